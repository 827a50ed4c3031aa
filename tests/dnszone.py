"""A small, real authoritative DNS server for tests: UDP and TCP on 127.0.0.1, port 0.

    with DnsZone() as zone:
        zone.add("api.test", "A", "192.0.2.10", ttl=5)
        zone.add("www.test", "CNAME", "api.test")
        zone.timeout("slow.test")          # never answers
        zone.servfail("broken.test")       # answers SERVFAIL
        zone.big("big.test", 100)          # 100 A records: TC=1 over UDP, full over TCP
        upstream = zone.address            # ("127.0.0.1", port)
        ...
        assert zone.count("api.test") == 1

Names are answered authoritatively: the records of (name, type); else a CNAME at the name,
followed through the zone's own records; else NODATA (the name has other records) or NXDOMAIN,
with the SOA of ``origin`` in the authority section. The zone answers for any name, not only
under ``origin``. UDP answers honour the query's EDNS payload size (512 without EDNS) and are
truncated (TC=1, question only) beyond it; TCP answers are never truncated.

Every query received is recorded (``queries``, ``count()``) before any behaviour applies, so a
test can assert that a refused name never reached the upstream.

It runs in daemon threads (one for UDP, one accepting TCP, one per TCP connection) and is a
context manager; records and behaviours may be changed while it runs.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsZone", "Seen"]

# A TCP client connection that sends nothing for this long is closed (threads must end).
_TCP_IDLE = 5.0
# How often the serving threads look at the stop flag.
_POLL = 0.1


@dataclasses.dataclass(frozen=True)
class Seen:
    """One query the zone received."""

    name: str  # lower case, no trailing dot
    type: str  # "A", "AAAA", ...
    proto: str  # "udp" | "tcp"
    peer: tuple[str, int]
    time: float  # time.monotonic()


# A responder gets (query, peer, proto, the wire answer the zone would send or None) and returns
# the datagrams (UDP) or messages (TCP) to send instead, in order; [] sends nothing.
Responder = Callable[[dns.message.Message, tuple[str, int], str, "bytes | None"], Iterable[bytes]]


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text
    return dns.name.from_text(text)


def _text(name: dns.name.Name) -> str:
    return name.canonicalize().to_text(omit_final_dot=True) if name != dns.name.root else "."


class DnsZone:
    def __init__(self, origin: str = "test", *, host: str = "127.0.0.1",
                 soa_ttl: int = 30, negative_ttl: int = 10) -> None:
        self.origin = _name(origin)
        self.host = host
        self._lock = threading.Lock()
        self._records: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self._behaviour: dict[dns.name.Name, tuple[str, object]] = {}
        self.queries: list[Seen] = []
        self._soa = dns.rrset.from_text(
            self.origin, soa_ttl, "IN", "SOA",
            f"ns.{self.origin} hostmaster.{self.origin} 1 3600 600 86400 {negative_ttl}")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self.address: tuple[str, int] = (host, 0)

    # ---- records --------------------------------------------------------------------------

    def add(self, name: str, rdtype: str, value: str, ttl: int = 300) -> None:
        """Add one record; records of the same (name, type) form one rrset (the last ttl wins)."""
        owner = _name(name)
        rdt = dns.rdatatype.from_text(rdtype)
        rdata = dns.rdata.from_text(dns.rdataclass.IN, rdt, value, origin=dns.name.root,
                                    relativize=False)
        with self._lock:
            rrset = self._records.get((owner, rdt))
            if rrset is None:
                rrset = self._records[(owner, rdt)] = dns.rrset.RRset(owner, dns.rdataclass.IN, rdt)
            rrset.add(rdata)
            rrset.ttl = ttl

    def set(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Replace the records of (name, type)."""
        self.remove(name, rdtype)
        for value in values:
            self.add(name, rdtype, value, ttl=ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        owner = _name(name)
        rdt = None if rdtype is None else dns.rdatatype.from_text(rdtype)
        with self._lock:
            for key in [k for k in self._records if k[0] == owner and rdt in (None, k[1])]:
                del self._records[key]

    def big(self, name: str, count: int = 100, ttl: int = 300) -> None:
        """``count`` A records in 198.51.100.0/24 and 203.0.113.0/24 (TEST-NET-2/3): with 100,
        the answer is ~1.6 kB, over both 512 bytes and the 1232-byte EDNS payload."""
        for i in range(count):
            prefix = "198.51.100" if i < 250 else "203.0.113"
            self.add(name, "A", f"{prefix}.{i % 250 + 1}", ttl=ttl)

    # ---- behaviours -----------------------------------------------------------------------

    def timeout(self, name: str) -> None:
        """Never answer queries for ``name`` (over UDP or TCP)."""
        with self._lock:
            self._behaviour[_name(name)] = ("timeout", None)

    def servfail(self, name: str) -> None:
        with self._lock:
            self._behaviour[_name(name)] = ("servfail", None)

    def delay(self, name: str, seconds: float) -> None:
        """Answer queries for ``name`` only after ``seconds``."""
        with self._lock:
            self._behaviour[_name(name)] = ("delay", seconds)

    def responder(self, name: str, fn: Responder) -> None:
        """Let ``fn`` decide what is sent for queries of ``name`` (hostile upstreams)."""
        with self._lock:
            self._behaviour[_name(name)] = ("responder", fn)

    def normal(self, name: str) -> None:
        """Undo timeout/servfail/delay/responder for ``name``."""
        with self._lock:
            self._behaviour.pop(_name(name), None)

    # ---- what was asked -------------------------------------------------------------------

    def count(self, name: str | None = None, rdtype: str | None = None,
              proto: str | None = None) -> int:
        """Queries received, optionally only for ``name`` / ``rdtype`` / ``proto``."""
        want = _text(_name(name)) if name is not None else None
        with self._lock:
            return sum(1 for s in self.queries
                       if (want is None or s.name == want) and (rdtype is None or s.type == rdtype)
                       and (proto is None or s.proto == proto))

    def names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self.queries]

    def clear_queries(self) -> None:
        with self._lock:
            self.queries.clear()

    # ---- answering ------------------------------------------------------------------------

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The zone's full (never truncated) answer to ``query``."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = question.name
        with self._lock:
            for _ in range(16):  # CNAME chains inside the zone; loops stop here
                rrset = self._records.get((name, question.rdtype))
                if rrset is not None:
                    response.answer.append(rrset.copy())
                    break
                cname = self._records.get((name, dns.rdatatype.CNAME))
                if cname is not None and question.rdtype != dns.rdatatype.CNAME:
                    response.answer.append(cname.copy())
                    name = cname[0].target
                    continue
                if not any(owner == name for owner, _ in self._records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa.copy())
                break
        return response

    def _handle(self, wire: bytes, peer: tuple[str, int], proto: str) -> list[bytes]:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - a test server answers garbage with FORMERR if it can
            if len(wire) >= 12:
                (txid,) = struct.unpack_from("!H", wire)
                return [struct.pack("!HHHHHH", txid, 0x8001, 0, 0, 0, 0)]
            return []
        if not query.question:
            return [dns.message.make_response(query).to_wire()]
        question = query.question[0]
        with self._lock:
            self.queries.append(Seen(_text(question.name), dns.rdatatype.to_text(question.rdtype),
                                     proto, peer, time.monotonic()))
            kind, arg = self._behaviour.get(question.name, ("normal", None))
        if kind == "timeout":
            return []
        if kind == "servfail":
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return [response.to_wire(max_size=65535)]
        if kind == "delay":
            time.sleep(arg)
        out = self._wire(query, self.answer(query), proto)
        if kind == "responder":
            return list(arg(query, peer, proto, out))
        return [out]

    def _wire(self, query: dns.message.Message, response: dns.message.Message, proto: str) -> bytes:
        # max_size: make_response() copies the query's payload size, and to_wire() would raise
        # TooBig beyond it; we truncate ourselves, as a server does.
        full = response.to_wire(max_size=65535)
        if proto == "tcp":
            return full
        limit = max(512, query.payload) if query.edns >= 0 else 512
        if len(full) <= limit:
            return full
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.AA | dns.flags.TC
        return truncated.to_wire()

    # ---- serving --------------------------------------------------------------------------

    def start(self) -> DnsZone:
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            tcp.listen(64)
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        udp.settimeout(_POLL)
        tcp.settimeout(_POLL)
        self._udp, self._tcp = udp, tcp
        self.address = (self.host, port)
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name=f"dnszone-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2.0)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DnsZone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            # A thread per query, so delay() and timeout() names do not hold up the others.
            threading.Thread(target=self._udp_reply, args=(wire, peer), daemon=True).start()

    def _udp_reply(self, wire: bytes, peer: tuple[str, int]) -> None:
        for out in self._handle(wire, peer, "udp"):
            try:
                self._udp.sendto(out, peer)
            except OSError:
                return

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._tcp.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn, peer), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.settimeout(_POLL)
        idle_since = time.monotonic()
        buf = b""
        with conn:
            while not self._stop.is_set() and time.monotonic() - idle_since < _TCP_IDLE:
                try:
                    chunk = conn.recv(65535)
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                idle_since = time.monotonic()
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    length = int.from_bytes(buf[:2], "big")
                    wire, buf = buf[2:2 + length], buf[2 + length:]
                    for out in self._handle(wire, peer, "tcp"):
                        try:
                            conn.sendall(len(out).to_bytes(2, "big") + out)
                        except OSError:
                            return
