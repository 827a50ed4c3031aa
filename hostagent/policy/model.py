"""The validated, immutable form of an egress policy.

Everything here has already passed validation (hostagent.policy.load): values are typed,
normalised and in range, so the compiler can trust them without re-checking. Objects are frozen
so a loaded policy set can be shared between the reload diff and the running state safely, and
each object keeps the line it came from so later stages can still point users at the YAML.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import FrozenInstanceError, dataclass

from hostagent.identity.labels import LabelSelector

__all__ = ["Mode", "Protocol", "PortRange", "CIDRPeer", "FQDNPeer", "FQDNPatternPeer", "Peer",
           "EgressRule", "KubernetesSelector", "ContainerSelector", "SelectorKind", "Selector", "Policy"]


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


class CIDRPeer:
    """A destination network; a bare address was widened to /32 or /128.

    Behaves as a frozen dataclass with the one field ``network`` would (construction, equality,
    hash, repr, immutability), but a policy may hold 100k of these, and an ipaddress network
    object took longer to build than everything else about loading its line, and 540 bytes
    where the peer alone takes 150 (measured); the compiler needs only integers (``key``). So
    a peer made by ``from_key`` builds its network object when ``network`` is first read.
    """

    __slots__ = ("key", "_network")
    __match_args__ = ("network",)

    key: tuple[int, int, int]   # (IP version, network address as an integer, prefix length)

    def __init__(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise TypeError(f"CIDRPeer needs an IPv4Network or IPv6Network, got {network!r}")
        _set(self, "key", (network.version, int(network.network_address), network.prefixlen))
        _set(self, "_network", network)

    @classmethod
    def from_key(cls, version: int, address: int, prefixlen: int) -> CIDRPeer:
        """The peer of a network given as integers that are already known to make one (no
        host bits set): what the loader has after reading the text."""
        peer = _new(cls)
        _set(peer, "key", (version, address, prefixlen))
        _set(peer, "_network", None)
        return peer

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        network = self._network
        if network is None:
            version, address, prefixlen = self.key
            cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            network = cls((address, prefixlen))
            _set(self, "_network", network)
        return network

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.key == other.key   # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"CIDRPeer(network={self.network!r})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self):
        return (CIDRPeer, (self.network,))


_new = object.__new__
_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class FQDNPeer:
    """A destination by DNS name: the addresses the node resolver answers for ``name``.

    ``name`` is normalised (hostagent.dns.names.normalize_name): lower case, no trailing dot,
    A-label form for internationalised names.
    """

    name: str


@dataclass(frozen=True, slots=True)
class FQDNPatternPeer:
    """Destinations by DNS name pattern: one or more leading ``*`` labels, each matching one or
    more labels, then fixed labels (``*.example.com`` matches ``a.b.example.com``, never
    ``example.com``). Normalised by hostagent.dns.names.normalize_pattern; docs/fqdn.md."""

    pattern: str


Peer = CIDRPeer | FQDNPeer | FQDNPatternPeer


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One entry of ``spec.egress``: destinations x ports that are allowed.

    ``to == ()`` means the YAML omitted ``to`` (any destination, as in Kubernetes
    NetworkPolicy); an explicit empty list is rejected at load time, so the two cannot be
    confused. A ``to`` listing only names (fqdn, fqdnPattern) allows only the addresses those
    names resolve to, never any destination. ``ports == ()`` means all ports, TCP and UDP.
    """

    index: int
    name: str
    to: tuple[Peer, ...]
    ports: tuple[PortRange, ...]
    line: int
    ticket: str | None = None   # the change ticket that approved this rule (events carry it)

    @property
    def any_destination(self) -> bool:
        return not self.to

    @property
    def cidrs(self) -> tuple[CIDRPeer, ...]:
        """The peers given as networks, in YAML order."""
        return tuple(p for p in self.to if isinstance(p, CIDRPeer))

    @property
    def fqdns(self) -> tuple[FQDNPeer | FQDNPatternPeer, ...]:
        """The peers given as DNS names or patterns, in YAML order."""
        return tuple(p for p in self.to if isinstance(p, (FQDNPeer, FQDNPatternPeer)))

    @property
    def all_ports(self) -> bool:
        return not self.ports


@dataclass(frozen=True, slots=True)
class KubernetesSelector:
    """Pods by Kubernetes identity; every given field must match (absent = any).

    Label selectors have Kubernetes semantics (hostagent.identity.labels). A pod is selected
    only once its metadata is known; until then its cgroup gets the node's pending action.
    """

    namespace: str | None
    namespace_selector: LabelSelector | None
    service_account: str | None
    pod_selector: LabelSelector | None

    def specificity(self) -> int:
        """How many requirements it states: with equal precedence, more requirements win."""
        return ((self.namespace is not None) + (self.service_account is not None)
                + (self.namespace_selector.specificity() if self.namespace_selector else 0)
                + (self.pod_selector.specificity() if self.pod_selector else 0))


@dataclass(frozen=True, slots=True)
class ContainerSelector:
    """Containers by runtime id (the full 64-hex id, or a prefix of at least 12 hex digits as
    Docker prints them) and/or by name (a Kubernetes container name from the pod's status)."""

    id: str | None
    name: str | None

    def specificity(self) -> int:
        return (self.id is not None) + (self.name is not None)


class SelectorKind(enum.Enum):
    """The kinds of selector, strongest precedence first: when policies of different kinds
    select the same cgroup, the narrower identity wins."""

    CONTAINER = "container"
    KUBERNETES = "kubernetes"
    SYSTEMD_UNIT = "systemdUnit"
    CGROUP_PATH = "cgroupPath"


@dataclass(frozen=True, slots=True)
class Selector:
    """Which cgroups a policy selects. Exactly one of the fields is set.

    cgroup_path: a normalised glob over cgroup paths (hostagent.policy.selector).
    systemd_unit: a glob over unit names ("agent-*.service"); selects the unit's own cgroup.
    kubernetes: selects pod cgroups; their containers inherit.
    container: selects container cgroups.
    A selected cgroup governs its descendants unless one of them is selected itself.
    """

    line: int
    cgroup_path: str | None = None
    systemd_unit: str | None = None
    kubernetes: KubernetesSelector | None = None
    container: ContainerSelector | None = None

    @property
    def kind(self) -> SelectorKind:
        if self.container is not None:
            return SelectorKind.CONTAINER
        if self.kubernetes is not None:
            return SelectorKind.KUBERNETES
        if self.systemd_unit is not None:
            return SelectorKind.SYSTEMD_UNIT
        return SelectorKind.CGROUP_PATH


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
    ticket: str | None = None   # metadata.ticket: the rules' ticket where they name none
