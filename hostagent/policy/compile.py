"""Policies -> what the kernel maps hold.

Two steps, because they change at different times:
- compile_ruleset(): one policy's rules -> LPM entries (prefix -> port ranges) and, for rules that
  name destinations by DNS name (fqdn, fqdnPattern), a name matcher and each rule's ports, on a
  policy change;
- Binder (hostagent.policy.bind): every cgroup on the node -> the policy that governs it, on a
  policy change and whenever cgroups or workload identities change.

The LPM trie answers with the longest matching prefix only, so each prefix must already carry
the ports of every rule whose network contains it (10.1.0.0/16 port 80 inside 10.0.0.0/8 port
443 is stored as 10.1.0.0/16 -> {80, 443}). Addresses are integers in the kernel's key form
(IPv4 as IPv4-mapped IPv6) so that the containment work stays cheap at 100k prefixes.

Names have no addresses until the node resolver answers for them, so they get no LPM entry here:
a rule whose ``to`` lists only names adds nothing to the trie (it must not become "any
destination"), and the resolver opens the answered addresses with FqdnRules' ports at runtime.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from hostagent.bpf.abi import MAX_PORT_RANGES, address_of, key_prefix
from hostagent.dns.names import NameMatcher
from hostagent.errors import PolicyCapacityError
from hostagent.policy.model import EgressRule, FQDNPeer, Policy, Protocol

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


def _port_order(entry: PortEntry) -> tuple[int, int, int, int]:
    return (entry.first, entry.last, entry.protocols, entry.rule)


@dataclass(frozen=True)
class FqdnRules:
    """A policy's fqdn / fqdnPattern peers: which egress rules a query name matches, and the
    port entries of each such rule (``ports``: rule index -> entries; a rule without ``ports``
    has the single all-ports entry, as in the LPM entries)."""

    matcher: NameMatcher
    ports: Mapping[int, tuple[PortEntry, ...]]

    def portentries(self, rules: Iterable[int]) -> tuple[PortEntry, ...]:
        """The sorted union of the port entries of ``rules`` (indices from ``matcher``).

        Always fits the kernel's MAX_PORT_RANGES: compile_ruleset checked that the entries of
        all of the policy's fqdn rules fit together. An index that is not an fqdn rule of this
        policy is a KeyError (a matcher from another ruleset)."""
        return tuple(sorted({e for rule in rules for e in self.ports[rule]}, key=_port_order))


@dataclass(frozen=True)
class Ruleset:
    """A policy's rules as LPM entries, and its DNS-name rules (``fqdn``: None when the policy
    names no fqdn or fqdnPattern peer); immutable once installed in the kernel."""

    policy: str
    rule_names: tuple[str, ...]
    entries: Mapping[Prefix, tuple[tuple[PortEntry, ...], bool]]   # -> (ports, RULE_NAMED)
    digest: str
    fqdn: FqdnRules | None = None
    rule_tickets: tuple[str | None, ...] = ()   # per rule: its ticket, else the policy's

    def __len__(self) -> int:
        return len(self.entries)


def _rule_ports(rule: EgressRule) -> tuple[PortEntry, ...]:
    ports = tuple(PortEntry(p.first, p.last, int(p.protocols), rule.index) for p in rule.ports)
    return ports or (PortEntry(*ALL_PORTS, rule.index),)


def _networks(policy: Policy) -> Iterable[tuple[Prefix, tuple[PortEntry, ...]]]:
    """The LPM entries each rule asks for. Only CIDR peers have prefixes; a rule listing only
    names yields none, and only an omitted ``to`` means any destination."""
    any_dest = [key_prefix(n) for n in _ANY]
    for rule in policy.egress:
        ports = _rule_ports(rule)
        if rule.any_destination:
            prefixes = any_dest
        else:
            prefixes = [key_prefix(peer.network) for peer in rule.cidrs]
        for prefix in prefixes:
            yield prefix, ports


def _fqdn_rules(policy: Policy) -> FqdnRules | None:
    """The matcher and ports of the rules that list names; None if no rule does.

    One address can be the answer for names of several rules (CDNs share addresses), and the
    resolver then opens it with the union of their ports in one kernel entry. Which names will
    share an address is not known here, so all fqdn rules' port entries must fit one entry.
    """
    entries: list[tuple[int, str, bool]] = []
    ports: dict[int, tuple[PortEntry, ...]] = {}
    for rule in policy.egress:
        peers = rule.fqdns
        if not peers:
            continue
        for peer in peers:
            if isinstance(peer, FQDNPeer):
                entries.append((rule.index, peer.name, False))
            else:
                entries.append((rule.index, peer.pattern, True))
        ports[rule.index] = tuple(sorted(set(_rule_ports(rule)), key=_port_order))
    if not ports:
        return None
    total = sum(len(p) for p in ports.values())
    if total > MAX_PORT_RANGES:
        rules = [rule for rule in policy.egress if rule.index in ports]
        raise PolicyCapacityError(
            f"policy {policy.name}: its {len(rules)} fqdn/fqdnPattern rules have {total} port "
            f"ranges together; the kernel map holds at most {MAX_PORT_RANGES} per destination, and "
            "one address can be the answer for names of every one of these rules (merge the "
            "rules' ports, or list names with the same ports in one rule)",
            path=policy.path, line=rules[0].line)
    return FqdnRules(NameMatcher(entries), MappingProxyType(ports))


_ANY = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _within(p: Prefix, outer: Sequence[Prefix]) -> bool:
    addr, plen = p
    return any(plen >= olen and addr & _mask(olen) == oaddr for oaddr, olen in outer)


def compile_ruleset(policy: Policy, metadata: Iterable) -> Ruleset:
    """The LPM entries of one policy, and its fqdn rules (Ruleset.fqdn).

    metadata: the node's protected networks (metadata endpoints with their NAT64 forms, and
    encrypted-DNS services). A prefix inside one is granted only by rules that name the endpoint
    itself: broader rules (0.0.0.0/0) never open it, and their ports do not leak into it.
    An entry is "named" (RULE_NAMED: may reach protected endpoints and DoT ports) when its
    prefix lies inside a protected network or is a single address.
    Raises PolicyCapacityError if a destination's, or the fqdn rules', port ranges do not fit.
    """
    fqdn = _fqdn_rules(policy)
    meta = [key_prefix(n) for n in metadata]
    direct: dict[Prefix, set[PortEntry]] = {}
    for prefix, ports in _networks(policy):
        direct.setdefault(prefix, set()).update(ports)

    lengths = sorted({plen for _, plen in direct})
    inside_meta = {p for p in direct if _within(p, meta)}
    entries: dict[Prefix, tuple[tuple[PortEntry, ...], bool]] = {}
    for prefix in direct:
        addr, plen = prefix
        inside = prefix in inside_meta
        grant = inside or plen == 128
        ranges: set[PortEntry] = set()
        for length in lengths:
            if length > plen:
                break
            outer = (addr & _mask(length), length)
            if outer in direct and (not inside or outer in inside_meta):
                ranges |= direct[outer]
        if len(ranges) > MAX_PORT_RANGES:
            raise PolicyCapacityError(
                f"policy {policy.name}: destination {_show(prefix)} is covered by "
                f"{len(ranges)} port ranges; the kernel map holds at most {MAX_PORT_RANGES} per "
                f"destination (merge rules or split the CIDR)", path=policy.path, line=policy.line)
        entries[prefix] = (tuple(sorted(ranges, key=_port_order)), grant)

    names = tuple(rule.name for rule in policy.egress)
    tickets = tuple(rule.ticket or policy.ticket for rule in policy.egress)
    content: tuple = (names, sorted(entries.items()))
    # Each only when present, so that a policy without them keeps the digest it always had.
    if fqdn is not None:
        content += (fqdn.matcher.digest(), sorted(fqdn.ports.items()))
    if any(tickets):
        content += (tickets,)
    h = hashlib.sha256(repr(content).encode())
    return Ruleset(policy.name, names, entries, h.hexdigest(), fqdn, tickets)


def _show(prefix: Prefix) -> str:
    addr, plen = prefix
    ip = address_of(addr.to_bytes(16, "big"))
    return f"{ip}/{plen - 96 if ip.version == 4 else plen}"


def compile_policies(policies: Iterable[Policy], protected_networks: Iterable) -> dict[str, Ruleset]:
    """Every policy's ruleset, by policy name. protected_networks: metadata and encrypted-DNS
    endpoints; only rules naming them open them (RULE_NAMED)."""
    protected = tuple(protected_networks)
    return {p.name: compile_ruleset(p, protected) for p in policies}
