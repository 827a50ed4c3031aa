"""DNS wire format on the hot path, by hand: query parsing and response assembly.

Every query (and every cached answer) goes through here, so nothing here uses dnspython: a full
dnspython parse costs more than the rest of a cached answer together. dnspython is used on the
slow path only (upstream replies, hostagent.dns.cache), where its strictness is worth the cost.

The parser accepts exactly what a stub resolver sends: one question, no answer or authority
records, a few additional records (OPT, and TSIG or SIG(0) which are skipped), no compression in
the question, nothing after the last record. Anything else is a FORMERR; an opcode other than
QUERY is NOTIMP; a datagram shorter than a header, or a response (QR=1), is dropped unanswered
(answering a response could start a packet loop with another server).
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "EDNS_PAYLOAD",
    "MAX_QUERY_SIZE",
    "Query",
    "WireError",
    "error_response",
    "name_text",
    "parse_query",
    "truncated_response",
    "upstream_query",
]

HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_U16x2 = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

# Header flag bits.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010

# RCODEs (RFC 1035, 6891). BADVERS does not fit the header's 4 bits: its upper bits go in OPT.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}
RCODE_BY_NAME = {v: k for k, v in RCODE_NAMES.items()}

# Types and classes the resolver treats specially.
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT, TYPE_ANY = 1, 5, 28, 41, 255
TYPE_IXFR, TYPE_AXFR, TYPE_MAILB, TYPE_MAILA = 251, 252, 253, 254
CLASS_IN = 1

# A query is a header, one name of at most 255 bytes and a few small additional records (OPT with
# a cookie or padding, TSIG). 4096 leaves room for any of those and bounds what one TCP frame or
# datagram can make us read.
MAX_QUERY_SIZE = 4096
# Additional records a query may carry: OPT plus a signature, with room to spare.
MAX_QUERY_ADDITIONAL = 4
MAX_NAME_WIRE = 255  # RFC 1035 2.3.4, the terminating zero included
MAX_LABEL = 63

# UDP payload we advertise and honour (DNS flag day 2020: avoids IP fragmentation).
EDNS_PAYLOAD = 1232
CLASSIC_UDP_LIMIT = 512  # RFC 1035, for clients without EDNS

# Our OPT record: root owner, our payload size, extended rcode 0, version 0, no flags, no options.
OPT_RR = b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)


class WireError(Exception):
    """A query that gets an error answer instead of being processed."""

    def __init__(self, rcode: int, why: str) -> None:
        super().__init__(why)
        self.rcode = rcode


class Query:
    """One parsed query. ``data[12:qend]`` is the question exactly as the client wrote it."""

    __slots__ = ("data", "flags", "name_end", "qend", "key_name", "qtype", "qclass",
                 "edns_payload", "edns_version")

    def __init__(self, data: bytes, flags: int, name_end: int, qend: int, key_name: bytes,
                 qtype: int, qclass: int, edns_payload: int, edns_version: int) -> None:
        self.data = data
        self.flags = flags
        self.name_end = name_end
        self.qend = qend
        self.key_name = key_name  # the question name on the wire, lower case
        self.qtype = qtype
        self.qclass = qclass
        self.edns_payload = edns_payload  # -1: no OPT record
        self.edns_version = edns_version

    @property
    def edns(self) -> bool:
        return self.edns_payload >= 0

    def udp_limit(self) -> int:
        """The largest UDP answer this client accepts."""
        if self.edns_payload < 0:
            return CLASSIC_UDP_LIMIT
        return min(max(self.edns_payload, CLASSIC_UDP_LIMIT), EDNS_PAYLOAD)


def parse_query(data: bytes) -> Query | None:
    """Parse a query. None: drop it unanswered. Raises WireError for an error answer."""
    n = len(data)
    if n < 12:
        return None
    _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        return None
    if flags & 0x7800:  # opcode
        raise WireError(NOTIMP, "opcode is not QUERY")
    if n > MAX_QUERY_SIZE:
        raise WireError(FORMERR, "query too large")
    if qdcount != 1 or ancount or nscount or arcount > MAX_QUERY_ADDITIONAL:
        raise WireError(FORMERR, "section counts")
    pos = 12
    while True:
        if pos >= n:
            raise WireError(FORMERR, "question name runs past the end")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > MAX_LABEL:  # also compression pointers (0xC0) and extended labels (0x40)
            raise WireError(FORMERR, "bad label length or compression in the question")
        pos += 1 + length
        if pos - 12 >= MAX_NAME_WIRE:
            raise WireError(FORMERR, "question name too long")
    name_end = pos
    if name_end + 4 > n:
        raise WireError(FORMERR, "question truncated")
    qtype, qclass = _U16x2.unpack_from(data, name_end)
    qend = name_end + 4
    edns_payload = -1
    edns_version = 0
    pos = qend
    for _ in range(arcount):
        if pos >= n:
            raise WireError(FORMERR, "additional record runs past the end")
        root_owner = data[pos] == 0
        pos = _skip_name(data, pos, n)
        if pos + 10 > n:
            raise WireError(FORMERR, "additional record truncated")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        pos += 10 + rdlen
        if pos > n:
            raise WireError(FORMERR, "additional record data runs past the end")
        if rtype == TYPE_OPT:
            if edns_payload >= 0 or not root_owner:
                raise WireError(FORMERR, "bad OPT record")
            edns_payload = rclass
            edns_version = (ttl >> 16) & 0xFF
    if pos != n:
        raise WireError(FORMERR, "trailing bytes")
    if qtype == TYPE_OPT:
        raise WireError(FORMERR, "OPT as a question type")
    return Query(data, flags, name_end, qend, data[12:name_end].lower(), qtype, qclass,
                 edns_payload, edns_version)


def _skip_name(data: bytes, pos: int, n: int) -> int:
    """Skip a possibly compressed name of an additional record, without following pointers."""
    start = pos
    while True:
        if pos >= n:
            raise WireError(FORMERR, "name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2  # a pointer ends the name; where it points does not matter here
        if length > MAX_LABEL:
            raise WireError(FORMERR, "bad label length")
        pos += 1 + length
        if pos - start >= MAX_NAME_WIRE:
            raise WireError(FORMERR, "name too long")


# ---------------------------------------------------------------------------------------------
# Names as text.

_PLAIN_LABEL = re.compile(rb"[a-z0-9_\-]+\Z")
# dnspython's escaping (dns.name._escapify): these printable characters get a backslash, other
# bytes outside 0x21..0x7e become \DDD. Kept identical so a CNAME target (rendered by dnspython)
# and a query name (rendered here) have the same text form.
_ESCAPED = frozenset(b'"().;\\@$')


def _escape_label(label: bytes) -> str:
    out = []
    for c in label:
        if c in _ESCAPED:
            out.append("\\" + chr(c))
        elif 0x20 < c < 0x7F:
            out.append(chr(c))
        else:
            out.append(f"\\{c:03d}")
    return "".join(out)


def name_text(wire: bytes) -> str:
    """Text form of an uncompressed wire name (already lower case): no trailing dot, "." for the
    root, labels with unusual bytes escaped as dnspython does."""
    labels = []
    pos = 0
    while True:
        length = wire[pos]
        if length == 0:
            break
        labels.append(wire[pos + 1:pos + 1 + length])
        pos += 1 + length
    if not labels:
        return "."
    if all(_PLAIN_LABEL.match(label) for label in labels):
        return b".".join(labels).decode("ascii")
    return ".".join(_escape_label(label) for label in labels)


# ---------------------------------------------------------------------------------------------
# Building messages.


def _opt(rcode: int) -> bytes:
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, (rcode >> 4) << 24, 0)


def response_flags(query_flags: int, rcode: int, extra: int = 0) -> int:
    """Flags of our answer to a query: QR, the query's opcode, RD and CD echoed, RA set."""
    return QR | (query_flags & (0x7800 | RD | CD)) | RA | extra | (rcode & 0xF)


