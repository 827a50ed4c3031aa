"""Hostile packets against the resolver: whatever arrives over UDP or TCP (random bytes,
truncated headers, compression loops, huge counts, bad label lengths), and whatever an upstream
sends back, the resolver neither crashes nor stalls: a valid query still gets its answer after
every batch, and no query ends in an internal error.

Example counts and per-example deadlines are bounded so the file runs in well under a minute;
hypothesis' example database is off (the checkout is shared).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import socket
import struct
import threading

import dns.message
import dns.name
import dns.query
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent.config import DnsConfig
from hostagent.dns import Client, NameVerdict, Resolver
from hostagent.dns import wire
from tests.dnszone import DnsZone

HOST = "127.0.0.1"

FUZZ = settings(max_examples=150, deadline=datetime.timedelta(seconds=3), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class AllowAll:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events = 0

    def attribute(self, src_ip, src_port, proto):
        return Client(src_port % 7, src_port)

    def check(self, client, qname):
        return NameVerdict("allow", "policy_rule", "fuzz", "all", grant=("all",))

    def allow(self, client, verdict, qname, addrs):
        pass

    def emit(self, event):
        with self.lock:
            self.events += 1


@pytest.fixture(scope="module")
def server():
    with DnsZone() as zone:
        zone.add("ok.test", "A", "192.0.2.1")
        cfg = dataclasses.replace(DnsConfig(), listen=(HOST, 0), upstream_timeout=0.3,
                                  rate_limit_qps=1e6, rate_limit_burst=10**6,
                                  tunnel_max_unique_subdomains=10**6)
        resolver = Resolver(cfg, AllowAll(), upstreams=[zone.address])
        resolver.start()
        try:
            yield resolver, zone
        finally:
            resolver.stop()


def still_answers(resolver: Resolver) -> None:
    host, port = resolver.address
    query = dns.message.make_query("ok.test", "A")
    answer = dns.query.udp(query, host, timeout=2.0, port=port)
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    answer = dns.query.tcp(dns.message.make_query("ok.test", "A"), host, timeout=2.0, port=port)
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    assert resolver.stats()["internal_errors"] == 0


# ---------------------------------------------------------------------------------------------
# Strategies: packets that are almost queries.

_COUNTS = st.one_of(st.sampled_from([0, 1, 2, 0xFFFF]), st.integers(0, 0xFFFF))


@st.composite
def headers(draw) -> bytes:
    return struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)),
                       draw(st.one_of(st.just(0x0100), st.integers(0, 0xFFFF))),
                       draw(_COUNTS), draw(_COUNTS), draw(_COUNTS), draw(_COUNTS))


@st.composite
def names(draw) -> bytes:
    """Wire names with bad label lengths, compression pointers (loops: 0xc00c points at the
    question itself), extended label types and missing terminators."""
    out = b""
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["label", "label", "long", "pointer", "ext"]))
        if kind == "label":
            out += bytes([n := draw(st.integers(1, 63))]) + draw(st.binary(min_size=n, max_size=n))
        elif kind == "long":  # a length byte that lies
            out += bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=70))
        elif kind == "pointer":
            out += struct.pack("!H", 0xC000 | draw(st.sampled_from([12, 13, 0, 0x3FFF])))
        else:
            out += bytes([draw(st.sampled_from([0x40, 0x41, 0x80]))])
    if draw(st.booleans()):
        out += b"\x00"
    return out


@st.composite
def records(draw) -> bytes:
    """An additional record: OPT or junk, with rdlength that may lie."""
    owner = draw(st.sampled_from([b"\x00", b"\xc0\x0c", b"\x01a\x00"]))
    rtype = draw(st.sampled_from([41, 41, 250, 1, 0xFFFF]))
    rdata = draw(st.binary(max_size=40))
    rdlen = draw(st.one_of(st.just(len(rdata)), st.integers(0, 0xFFFF)))
    return owner + struct.pack("!HHIH", rtype, draw(st.integers(0, 0xFFFF)),
                               draw(st.integers(0, 2**32 - 1)), rdlen) + rdata


@st.composite
def hostile_packets(draw) -> bytes:
    packet = draw(headers()) + draw(names()) + draw(st.binary(max_size=4))
    for _ in range(draw(st.integers(0, 3))):
        packet += draw(records())
    cut = draw(st.one_of(st.none(), st.integers(0, len(packet))))
    return packet if cut is None else packet[:cut]


def _valid_query(name: str = "ok.test") -> bytes:
    return dns.message.make_query(name, "A").to_wire()


@st.composite
def mutated_queries(draw) -> bytes:
    """A valid query with a few bytes changed, inserted or removed."""
    data = bytearray(_valid_query())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos:pos + draw(st.integers(1, 4))]
    return bytes(data)


ANY_PACKET = st.one_of(st.binary(max_size=700), hostile_packets(), mutated_queries())


# ---------------------------------------------------------------------------------------------
# UDP and TCP


@FUZZ
@given(packets=st.lists(ANY_PACKET, min_size=1, max_size=10))
def test_hostile_udp_packets(server, packets):
    resolver, _ = server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for packet in packets:
            s.sendto(packet, resolver.address)
    still_answers(resolver)


@st.composite
def tcp_streams(draw) -> bytes:
    """Frames whose length prefix may lie, run over, be zero or exceed any query."""
    stream = b""
    for _ in range(draw(st.integers(1, 5))):
        body = draw(ANY_PACKET)
        length = draw(st.one_of(st.just(len(body)), st.just(len(body)), st.integers(0, 0xFFFF)))
        stream += struct.pack("!H", length) + body
    if draw(st.booleans()):
        stream += struct.pack("!H", len(q := _valid_query())) + q
    return stream


@FUZZ
@given(stream=tcp_streams(), half_close=st.booleans())
def test_hostile_tcp_streams(server, stream, half_close):
    resolver, _ = server
    with socket.create_connection(resolver.address, timeout=2.0) as s:
        s.sendall(stream)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(0.05)
        try:
            while s.recv(65535):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    still_answers(resolver)


def test_tcp_split_into_single_bytes(server):
    resolver, _ = server
    query = _valid_query()
    with socket.create_connection(resolver.address, timeout=2.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in struct.pack("!H", len(query)) + query:
            s.sendall(bytes([byte]))
        (length,) = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))
        answer = dns.message.from_wire(s.recv(length, socket.MSG_WAITALL))
    assert answer.answer


# ---------------------------------------------------------------------------------------------
# The parser on its own


@settings(max_examples=2000, deadline=None, database=None)
@given(data=ANY_PACKET)
def test_parse_query_only_raises_wire_errors(data):
    try:
        query = wire.parse_query(data)
    except wire.WireError as err:
        assert err.rcode in (wire.FORMERR, wire.NOTIMP)
        assert len(wire.error_response(data, None, err.rcode)) == 12
        return
    if query is not None:
        assert 12 < query.qend <= len(data) and len(query.key_name) <= 255
        wire.name_text(query.key_name)
        assert wire.error_response(data, query, wire.REFUSED)[:2] == data[:2]


_LABELS = st.binary(min_size=1, max_size=63)


@settings(max_examples=500, deadline=None, database=None)
@given(labels=st.lists(_LABELS, min_size=0, max_size=6), qtype=st.integers(1, 65535),
       edns=st.booleans())
def test_parse_query_agrees_with_dnspython(labels, qtype, edns):
    if sum(len(label) + 1 for label in labels) + 1 > 255 or qtype == 41:
        return
    name = dns.name.Name([*labels, b""])
    data = dns.message.make_query(name, qtype, use_edns=0 if edns else None).to_wire()
    query = wire.parse_query(data)
    assert query.key_name == name.canonicalize().to_wire()
    expected = "." if not labels else name.canonicalize().to_text(omit_final_dot=True)
    assert wire.name_text(query.key_name) == expected
    assert (query.qtype, query.qclass, query.edns) == (qtype, 1, edns)


# ---------------------------------------------------------------------------------------------
# Hostile upstream answers

_serial = itertools.count()


_MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "insert", "delete", "counts"]),
                                st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)),
                      min_size=1, max_size=6)


def mutate(default: bytes, ops) -> bytes:
    """Apply drawn edits to an upstream reply. Positions are fractions of the reply length so
    the edits can be drawn before the reply (and its random id) exists; the id is kept intact
    more often than not, so that the reply gets past matching and into the parser."""
    data = bytearray(default)
    for op, where, blob in ops:
        pos = min(len(data), 2 + int(where * max(len(data) - 2, 0)))
        if op == "flip" and pos < len(data):
            data[pos] ^= blob[0] or 1
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos:pos + len(blob) % 8 + 1]
        elif op == "counts" and len(data) >= 12:
            data[6:12] = (blob * 6)[:6]
    return bytes(data)


@settings(max_examples=60, deadline=datetime.timedelta(seconds=5), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=_MUTATIONS, cname=st.booleans(), then_real=st.booleans())
def test_hostile_upstream_replies(server, ops, cname, then_real):
    resolver, zone = server
    name = f"u{next(_serial)}.fuzz.test"
    if cname:
        zone.add(name, "CNAME", "ok.test")
    else:
        zone.add(name, "A", "192.0.2.9")

    def responder(query, peer, proto, default):
        if default is None:
            return []
        bad = mutate(default, ops)
        return [bad, default] if then_real else [bad]

    zone.responder(name, responder)
    host, port = resolver.address
    answer = dns.query.udp(dns.message.make_query(name, "A"), host, timeout=3.0, port=port)
    assert answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)
    still_answers(resolver)
