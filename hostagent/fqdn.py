"""FQDN rules in the kernel: what the node resolver may answer, and what its answers open.

The resolver (hostagent.dns) knows nothing of policies or maps; DnsGate is the one object it
talks to (its ResolverHooks):
- attribute(): which socket sent a query, from the kernel's dns_clients map (written by the skb
  hook when the packet left), never from the packet;
- check(): may that workload resolve that name, under the binding in force for its cgroup;
- allow(): open the answer's addresses for that workload (fqdn_v1), before the answer leaves.

Allowances mirrors fqdn_v1 and is its only writer. An entry is (cgroup, address) -> the rules
that allowed it (their ports, through a shared port set), the names it was answered for, and
its expiry (TTL + grace), which the kernel checks itself; sweep() only frees memory.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hostagent.bpf import abi
from hostagent.bpf.syscall import MapLookup
from hostagent.config import DefaultAction, DnsConfig
from hostagent.dns.hooks import Client, NameVerdict
from hostagent.errors import PolicyCapacityError
from hostagent.policy.compile import PortEntry, Ruleset

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RECENT_NAMES = 65536  # (workload, address) -> name, for connection events; bounded LRU
# struct fqdn_key and struct dns_client_key of bpf/lib/abi.h (tests/test_abi.py checks sizes)
_FQDN_KEY = struct.Struct("<Q16s")
_CLIENT_KEY = struct.Struct("<16sHBx")
_CLIENT_VALUE = struct.Struct("<QQ")  # struct dns_client: cgroup_id, sock_cookie
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def source_key(text: str) -> bytes:
    """abi.address_key() of an address in text form, with inet_pton rather than ipaddress:
    the resolver attributes every query by its source, so this is on its hot path."""
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)


@dataclass(frozen=True, slots=True)
class Grant:
    """What check() hands the resolver for an allowed name, and allow() writes."""

    ruleset_id: int
    rules: frozenset[int]          # egress rule indices whose fqdn/fqdnPattern matched
    ports: tuple[PortEntry, ...] | None   # None: audit or node default, nothing to open
    named: bool                    # a rule lists the exact name (FQDN_NAMED)


@dataclass(slots=True)
class _Entry:
    ruleset_id: int
    rules: frozenset[int]
    named: bool
    expires_ns: int
    portset: int
    names: set[str]


class Allowances:
    """The mirror of fqdn_v1. Thread-safe: the resolver grants, the main loop sweeps."""

    def __init__(self, programs, enforcement, grace: int, capacity: int) -> None:
        self._table = programs["fqdn"]
        self._enf = enforcement
        self._grace_ns = grace * 1_000_000_000
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, bytes], _Entry] = {}
        self._recent: OrderedDict[tuple[int, bytes], str] = OrderedDict()
        self.granted = 0
        self.expired = 0
        self.failures = 0
        self._adopt()

    def _adopt(self) -> None:
        """A previous agent's allowances keep working until they expire: their port sets are
        held so nothing reuses them meanwhile. Their names are not known any more."""
        now = time.monotonic_ns()
        for key, value in self._table.items():
            k = _FQDN_KEY.unpack(bytes(key))
            if value.expires_ns <= now:
                del self._table[key]
                continue
            self._enf.adopt_portset(value.portset_id)
            self._entries[k] = _Entry(0, frozenset(), bool(value.flags & abi.FQDN_NAMED),
                                      value.expires_ns, value.portset_id, set())

    def __len__(self) -> int:
        return len(self._entries)

    def grant(self, cgid: int, grant: Grant, name: str,
              addrs: Sequence[tuple[IPAddress, int]]) -> None:
        """Open addrs (with their TTLs) for cgroup cgid. Raises when the map is full: the
        resolver then answers SERVFAIL, so a name is never answered without its allowance."""
        now = time.monotonic_ns()
        with self._lock:
            for addr, _ in addrs:
                self._remember(cgid, abi.address_key(addr), name)
            if grant.ports is None:
                return
            for addr, ttl in addrs:
                k = (cgid, abi.address_key(addr))
                expires = now + ttl * 1_000_000_000 + self._grace_ns
                old = self._entries.get(k)
                if old is not None and old.expires_ns > now and old.ruleset_id == grant.ruleset_id:
                    if grant.rules <= old.rules and expires <= old.expires_ns:
                        old.names.add(name)
                        continue
                    rules = old.rules | grant.rules
                    named = old.named or grant.named
                    expires = max(expires, old.expires_ns)
                    names = old.names | {name}
                else:
                    rules, named, names = grant.rules, grant.named, {name}
                if old is None and len(self._entries) >= self.capacity:
                    self._sweep_locked(now)
                    if len(self._entries) >= self.capacity:
                        self.failures += 1
                        raise PolicyCapacityError(
                            f"dns.maxAllowances ({self.capacity}) reached: cannot open {addr} "
                            f"for {name}")
                ports = self._ports_of(grant, rules)
                self._write(k, _Entry(grant.ruleset_id, rules, named, expires,
                                      self._enf.hold_portset(ports), names), old)
                self.granted += 1

    def _ports_of(self, grant: Grant, rules: frozenset[int]) -> tuple[PortEntry, ...]:
        if rules == grant.rules:
            return grant.ports
        ruleset = self._enf.ruleset(grant.ruleset_id)
        return ruleset.fqdn.portentries(rules) if ruleset and ruleset.fqdn else grant.ports

    def _write(self, k: tuple[int, bytes], entry: _Entry, old: _Entry | None) -> None:
        key = self._table.Key.from_buffer_copy(_FQDN_KEY.pack(*k))
        self._table[key] = self._table.Leaf(expires_ns=entry.expires_ns,
                                            portset_id=entry.portset,
                                            flags=abi.FQDN_NAMED if entry.named else 0)
        self._entries[k] = entry
        if old is not None:
            self._enf.release_portset(old.portset)

    def _delete(self, k: tuple[int, bytes]) -> None:
        entry = self._entries.pop(k)
        key = self._table.Key.from_buffer_copy(_FQDN_KEY.pack(*k))
        try:
            del self._table[key]
        except KeyError:
            pass  # gone already: deletion is the goal
        self._enf.release_portset(entry.portset)

    def _remember(self, cgid: int, addr: bytes, name: str) -> None:
        k = (cgid, addr)
        self._recent[k] = name
        self._recent.move_to_end(k)
        if len(self._recent) > _RECENT_NAMES:
            self._recent.popitem(last=False)

    def name_of(self, cgid: int, addr: bytes) -> str | None:
        """The name a workload resolved an address from, for its connection events."""
        if not self._recent:   # no lock for the common case: nothing resolved recently
            return None
        with self._lock:
            return self._recent.get((cgid, addr))

    def sweep(self) -> int:
        with self._lock:
            return self._sweep_locked(time.monotonic_ns())

    def _sweep_locked(self, now: int) -> int:
        gone = [k for k, e in self._entries.items() if e.expires_ns <= now]
        for k in gone:
            self._delete(k)
        self.expired += len(gone)
        return len(gone)

    def forget(self, cgids: Iterable[int]) -> None:
        """Cgroups that are gone: their allowances with them."""
        cgids = set(cgids)
        with self._lock:
            for k in [k for k in self._entries if k[0] in cgids]:
                self._delete(k)
            for k in [k for k in self._recent if k[0] in cgids]:
                del self._recent[k]

    def rebound(self, cgids: Iterable[int], recheck: Callable[[int, str], Grant | None]) -> None:
        """Cgroups whose binding changed: keep what the new policy still allows, with the new
        policy's ports; close the rest at once."""
        cgids = set(cgids)
        now = time.monotonic_ns()
        with self._lock:
            for k in [k for k in self._entries if k[0] in cgids]:
                entry = self._entries[k]
                grants = [g for g in (recheck(k[0], n) for n in entry.names) if g and g.ports]
                if not grants:
                    self._delete(k)
                    continue
                ruleset_id = grants[0].ruleset_id
                rules = frozenset().union(*(g.rules for g in grants
                                            if g.ruleset_id == ruleset_id))
                ruleset = self._enf.ruleset(ruleset_id)
                if ruleset is None or ruleset.fqdn is None:
                    self._delete(k)
                    continue
                ports = ruleset.fqdn.portentries(rules)
                named = any(g.named for g in grants)
                self._write(k, _Entry(ruleset_id, rules, named, max(entry.expires_ns, now),
                                      self._enf.hold_portset(ports), entry.names), entry)


