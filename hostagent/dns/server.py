"""The node's DNS resolver: answers a workload only names its policy allows, and has the
answer's addresses opened in the kernel for that workload before the answer leaves.

Per query (UDP, or TCP with 2-byte length framing):

1. parse the header and question by hand (hostagent.dns.wire): FORMERR, NOTIMP, or dropped;
2. ``hooks.attribute``: who sent it, as the kernel saw it; unknown -> REFUSED ("unattributed");
3. per-workload token bucket -> REFUSED ("rate_limited");
4. ``hooks.check`` (memoized per (workload, name) until invalidate()) -> refused rcode on deny;
5. tunnel shapes and per-zone unique-name counts -> refused rcode ("tunnel"), never forwarded;
6. the shared answer cache; on a miss, the upstreams (coalesced, bounded, hostagent.dns.upstream);
7. every CNAME in the chain checked for this workload ("cname_not_allowed"), rebind-protected
   addresses dropped unless the policy opens them ("rebinding");
8. ``hooks.allow`` with the addresses and their TTLs, once per (workload, cached answer);
9. the answer: pre-built bytes, the client's id and question spliced in, TC=1 when a UDP answer
   exceeds what the client accepts.

The event loop (uvloop) runs in its own daemon thread; hooks are called from it. An exception
while handling one query answers SERVFAIL and is counted; it never stops the server.

Events are plain dicts::

    {"kind": "dns", "time": "2024-05-01T12:00:00.123Z", "verdict": "allow"|"deny"|"audit",
     "reason": str, "policy": str|None, "rule": str|None,
     "query": {"name": str, "type": "A"}, "rcode": "NOERROR"|"REFUSED"|...,
     "answers": [{"ip": str, "ttl": int}], "cnames": [str], "dropped": [str],
     "workload": {"cgroup_id": int|None}, "socket": {"cookie": int},
     "client": {"ip": str, "port": int, "protocol": "udp"|"tcp"}}

Reasons the resolver itself sets: unattributed, rate_limited, tunnel, cname_not_allowed,
rebinding, allowance_failed, upstream_failure, bad_answer, overloaded, malformed,
not_implemented, unsupported_query, internal_error; otherwise the reason is check()'s.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence

import dns.name
import dns.rdatatype
import uvloop

from hostagent.config import DnsConfig
from hostagent.dns import wire
from hostagent.dns.cache import AnswerCache, BadAnswer, CacheEntry, build_entry
from hostagent.dns.guard import (EventLimiter, RateLimitedLog, RateLimiter, RebindFilter,
                                 TunnelGuard)
from hostagent.dns.hot import REFRESH as HOT_REFRESH
from hostagent.dns.hot import HotAnswer, HotAnswers
from hostagent.dns.hooks import (ALLOW, AUDIT, DENY, VERDICTS, Client, NameVerdict,
                                 ResolverHooks)
from hostagent.dns.upstream import UpstreamFailure, UpstreamPool, system_upstreams
from hostagent.errors import HostAgentError

__all__ = ["AddressInUseError", "Resolver", "ResolverError"]

log = logging.getLogger(__name__)

PROTO_TCP = 6
PROTO_UDP = 17

# Upstream queries in flight at once. Each holds a socket (a file descriptor) for up to
# upstream_timeout seconds; 1024 covers a burst of distinct names at thousands of misses per
# second without approaching the default RLIMIT_NOFILE.
MAX_INFLIGHT = 1024
# How long a miss may wait for an in-flight slot before it is answered SERVFAIL: a short burst
# above the limit is absorbed, a sustained flood is shed without queueing unbounded work.
INFLIGHT_GRACE = 0.1
# Misses allowed to wait for a slot during that grace; beyond, SERVFAIL at once.
MAX_INFLIGHT_WAITERS = 1024
# TCP clients at once; each costs a descriptor and a buffer. Stub resolvers only use TCP after a
# truncated answer, so a few hundred is far above normal use.
MAX_TCP_CONNECTIONS = 256
# A TCP connection without a complete query (and nothing pending) for this long is closed:
# RFC 7766 6.2.3 recommends idle timeouts of seconds; it also ends slow-loris connections.
TCP_IDLE_TIMEOUT = 10.0
# Queries one TCP connection may have awaiting upstream answers before we stop reading it.
MAX_TCP_PENDING = 32
# Unsent bytes we buffer per TCP connection before we stop reading it (client not reading).
TCP_WRITE_HIGH_WATER = 256 * 1024
TCP_BACKLOG = 128
# Memoized check() results; the memo is dropped wholesale beyond this (a workload cycling
# through random names must not grow it without bound).
MAX_MEMO = 262144
MAX_NAME_MEMO = 65536
# Per-workload decisions kept on one cached answer (see _Decision); bounds cache memory at
# cache_size x this many, whatever the number of workloads.
MAX_WORKLOADS_PER_ENTRY = 4096
# start() waits this long for the loop thread to listen; stop() for it to finish.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Receive buffer of the UDP socket: room for a burst of a few thousand queries while the loop
# is busy (best effort; the kernel caps it at net.core.rmem_max).
UDP_RCVBUF = 4 * 1024 * 1024
# Events of kinds an attacker can generate at line rate, per (kind, workload), at most one per:
FLOOD_EVENT_INTERVAL = 1.0

_HEADER_TAIL = struct.Struct("!HHHHH")  # a header without its id


class ResolverError(HostAgentError):
    """The DNS resolver failed."""


class AddressInUseError(ResolverError):
    """The resolver's listen address is already in use."""


