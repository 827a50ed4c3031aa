"""Validated upstream answers, shared by every workload, stored as ready-to-send wire bytes.

An upstream reply is parsed once (dnspython), reduced to the CNAME chain from the question name
(everything else dropped: other answer records, authority, additional), its TTLs clamped, and
laid out as an answer section whose owner of the question name is a pointer to the question
(offset 12). Serving it is then: header + the client's own question bytes + these bytes. The TTL
fields are rewritten at most once per second of age, not per query.

What differs per workload (is every name of the chain allowed for it, which rebind-protected
addresses its policy opens, has allow() run for it) lives next to the entry in
``CacheEntry.workloads`` and is decided by the server.
"""

from __future__ import annotations

import collections
import ipaddress
import struct

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from hostagent.dns import wire
from hostagent.dns.guard import RebindFilter, clamp_ttl
from hostagent.dns.hooks import IPAddress

__all__ = ["AnswerCache", "BadAnswer", "CacheEntry", "Template", "build_entry"]

# A CNAME chain longer than this is refused: real chains (CDNs) have at most 4-5 links, and
# each link costs a policy check per workload.
MAX_CNAME_CHAIN = 12

_RR_HEAD = struct.Struct("!HHIH")
_U32 = struct.Struct("!I")
_POINTER = struct.Struct("!H")
# Largest answer section we keep: a TCP message is at most 65535 bytes, and the header, the
# longest question and our OPT record take the rest.
MAX_ANSWER_SECTION = 65535 - 12 - 259 - 11


class BadAnswer(Exception):
    """An upstream reply we will not pass on (CNAME loop, chain too long, unusable rcode)."""


class Record:
    __slots__ = ("owner", "rtype", "rclass", "ttl", "rdata", "addr")

    def __init__(self, owner: bytes, rtype: int, rclass: int, ttl: int, rdata: bytes,
                 addr: IPAddress | None) -> None:
        self.owner = owner  # uncompressed wire form, lower case
        self.rtype = rtype
        self.rclass = rclass
        self.ttl = ttl  # clamped
        self.rdata = rdata  # uncompressed wire form
        self.addr = addr  # A/AAAA only


class Template:
    """The answer section for a list of records, with TTLs aged in whole seconds.

    Owner names are compressed: the question name becomes a pointer to offset 12 (where every
    client's question starts, whatever its case), and a name already written (an owner, or a
    CNAME target) becomes a pointer to it. Without this, N records owned by a long CNAME target
    would cost N copies of a 255-byte name, an answer far larger than the reply it came from.
    """

    __slots__ = ("_base", "_ttls", "count", "size", "_age", "_bytes")

    def __init__(self, qname: bytes, records: list[Record]) -> None:
        start = 12 + len(qname) + 4  # header, question name, qtype, qclass
        written = {qname: 12}  # lower-case wire name -> offset in the message
        buf = bytearray()
        ttls = []
        for r in records:
            offset = written.get(r.owner)
            if offset is not None and offset < 0x4000:
                buf += _POINTER.pack(0xC000 | offset)
            else:
                written.setdefault(r.owner, start + len(buf))
                buf += r.owner
            ttls.append((len(buf) + 4, r.ttl))
            buf += _RR_HEAD.pack(r.rtype, r.rclass, r.ttl, len(r.rdata))
            if r.rtype == wire.TYPE_CNAME:
                written.setdefault(r.rdata.lower(), start + len(buf))
            buf += r.rdata
        self._base = bytes(buf)
        self._ttls = tuple(ttls)
        self.count = len(records)
        self.size = len(buf)
        self._age = 0
        self._bytes = self._base

    def at(self, age: int) -> bytes:
        """The section with every TTL reduced by ``age`` seconds (rebuilt once per age)."""
        if age != self._age:
            buf = bytearray(self._base)
            for offset, ttl in self._ttls:
                _U32.pack_into(buf, offset, ttl - age if ttl > age else 0)
            self._bytes = bytes(buf)
            self._age = age
        return self._bytes


