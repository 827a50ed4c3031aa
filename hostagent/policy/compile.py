"""Policies -> what the kernel maps hold.

Two steps, because they change at different times:
- compile_ruleset(): one policy's rules -> LPM entries (prefix -> port ranges), on a policy change;
- Binder (hostagent.policy.bind): every cgroup on the node -> the policy that governs it, on a
  policy change and whenever cgroups or workload identities change.

The LPM trie answers with the longest matching prefix only, so each prefix must already carry
the ports of every rule whose network contains it (10.1.0.0/16 port 80 inside 10.0.0.0/8 port
443 is stored as 10.1.0.0/16 -> {80, 443}). Addresses are integers in the kernel's key form
(IPv4 as IPv4-mapped IPv6) so that the containment work stays cheap at 100k prefixes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hostagent.bpf.abi import MAX_PORT_RANGES, address_of, key_prefix
from hostagent.errors import PolicyCapacityError
from hostagent.policy.model import Policy, Protocol

Prefix = tuple[int, int]  # (128-bit address in key form, prefix length 0..128)


@dataclass(frozen=True, slots=True)
class PortEntry:
    first: int
    last: int
    protocols: int   # PROTO_BIT_*
    rule: int        # index of the policy's egress rule


ALL_PORTS = (0, 65535, int(Protocol.ANY))
_FULL = (1 << 128) - 1


def _mask(plen: int) -> int:
    return _FULL ^ ((1 << (128 - plen)) - 1) if plen else 0


@dataclass(frozen=True)
class Ruleset:
    """A policy's rules as LPM entries; immutable once installed in the kernel."""

    policy: str
    rule_names: tuple[str, ...]
    entries: Mapping[Prefix, tuple[tuple[PortEntry, ...], bool]]   # -> (ports, metadata grant)
    digest: str

    def __len__(self) -> int:
        return len(self.entries)


def _networks(policy: Policy) -> Iterable[tuple[Prefix, tuple[PortEntry, ...]]]:
    any_dest = [key_prefix(n) for n in _ANY]
    for rule in policy.egress:
        ports = tuple(PortEntry(p.first, p.last, int(p.protocols), rule.index) for p in rule.ports)
        if not ports:
            ports = (PortEntry(*ALL_PORTS, rule.index),)
        prefixes = [key_prefix(peer.network) for peer in rule.to] if rule.to else any_dest
        for prefix in prefixes:
            yield prefix, ports


_ANY = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _within(p: Prefix, outer: Sequence[Prefix]) -> bool:
    addr, plen = p
    return any(plen >= olen and addr & _mask(olen) == oaddr for oaddr, olen in outer)


def compile_ruleset(policy: Policy, metadata: Iterable) -> Ruleset:
    """The LPM entries of one policy.

    metadata: the node's blocked metadata networks (ip_network objects, NAT64 forms included).
    A prefix inside a metadata endpoint is granted only by rules that name the endpoint itself:
    broader rules (0.0.0.0/0) never open it, and their ports do not leak into it.
    """
    meta = [key_prefix(n) for n in metadata]
    direct: dict[Prefix, set[PortEntry]] = {}
    for prefix, ports in _networks(policy):
        direct.setdefault(prefix, set()).update(ports)

    lengths = sorted({plen for _, plen in direct})
    inside_meta = {p for p in direct if _within(p, meta)}
    entries: dict[Prefix, tuple[tuple[PortEntry, ...], bool]] = {}
    for prefix in direct:
        addr, plen = prefix
        grant = prefix in inside_meta
        ranges: set[PortEntry] = set()
        for length in lengths:
            if length > plen:
                break
            outer = (addr & _mask(length), length)
            if outer in direct and (not grant or outer in inside_meta):
                ranges |= direct[outer]
        if len(ranges) > MAX_PORT_RANGES:
            raise PolicyCapacityError(
                f"policy {policy.name}: destination {_show(prefix)} is covered by "
                f"{len(ranges)} port ranges; the kernel map holds at most {MAX_PORT_RANGES} per "
                f"destination (merge rules or split the CIDR)", path=policy.path, line=policy.line)
        entries[prefix] = (tuple(sorted(ranges, key=lambda r: (r.first, r.last, r.protocols,
                                                                r.rule))), grant)

    names = tuple(rule.name for rule in policy.egress)
    h = hashlib.sha256(repr((names, sorted(entries.items()))).encode())
    return Ruleset(policy.name, names, entries, h.hexdigest())


def _show(prefix: Prefix) -> str:
    addr, plen = prefix
    ip = address_of(addr.to_bytes(16, "big"))
    return f"{ip}/{plen - 96 if ip.version == 4 else plen}"