class _Overloaded(Exception):
    pass


class _AllowanceFailed(Exception):
    pass


class _Decision:
    """What one workload gets from one cache entry, valid for one invalidate() generation."""

    __slots__ = ("generation", "refuse_name", "verdict", "reason", "template", "dropped",
                 "answers", "always_emit", "rcode_name", "outcome")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.refuse_name: str | None = None  # a CNAME link the workload may not resolve
        self.verdict = ALLOW
        self.reason = ""
        self.template = None
        self.dropped: tuple[str, ...] = ()
        self.answers: tuple[tuple[str, int], ...] = ()  # (ip text, clamped ttl) for events
        self.always_emit = False
        self.rcode_name = "NOERROR"
        self.outcome = [0]  # the shared counter cell of (policy, verdict, rcode)


class Resolver:
    """The node resolver. See the module docstring for what it does per query."""

    def __init__(self, cfg: DnsConfig, hooks: ResolverHooks, *,
                 upstreams: Sequence[tuple[str, int]] | None = None,
                 max_inflight: int = MAX_INFLIGHT,
                 max_tcp_connections: int = MAX_TCP_CONNECTIONS,
                 tcp_idle_timeout: float = TCP_IDLE_TIMEOUT) -> None:
        self._cfg = cfg
        self._hooks = hooks
        self._upstreams = tuple(upstreams) if upstreams is not None else None
        self._max_inflight = max_inflight
        self._max_tcp = max_tcp_connections
        self._tcp_idle = tcp_idle_timeout
        self._refused_rcode = wire.RCODE_BY_NAME[cfg.refused_rcode]
        self._emit_allowed = cfg.emit_allowed

        self._cache = AnswerCache(cfg.cache_size)
        self._hot = HotAnswers()
        self._buckets = RateLimiter(cfg.rate_limit_qps, cfg.rate_limit_burst)
        self._tunnel = TunnelGuard(cfg.tunnel_max_label_length, cfg.tunnel_entropy_min_length,
                                   cfg.tunnel_entropy_bits, cfg.tunnel_max_unique_subdomains,
                                   cfg.tunnel_window)
        self._rebind = RebindFilter(cfg.rebind_protect)
        self._flood_events = EventLimiter(FLOOD_EVENT_INTERVAL)
        self._rlog = RateLimitedLog(log)

        # invalidate() bumps the generation; memo entries and per-entry decisions carry the
        # generation they were made in and are ignored once it moved on.
        self._gen_lock = threading.Lock()
        self._generation = 0
        self._memo: dict[tuple[int, str], tuple[int, NameVerdict]] = {}
        self._names: dict[bytes, str] = {}
        self._types: dict[int, str] = {}
        self._iso_ms = -1
        self._iso_text = ""

        self._lock = threading.Lock()  # start/stop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._address: tuple[str, int] | None = None
        self._pool: UpstreamPool | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[tuple, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._tcp_conns: set[_TcpConnection] = set()
        self._waiters = 0

        # Counters: plain ints and dicts written by the loop thread only, read by stats().
        self._outcomes: dict[tuple[str, str, str], list[int]] = {}  # cells: see _outcome()
        self._n = dict.fromkeys((
            "queries", "cache_hits", "hot_hits", "cache_misses", "coalesced", "tunnel_refused",
            "rate_limited", "unattributed", "malformed", "dropped", "internal_errors",
            "allowance_failures", "upstream_failures", "overloaded", "truncated", "denied",
            "cname_refused", "rebinding_drops", "tcp_rejected", "tcp_timeouts", "emitted",
            "emit_errors"), 0)

    # -----------------------------------------------------------------------------------------
    # Lifecycle (any thread).

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; raises ResolverError before start()."""
        if self._address is None:
            raise ResolverError("the resolver is not listening")
        return self._address

    def start(self) -> None:
        """Bind UDP and TCP on cfg.listen, start the loop thread, return once listening."""
        with self._lock:
            if self._thread is not None:
                raise ResolverError("the resolver is already running")
            upstreams = self._upstreams
            try:
                if upstreams is None:
                    upstreams = self._cfg.upstreams or system_upstreams()
            except UpstreamFailure as err:
                raise ResolverError(str(err)) from None
            host, port = self._cfg.listen
            for up_host, up_port in upstreams:
                if _same_address(up_host, host) and up_port == port:
                    raise ResolverError(f"upstream {up_host}:{up_port} is the resolver's own listen"
                                        " address: queries would loop")
            try:
                self._pool = UpstreamPool(upstreams, timeout=self._cfg.upstream_timeout,
                                          socket_mark=self._cfg.socket_mark)
            except UpstreamFailure as err:
                raise ResolverError(str(err)) from None
            udp, tcp = _bind(host, port)
            self._address = (host, udp.getsockname()[1])
            ready = threading.Event()
            self._start_error = None
            thread = threading.Thread(target=self._run, args=(udp, tcp, ready),
                                      name="hostagent-dns", daemon=True)
            self._thread = thread
            thread.start()
            if not ready.wait(START_TIMEOUT) or self._start_error is not None:
                err = self._start_error
                self._stop_locked()
                udp.close()
                tcp.close()
                raise ResolverError(f"the resolver did not start: {err or 'timed out'}")
            log.info("DNS resolver listening on %s:%d (UDP and TCP), upstreams %s", host,
                     self._address[1], ", ".join(u.label for u in self._pool.upstreams))

    def stop(self) -> None:
        """Stop serving and wait for the loop thread (at most STOP_TIMEOUT). Idempotent."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop already closed
                pass
        if thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                log.error("the DNS resolver thread did not stop within %.0fs", STOP_TIMEOUT)
        self._thread = None
        self._address = None

    def invalidate(self) -> None:
        """Forget memoized check() results and which workloads had which answers opened.

        Call on any policy or workload binding change. Thread-safe; takes effect for every
        query whose check() starts afterwards.
        """
        with self._gen_lock:
            self._generation += 1

    def stats(self) -> dict:
        """Counters for status and metrics. Safe to call from any thread.

        Plain ints, unless noted: queries (parsed), cache_hits (hot_hits of them answered
        without a parse, hostagent.dns.hot), cache_misses, coalesced,
        denied, cname_refused, tunnel_refused, rate_limited, unattributed, malformed, dropped,
        truncated, internal_errors, allowance_failures, upstream_failures, overloaded,
        rebinding_drops, tcp_rejected, tcp_timeouts, emitted, emit_errors, events_suppressed,
        cache_entries, inflight, tcp_connections, generation; listening (bool); address
        ([host, port] or None); queries_by ([{policy, verdict, rcode, count}]); upstreams
        ([{upstream, healthy, failures}]); upstream_failures_by ({upstream: n});
        upstream_latency ({counts: per LATENCY_BUCKETS bucket then +Inf, sum: seconds});
        upstream_ignored_replies, upstream_tcp_fallbacks.
        """
        out: dict = dict(self._n)
        pool = self._pool
        out["queries_by"] = [{"policy": p, "verdict": v, "rcode": r, "count": n}
                             for (p, v, r), (n,) in dict(self._outcomes).items()]
        out["cache_entries"] = len(self._cache)
        out["inflight"] = len(self._inflight)
        out["tcp_connections"] = len(self._tcp_conns)
        out["events_suppressed"] = self._flood_events.suppressed
        out["generation"] = self._generation
        out["listening"] = self._address is not None
        out["address"] = list(self._address) if self._address else None
        if pool is not None:
            now = time.monotonic()
            failures = dict(pool.failures)
            out["upstreams"] = [{"upstream": u.label, "healthy": u.healthy(now),
                                 "failures": failures.get(u.label, 0)} for u in pool.upstreams]
            out["upstream_failures_by"] = failures
            out["upstream_latency"] = {"counts": list(pool.latency_counts),
                                       "sum": pool.latency_sum}
            out["upstream_ignored_replies"] = pool.ignored_replies
            out["upstream_tcp_fallbacks"] = pool.tcp_fallbacks
        else:
            out["upstreams"] = []
            out["upstream_failures_by"] = {}
            out["upstream_latency"] = {"counts": [], "sum": 0.0}
            out["upstream_ignored_replies"] = 0
            out["upstream_tcp_fallbacks"] = 0
        return out

    # -----------------------------------------------------------------------------------------
    # The loop thread.

    def _run(self, udp: socket.socket, tcp: socket.socket, ready: threading.Event) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(udp, tcp, ready))
        except BaseException as err:  # noqa: BLE001 - reported to start() or logged
            if not ready.is_set():
                self._start_error = err
                ready.set()
            else:
                log.exception("the DNS resolver stopped on an error")
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._loop = None
                self._stopping = None
                self._inflight.clear()
                self._tasks.clear()
                self._tcp_conns.clear()

    async def _serve(self, udp: socket.socket, tcp: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._sem = asyncio.Semaphore(self._max_inflight)
        udp_transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self),
                                                               sock=udp)
        server = await loop.create_server(lambda: _TcpConnection(self), sock=tcp,
                                          backlog=TCP_BACKLOG)
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            udp_transport.close()
            server.close()
            for conn in list(self._tcp_conns):
                conn.abort()
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -----------------------------------------------------------------------------------------
    # One query. Runs in the loop thread; returns the answer to send now, or None (dropped, or
    # answered later through responder.respond()).

    def _query(self, data: bytes, addr: tuple, proto: int, responder) -> bytes | None:
        q = None
        try:
            try:
                q = wire.parse_query(data)
            except wire.WireError as err:
                return self._malformed(data, addr, proto, err)
            if q is None:
                self._n["dropped"] += 1
                return None
            self._n["queries"] += 1
            now = time.monotonic()
            # Read once, before any check(): what is decided below is stamped with it, so an
            # invalidate() that lands meanwhile makes the next query decide again.
            generation = self._generation
            client = self._hooks.attribute(addr[0], addr[1], proto)
            if client is None:
                self._n["unattributed"] += 1
                return self._refuse(q, None, None, "unattributed", addr, proto, wire.REFUSED,
                                    flood_key=("unattributed", addr[0]), now=now)
            cgroup = client.cgroup_id
            if not self._buckets.take(cgroup, now):
                self._n["rate_limited"] += 1
                return self._refuse(q, client, None, "rate_limited", addr, proto, wire.REFUSED,
                                    flood_key=("rate_limited", cgroup), now=now)
            if q.edns_version != 0:
                return self._refuse(q, client, None, "unsupported_query", addr, proto,
                                    wire.BADVERS, flood_key=("badvers", cgroup), now=now)
            if q.qclass != wire.CLASS_IN or q.qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR,
                                                         wire.TYPE_MAILA, wire.TYPE_MAILB):
                rcode = (wire.NOTIMP if q.qtype in (wire.TYPE_MAILA, wire.TYPE_MAILB)
                         else wire.REFUSED)
                return self._refuse(q, client, None, "unsupported_query", addr, proto, rcode,
                                    flood_key=("unsupported", cgroup), now=now)
            qname = self._names.get(q.key_name)
            if qname is None:
                if len(self._names) >= MAX_NAME_MEMO:
                    self._names.clear()
                qname = self._names[q.key_name] = wire.name_text(q.key_name)
            verdict = self._verdict(client, qname, generation)
            if verdict.verdict == DENY:
                self._n["denied"] += 1
                return self._refuse(q, client, verdict, verdict.reason, addr, proto, qname=qname)
            key = (q.key_name, q.qtype, q.qclass, q.edns_payload >= 0)
            entry = self._cache.get(key, now)
            if entry is None:
                # A cached name passed this check when it was first asked for.
                shape = self._tunnel.shape(q.key_name)
                if shape is not None:
                    return self._tunnel_refused(q, client, verdict, qname, addr, proto)
            if not self._tunnel.admit(cgroup, qname, now):
                return self._tunnel_refused(q, client, verdict, qname, addr, proto)
            if entry is not None:
                self._n["cache_hits"] += 1
                return self._answer(q, client, verdict, qname, entry, now, addr, proto,
                                    generation)
            self._n["cache_misses"] += 1
            responder.pending += 1
            self._spawn(self._miss(q, client, qname, key, addr, proto, responder))
            return None
        except Exception:
            return self._internal_error(data, q, addr, proto)

    def _verdict(self, client: Client, qname: str, generation: int) -> NameVerdict:
        key = (client.cgroup_id, qname)
        memo = self._memo.get(key)
        if memo is not None and memo[0] == generation:
            return memo[1]
        verdict = self._hooks.check(client, qname)
        if not isinstance(verdict, NameVerdict) or verdict.verdict not in VERDICTS:
            raise TypeError(f"check() returned {verdict!r}, not a NameVerdict")
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        self._memo[key] = (generation, verdict)
        return verdict

    def _answer(self, q: wire.Query, client: Client, verdict: NameVerdict, qname: str,
                entry: CacheEntry, now: float, addr: tuple, proto: int,
                generation: int) -> bytes:
        """Answer from a cache entry (the hot path: no dnspython, no allocation beyond the
        answer bytes and the event). ``verdict`` was decided in ``generation``."""
        decision = entry.workloads.get(client.cgroup_id)
        if decision is None or decision.generation != self._generation:
            try:
                decision = self._decide(client, verdict, qname, entry, now, generation)
            except _AllowanceFailed:
                self._n["allowance_failures"] += 1
                return self._refuse(q, client, verdict, "allowance_failed", addr, proto,
                                    wire.SERVFAIL, qname=qname, verdict_name=verdict.verdict,
                                    cnames=entry.cnames)
            if len(entry.workloads) >= MAX_WORKLOADS_PER_ENTRY:
                entry.workloads.clear()  # costs repeated allow() calls, never a wrong answer
            entry.workloads[client.cgroup_id] = decision
        if decision.refuse_name is not None:
            self._n["cname_refused"] += 1
            return self._refuse(q, client, verdict, "cname_not_allowed", addr, proto,
                                qname=qname, cnames=entry.cnames)
        age = int(now - entry.created)
        template = decision.template
        data = q.data
        edns = q.edns_payload >= 0
        # Header: the client's id; QR, RA, the client's RD and CD, the entry's rcode.
        out = (data[:2] + _HEADER_TAIL.pack(0x8080 | (q.flags & 0x0110) | entry.rcode, 1,
                                            template.count, 0, edns)
               + data[12:q.qend] + template.at(age) + (wire.OPT_RR if edns else b""))
        decision.outcome[0] += 1
        if proto == PROTO_UDP and len(out) > wire.CLASSIC_UDP_LIMIT and len(out) > q.udp_limit():
            self._n["truncated"] += 1
            return wire.truncated_response(q, entry.rcode)
        if self._emit_allowed or decision.always_emit:
            self._emit_answer(q, client, verdict, qname, entry, decision, age, addr, proto)
        elif proto == PROTO_UDP:
            self._hot.put((client.cgroup_id, data[2:]), HotAnswer(
                entry, decision, (q.key_name, q.qtype, q.qclass, edns), qname,
                out[2:12] + data[12:q.qend], template, wire.OPT_RR if edns else b"", now))
        return out

    def _hot_answer(self, data: bytes, addr: tuple) -> bytes | None:
        """The answer to a UDP query this workload sent before byte for byte (hostagent.dns.hot),
        or None: the full path (_query) decides."""
        try:
            now = time.monotonic()
            client = self._hooks.attribute(addr[0], addr[1], PROTO_UDP)
            if client is None:
                return None
            cgroup = client.cgroup_id
            key = (cgroup, data[2:])
            hot = self._hot.get(key)
            if hot is None:
                return None
            entry = hot.entry
            if (hot.decision.generation != self._generation or now >= entry.expires
                    or entry.workloads.get(cgroup) is not hot.decision):
                self._hot.discard(key)
                return None
            if not self._buckets.take(cgroup, now):
                return None  # the full path refuses it, and reports
            if now - hot.refreshed >= HOT_REFRESH:
                if (self._cache.get(hot.cache_key, now) is not entry
                        or not self._tunnel.admit(cgroup, hot.qname, now)):
                    self._hot.discard(key)
                    return None
                hot.refreshed = now
            n = self._n
            n["queries"] += 1
            n["cache_hits"] += 1
            n["hot_hits"] += 1
            hot.decision.outcome[0] += 1
            return data[:2] + hot.body(now)
        except Exception:  # noqa: BLE001 - the full path answers it, and reports what failed
            return None

    def _emit_answer(self, q: wire.Query, client: Client, verdict: NameVerdict, qname: str,
                     entry: CacheEntry, decision: _Decision, age: int, addr: tuple,
                     proto: int) -> None:
        self._emit({
                "kind": "dns", "time": self._iso_now(), "verdict": decision.verdict,
                "reason": decision.reason, "policy": verdict.policy, "rule": verdict.rule,
                "ticket": verdict.ticket,
                "query": {"name": qname, "type": self._type_text(q.qtype)},
                "rcode": decision.rcode_name,
                "answers": [{"ip": ip, "ttl": ttl - age} for ip, ttl in decision.answers],
                "cnames": list(entry.cnames), "dropped": list(decision.dropped),
                "workload": {"cgroup_id": client.cgroup_id}, "socket": {"cookie": client.cookie},
                "client": {"ip": addr[0], "port": addr[1],
                           "protocol": "udp" if proto == PROTO_UDP else "tcp"}})

    def _decide(self, client: Client, verdict: NameVerdict, qname: str, entry: CacheEntry,
                now: float, generation: int) -> _Decision:
        """Check the chain for this workload, drop rebind-protected addresses it may not see,
        and open the rest in the kernel. Raises _AllowanceFailed."""
        decision = _Decision(generation)
        decision.verdict = verdict.verdict
        decision.reason = verdict.reason
        for name in entry.cnames:
            link = self._verdict(client, name, generation)
            if link.verdict == DENY:
                decision.refuse_name = name
                return decision
            if link.verdict == AUDIT and decision.verdict == ALLOW:
                decision.verdict = AUDIT
                decision.reason = "cname_not_allowed"
        drop: frozenset = frozenset()
        if entry.protected:
            drop = frozenset(a for a in entry.protected if not _private_ok(verdict, a))
        age = int(now - entry.created)
        addrs = entry.addresses(drop, age)
        if verdict.grant is not None and addrs:
            try:
                self._hooks.allow(client, verdict, qname, addrs)
            except Exception as err:
                self._rlog.log(logging.ERROR, "allow", now, "opening %d addresses for %s in the "
                               "kernel failed: %s", len(addrs), qname, err)
                raise _AllowanceFailed from err
        decision.template = entry.template(drop)
        decision.answers = tuple((str(r.addr), r.ttl) for r in entry.records
                                 if r.addr is not None and r.addr not in drop)
        if drop:
            self._n["rebinding_drops"] += len(drop)
            decision.dropped = tuple(sorted(str(a) for a in drop))
            decision.reason = "rebinding"
        decision.always_emit = bool(drop) or decision.verdict == AUDIT
        decision.rcode_name = wire.RCODE_NAMES[entry.rcode]
        decision.outcome = self._outcome((verdict.policy or "", decision.verdict,
                                          decision.rcode_name))
        return decision

    def _outcome(self, key: tuple[str, str, str]) -> list[int]:
        """The counter cell of hostagent_dns_queries_total{policy,verdict,rcode}."""
        cell = self._outcomes.get(key)
        if cell is None:
            cell = self._outcomes[key] = [0]
        return cell

    async def _miss(self, q: wire.Query, client: Client, qname: str, key: tuple, addr: tuple,
                    proto: int, responder) -> None:
        out = None
        try:
            try:
                entry = await self._fetch(q, key)
            except UpstreamFailure as err:
                self._n["upstream_failures"] += 1
                self._rlog.log(logging.WARNING, "upstream", time.monotonic(),
                               "no upstream answered %s: %s", qname, err)
                out = self._failed(q, client, qname, "upstream_failure", addr, proto)
            except BadAnswer as err:
                self._rlog.log(logging.WARNING, "bad_answer", time.monotonic(),
                               "unusable upstream answer for %s: %s", qname, err)
                out = self._failed(q, client, qname, "bad_answer", addr, proto)
            except _Overloaded:
                self._n["overloaded"] += 1
                self._rlog.log(logging.WARNING, "overloaded", time.monotonic(),
                               "more than %d upstream queries in flight: answering SERVFAIL",
                               self._max_inflight)
                out = self._failed(q, client, qname, "overloaded", addr, proto)
            else:
                # Policy may have changed while we waited: ask again (memoized unless it did).
                generation = self._generation
                verdict = self._verdict(client, qname, generation)
                if verdict.verdict == DENY:
                    self._n["denied"] += 1
                    out = self._refuse(q, client, verdict, verdict.reason, addr, proto,
                                       qname=qname)
                else:
                    out = self._answer(q, client, verdict, qname, entry, time.monotonic(), addr,
                                       proto, generation)
        except asyncio.CancelledError:
            raise
        except Exception:
            out = self._internal_error(q.data, q, addr, proto)
        finally:
            responder.pending -= 1
        responder.respond(out, addr)

    async def _fetch(self, q: wire.Query, key: tuple) -> CacheEntry:
        """The entry for ``key`` from upstream; identical misses in flight share one query."""
        task = self._inflight.get(key)
        if task is None:
            task = self._loop.create_task(self._fetch_upstream(q, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._fetched(key, t))
        else:
            self._n["coalesced"] += 1
        return await asyncio.shield(task)

    def _fetched(self, key: tuple, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited is not logged

    async def _fetch_upstream(self, q: wire.Query, key: tuple) -> CacheEntry:
        sem = self._sem
        if sem.locked():
            if self._waiters >= MAX_INFLIGHT_WAITERS:
                raise _Overloaded
            self._waiters += 1
            try:
                async with asyncio.timeout(INFLIGHT_GRACE):
                    await sem.acquire()
            except TimeoutError:
                raise _Overloaded from None
            finally:
                self._waiters -= 1
        else:
            await sem.acquire()
        try:
            msg = await self._pool.resolve(q.key_name, q.qtype, q.qclass)
        finally:
            sem.release()
        qname = dns.name.from_wire(q.key_name, 0)[0]
        entry = build_entry(msg, qname, q.qtype, q.qclass, ttl_min=self._cfg.ttl_min,
                            ttl_max=self._cfg.ttl_max, rebind=self._rebind, now=time.monotonic())
        self._cache.put(key, entry)
        return entry

    # -----------------------------------------------------------------------------------------
    # Answers other than from an entry, and events.

    def _refuse(self, q: wire.Query, client: Client | None, verdict: NameVerdict | None,
                reason: str, addr: tuple, proto: int, rcode: int | None = None, *,
                qname: str | None = None, verdict_name: str = DENY, cnames: Sequence[str] = (),
                flood_key: object = None, now: float = 0.0) -> bytes:
        if rcode is None:
            rcode = self._refused_rcode
        rcode_name = wire.RCODE_NAMES.get(rcode, str(rcode))
        policy = verdict.policy if verdict is not None else None
        okey = (policy or "", verdict_name, rcode_name)
        self._outcome(okey)[0] += 1
        if flood_key is None or self._flood_events.allow(flood_key, now):
            if qname is None:
                qname = wire.name_text(q.key_name)
            self._emit(self._event(q, qname, client, addr, proto, verdict_name, reason, verdict,
                                   rcode_name, cnames=cnames))
        return wire.error_response(q.data, q, rcode)

    def _failed(self, q: wire.Query, client: Client, qname: str, reason: str, addr: tuple,
                proto: int) -> bytes:
        verdict = self._verdict(client, qname, self._generation)
        return self._refuse(q, client, verdict, reason, addr, proto, wire.SERVFAIL, qname=qname,
                            verdict_name=verdict.verdict)

    def _tunnel_refused(self, q: wire.Query, client: Client, verdict: NameVerdict, qname: str,
                        addr: tuple, proto: int) -> bytes:
        self._n["tunnel_refused"] += 1
        return self._refuse(q, client, verdict, "tunnel", addr, proto, qname=qname)

    def _malformed(self, data: bytes, addr: tuple, proto: int, err: wire.WireError) -> bytes:
        self._n["malformed"] += 1
        reason = "not_implemented" if err.rcode == wire.NOTIMP else "malformed"
        now = time.monotonic()
        client = None
        try:
            client = self._hooks.attribute(addr[0], addr[1], proto)
        except Exception:  # noqa: BLE001 - the answer is an error already; only the event lacks it
            pass
        flood_key = (reason, client.cgroup_id if client else addr[0])
        rcode_name = wire.RCODE_NAMES[err.rcode]
        okey = ("", DENY, rcode_name)
        self._outcome(okey)[0] += 1
        if self._flood_events.allow(flood_key, now):
            self._emit(self._event(None, "", client, addr, proto, DENY, reason, None, rcode_name))
        return wire.error_response(data, None, err.rcode)

    def _internal_error(self, data: bytes, q: wire.Query | None, addr: tuple,
                        proto: int) -> bytes | None:
        self._n["internal_errors"] += 1
        self._rlog.log(logging.ERROR, "internal", time.monotonic(),
                       "internal error answering a DNS query from %s", addr[0], exc_info=True)
        okey = ("", DENY, "SERVFAIL")
        self._outcome(okey)[0] += 1
        if len(data) < 12:
            return None
        try:
            return wire.error_response(data, q, wire.SERVFAIL)
        except Exception:  # noqa: BLE001 - nothing sensible left to answer
            return None

    def _event(self, q: wire.Query | None, qname: str, client: Client | None, addr: tuple,
               proto: int, verdict_name: str, reason: str, verdict: NameVerdict | None,
               rcode_name: str, *, cnames: Sequence[str] = ()) -> dict:
        return {
            "kind": "dns", "time": self._iso_now(), "verdict": verdict_name, "reason": reason,
            "policy": verdict.policy if verdict is not None else None,
            "rule": verdict.rule if verdict is not None else None,
            "ticket": verdict.ticket if verdict is not None else None,
            "query": {"name": qname, "type": self._type_text(q.qtype) if q is not None else ""},
            "rcode": rcode_name, "answers": [], "cnames": list(cnames), "dropped": [],
            "workload": {"cgroup_id": client.cgroup_id if client is not None else None},
            "socket": {"cookie": client.cookie if client is not None else 0},
            "client": {"ip": addr[0], "port": addr[1],
                       "protocol": "udp" if proto == PROTO_UDP else "tcp"},
        }

    def _emit(self, event: dict) -> None:
        try:
            self._hooks.emit(event)
            self._n["emitted"] += 1
        except Exception:
            self._n["emit_errors"] += 1
            self._rlog.log(logging.ERROR, "emit", time.monotonic(), "emitting a DNS event failed",
                           exc_info=True)

    def _iso_now(self) -> str:
        """ISO-8601 UTC with milliseconds, formatted at most once per millisecond."""
        ms = int(time.time() * 1000)
        if ms != self._iso_ms:
            second, frac = divmod(ms, 1000)
            self._iso_text = time.strftime(f"%Y-%m-%dT%H:%M:%S.{frac:03d}Z", time.gmtime(second))
            self._iso_ms = ms
        return self._iso_text

    def _type_text(self, qtype: int) -> str:
        text = self._types.get(qtype)
        if text is None:
            if len(self._types) >= 1024:
                self._types.clear()
            text = self._types[qtype] = dns.rdatatype.to_text(qtype)
        return text


def _private_ok(verdict: NameVerdict, addr) -> bool:
    ok = verdict.private_ok
    if ok is None:
        return False
    try:
        return bool(ok(addr))
    except Exception:  # noqa: BLE001 - a failing policy callback keeps the address out
        log.exception("private_ok(%s) failed", addr)
        return False


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False


def _bind(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same (host, port); port 0 picks one free for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    attempts = 20 if port == 0 else 1
    for _ in range(attempts):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            except OSError:
                pass
            udp.bind((host, port))
        except OSError as err:
            udp.close()
            raise _bind_error(err, host, port, "UDP") from None
        actual = udp.getsockname()[1]
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Only so a restart is not refused while old connections sit in TIME_WAIT; unlike
            # UDP's, TCP's SO_REUSEADDR never lets two listeners share the port.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, actual))
            tcp.listen(TCP_BACKLOG)
        except OSError as err:
            tcp.close()
            udp.close()
            if port == 0 and err.errno == errno.EADDRINUSE:
                continue
            raise _bind_error(err, host, actual, "TCP") from None
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise ResolverError(f"cannot find a port free for both UDP and TCP on {host}")


def _bind_error(err: OSError, host: str, port: int, proto: str) -> ResolverError:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return AddressInUseError(
            f"cannot listen for DNS on {where}/{proto}: address already in use (another DNS "
            "server such as systemd-resolved, dnsmasq or a second agent?); set dns.listen",
            address=where)
    if err.errno == errno.EADDRNOTAVAIL:
        return ResolverError(f"cannot listen for DNS on {where}/{proto}: the address is not "
                             "assigned to this host", address=where)
    return ResolverError(f"cannot listen for DNS on {where}/{proto}: {err.strerror or err}",
                         address=where)


class _UdpProtocol(asyncio.DatagramProtocol):
    __slots__ = ("_resolver", "_transport", "pending")

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._transport: asyncio.DatagramTransport | None = None
        self.pending = 0

    def connection_made(self, transport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        out = self._resolver._hot_answer(data, addr)
        if out is None:
            out = self._resolver._query(data, addr, PROTO_UDP, self)
        if out is not None:
            self._transport.sendto(out, addr)

    def respond(self, out: bytes | None, addr) -> None:
        if out is not None and self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for answers to clients that went away: nothing to do


class _TcpConnection(asyncio.Protocol):
    """One TCP client: several length-framed queries, answered in any order (RFC 7766)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._transport: asyncio.Transport | None = None
        self._addr: tuple = ("", 0)
        self._buf = bytearray()
        self._idle: asyncio.TimerHandle | None = None
        self._paused = False
        self._write_paused = False
        self._closed = False
        self._eof = False
        self.pending = 0

    def connection_made(self, transport) -> None:
        r = self._resolver
        self._transport = transport
        if len(r._tcp_conns) >= r._max_tcp:
            r._n["tcp_rejected"] += 1
            r._rlog.log(logging.WARNING, "tcp_full", time.monotonic(),
                        "%d DNS TCP connections open: refusing more", r._max_tcp)
            self._closed = True
            transport.abort()
            return
        r._tcp_conns.add(self)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._addr = (peer[0], peer[1])
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._resolver._tcp_conns.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._resolver._loop.call_later(self._resolver._tcp_idle, self._idle_fired)

    def _idle_fired(self) -> None:
        if self._closed:
            return
        if self.pending:
            self._arm_idle()  # still answering: the client is waiting on us, not idle
            return
        self._resolver._n["tcp_timeouts"] += 1
        self._closed = True
        self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length = (buf[0] << 8) | buf[1]
            if length > wire.MAX_QUERY_SIZE:
                # The frame cannot be a query; the stream cannot be trusted past it.
                self._resolver._n["malformed"] += 1
                self._closed = True
                self._transport.abort()
                return
            if len(buf) < 2 + length:
                break
            frame = bytes(buf[2:2 + length])
            del buf[:2 + length]
            self._arm_idle()
            out = self._resolver._query(frame, self._addr, PROTO_TCP, self)
            if out is not None:
                self._write(out)
            if self._closed:
                return
        self._flow()

    def respond(self, out: bytes | None, addr) -> None:
        if out is not None and not self._closed:
            self._write(out)
            self._arm_idle()
        self._flow()
        self._close_if_done()

    def _write(self, out: bytes) -> None:
        if len(out) > 65535:
            return  # cannot be framed; cannot happen with replies bounded by the upstream's
        self._transport.write(len(out).to_bytes(2, "big") + out)

    def _flow(self) -> None:
        if self._closed:
            return
        want_pause = self.pending >= MAX_TCP_PENDING or self._write_paused
        if want_pause and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        elif not want_pause and self._paused:
            self._transport.resume_reading()
            self._paused = False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flow()

    def eof_received(self) -> bool:
        # Half-close: the client sent all its queries. Keep the transport open (return True)
        # until the pending ones are answered, then close.
        self._eof = True
        self._close_if_done()
        return True

    def _close_if_done(self) -> None:
        if self._eof and not self.pending and not self._closed:
            self._closed = True
            self._transport.close()  # after the buffered answers are written