class CacheEntry:
    """One validated answer. ``created``/``expires`` are time.monotonic() values."""

    __slots__ = ("qname", "rcode", "records", "cnames", "created", "expires", "protected",
                 "full", "_variants", "workloads")

    def __init__(self, qname: bytes, rcode: int, records: list[Record], cnames: tuple[str, ...],
                 created: float, lifetime: int, rebind: RebindFilter) -> None:
        self.qname = qname  # wire form, lower case
        self.rcode = rcode
        self.records = records
        self.cnames = cnames  # the chain after the question name, as text (lower case)
        self.created = created
        self.expires = created + lifetime
        self.protected = frozenset(r.addr for r in records
                                   if r.addr is not None and rebind.protected(r.addr))
        self.full = Template(qname, records)
        if self.full.size > MAX_ANSWER_SECTION:
            raise BadAnswer(f"answer of {self.full.size} bytes")
        self._variants: dict[frozenset[IPAddress], Template] = {}
        # cgroup id -> the server's per-workload decision for this entry (see server.py).
        self.workloads: dict[int, object] = {}

    def age(self, now: float) -> int:
        return int(now - self.created)

    def addresses(self, drop: frozenset[IPAddress], age: int) -> list[tuple[IPAddress, int]]:
        """(address, remaining ttl) of the A/AAAA records, less ``drop``."""
        return [(r.addr, r.ttl - age) for r in self.records
                if r.addr is not None and r.addr not in drop]

    def template(self, drop: frozenset[IPAddress]) -> Template:
        """The answer without the addresses in ``drop`` (shared by workloads dropping the same)."""
        if not drop:
            return self.full
        t = self._variants.get(drop)
        if t is None:
            t = self._variants[drop] = Template(
                self.qname, [r for r in self.records if r.addr is None or r.addr not in drop])
        return t


def build_entry(msg: dns.message.Message, qname: dns.name.Name, qtype: int, qclass: int, *,
                ttl_min: int, ttl_max: int, rebind: RebindFilter, now: float) -> CacheEntry:
    """Reduce an upstream reply to the CNAME chain from ``qname``. Raises BadAnswer."""
    rcode = msg.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise BadAnswer(f"upstream rcode {dns.rcode.to_text(rcode)}")
    by_key = {(rrset.name, rrset.rdtype): rrset for rrset in msg.answer
              if rrset.rdclass == qclass and rrset.covers == dns.rdatatype.NONE}
    rrsets = []
    cnames: list[str] = []
    final = False
    if qtype == wire.TYPE_ANY:
        rrsets = [rrset for (name, _), rrset in by_key.items() if name == qname]
        final = bool(rrsets)
    else:
        seen = {qname}
        current = qname
        for _ in range(MAX_CNAME_CHAIN + 1):
            rrset = by_key.get((current, qtype))
            if rrset is not None:
                rrsets.append(rrset)
                final = True
                break
            cname = by_key.get((current, dns.rdatatype.CNAME)) if qtype != wire.TYPE_CNAME else None
            if cname is None:
                break
            # One target only: a CNAME rrset with two records is malformed, and passing both on
            # would hand the client a name nobody checked.
            target = cname[0].target
            if target in seen:
                raise BadAnswer("CNAME loop")
            seen.add(target)
            rrsets.append(_first_only(cname))
            cnames.append(_text(target))
            current = target
        else:
            raise BadAnswer("CNAME chain too long")
    records = []
    for rrset in rrsets:
        owner = rrset.name.canonicalize().to_wire()
        ttl = clamp_ttl(rrset.ttl, ttl_min, ttl_max)
        for rdata in rrset:
            addr = None
            if rrset.rdtype in (wire.TYPE_A, wire.TYPE_AAAA):
                addr = ipaddress.ip_address(rdata.address)
            records.append(Record(owner, rrset.rdtype, rrset.rdclass, ttl, rdata.to_wire(), addr))
    lifetime = min((r.ttl for r in records), default=ttl_max)
    if not final:
        # Negative answer (RFC 2308): the SOA's minimum bounds how long it may be cached. The
        # SOA itself is not passed on (it is not on the chain); clients will ask again sooner.
        negative = ttl_min
        for rrset in msg.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                negative = clamp_ttl(min(rrset.ttl, rrset[0].minimum), ttl_min, ttl_max)
                break
        lifetime = min(lifetime, negative)
    return CacheEntry(qname.canonicalize().to_wire(), rcode, records, tuple(cnames), now,
                      lifetime, rebind)


def _first_only(rrset):
    if len(rrset) == 1:
        return rrset
    return dns.rrset.from_rdata(rrset.name, rrset.ttl, rrset[0])


def _text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.canonicalize().to_text(omit_final_dot=True)


class AnswerCache:
    """LRU of CacheEntry by (question name wire lower case, qtype, qclass, client has EDNS)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: collections.OrderedDict[tuple, CacheEntry] = collections.OrderedDict()

    def get(self, key: tuple, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: CacheEntry) -> None:
        if self._size <= 0 or entry.expires <= entry.created:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
