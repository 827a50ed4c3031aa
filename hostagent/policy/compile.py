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

A 100k-CIDR policy is compiled on every change of it, so the per-prefix work is kept to a few
dict operations: the peers of one rule share one port tuple, nesting is looked for only at the
prefix lengths the policy actually uses, and the digest is written out directly rather than
through repr() of 100k dataclass instances (same text, same digest). RulesetCache skips the
compile of a policy that has not changed since the last call.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from hostagent.bpf.abi import MAX_PORT_RANGES, address_of, key_prefix
from hostagent.dns.names import NameMatcher
from hostagent.errors import PolicyCapacityError
from hostagent.policy.load import gc_paused
from hostagent.policy.model import CIDRPeer, EgressRule, FQDNPeer, Policy, Protocol

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


def _sorted_ports(ports: Iterable[PortEntry]) -> tuple[PortEntry, ...]:
    return tuple(sorted(set(ports), key=_port_order))


_V4_MAPPED = key_prefix(ipaddress.ip_network("0.0.0.0/0"))[0]


def _direct(policy: Policy) -> dict[Prefix, tuple[PortEntry, ...]]:
    """Each prefix the rules name, with the sorted port entries of every rule that names it.
    Only CIDR peers have prefixes; a rule listing only names yields none, and only an omitted
    ``to`` means any destination. Prefixes of one rule share its tuple (see _union)."""
    any_dest = [key_prefix(n) for n in _ANY]
    direct: dict[Prefix, tuple[PortEntry, ...]] = {}
    unions: dict = {}
    for rule in policy.egress:
        ports = _sorted_ports(_rule_ports(rule))
        if rule.any_destination:
            prefixes = any_dest
        else:
            # key_prefix() on the peer's integers (CIDRPeer.key), without a network object:
            # this loop runs once per CIDR of the policy
            prefixes = []
            for peer in rule.to:
                if type(peer) is CIDRPeer:
                    version, address, length = peer.key
                    if version == 4:
                        prefixes.append((_V4_MAPPED | address, 96 + length))
                    else:
                        prefixes.append((address, length))
        for prefix in prefixes:
            have = direct.setdefault(prefix, ports)
            if have is not ports:
                direct[prefix] = _union(unions, (have, ports))
    return direct


def _union(memo: dict, parts: tuple[tuple[PortEntry, ...], ...]) -> tuple[PortEntry, ...]:
    """The sorted union of port tuples, one tuple object per distinct union (memo)."""
    got = memo.get(parts)
    if got is None:
        got = memo[parts] = _sorted_ports(e for part in parts for e in part)
    return got


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


def compile_ruleset(policy: Policy, metadata: Iterable) -> Ruleset:
    """The LPM entries of one policy, and its fqdn rules (Ruleset.fqdn).

    metadata: the node's protected networks (metadata endpoints with their NAT64 forms, and
    encrypted-DNS services). A prefix inside one is granted only by rules that name the endpoint
    itself: broader rules (0.0.0.0/0) never open it, and their ports do not leak into it.
    An entry is "named" (RULE_NAMED: may reach protected endpoints and DoT ports) when its
    prefix lies inside a protected network or is a single address.
    Raises PolicyCapacityError if a destination's, or the fqdn rules', port ranges do not fit.
    """
    with gc_paused():
        return _compile_ruleset(policy, [key_prefix(n) for n in metadata])


