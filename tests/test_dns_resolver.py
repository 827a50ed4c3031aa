"""The node resolver end to end: a real authoritative upstream (tests.dnszone) on loopback,
real dnspython clients over UDP and TCP, and recording fakes of the policy and kernel hooks.

The fake attribute() maps the client's source port to a cgroup id the test chose, so each
query below is sent from a port registered for the workload it plays.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import os
import random
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hostagent.config import DnsConfig
from hostagent.dns import (AddressInUseError, Client, DnsCollector, NameVerdict, Resolver,
                           ResolverError, system_upstreams)
from hostagent.dns import wire
from hostagent.dns.guard import RateLimiter, RebindFilter, TunnelGuard, label_entropy
from hostagent.dns.upstream import UpstreamPool
from hostagent.errors import HostAgentError
from tests.dnszone import DnsZone

HOST = "127.0.0.1"
GRANT = ("grant", "web/api")


def allowed(policy: str = "web", rule: str = "api", **kw) -> NameVerdict:
    return NameVerdict("allow", "policy_rule", policy, rule, grant=GRANT, **kw)


def denied(policy: str = "web") -> NameVerdict:
    return NameVerdict("deny", "policy_default", policy, None)


def audited(policy: str = "web") -> NameVerdict:
    return NameVerdict("audit", "policy_default", policy, None, grant=GRANT)


@dataclasses.dataclass
class Allowed:
    cgroup: int
    qname: str
    addrs: list[tuple[str, int]]
    time: float


class FakeHooks:
    """Policy and kernel as a test sees them: dictionaries, and lists of what was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ports: dict[int, int | None] = {}  # client source port -> cgroup id (None: unknown)
        self.policy: dict[object, NameVerdict] = {}  # name or (cgroup, name) -> verdict
        self.default = denied()
        self.checks: list[tuple[int, str]] = []
        self.allows: list[Allowed] = []
        self.events: list[dict] = []
        self.on_allow = None  # called inside allow(): sleep, raise

    def attribute(self, src_ip: str, src_port: int, proto: int) -> Client | None:
        cgroup = self.ports.get(src_port, 1)
        return None if cgroup is None else Client(cgroup, cookie=src_port)

    def check(self, client: Client, qname: str) -> NameVerdict:
        with self.lock:
            self.checks.append((client.cgroup_id, qname))
        return self.policy.get((client.cgroup_id, qname), self.policy.get(qname, self.default))

    def allow(self, client, verdict, qname, addrs) -> None:
        if self.on_allow is not None:
            self.on_allow()
        with self.lock:
            self.allows.append(Allowed(client.cgroup_id, qname,
                                       [(str(a), ttl) for a, ttl in addrs], time.monotonic()))

    def emit(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)

    def allow_names(self, *names: str, cgroup: int | None = None, **kw) -> None:
        for name in names:
            self.policy[name if cgroup is None else (cgroup, name)] = allowed(**kw)

    def find(self, reason: str | None = None, name: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.events if (reason is None or e["reason"] == reason)
                    and (name is None or e["query"]["name"] == name)]

    def allows_for(self, qname: str, cgroup: int | None = None) -> list[Allowed]:
        with self.lock:
            return [a for a in self.allows
                    if a.qname == qname and (cgroup is None or a.cgroup == cgroup)]


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Ask:
    """Queries to a running resolver from a port registered for ``cgroup``."""

    def __init__(self, resolver: Resolver, hooks: FakeHooks) -> None:
        self.resolver = resolver
        self.hooks = hooks

    def _port(self, kind: int, cgroup: int | None) -> int:
        port = _free_port(kind)
        self.hooks.ports[port] = cgroup
        return port

    def udp(self, name: str, rdtype: str = "A", *, cgroup: int | None = 1, edns: bool = False,
            timeout: float = 3.0) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
        host, port = self.resolver.address
        return dns.query.udp(query, host, timeout=timeout, port=port, source=HOST,
                             source_port=self._port(socket.SOCK_DGRAM, cgroup))

    def tcp(self, name: str, rdtype: str = "A", *, cgroup: int | None = 1,
            timeout: float = 3.0) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        host, port = self.resolver.address
        return dns.query.tcp(query, host, timeout=timeout, port=port, source=HOST,
                             source_port=self._port(socket.SOCK_STREAM, cgroup))

    def both(self, name: str, rdtype: str = "A", **kw) -> list[dns.message.Message]:
        return [self.udp(name, rdtype, **kw), self.tcp(name, rdtype, **kw)]


def config(**overrides) -> DnsConfig:
    base = dict(listen=(HOST, 0), upstream_timeout=0.5, rate_limit_qps=10000.0,
                rate_limit_burst=10000)
    base.update(overrides)
    return dataclasses.replace(DnsConfig(), **base)


@contextlib.contextmanager
def running(hooks: FakeHooks, upstreams, **overrides):
    resolver = Resolver(config(**overrides), hooks, upstreams=upstreams)
    resolver.start()
    try:
        yield Ask(resolver, hooks)
    finally:
        resolver.stop()


def addresses(msg: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in msg.answer
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset)


def ttls(msg: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in msg.answer]


@pytest.fixture
def zone():
    with DnsZone() as z:
        yield z


@pytest.fixture
def hooks():
    return FakeHooks()


@pytest.fixture
def ask(zone, hooks):
    with running(hooks, [zone.address]) as a:
        yield a


# ---------------------------------------------------------------------------------------------
# Allowed, denied, NXDOMAIN