def error_response(data: bytes, query: Query | None, rcode: int) -> bytes:
    """An answer with no records: the question echoed when it parsed, OPT when the query had it."""
    txid, flags = _U16x2.unpack_from(data)
    if query is None:
        return HEADER.pack(txid, response_flags(flags, rcode), 0, 0, 0, 0)
    edns = query.edns_payload >= 0
    return (HEADER.pack(txid, response_flags(flags, rcode), 1, 0, 0, 1 if edns else 0)
            + data[12:query.qend] + (_opt(rcode) if edns else b""))


def truncated_response(query: Query, rcode: int) -> bytes:
    """TC=1 with the question only: the client retries over TCP (RFC 7766)."""
    data = query.data
    txid = data[0] << 8 | data[1]
    edns = query.edns_payload >= 0
    return (HEADER.pack(txid, response_flags(query.flags, rcode, TC), 1, 0, 0, 1 if edns else 0)
            + data[12:query.qend] + (OPT_RR if edns else b""))


def upstream_query(txid: int, name_wire: bytes, qtype: int, qclass: int) -> bytes:
    """Our query to an upstream: RD, EDNS with our payload size, none of the client's options
    (cookies, client subnet, padding stay with the client)."""
    return (HEADER.pack(txid, RD, 1, 0, 0, 1) + name_wire + _U16x2.pack(qtype, qclass) + OPT_RR)