def _compile_ruleset(policy: Policy, meta: list[Prefix]) -> Ruleset:
    fqdn = _fqdn_rules(policy)
    direct = _direct(policy)
    # (address << 8) | length: sorts as (address, length) does, three times faster
    codes = sorted([(addr << 8) | plen for addr, plen in direct])
    inside_meta = _inside(codes, meta)
    lengths = sorted({plen for _, plen in direct})
    # for each prefix length, the shorter lengths in use and their masks: a prefix can only be
    # nested in prefixes of those lengths (almost always none, or one or two)
    shorter = {plen: [(length, _mask(length)) for length in lengths if length < plen]
               for plen in lengths}
    unions: dict = {}
    # In address order: the digest is of the sorted entries, and the kernel's LPM trie takes
    # 100k entries a quarter faster sorted than in YAML order (measured).
    entries: dict[Prefix, tuple[tuple[PortEntry, ...], bool]] = {}
    texts: list[str] = []   # each entry as repr() writes it, for the digest
    ends: dict[tuple[int, bool], str] = {}   # (id(port tuple), named) -> its part of that text
    too_many: list[Prefix] = []
    for code in codes:
        addr, plen = prefix = (code >> 8, code & 0xFF)
        ranges = direct[prefix]
        inside = prefix in inside_meta if inside_meta else False
        outers = shorter[plen]
        if outers:
            parts = [ranges]
            for length, mask in outers:
                outer = (addr & mask, length)
                if outer in direct and (not inside or outer in inside_meta):
                    parts.append(direct[outer])
            if len(parts) > 1:
                ranges = _union(unions, tuple(parts))
        if len(ranges) > MAX_PORT_RANGES:
            too_many.append(prefix)
        named = inside or plen == 128
        entries[prefix] = (ranges, named)
        end = ends.get((id(ranges), named))
        if end is None:
            end = ends[(id(ranges), named)] = f"({ranges!r}, {named}))"
        texts.append(f"(({addr}, {plen}), {end}")
    if too_many:   # the first in YAML order, as a user reads the policy
        over = set(too_many)
        prefix = next(p for p in direct if p in over)
        raise PolicyCapacityError(
            f"policy {policy.name}: destination {_show(prefix)} is covered by "
            f"{len(entries[prefix][0])} port ranges; the kernel map holds at most "
            f"{MAX_PORT_RANGES} per destination (merge rules or split the CIDR)",
            path=policy.path, line=policy.line)

    names = tuple(rule.name for rule in policy.egress)
    tickets = tuple(rule.ticket or policy.ticket for rule in policy.egress)
    # The digest is of repr((names, sorted(entries.items()), *rest)), as it always was, with
    # rest only when present, so that a policy without them keeps the digest it always had;
    # the entries' text is written above (repr() of 100k dataclass instances is slow).
    rest: tuple = ()
    if fqdn is not None:
        rest += (fqdn.matcher.digest(), sorted(fqdn.ports.items()))
    if any(tickets):
        rest += (tickets,)
    listed = "[" + ", ".join(texts) + "]"
    content = "(" + ", ".join([repr(names), listed, *map(repr, rest)]) + ")"
    h = hashlib.sha256(content.encode())
    return Ruleset(policy.name, names, entries, h.hexdigest(), fqdn, tickets)


def _inside(codes: list[int], meta: Sequence[Prefix]) -> set[Prefix]:
    """The prefixes (as sorted codes) that lie inside one of the protected networks: those
    whose address is in the network's range and whose length is at least the network's."""
    found: set[Prefix] = set()
    for oaddr, olen in meta:
        lo = bisect.bisect_left(codes, oaddr << 8)
        hi = bisect.bisect_right(codes, ((oaddr | (_FULL ^ _mask(olen))) << 8) | 0xFF)
        found.update((code >> 8, code & 0xFF) for code in codes[lo:hi] if code & 0xFF >= olen)
    return found


def _show(prefix: Prefix) -> str:
    addr, plen = prefix
    ip = address_of(addr.to_bytes(16, "big"))
    return f"{ip}/{plen - 96 if ip.version == 4 else plen}"


def compile_policies(policies: Iterable[Policy], protected_networks: Iterable) -> dict[str, Ruleset]:
    """Every policy's ruleset, by policy name. protected_networks: metadata and encrypted-DNS
    endpoints; only rules naming them open them (RULE_NAMED)."""
    return RulesetCache().compile(policies, protected_networks)


class RulesetCache:
    """compile_policies for a caller that compiles again and again (the agent's reloads).

    A policy that is the very object compiled by the previous call, with the same protected
    networks, gets the same Ruleset back without compiling: PolicyDirLoader hands back the same
    Policy objects for the files that did not change, so a reload compiles only what changed.
    Identity, not equality: an equal but different object is compiled again (comparing two
    100k-CIDR policies costs about as much as compiling one). Only the last call's policies are
    kept. Not thread-safe.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[Policy, tuple, Ruleset]] = {}   # by id() of the policy
        self.compiled: list[str] = []   # the policies the last compile() compiled (not reused)

    def compile(self, policies: Iterable[Policy], protected_networks: Iterable) -> dict[str, Ruleset]:
        """As compile_policies(); PolicyCapacityError leaves the cache as it was."""
        protected = tuple(protected_networks)
        out: dict[str, Ruleset] = {}
        kept: dict[int, tuple[Policy, tuple, Ruleset]] = {}
        compiled = []
        with gc_paused():
            meta = [key_prefix(n) for n in protected]
            for p in policies:
                hit = self._last.get(id(p))
                if hit is not None and hit[0] is p and hit[1] == protected:
                    ruleset = hit[2]
                else:
                    ruleset = _compile_ruleset(p, meta)
                    compiled.append(p.name)
                kept[id(p)] = (p, protected, ruleset)
                out[p.name] = ruleset
        self._last, self.compiled = kept, compiled
        return out