class SenderTable:
    """Who sent from a source address and port: the kernel's dns_clients records, read once per
    socket rather than once per query.

    A bpf() lookup costs ~2 µs, a tenth of a cached answer's whole budget. The skb hook bumps
    dns_senders_gen (an mmapped counter, read without a syscall) after every record it
    changes, and it does so before the packet that changed it reaches the resolver. So what
    was read while the counter read g is the kernel's record for as long as it still reads g;
    once it moves, the memo is dropped and each source is looked up again. A source port
    reused by another socket (another workload) always moves it. Used by the resolver's
    thread only.
    """

    MAX_MEMO = 65536

    def __init__(self, clients_fd: int, gen_fd: int) -> None:
        self._lookup = MapLookup(clients_fd, _CLIENT_KEY.size, _CLIENT_VALUE.size)
        self._gen_map = mmap.mmap(gen_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self._gen = memoryview(self._gen_map).cast("Q")
        self._memo: dict[tuple[str, int, int], Client] = {}
        self._memo_gen = -1
        self._keys: dict[str, bytes] = {}

    def client(self, src_ip: str, src_port: int, proto: int) -> Client | None:
        gen = self._gen[0]
        if gen != self._memo_gen:
            self._memo.clear()  # every record may have changed: start over
            self._memo_gen = gen
        else:
            hit = self._memo.get((src_ip, src_port, proto))
            if hit is not None:
                return hit
        key = self._keys.get(src_ip)
        if key is None:
            if len(self._keys) >= self.MAX_MEMO:
                self._keys.clear()
            key = self._keys[src_ip] = source_key(src_ip)
        raw = self._lookup.lookup(_CLIENT_KEY.pack(key, src_port, proto))
        client = None if raw is None else Client(*_CLIENT_VALUE.unpack(raw))
        if client is not None:  # an unknown source is asked again: it may be written soon
            if len(self._memo) >= self.MAX_MEMO:
                self._memo.clear()
            self._memo[(src_ip, src_port, proto)] = client
        return client


_DEFAULT_VERDICT = {DefaultAction.ALLOW: "allow", DefaultAction.AUDIT: "audit",
                    DefaultAction.DENY: "deny"}


class DnsGate:
    """The resolver's hooks (hostagent.dns.hooks.ResolverHooks), over the enforcement state.

    binding_of(cgid) gives the binding tuple in force for a cgroup (its own, else its nearest
    bound ancestor's), as the kernel would find it; None when none.
    """

    def __init__(self, programs, enforcement, allowances: Allowances, cfg: DnsConfig,
                 default_action: DefaultAction,
                 binding_of: Callable[[int], tuple | None]) -> None:
        self._senders = SenderTable(programs["dns_clients"].map_fd,
                                    programs["dns_senders_gen"].map_fd)
        self._enf = enforcement
        self.allowances = allowances
        self._default = default_action
        self._binding_of = binding_of
        self._encrypted_names = frozenset(cfg.encrypted_dns_names)
        self.events: deque[dict] = deque(maxlen=100_000)   # drained by the main loop
        self.events_dropped = 0
        self._explicit: dict[str, Callable[[IPAddress], bool]] = {}

    # -- ResolverHooks ----------------------------------------------------------------------------

    def attribute(self, src_ip: str, src_port: int, proto: int) -> Client | None:
        return self._senders.client(src_ip, src_port, proto)

    def check(self, client: Client, qname: str) -> NameVerdict:
        return self._check(client.cgroup_id, qname)

    def allow(self, client: Client, verdict: NameVerdict, qname: str,
              addrs: Sequence[tuple[IPAddress, int]]) -> None:
        if isinstance(verdict.grant, Grant):
            self.allowances.grant(client.cgroup_id, verdict.grant, qname, addrs)

    def emit(self, event: dict) -> None:
        if len(self.events) == self.events.maxlen:
            self.events_dropped += 1
        self.events.append(event)

    # -- policy -----------------------------------------------------------------------------------

    def _check(self, cgid: int, qname: str) -> NameVerdict:
        b = self._binding_of(cgid)
        if b is None:
            return NameVerdict(_DEFAULT_VERDICT[self._default], "node_default", None, None)
        ruleset_id, _policy_id, mode, flags = b[:4]
        if flags & (abi.BINDING_PENDING | abi.BINDING_CONFLICT):
            reason = "selector_conflict" if flags & abi.BINDING_CONFLICT else "pending_identity"
            verdict = {abi.BindingMode.ENFORCE: "deny", abi.BindingMode.AUDIT: "audit"}.get(
                mode, "allow")
            return NameVerdict(verdict, reason, None, None)
        if mode == abi.BindingMode.NONE:
            return NameVerdict(_DEFAULT_VERDICT[self._default], "node_default", None, None)
        ruleset = self._enf.ruleset(ruleset_id)
        if ruleset is None:  # replaced under us: the next query sees the new binding
            return NameVerdict("deny", "policy_default", None, None)
        audit = mode == abi.BindingMode.AUDIT
        fq = ruleset.fqdn
        rules = fq.matcher.match(qname) if fq else frozenset()
        named = bool(rules & fq.matcher.exact(qname)) if rules else False
        private_ok = self._explicit_for(ruleset)
        if qname in self._encrypted_names and not named:
            return NameVerdict("audit" if audit else "deny", "encrypted_dns", ruleset.policy,
                               None, private_ok=private_ok)
        if not rules:
            return NameVerdict("audit" if audit else "deny", "policy_default", ruleset.policy,
                               None, grant=Grant(ruleset_id, frozenset(), None, False) if audit
                               else None, private_ok=private_ok)
        first = min(rules)
        return NameVerdict("allow", "policy_rule", ruleset.policy, ruleset.rule_names[first],
                           grant=Grant(ruleset_id, rules, fq.portentries(rules), named),
                           private_ok=private_ok, ticket=ruleset.rule_tickets[first]
                           if first < len(ruleset.rule_tickets) else None)

    def recheck(self, cgid: int, qname: str) -> Grant | None:
        v = self._check(cgid, qname)
        return v.grant if v.verdict == "allow" and isinstance(v.grant, Grant) else None

    def _explicit_for(self, ruleset: Ruleset) -> Callable[[IPAddress], bool]:
        """Rebind-protected addresses a policy may still get from DNS: those inside one of its
        own CIDRs, other than 0.0.0.0/0 and ::/0."""
        fn = self._explicit.get(ruleset.digest)
        if fn is None:
            fn = _explicit_checker(ruleset.entries)
            if len(self._explicit) > 1024:
                self._explicit.clear()
            self._explicit[ruleset.digest] = fn
        return fn


def _explicit_checker(entries: Mapping[tuple[int, int], object]) -> Callable[[IPAddress], bool]:
    prefixes = frozenset(entries) - {abi.key_prefix(ipaddress.ip_network("0.0.0.0/0")),
                                     abi.key_prefix(ipaddress.ip_network("::/0"))}
    lengths = sorted({plen for _, plen in prefixes}, reverse=True)
    full = (1 << 128) - 1

    def explicit(addr: IPAddress) -> bool:
        value = int.from_bytes(abi.address_key(addr), "big")
        return any((value & (full ^ ((1 << (128 - plen)) - 1)), plen) in prefixes
                   for plen in lengths)
    return explicit
