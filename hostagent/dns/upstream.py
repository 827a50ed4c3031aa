"""Asking the upstream resolvers: one fresh socket per query, strict reply matching, health.

Spoofing a reply to us needs the transaction id (16 random bits from ``secrets``), the source
port (a fresh socket per query: the kernel picks a random ephemeral port), the exact question,
and the upstream's address (each UDP socket is connected, so the kernel drops datagrams from
anyone else). Replies that do not match are ignored and we keep waiting until the timeout;
they never end the exchange, or a spoofer could make us fail queries at will.

Every upstream socket carries SO_MARK = DnsConfig.socket_mark, which the kernel side of the
agent uses to recognise the resolver's own queries and not redirect them back to it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Sequence

import dns.message
import dns.rcode

from hostagent.dns import wire
from hostagent.errors import HostAgentError

__all__ = ["LATENCY_BUCKETS", "Upstream", "UpstreamFailure", "UpstreamPool", "system_upstreams"]

log = logging.getLogger(__name__)

# Largest UDP reply accepted: we advertise EDNS_PAYLOAD, and an upstream that sends more than
# four times that is not following the protocol (or is not an upstream).
MAX_UDP_REPLY = 4 * wire.EDNS_PAYLOAD
# TCP replies carry a 16-bit length, which already bounds them.
MAX_TCP_REPLY = 65535
# A failing upstream is skipped for BACKOFF_BASE seconds, doubling per consecutive failure up to
# BACKOFF_MAX: long enough not to add a timeout to every query while it is down, short enough to
# notice within half a minute that it is back.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
# Upstream latency histogram buckets, seconds (hostagent_dns_upstream_latency_seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SYSTEMD_STUB = ipaddress.ip_address("127.0.0.53")
SYSTEMD_RESOLV_CONF = "/run/systemd/resolve/resolv.conf"
_SO_MARK = getattr(socket, "SO_MARK", 36)
_U16 = struct.Struct("!H")


class UpstreamFailure(HostAgentError):
    """No upstream resolver gave a usable answer."""


class Upstream:
    """One upstream resolver and its health."""

    __slots__ = ("host", "port", "family", "label", "failures", "down_until")

    def __init__(self, host: str, port: int) -> None:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
        self.host = host
        self.port = port
        self.family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        self.label = f"[{host}]:{port}" if addr.version == 6 else f"{host}:{port}"
        self.failures = 0  # consecutive
        self.down_until = 0.0

    def healthy(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(self.failures - 1, 16))

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class _BadReply(Exception):
    pass


class UpstreamPool:
    """The upstreams, asked in configured order; those backing off are skipped while any
    other is healthy."""

    def __init__(self, upstreams: Sequence[tuple[str, int]], *, timeout: float,
                 socket_mark: int | None) -> None:
        if not upstreams:
            raise UpstreamFailure("no upstream resolvers configured")
        self.upstreams = [Upstream(host, port) for host, port in upstreams]
        self._timeout = timeout
        self._mark = socket_mark
        self._mark_warned = False
        # Counters read by stats() (plain ints: the loop thread writes, a scrape reads).
        self.failures = {u.label: 0 for u in self.upstreams}
        self.ignored_replies = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.tcp_fallbacks = 0

    def order(self, now: float) -> list[Upstream]:
        healthy = [u for u in self.upstreams if u.healthy(now)]
        return healthy or list(self.upstreams)

    async def resolve(self, name_wire: bytes, qtype: int, qclass: int) -> dns.message.Message:
        """The first usable (NOERROR or NXDOMAIN) reply; raises UpstreamFailure."""
        last = "no upstream tried"
        for up in self.order(time.monotonic()):
            started = time.monotonic()
            try:
                msg = await self._exchange(up, name_wire, qtype, qclass)
            except (TimeoutError, OSError, _BadReply) as err:
                up.failed(time.monotonic())
                self.failures[up.label] += 1
                last = f"{up.label}: {_describe(err)}"
                continue
            up.succeeded()  # it answered, whatever it said: it is alive
            self._observe(time.monotonic() - started)
            rcode = msg.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return msg
            # SERVFAIL, REFUSED...: another upstream may do better for this name.
            self.failures[up.label] += 1
            last = f"{up.label}: {dns.rcode.to_text(rcode)}"
        raise UpstreamFailure(last)

    def _observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[i] += 1
                return
        self.latency_counts[-1] += 1

    def _socket(self, up: Upstream, kind: int) -> socket.socket:
        sock = socket.socket(up.family, kind)
        try:
            sock.setblocking(False)
            if self._mark is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self._mark)
                except PermissionError:
                    self._mark = None
                    if not self._mark_warned:
                        self._mark_warned = True
                        log.warning("cannot set SO_MARK on upstream sockets (needs CAP_NET_ADMIN):"
                                    " the resolver's own queries are not marked, and the kernel"
                                    " redirect may send them back to the resolver")
        except BaseException:
            sock.close()
            raise
        return sock

    async def _exchange(self, up: Upstream, name_wire: bytes, qtype: int,
                        qclass: int) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        question = name_wire + struct.pack("!HH", qtype, qclass)
        txid = secrets.randbits(16)
        sock = self._socket(up, socket.SOCK_DGRAM)
        try:
            sock.connect((up.host, up.port))  # UDP: only sets the peer, never blocks
            async with asyncio.timeout(self._timeout):
                sock.send(wire.upstream_query(txid, name_wire, qtype, qclass))
                while True:
                    data = await loop.sock_recv(sock, MAX_UDP_REPLY + 1)
                    if len(data) > MAX_UDP_REPLY or not _matches(data, txid, question):
                        self.ignored_replies += 1
                        continue
                    if data[2] & (wire.TC >> 8):
                        break
                    try:
                        return _parse(data)
                    except _BadReply:
                        self.ignored_replies += 1
        finally:
            sock.close()
        self.tcp_fallbacks += 1
        return await self._exchange_tcp(up, name_wire, qtype, qclass, question)

    async def _exchange_tcp(self, up: Upstream, name_wire: bytes, qtype: int, qclass: int,
                            question: bytes) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        txid = secrets.randbits(16)
        query = wire.upstream_query(txid, name_wire, qtype, qclass)
        sock = self._socket(up, socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(self._timeout):
                await loop.sock_connect(sock, (up.host, up.port))
                await loop.sock_sendall(sock, _U16.pack(len(query)) + query)
                # One query per connection, so the first reply must be ours.
                (length,) = _U16.unpack(await _recv_exactly(loop, sock, 2))
                data = await _recv_exactly(loop, sock, length)
        finally:
            sock.close()
        if not _matches(data, txid, question):
            self.ignored_replies += 1
            raise _BadReply("TCP reply does not match the query")
        return _parse(data)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, min(n - len(buf), 65536))
        if not chunk:
            raise _BadReply("connection closed mid-reply")
        buf += chunk
    return bytes(buf)


def _matches(data: bytes, txid: int, question: bytes) -> bool:
    """Is ``data`` a reply (QR=1, opcode QUERY) to our query: same id, one question, the same
    question (names compare case-insensitively)?"""
    if len(data) < 12 + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", data)
    if rid != txid or not flags & wire.QR or flags & 0x7800 or qdcount != 1:
        return False
    name_end = 12 + len(question) - 4
    # Only the name is compared case-insensitively: lower() on the type and class bytes would
    # turn type 65 (0x0041) into 0x0061.
    return (data[12:name_end].lower() == question[:-4]
            and data[name_end:name_end + 4] == question[-4:])


def _parse(data: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(data, ignore_trailing=False)
    # Hostile input: dnspython raises more than DNSException on some (ValueError, ...).
    except Exception as err:  # noqa: BLE001
        raise _BadReply(f"unparseable reply: {err}") from None


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, OSError):
        return err.strerror or errno.errorcode.get(err.errno or 0, str(err))
    return str(err)


def system_upstreams(path: str = "/etc/resolv.conf", *,
                     systemd_path: str = SYSTEMD_RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The nameservers of resolv.conf as (address, 53) pairs.

    When the file points at systemd-resolved's stub (127.0.0.53), the stub is a local forwarder
    that the kernel redirect would loop through; its own upstreams (``systemd_path``) are used.
    Raises UpstreamFailure when there are none.
    """
    servers = _nameservers(path)
    if any(ipaddress.ip_address(s.split("%", 1)[0]) == SYSTEMD_STUB for s in servers):
        servers = [s for s in _nameservers(systemd_path)
                   if ipaddress.ip_address(s.split("%", 1)[0]) != SYSTEMD_STUB]
        path = systemd_path
    if not servers:
        raise UpstreamFailure(f"{path}: no nameserver lines; set dns.upstreams in the node config")
    return tuple((s, 53) for s in servers)


def _nameservers(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UpstreamFailure(f"{path}: cannot read: {err.strerror or err}") from None
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            if fields[1] not in out:
                out.append(fields[1])
    return out
