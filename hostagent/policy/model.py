"""The validated, immutable form of an egress policy.

Everything here has already passed validation (hostagent.policy.load): values are typed,
normalised and in range, so the compiler can trust them without re-checking. Objects are frozen
so a loaded policy set can be shared between the reload diff and the running state safely, and
each object keeps the line it came from so later stages can still point users at the YAML.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

__all__ = ["Mode", "Protocol", "PortRange", "CIDRPeer", "EgressRule", "Selector", "Policy"]


class Mode(enum.Enum):
    """What happens to a connection no rule allows."""

    ENFORCE = "enforce"  # denied in the kernel and reported
    AUDIT = "audit"  # allowed, but reported as "would have been denied"


class Protocol(enum.IntFlag):
    """Transport protocols a port range applies to.

    The bit values are shared with the kernel ABI (bpf/lib/abi.h): never renumber them.
    """

    TCP = 1
    UDP = 2
    ANY = 3  # TCP | UDP


@dataclass(frozen=True, slots=True)
class PortRange:
    """Destination ports ``first..last`` (inclusive, 1-65535) for ``protocols``."""

    first: int
    last: int
    protocols: Protocol


@dataclass(frozen=True, slots=True)
class CIDRPeer:
    """A destination network; a bare address was widened to /32 or /128."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One entry of ``spec.egress``: destinations x ports that are allowed.

    ``to == ()`` means the YAML omitted ``to`` (any destination, as in Kubernetes
    NetworkPolicy); an explicit empty list is rejected at load time, so the two cannot be
    confused. ``ports == ()`` means all ports, TCP and UDP.
    """

    index: int
    name: str
    to: tuple[CIDRPeer, ...]
    ports: tuple[PortRange, ...]
    line: int

    @property
    def any_destination(self) -> bool:
        return not self.to

    @property
    def all_ports(self) -> bool:
        return not self.ports


@dataclass(frozen=True, slots=True)
class Selector:
    """Which cgroups a policy selects: a normalised glob (see hostagent.policy.selector)."""

    cgroup_path: str
    line: int


@dataclass(frozen=True, slots=True)
class Policy:
    """One ``EgressPolicy`` document.

    ``path`` is the file it came from and ``line`` the first line of the document's content.
    An empty ``egress`` allows nothing.
    """

    name: str
    selector: Selector
    mode: Mode
    allow_raw_sockets: bool
    egress: tuple[EgressRule, ...]
    path: str
    line: int