def test_allowed_name_is_answered_opened_and_reported(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10", ttl=60)
    zone.add("api.test", "AAAA", "2001:db8::10", ttl=60)
    hooks.allow_names("api.test")
    for answer in ask.both("api.test"):
        assert answer.rcode() == dns.rcode.NOERROR
        assert addresses(answer) == ["192.0.2.10"]
    assert addresses(ask.udp("api.test", "AAAA")) == ["2001:db8::10"]
    assert zone.count("api.test", "A") == 1  # the TCP query was answered from the cache
    opened = hooks.allows_for("api.test")
    assert [a.addrs for a in opened] == [[("192.0.2.10", 60)], [("2001:db8::10", 60)]]
    event = hooks.find(name="api.test")[0]
    assert event["kind"] == "dns" and event["verdict"] == "allow"
    assert event["reason"] == "policy_rule" and event["policy"] == "web" and event["rule"] == "api"
    assert event["query"] == {"name": "api.test", "type": "A"}
    assert event["rcode"] == "NOERROR"
    assert event["answers"] == [{"ip": "192.0.2.10", "ttl": 60}]
    assert event["workload"] == {"cgroup_id": 1}
    assert event["client"]["protocol"] == "udp" and event["client"]["ip"] == HOST
    assert event["socket"]["cookie"] == event["client"]["port"]
    assert event["time"].endswith("Z") and "T" in event["time"]
    assert [e["client"]["protocol"] for e in hooks.find(name="api.test")] == ["udp", "tcp", "udp"]


def test_denied_name_is_refused_and_never_forwarded(zone, hooks, ask):
    zone.add("secret.test", "A", "192.0.2.66")
    for answer in ask.both("secret.test"):
        assert answer.rcode() == dns.rcode.REFUSED
        assert not answer.answer
    assert zone.count("secret.test") == 0
    assert not hooks.allows
    events = hooks.find(name="secret.test")
    assert [(e["verdict"], e["reason"], e["rcode"]) for e in events] == \
        [("deny", "policy_default", "REFUSED")] * 2


def test_denied_name_answers_nxdomain_when_configured(zone, hooks):
    zone.add("secret.test", "A", "192.0.2.66")
    with running(hooks, [zone.address], refused_rcode="NXDOMAIN") as ask:
        assert ask.udp("secret.test").rcode() == dns.rcode.NXDOMAIN
    assert hooks.find(name="secret.test")[0]["rcode"] == "NXDOMAIN"
    assert zone.count() == 0


def test_nxdomain_from_upstream_is_passed_on_and_cached(zone, hooks, ask):
    hooks.allow_names("missing.test")
    for answer in ask.both("missing.test"):
        assert answer.rcode() == dns.rcode.NXDOMAIN
    assert zone.count("missing.test") == 1
    assert not hooks.allows  # nothing to open
    assert hooks.find(name="missing.test")[0]["rcode"] == "NXDOMAIN"


def test_allowed_events_can_be_turned_off_but_audit_still_reports(zone, hooks):
    zone.add("api.test", "A", "192.0.2.10")
    zone.add("watched.test", "A", "192.0.2.11")
    hooks.allow_names("api.test")
    hooks.policy["watched.test"] = audited()
    with running(hooks, [zone.address], emit_allowed=False) as ask:
        assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
        assert addresses(ask.udp("watched.test")) == ["192.0.2.11"]
    assert hooks.find(name="api.test") == []
    [event] = hooks.find(name="watched.test")
    assert event["verdict"] == "audit" and event["rcode"] == "NOERROR"
    assert hooks.allows_for("watched.test")  # audit answers are opened like allowed ones


def test_unattributed_query_is_refused(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    assert ask.udp("api.test", cgroup=None).rcode() == dns.rcode.REFUSED
    assert ask.tcp("api.test", cgroup=None).rcode() == dns.rcode.REFUSED
    assert zone.count() == 0 and not hooks.checks
    event = hooks.find(reason="unattributed")[0]
    assert event["verdict"] == "deny" and event["workload"] == {"cgroup_id": None}
    assert ask.resolver.stats()["unattributed"] == 2


# ---------------------------------------------------------------------------------------------
# CNAME chains


def test_cname_chain_every_link_checked(zone, hooks, ask):
    zone.add("www.test", "CNAME", "edge.cdn.test")
    zone.add("edge.cdn.test", "CNAME", "pop1.cdn.test")
    zone.add("pop1.cdn.test", "A", "192.0.2.20", ttl=120)
    hooks.allow_names("www.test", "edge.cdn.test", "pop1.cdn.test")
    answer = ask.udp("www.test")
    assert addresses(answer) == ["192.0.2.20"]
    assert [rrset.rdtype for rrset in answer.answer] == \
        [dns.rdatatype.CNAME, dns.rdatatype.CNAME, dns.rdatatype.A]
    assert {name for _, name in hooks.checks} == {"www.test", "edge.cdn.test", "pop1.cdn.test"}
    [opened] = hooks.allows_for("www.test")
    assert opened.addrs == [("192.0.2.20", 120)]
    assert hooks.find(name="www.test")[0]["cnames"] == ["edge.cdn.test", "pop1.cdn.test"]


def test_cname_to_a_disallowed_name_is_refused(zone, hooks, ask):
    zone.add("www.test", "CNAME", "tracker.evil.test")
    zone.add("tracker.evil.test", "A", "192.0.2.99")
    hooks.allow_names("www.test")
    for answer in ask.both("www.test"):
        assert answer.rcode() == dns.rcode.REFUSED
        assert not answer.answer
    assert not hooks.allows
    event = hooks.find(reason="cname_not_allowed")[0]
    assert event["verdict"] == "deny" and event["cnames"] == ["tracker.evil.test"]
    assert event["rcode"] == "REFUSED"


def test_cname_link_in_audit_is_answered_and_reported(zone, hooks, ask):
    zone.add("www.test", "CNAME", "new.cdn.test")
    zone.add("new.cdn.test", "A", "192.0.2.21")
    hooks.allow_names("www.test")
    hooks.policy["new.cdn.test"] = audited()
    assert addresses(ask.udp("www.test")) == ["192.0.2.21"]
    [event] = hooks.find(name="www.test")
    assert (event["verdict"], event["reason"]) == ("audit", "cname_not_allowed")
    assert hooks.allows_for("www.test")


def test_cname_loop_is_servfail(zone, hooks, ask):
    zone.add("a.loop.test", "CNAME", "b.loop.test")
    zone.add("b.loop.test", "CNAME", "a.loop.test")
    hooks.allow_names("a.loop.test", "b.loop.test")
    assert ask.udp("a.loop.test").rcode() == dns.rcode.SERVFAIL
    assert hooks.find(reason="bad_answer")


def test_records_off_the_chain_are_dropped(zone, hooks, ask):
    def junk(query, peer, proto, default):
        response = dns.message.from_wire(default)
        response.answer.append(dns.rrset.from_text("other.test.", 300, "IN", "A", "192.0.2.250"))
        response.additional.append(
            dns.rrset.from_text("ns.evil.test.", 300, "IN", "A", "192.0.2.251"))
        return [response.to_wire()]
    zone.add("api.test", "A", "192.0.2.10")
    zone.responder("api.test", junk)
    hooks.allow_names("api.test")
    answer = ask.udp("api.test")
    assert addresses(answer) == ["192.0.2.10"]
    assert not answer.additional and not answer.authority
    assert hooks.allows_for("api.test")[0].addrs == [("192.0.2.10", 300)]


# ---------------------------------------------------------------------------------------------
# Rebinding and TTLs


def test_rebinding_addresses_are_dropped(zone, hooks, ask):
    for address in ("10.0.0.5", "127.0.0.1", "169.254.169.254", "192.0.2.7"):
        zone.add("rebind.test", "A", address)
    for address in ("::1", "fd00::1", "::ffff:10.0.0.1", "2001:db8::7"):
        zone.add("rebind.test", "AAAA", address)
    hooks.allow_names("rebind.test")
    assert addresses(ask.udp("rebind.test")) == ["192.0.2.7"]
    assert addresses(ask.tcp("rebind.test", "AAAA")) == ["2001:db8::7"]
    assert [a.addrs for a in hooks.allows_for("rebind.test")] == [[("192.0.2.7", 300)],
                                                                  [("2001:db8::7", 300)]]
    events = hooks.find(reason="rebinding")
    assert events[0]["dropped"] == ["10.0.0.5", "127.0.0.1", "169.254.169.254"]
    assert sorted(events[1]["dropped"]) == sorted(["::1", "fd00::1", "::ffff:a00:1"])
    assert events[0]["answers"] == [{"ip": "192.0.2.7", "ttl": 300}]


def test_rebinding_address_kept_when_policy_allows_it(zone, hooks, ask):
    zone.add("db.test", "A", "10.1.2.3")
    zone.add("db.test", "A", "169.254.169.254")
    internal = ipaddress.ip_network("10.0.0.0/8")
    hooks.policy["db.test"] = allowed(private_ok=lambda a: a in internal)
    # Another workload, without the exception, shares the cached answer but not the address.
    hooks.policy[(2, "db.test")] = allowed()
    assert addresses(ask.udp("db.test")) == ["10.1.2.3"]
    assert addresses(ask.udp("db.test", cgroup=2)) == []
    assert hooks.allows_for("db.test", 1)[0].addrs == [("10.1.2.3", 300)]
    assert hooks.allows_for("db.test", 2) == []
    assert zone.count("db.test") == 1
    assert [e["dropped"] for e in hooks.find(reason="rebinding")] == \
        [["169.254.169.254"], ["10.1.2.3", "169.254.169.254"]]


def test_ttls_are_clamped(zone, hooks, ask):
    zone.add("short.test", "A", "192.0.2.1", ttl=1)
    zone.add("long.test", "A", "192.0.2.2", ttl=100000)
    zone.add("zero.test", "A", "192.0.2.3", ttl=0)
    hooks.allow_names("short.test", "long.test", "zero.test")
    assert ttls(ask.udp("short.test")) == [5]
    assert ttls(ask.udp("long.test")) == [3600]
    assert ttls(ask.udp("zero.test")) == [5]
    assert [a.addrs[0][1] for a in hooks.allows] == [5, 3600, 5]


def test_template_is_rebuilt_once_per_second_of_age():
    from hostagent.dns.cache import Record, Template

    rec = Record(b"\x03api\x04test\x00", 1, 1, 300, bytes([192, 0, 2, 1]), None)
    template = Template(b"\x03api\x04test\x00", [rec])
    assert template.at(0)[:2] == b"\xc0\x0c"  # the owner points at the question
    first = template.at(3)
    assert template.at(3) is first  # not rebuilt within the same second
    assert struct.unpack_from("!I", first, 6)[0] == 297


def test_cached_ttls_count_down(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10", ttl=300)
    hooks.allow_names("api.test")
    assert ttls(ask.udp("api.test")) == [300]
    time.sleep(1.2)
    assert ttls(ask.udp("api.test")) in ([299], [298])  # 298 only on a stalled machine
    assert zone.count("api.test") == 1


@pytest.mark.parametrize("emit_allowed", [True, False], ids=["full-path", "hot-path"])
def test_expired_answer_is_asked_again_and_opened_again(zone, hooks, emit_allowed):
    zone.add("api.test", "A", "192.0.2.10", ttl=1)
    hooks.allow_names("api.test")
    with running(hooks, [zone.address], ttl_min=1, emit_allowed=emit_allowed) as ask:
        ask.udp("api.test")
        ask.udp("api.test")  # a repeat: hot when allowed answers emit no event
        time.sleep(1.2)
        ask.udp("api.test")
    assert zone.count("api.test") == 2
    assert len(hooks.allows_for("api.test")) == 2


# ---------------------------------------------------------------------------------------------
# Truncation and TCP


def test_big_answer_truncated_over_udp_then_full_over_tcp(zone, hooks, ask):
    zone.big("big.test", 100)
    hooks.allow_names("big.test")
    for edns in (False, True):
        answer = ask.udp("big.test", edns=edns)
        assert answer.flags & dns.flags.TC and not answer.answer
    # The resolver itself fell back to TCP towards the zone (the answer is over 1232 bytes),
    # once per cache entry (with and without EDNS).
    assert zone.count("big.test", proto="tcp") == 2
    host, port = ask.resolver.address
    query = dns.message.make_query("big.test", "A")
    answer, used_tcp = dns.query.udp_with_fallback(query, host, timeout=3, port=port)
    assert used_tcp and len(addresses(answer)) == 100
    assert [len(a.addrs) for a in hooks.allows_for("big.test")] == [100, 100]
    assert ask.resolver.stats()["truncated"] == 3


def test_answers_are_compressed(zone, hooks, ask):
    """100 records owned by a long CNAME target: the answer stays about as small as the
    upstream's (pointers), instead of repeating the 200-byte name 100 times."""
    target = ".".join(["x" * 60] * 3) + ".test"
    zone.add("short.test", "CNAME", target)
    zone.big(target, 100)
    hooks.allow_names("short.test", target)
    host, port = ask.resolver.address
    with socket.create_connection((host, port), timeout=3) as sock:
        q = dns.message.make_query("short.test", "A").to_wire()
        sock.sendall(struct.pack("!H", len(q)) + q)
        (length,) = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))
        answer = dns.message.from_wire(sock.recv(length, socket.MSG_WAITALL))
    assert len(addresses(answer)) == 100
    assert answer.answer[1].name.to_text() == target + "."
    assert length < 100 * 16 + 400


def test_ipv6_listen_address(zone, hooks):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    resolver = Resolver(config(listen=("::1", 0)), hooks, upstreams=[zone.address])
    resolver.start()
    try:
        host, port = resolver.address
        assert host == "::1"
        for send in (dns.query.udp, dns.query.tcp):
            answer = send(dns.message.make_query("api.test", "A"), host, timeout=3, port=port)
            assert addresses(answer) == ["192.0.2.10"]
    finally:
        resolver.stop()
    assert {e["client"]["ip"] for e in hooks.events} == {"::1"}


def test_several_queries_on_one_tcp_connection(zone, hooks, ask):
    for i in range(5):
        zone.add(f"h{i}.test", "A", f"192.0.2.{i + 1}")
        hooks.allow_names(f"h{i}.test")
    host, port = ask.resolver.address
    with socket.create_connection((host, port), timeout=3) as sock:
        queries = {}
        for i in range(5):
            q = dns.message.make_query(f"h{i}.test", "A")
            queries[q.id] = f"192.0.2.{i + 1}"
            wire_q = q.to_wire()
            sock.sendall(struct.pack("!H", len(wire_q)) + wire_q)  # pipelined
        got = {}
        for _ in range(5):
            answer = _read_tcp(sock)
            got[answer.id] = addresses(answer)[0]
    assert got == queries


def _read_tcp(sock: socket.socket) -> dns.message.Message:
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    (length,) = struct.unpack("!H", exactly(2))
    return dns.message.from_wire(exactly(length))


def test_idle_tcp_connections_are_closed_and_bounded(zone, hooks):
    resolver = Resolver(config(), hooks, upstreams=[zone.address], max_tcp_connections=2,
                        tcp_idle_timeout=0.3)
    resolver.start()
    try:
        host, port = resolver.address
        first = socket.create_connection((host, port), timeout=3)
        second = socket.create_connection((host, port), timeout=3)
        time.sleep(0.05)
        third = socket.create_connection((host, port), timeout=3)
        assert third.recv(10) == b""  # over the limit: closed at once
        t0 = time.monotonic()
        assert first.recv(10) == b""  # idle: closed by the resolver
        assert 0.2 < time.monotonic() - t0 < 2.0
        assert second.recv(10) == b""
        for s in (first, second, third):
            s.close()
        stats = resolver.stats()
        assert stats["tcp_rejected"] >= 1 and stats["tcp_timeouts"] >= 2
        # And it still serves TCP afterwards.
        hooks.allow_names("api.test")
        zone.add("api.test", "A", "192.0.2.10")
        assert addresses(Ask(resolver, hooks).tcp("api.test")) == ["192.0.2.10"]
    finally:
        resolver.stop()


# ---------------------------------------------------------------------------------------------
# allow(): ordering and failures


def test_allow_completes_before_the_client_gets_the_answer(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    done = []

    def slow_allow():
        time.sleep(0.3)
        done.append(time.monotonic())

    hooks.on_allow = slow_allow
    for proto in ("udp", "tcp"):
        done.clear()
        hooks.policy[(3 if proto == "udp" else 4, "api.test")] = allowed()
        answer = getattr(ask, proto)("api.test", cgroup=3 if proto == "udp" else 4)
        received = time.monotonic()
        assert addresses(answer) == ["192.0.2.10"]
        assert done and done[0] <= received


def test_allow_failure_fails_closed(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")

    def broken():
        raise OSError("map full")

    hooks.on_allow = broken
    for answer in ask.both("api.test"):
        assert answer.rcode() == dns.rcode.SERVFAIL and not answer.answer
    events = hooks.find(reason="allowance_failed")
    assert len(events) == 2 and events[0]["rcode"] == "SERVFAIL"
    # Fixed: the next query opens the addresses and is answered (from the cache).
    hooks.on_allow = None
    assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
    assert len(hooks.allows_for("api.test")) == 1
    assert zone.count("api.test") == 1
    assert ask.resolver.stats()["allowance_failures"] == 2


# ---------------------------------------------------------------------------------------------
# Upstreams


def _dead_port() -> int:
    return _free_port(socket.SOCK_DGRAM)  # nothing listens there any more: ICMP unreachable


def test_upstream_down_is_servfail(hooks):
    hooks.allow_names("api.test")
    with running(hooks, [(HOST, _dead_port())]) as ask:
        for answer in ask.both("api.test"):
            assert answer.rcode() == dns.rcode.SERVFAIL
        stats = ask.resolver.stats()
    events = hooks.find(reason="upstream_failure")
    assert events and events[0]["verdict"] == "allow" and events[0]["rcode"] == "SERVFAIL"
    assert stats["upstream_failures"] >= 2
    assert sum(stats["upstream_failures_by"].values()) >= 2


def test_silent_upstream_times_out_then_is_skipped(zone, hooks):
    zone.add("a.test", "A", "192.0.2.1")
    zone.add("b.test", "A", "192.0.2.2")
    hooks.allow_names("a.test", "b.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind((HOST, 0))
        with running(hooks, [black_hole.getsockname(), zone.address],
                     upstream_timeout=1.0) as ask:
            t0 = time.monotonic()
            assert addresses(ask.udp("a.test")) == ["192.0.2.1"]
            assert time.monotonic() - t0 >= 0.95  # waited for the first upstream
            t0 = time.monotonic()
            assert addresses(ask.udp("b.test")) == ["192.0.2.2"]
            assert time.monotonic() - t0 < 0.5  # the first upstream is backing off
            health = {u["upstream"]: u["healthy"] for u in ask.resolver.stats()["upstreams"]}
        assert list(health.values()) == [False, True]


def test_name_that_never_answers_is_servfail_after_the_timeout(zone, hooks):
    zone.timeout("slow.test")
    hooks.allow_names("slow.test")
    with running(hooks, [zone.address], upstream_timeout=0.3) as ask:
        t0 = time.monotonic()
        assert ask.udp("slow.test").rcode() == dns.rcode.SERVFAIL
        assert 0.25 < time.monotonic() - t0 < 2.0


def test_upstream_servfail_tries_the_next_upstream(hooks):
    with DnsZone() as broken, DnsZone() as good:
        broken.servfail("api.test")
        good.add("api.test", "A", "192.0.2.10")
        hooks.allow_names("api.test")
        with running(hooks, [broken.address, good.address]) as ask:
            assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
        assert broken.count("api.test") == 1 and good.count("api.test") == 1
    with DnsZone() as broken:
        broken.servfail("api.test")
        with running(hooks, [broken.address]) as ask:
            assert ask.udp("api.test").rcode() == dns.rcode.SERVFAIL


def test_hostile_replies_are_ignored(zone, hooks, ask):
    """Wrong id, wrong question, a reply from another port: only the real answer counts."""
    zone.add("api.test", "A", "192.0.2.10")
    zone.add("evil.test", "A", "6.6.6.6")
    hooks.allow_names("api.test")

    def forged(query, name="api.test", address="6.6.6.6", txid=None):
        response = dns.message.make_response(query)
        if name != "api.test":
            response.question = [dns.rrset.RRset(dns.name.from_text(name), 1, 1)]
        response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", address))
        if txid is not None:
            response.id = txid
        return response.to_wire()

    def hostile(query, peer, proto, default):
        # Right id and question, but from another socket: the connected socket drops it.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.sendto(forged(query), peer)
        time.sleep(0.02)
        return [forged(query, txid=query.id ^ 0x5A5A),  # wrong id
                forged(query, name="evil.test"),  # wrong question
                b"\x00" * 5,  # garbage
                default]

    zone.responder("api.test", hostile)
    assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
    assert addresses(ask.tcp("api.test")) == ["192.0.2.10"]  # cached: the good answer only
    assert ask.resolver.stats()["upstream_ignored_replies"] >= 3


def test_only_hostile_replies_is_servfail_and_not_cached(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")

    def wrong_only(query, peer, proto, default):
        bad = dns.message.from_wire(default)
        bad.id ^= 1
        return [bad.to_wire()]

    zone.responder("api.test", wrong_only)
    assert ask.udp("api.test").rcode() == dns.rcode.SERVFAIL
    zone.normal("api.test")
    # The only upstream is backing off, but with none healthy all are asked.
    assert addresses(ask.udp("api.test")) == ["192.0.2.10"]


def test_identical_misses_are_coalesced(zone, hooks, ask):
    zone.add("slowish.test", "A", "192.0.2.30")
    zone.delay("slowish.test", 0.3)
    hooks.allow_names("slowish.test")
    results = []

    def one():
        results.append(addresses(ask.udp("slowish.test")))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [["192.0.2.30"]] * 8
    assert zone.count("slowish.test") == 1
    assert ask.resolver.stats()["coalesced"] >= 1


def test_upstream_socket_carries_the_mark():
    pool = UpstreamPool([(HOST, 53)], timeout=1.0, socket_mark=0x48410053)
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = pool._socket(pool.upstreams[0], kind)
        try:
            # the suite runs as root: a refused mark would let the agent redirect itself
            assert pool._mark is not None
            assert sock.getsockopt(socket.SOL_SOCKET, 36) == 0x48410053
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
# Rate limit and tunnels


@pytest.mark.parametrize("emit_allowed", [True, False], ids=["full-path", "hot-path"])
def test_rate_limit_per_workload(zone, hooks, emit_allowed):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    with running(hooks, [zone.address], rate_limit_qps=0.5, rate_limit_burst=3,
                 emit_allowed=emit_allowed) as ask:
        rcodes = [ask.udp("api.test", cgroup=7).rcode() for _ in range(6)]
        assert rcodes == [dns.rcode.NOERROR] * 3 + [dns.rcode.REFUSED] * 3
        # Another workload has its own bucket.
        assert ask.udp("api.test", cgroup=8).rcode() == dns.rcode.NOERROR
        assert ask.resolver.stats()["rate_limited"] == 3
    events = hooks.find(reason="rate_limited")
    assert len(events) == 1  # one per workload per second: a flood does not flood the events
    assert events[0]["workload"] == {"cgroup_id": 7} and events[0]["rcode"] == "REFUSED"


def _base32_label(n: int) -> str:
    return base64.b32encode(os.urandom(n)).decode().lower().rstrip("=")


def test_tunnel_shaped_names_are_refused_and_never_forwarded(zone, hooks, ask):
    hooks.default = allowed()  # the policy allows everything: only the tunnel guard refuses
    data = _base32_label(40)  # 64 characters of base32
    iodine_like = [
        f"{data[:57]}.t.tunnel.test",  # one label over 52 characters
        f"p{data[:40]}.t.tunnel.test",  # 41 characters of base32: high entropy
        f"{data[:30]}.{data[30:60]}.t.tunnel.test",
    ]
    for name in iodine_like:
        for answer in ask.both(name):
            assert answer.rcode() == dns.rcode.REFUSED, name
    assert zone.count() == 0
    tunnel = hooks.find(reason="tunnel")
    assert len(tunnel) == 6 and tunnel[0]["verdict"] == "deny"
    assert ask.resolver.stats()["tunnel_refused"] == 6


def test_base128_label_is_refused(zone, hooks, ask):
    hooks.default = allowed()
    label = bytes(range(0xBC, 0xBC + 40))  # iodine's base128 alphabet is bytes >= 0xbc
    query = dns.message.make_query(dns.name.Name([label, b"t", b"tunnel", b"test", b""]), "A")
    host, port = ask.resolver.address
    assert dns.query.udp(query, host, timeout=3, port=port).rcode() == dns.rcode.REFUSED
    assert zone.count() == 0


def test_many_unique_subdomains_of_one_zone_are_refused(zone, hooks):
    hooks.default = allowed()
    with running(hooks, [zone.address], tunnel_max_unique_subdomains=10,
                 tunnel_window=60.0) as ask:
        rcodes = [ask.udp(f"c{i:03d}x.t.tunnel.test").rcode() for i in range(12)]
        assert rcodes == [dns.rcode.NXDOMAIN] * 10 + [dns.rcode.REFUSED] * 2
        # Names it already asked for are not new data; other workloads and zones are separate.
        assert ask.udp("c001x.t.tunnel.test").rcode() == dns.rcode.NXDOMAIN
        assert ask.udp("c011x.t.tunnel.test", cgroup=2).rcode() == dns.rcode.NXDOMAIN
        assert ask.udp("c011x.other.test").rcode() == dns.rcode.NXDOMAIN
    assert zone.count("c010x.t.tunnel.test", ) == 0 and zone.count("c011x.t.tunnel.test") == 1
    assert len(hooks.find(reason="tunnel")) == 2


CDN_NAMES = [
    "d3i4yxtzktqr9n.cloudfront.net",
    "e3-4.x.cdn.example.net",
    "a5e8f7c9b1d2e3f4a5b6c7d8e9f0a1b2-123456789.us-west-2.elb.amazonaws.com",
    "internal-my-internal-lb-1234567890.us-west-2.elb.amazonaws.com",
    "a95fbc180b680b58a6468ef360d16e96.gr7.us-west-2.eks.amazonaws.com",
    "my-company-production-artifacts-bucket.s3.amazonaws.com",
    "hello-world-abc123xyz-uc.a.run.app",
    "aaaaaaaaaabbbbbbbbbbccccccccccdddd.example.com",  # long, low entropy
    "mississippimississippimississippi.example.com",
    "www.googletagmanager.com",
    "_sip._tcp.example.com",
]


def test_cdn_names_pass_end_to_end(zone, hooks, ask):
    hooks.default = allowed()
    for name in CDN_NAMES:
        zone.add(name, "A", "192.0.2.40")
        assert addresses(ask.udp(name)) == ["192.0.2.40"], name
    assert not hooks.find(reason="tunnel")


@pytest.mark.parametrize("name", CDN_NAMES)
def test_tunnel_guard_passes_normal_names(name):
    guard = TunnelGuard(52, 24, 3.8, 200, 60.0)
    assert guard.shape(dns.name.from_text(name).canonicalize().to_wire()) is None


@pytest.mark.parametrize("length", [24, 32, 45, 52])
def test_tunnel_guard_refuses_encoded_labels(length):
    guard = TunnelGuard(52, 24, 3.8, 200, 60.0)
    rng = random.Random(length)   # fixed samples: the rates below are not a coin toss per run
    refused = 0
    for _ in range(50):
        label = base64.b32encode(rng.randbytes(40)).decode().lower()[:length]
        refused += guard.shape(dns.name.from_text(f"{label}.t.example.com").to_wire()) == "entropy"
    # Random base32 labels reach 3.8 bits: 24 characters about 84% of the time, 32 about 99.3%,
    # 45 and more always (measured over 20,000 samples).
    assert refused >= (30 if length == 24 else 49)


def test_tunnel_guard_memory_is_bounded():
    guard = TunnelGuard(52, 24, 3.8, 5, 60.0, max_zones=100)
    for i in range(1000):
        assert guard.admit(1, f"a.z{i}.example.com", float(i))
    assert len(guard._zones) == 100
    for i in range(5):
        assert guard.admit(1, f"n{i}.z.example.com", 0.0)
    assert not guard.admit(1, "n5.z.example.com", 1.0)
    assert guard.admit(1, "n5.z.example.com", 61.0)  # the window moved on


def test_label_entropy():
    assert label_entropy(b"aaaa") == 0.0
    assert label_entropy(b"abcd") == 2.0


def test_rate_limiter_buckets():
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=10)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.take("a", 1.0)
    for i in range(100):
        limiter.take(i, 5.0)
    assert len(limiter) <= 10


def test_rebind_filter():
    f = RebindFilter(DnsConfig().rebind_protect)
    for protected in ("10.1.1.1", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254",
                      "100.64.0.1", "0.0.0.0", "fd00::1", "fe80::1", "::1", "::", "::ffff:8.8.8.8"):
        assert f.protected(ipaddress.ip_address(protected)), protected
    for public in ("8.8.8.8", "192.0.2.1", "2001:db8::1", "172.32.0.1"):
        assert not f.protected(ipaddress.ip_address(public)), public


# ---------------------------------------------------------------------------------------------
# Cache, per-workload allowances, invalidate()


def test_cache_is_shared_but_allow_is_per_workload(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    ask.udp("api.test", cgroup=1)
    ask.udp("api.test", cgroup=2)
    ask.tcp("api.test", cgroup=1)
    ask.udp("api.test", cgroup=2)
    assert zone.count("api.test") == 1
    assert [a.cgroup for a in hooks.allows_for("api.test")] == [1, 2]
    stats = ask.resolver.stats()
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 1


def test_cached_answer_still_checked_per_workload(zone, hooks, ask):
    zone.add("www.test", "CNAME", "cdn.test")
    zone.add("cdn.test", "A", "192.0.2.10")
    hooks.allow_names("www.test", "cdn.test")
    hooks.policy[(2, "cdn.test")] = denied()
    hooks.policy[(3, "www.test")] = denied()
    assert addresses(ask.udp("www.test", cgroup=1)) == ["192.0.2.10"]
    assert ask.udp("www.test", cgroup=2).rcode() == dns.rcode.REFUSED  # a link is denied
    assert ask.udp("www.test", cgroup=3).rcode() == dns.rcode.REFUSED  # the name is denied
    assert zone.count("www.test") == 1
    assert [a.cgroup for a in hooks.allows] == [1]


def test_check_is_memoized_until_invalidate(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    for _ in range(3):
        assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
    assert hooks.checks.count((1, "api.test")) == 1
    assert len(hooks.allows) == 1
    hooks.policy["api.test"] = denied()
    assert ask.udp("api.test").rcode() == dns.rcode.NOERROR  # memoized
    ask.resolver.invalidate()
    assert ask.udp("api.test").rcode() == dns.rcode.REFUSED
    hooks.policy["api.test"] = allowed()
    ask.resolver.invalidate()
    assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
    assert len(hooks.allows) == 2  # re-opened after invalidate()
    assert zone.count("api.test") == 1  # the answer itself stayed cached


def _send_as(ask: Ask, payload: bytes, cgroup: int) -> bytes:
    """Send exact query bytes from a port registered for ``cgroup``; the answer's bytes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        ask.hooks.ports[s.getsockname()[1]] = cgroup
        s.settimeout(3)
        s.sendto(payload, ask.resolver.address)
        return s.recv(65535)


def test_repeats_are_answered_hot_byte_for_byte_and_judged_again(zone, hooks):
    """A repeat of a query a workload sent before (hostagent.dns.hot) gets the answer the full
    path gives, with its own id; a policy change, another workload, and a TTL's passing
    second are each seen by the very next repeat."""
    zone.add("api.test", "A", "192.0.2.10", ttl=300)
    hooks.allow_names("api.test")
    hooks.policy[(2, "api.test")] = denied()
    with running(hooks, [zone.address], emit_allowed=False) as ask:
        query = dns.message.make_query("api.test", "A")
        wire_q = query.to_wire()
        first = _send_as(ask, wire_q, 1)  # a miss: the full path, which makes it hot
        assert ask.resolver.stats()["hot_hits"] == 0
        for qid in (1, 2, 0xBEEF):
            again = _send_as(ask, struct.pack("!H", qid) + wire_q[2:], 1)
            assert again[:2] == struct.pack("!H", qid)
            assert again[2:] == first[2:]
        stats = ask.resolver.stats()
        assert stats["hot_hits"] == 3 and stats["cache_hits"] == 3
        assert len(hooks.allows) == 1 and hooks.checks.count((1, "api.test")) == 1

        # the same bytes from another workload are judged for that workload
        other = dns.message.from_wire(_send_as(ask, wire_q, 2))
        assert other.rcode() == dns.rcode.REFUSED

        # TTLs keep counting down
        time.sleep(1.2)
        aged = dns.message.from_wire(_send_as(ask, wire_q, 1))
        assert ttls(aged) in ([299], [298])

        # a policy change reaches the next repeat
        hooks.policy["api.test"] = denied()
        ask.resolver.invalidate()
        refused = dns.message.from_wire(_send_as(ask, wire_q, 1))
        assert refused.rcode() == dns.rcode.REFUSED
        assert ask.resolver.stats()["hot_hits"] == 4
    assert zone.count("api.test") == 1


def test_invalidate_from_another_thread_during_queries(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            ask.resolver.invalidate()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(30):
            assert addresses(ask.udp("api.test")) == ["192.0.2.10"]
    finally:
        stop.set()
        thread.join()
    assert ask.resolver.stats()["internal_errors"] == 0


# ---------------------------------------------------------------------------------------------
# Wire-level handling


def _raw_udp(resolver: Resolver, payload: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, resolver.address)
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def test_malformed_queries(zone, hooks, ask):
    r = ask.resolver
    assert _raw_udp(r, b"\x12\x34\x01", timeout=0.3) is None  # shorter than a header: dropped
    good = dns.message.make_query("api.test", "A").to_wire()
    response = bytearray(good)
    response[2] |= 0x80  # QR=1: a response, never answered
    assert _raw_udp(r, bytes(response), timeout=0.3) is None

    def rcode_of(payload: bytes) -> int:
        reply = _raw_udp(r, payload)
        assert reply is not None and reply[:2] == payload[:2] and reply[2] & 0x80
        return reply[3] & 0xF

    two_questions = bytearray(good)
    two_questions[5] = 2
    assert rcode_of(bytes(two_questions)) == wire.FORMERR
    status = bytearray(good)
    status[2] = (status[2] & 0x87) | (2 << 3)  # opcode STATUS
    assert rcode_of(bytes(status)) == wire.NOTIMP
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    assert rcode_of(header + b"\xc0\x0c\x00\x01\x00\x01") == wire.FORMERR  # compression
    assert rcode_of(header + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01") == wire.FORMERR
    assert rcode_of(header + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01") == wire.FORMERR
    assert rcode_of(header + b"\x03api\x04te") == wire.FORMERR  # truncated
    assert rcode_of(good + b"junk") == wire.FORMERR  # trailing bytes
    assert r.stats()["malformed"] == 7
    # Flooding events are limited per source: one "malformed" event in this second.
    assert len(hooks.find(reason="malformed")) == 1


def test_query_types_and_classes_not_served(zone, hooks, ask):
    hooks.default = allowed()
    assert ask.tcp("api.test", "AXFR").rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query("version.bind", "TXT", "CH")
    host, port = ask.resolver.address
    assert dns.query.udp(chaos, host, timeout=3, port=port).rcode() == dns.rcode.REFUSED
    edns1 = dns.message.make_query("api.test", "A", use_edns=1)
    assert dns.query.udp(edns1, host, timeout=3, port=port).rcode() == dns.rcode.BADVERS
    assert zone.count() == 0


def test_client_case_and_flags_are_echoed(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    ask.udp("api.test")
    query = dns.message.make_query("ApI.TeSt", "A", flags=0)  # RD=0, mixed case
    host, port = ask.resolver.address
    answer = dns.query.udp(query, host, timeout=3, port=port)
    assert answer.id == query.id and answer.question[0].name.to_text() == "ApI.TeSt."
    assert not answer.flags & dns.flags.RD and answer.flags & dns.flags.RA
    assert addresses(answer) == ["192.0.2.10"]


def test_names_with_unusual_bytes_reach_check_escaped(zone, hooks, ask):
    name = dns.name.Name([b"a.b", b"example", b"test", b""])  # a dot inside a label
    host, port = ask.resolver.address
    answer = dns.query.udp(dns.message.make_query(name, "A"), host, timeout=3, port=port)
    assert answer.rcode() == dns.rcode.REFUSED
    assert (1, "a\\.b.example.test") in hooks.checks


def test_parse_query_agrees_with_dnspython():
    for q in (dns.message.make_query("www.Example.COM", "AAAA"),
              dns.message.make_query("x.test", "TXT", use_edns=0, payload=4096),
              dns.message.make_query(".", "NS", use_edns=0, want_dnssec=True)):
        data = q.to_wire()
        parsed = wire.parse_query(data)
        assert parsed.qtype == q.question[0].rdtype
        assert wire.name_text(parsed.key_name) in ("www.example.com", "x.test", ".")
        assert parsed.edns == (q.edns >= 0)
        assert data[12:parsed.qend] == q.question[0].name.to_wire() + struct.pack(
            "!HH", q.question[0].rdtype, q.question[0].rdclass)
    assert wire.parse_query(dns.message.make_query("a", "A", use_edns=0, payload=300)
                            .to_wire()).udp_limit() == 512
    assert wire.parse_query(dns.message.make_query("a", "A", use_edns=0, payload=4096)
                            .to_wire()).udp_limit() == 1232


def test_name_text_matches_dnspython_escaping():
    for labels in ([b"a.b", b"c"], [b"x y", b"\x00\xff"], [b'"()', b";@$\\'"], [b"_sip", b"_tcp"]):
        name = dns.name.Name([*labels, b""])
        assert wire.name_text(name.to_wire()) == name.to_text(omit_final_dot=True)


# ---------------------------------------------------------------------------------------------
# Robustness: hooks that raise, overload


def test_hook_exceptions_answer_servfail_and_the_server_goes_on(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    original = hooks.check

    def broken_check(client, qname):
        raise RuntimeError("policy engine bug")

    hooks.check = broken_check
    assert ask.udp("api.test").rcode() == dns.rcode.SERVFAIL
    assert ask.tcp("api.test").rcode() == dns.rcode.SERVFAIL
    hooks.check = original
    assert addresses(ask.udp("api.test")) == ["192.0.2.10"]

    def broken_emit(event):
        raise RuntimeError("event sink down")

    hooks.emit = broken_emit
    assert addresses(ask.tcp("api.test")) == ["192.0.2.10"]
    stats = ask.resolver.stats()
    assert stats["internal_errors"] == 2 and stats["emit_errors"] >= 1


def test_inflight_limit_answers_servfail(zone, hooks):
    zone.timeout("slow1.test")
    zone.timeout("slow2.test")
    hooks.default = allowed()
    resolver = Resolver(config(upstream_timeout=1.0), hooks, upstreams=[zone.address],
                        max_inflight=1)
    resolver.start()
    try:
        ask = Ask(resolver, hooks)
        results = {}
        first = threading.Thread(target=lambda: results.update(a=ask.udp("slow1.test").rcode()))
        first.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert ask.udp("slow2.test").rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - t0 < 0.8  # shed after the grace period, not the timeout
        first.join()
        assert results["a"] == dns.rcode.SERVFAIL
        assert resolver.stats()["overloaded"] == 1
        assert hooks.find(reason="overloaded")
    finally:
        resolver.stop()


# ---------------------------------------------------------------------------------------------
# Lifecycle, config, metrics


def test_start_reports_an_address_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        resolver = Resolver(config(listen=(HOST, port)), FakeHooks(), upstreams=[(HOST, 9)])
        with pytest.raises(AddressInUseError) as err:
            resolver.start()
    assert isinstance(err.value, ResolverError) and isinstance(err.value, HostAgentError)
    assert "address already in use" in str(err.value) and str(port) in str(err.value)
    resolver.stop()  # never started: a no-op


def test_stop_is_prompt_and_idempotent(zone, hooks):
    zone.timeout("slow.test")
    hooks.allow_names("slow.test")
    resolver = Resolver(config(upstream_timeout=10.0), hooks, upstreams=[zone.address])
    resolver.start()
    host, port = resolver.address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(dns.message.make_query("slow.test", "A").to_wire(), (host, port))
        tcp = socket.create_connection((host, port), timeout=3)
        time.sleep(0.2)
        t0 = time.monotonic()
        resolver.stop()
        assert time.monotonic() - t0 < 1.0
        tcp.close()
    resolver.stop()
    with pytest.raises(ResolverError):
        resolver.address
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, port))


def test_own_listen_address_as_upstream_is_refused(hooks):
    resolver = Resolver(config(listen=(HOST, 5353)), hooks, upstreams=[(HOST, 5353)])
    with pytest.raises(ResolverError, match="loop"):
        resolver.start()


def test_system_upstreams(tmp_path):
    plain = tmp_path / "resolv.conf"
    plain.write_text("# comment\nsearch example.com\nnameserver 10.0.0.2\n"
                     "nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n")
    assert system_upstreams(str(plain)) == (("10.0.0.2", 53), ("fe80::1%eth0", 53))
    stub = tmp_path / "stub.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    real = tmp_path / "real.conf"
    real.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    assert system_upstreams(str(stub), systemd_path=str(real)) == \
        (("192.0.2.53", 53), ("2001:db8::53", 53))
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    with pytest.raises(HostAgentError, match="no nameserver"):
        system_upstreams(str(empty))
    with pytest.raises(HostAgentError):
        system_upstreams(str(stub), systemd_path=str(tmp_path / "missing.conf"))


def test_collector_exports_bounded_labels(zone, hooks, ask):
    zone.add("api.test", "A", "192.0.2.10")
    hooks.allow_names("api.test")
    ask.udp("api.test")
    ask.udp("api.test")
    ask.udp("secret.test")
    registry = CollectorRegistry()
    registry.register(DnsCollector(ask.resolver))
    text = generate_latest(registry).decode()
    for metric in ("hostagent_dns_queries_total", "hostagent_dns_cache_hits_total",
                   "hostagent_dns_cache_misses_total", "hostagent_dns_upstream_latency_seconds",
                   "hostagent_dns_upstream_failures_total", "hostagent_dns_tunnel_refused_total",
                   "hostagent_dns_rate_limited_total", "hostagent_dns_unattributed_total"):
        assert metric in text, metric
    assert 'hostagent_dns_queries_total{policy="web",rcode="NOERROR",verdict="allow"} 2.0' in text
    assert 'hostagent_dns_queries_total{policy="web",rcode="REFUSED",verdict="deny"} 1.0' in text
    assert "hostagent_dns_cache_hits_total 1.0" in text
    assert 'hostagent_dns_upstream_latency_seconds_count 1.0' in text
    assert "api.test" not in text and "secret" not in text and "192.0.2" not in text
    assert registry.get_sample_value("hostagent_dns_upstream_failures_total",
                                     {"upstream": f"{zone.address[0]}:{zone.address[1]}"}) == 0


def test_collector_survives_a_failing_resolver():
    class Broken:
        def stats(self):
            raise RuntimeError("boom")

    errors = []
    registry = CollectorRegistry()
    registry.register(DnsCollector(Broken(), on_error=lambda: errors.append(1)))
    assert generate_latest(registry) == b""
    assert errors == [1]
