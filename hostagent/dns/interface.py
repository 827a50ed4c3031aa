"""Giving dns.listen an address pods can reach.

A pod in its own network namespace cannot reach the node's loopback, so on Kubernetes the
resolver listens on an address of the node every pod routes to, a link-local one on a dummy
interface, as NodeLocal DNSCache does (169.254.20.10). When dns.listen names an address no
interface has yet, the agent creates that interface (dns.interface) and puts the address on
it (or on `lo`, for kernels without dummy interfaces); an address that is already there
(loopback, the node's own, one the operator made) is left alone. The address stays when the
agent stops, like the pinned programs that send DNS to it; `hostagent uninstall` removes it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostagent.errors import SetupError

log = logging.getLogger(__name__)
IFA_F_NODAD = 0x02   # no duplicate address detection: the address is usable at once


def _local(ipr: IPRoute, addr) -> bool:
    family = 6 if addr.version == 6 else 2
    for msg in ipr.get_addr(family=family):
        if ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")) == addr:
            return True
    return addr.is_loopback and addr.version == 4   # 127/8 is all local on lo


def ensure_listen_address(host: str, interface: str | None) -> str | None:
    """Make `host` a local address. Returns what was done, None if nothing was needed."""
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        return None
    with IPRoute() as ipr:
        if _local(ipr, addr):
            return None
        if not interface:
            raise SetupError(f"dns.listen {host}: no interface has this address, and "
                             "dns.interface is null: add the address, or name an interface "
                             "for the agent to put it on")
        try:
            links = ipr.link_lookup(ifname=interface)
            if not links:
                try:
                    ipr.link("add", ifname=interface, kind="dummy")
                except NetlinkError as err:
                    if err.code == errno.EOPNOTSUPP:
                        raise SetupError(
                            f"dns.listen {host}: this kernel has no dummy interfaces to create "
                            f"{interface} with; set dns.interface: lo (any local address "
                            "serves pods routed to the node)") from None
                    raise
                links = ipr.link_lookup(ifname=interface)
            index = links[0]
            ipr.link("set", index=index, state="up")
            ipr.addr("add", index=index, address=str(addr),
                     prefixlen=128 if addr.version == 6 else 32,
                     **({"flags": IFA_F_NODAD} if addr.version == 6 else {}))
        except NetlinkError as err:
            raise SetupError(f"dns.listen {host}: cannot put it on interface {interface}: "
                             f"{os.strerror(err.code)}") from None
    log.info("dns.listen %s: added to interface %s", host, interface)
    return f"added {host} to {interface}"


def remove_listen_address(host: str, interface: str | None) -> list[str]:
    """uninstall: the address the agent put on dns.interface, and the interface itself if it
    is a dummy left with no address (never any other kind of link)."""
    done: list[str] = []
    if not interface:
        return done
    addr = ipaddress.ip_address(host)
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            return done
        index = links[0]
        family = 6 if addr.version == 6 else 2
        for msg in ipr.get_addr(family=family, index=index):
            if ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")) == addr:
                ipr.addr("del", index=index, address=str(addr), prefixlen=msg["prefixlen"])
                done.append(f"removed {host} from {interface}")
        (link,) = ipr.get_links(index)
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind == "dummy" and not ipr.get_addr(index=index):
            ipr.link("del", index=index)
            done.append(f"removed interface {interface}")
    return done
