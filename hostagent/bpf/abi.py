"""Python side of bpf/lib/abi.h.

The enums share their numbers with the C enums of abi.h (and, later, the proto enums); the
ctypes structures mirror the C structs and are used only to build keys and values handed to
bcc tables and to decode ring buffer records. tests/test_abi.py compiles abi.h and checks every
size, offset and enum value below against it, so a drift fails the build instead of corrupting
maps.
"""

from __future__ import annotations

import ctypes as ct
import enum
import ipaddress
import sys

ABI_VERSION = 1
MAX_CGROUP_DEPTH = 16
MAX_PORT_RANGES = 16
RULE_NONE = 0xFFFF

CONFIG_EMIT_ALLOW = 0x1
BINDING_METADATA_EXEMPT = 0x1
BINDING_ALLOW_RAW = 0x2
BINDING_PENDING = 0x4
BINDING_CONFLICT = 0x8
BINDING_FQDN = 0x10
RULE_NAMED = 0x1
PROTECTED_METADATA = 1
PROTECTED_ENCRYPTED_DNS = 2
DNS_REDIRECT = 0x1
MAX_ENCRYPTED_DNS_PORTS = 4
FQDN_NAMED = 0x1
PROTO_BIT_TCP = 1
PROTO_BIT_UDP = 2
PROTECTED_FILTER_BITS = 65536
PROTECTED_FILTER_WORDS = 1024
ALLOW_COUNT_POLICIES = 1024
ALLOW_COUNT_STRIDE = 16
ALLOW_COUNT_SLOTS = ALLOW_COUNT_POLICIES * ALLOW_COUNT_STRIDE
ALLOW_COUNT_NODE_DEFAULT = 8


class Verdict(enum.IntEnum):
    """enum hostagent_verdict."""

    UNSPECIFIED = 0
    ALLOW = 1
    DENY = 2
    AUDIT = 3


class Reason(enum.IntEnum):
    """enum hostagent_reason."""

    UNSPECIFIED = 0
    POLICY_RULE = 1
    POLICY_DEFAULT = 2
    METADATA_BLOCK = 3
    NODE_DEFAULT = 4
    RAW_SOCKET = 5
    METADATA_EXEMPT = 6
    PENDING_IDENTITY = 7
    SELECTOR_CONFLICT = 8
    DNS_REDIRECT = 9
    ENCRYPTED_DNS = 10


class Hook(enum.IntEnum):
    """enum hostagent_hook."""

    UNSPECIFIED = 0
    CONNECT4 = 1
    CONNECT6 = 2
    SENDMSG4 = 3
    SENDMSG6 = 4
    SOCK_CREATE = 5
    SKB_EGRESS = 6
    TCP_CLOSE = 7


class BindingMode(enum.IntEnum):
    """enum hostagent_mode."""

    NONE = 0
    ENFORCE = 1
    AUDIT = 2


class KernelError(enum.IntEnum):
    """enum hostagent_error."""

    UNSPECIFIED = 0
    RINGBUF_FULL = 1
    COUNTER_UPDATE = 2
    SK_STORAGE = 3
    CONFIG_MISSING = 4
    DNS_ORIGIN = 5
    DNS_CLIENT = 6
    FLOW_ORIGIN = 7


class SourceFile(enum.IntEnum):
    """enum hostagent_file."""

    UNSPECIFIED = 0
    COUNTERS = 1
    ORIGIN = 2
    POLICY = 3
    EVENTS = 4
    SOCK_ADDR = 5
    SOCK_CREATE = 6
    CGROUP_SKB = 7
    DNS = 8
    SOCK_OPS = 9


class Config(ct.Structure):
    _fields_ = [
        ("abi_version", ct.c_uint32),
        ("generation", ct.c_uint32),
        ("default_action", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("reserved", ct.c_uint32),
    ]


class Binding(ct.Structure):
    _fields_ = [
        ("ruleset_id", ct.c_uint32),
        ("policy_id", ct.c_uint32),
        ("mode", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("generation", ct.c_uint32),
    ]


class RuleKey(ct.Structure):
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("ruleset_id", ct.c_uint32),  # big-endian
        ("addr", ct.c_uint8 * 16),
    ]


class RuleValue(ct.Structure):
    _fields_ = [("portset_id", ct.c_uint32), ("flags", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class PortRange(ct.Structure):
    _fields_ = [
        ("first", ct.c_uint16),
        ("last", ct.c_uint16),
        ("protocols", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("rule", ct.c_uint16),
    ]


class PortSet(ct.Structure):
    _fields_ = [
        ("count", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("ranges", PortRange * MAX_PORT_RANGES),
    ]


class MetadataKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class ProtectedFilter(ct.Structure):
    _fields_ = [
        ("ready", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("v4", ct.c_uint64 * PROTECTED_FILTER_WORDS),
        ("v6", ct.c_uint64 * PROTECTED_FILTER_WORDS),
    ]


class DnsConfig(ct.Structure):
    _fields_ = [
        ("addr", ct.c_uint8 * 16),
        ("port", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("mark", ct.c_uint32),
        ("agent_cgroup_id", ct.c_uint64),
        ("encrypted_ports", ct.c_uint16 * MAX_ENCRYPTED_DNS_PORTS),
    ]


class DnsOrigin(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("family", ct.c_uint8),
                ("pad", ct.c_uint8)]


class DnsClientKey(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("protocol", ct.c_uint8),
                ("pad", ct.c_uint8)]


class DnsClient(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("sock_cookie", ct.c_uint64)]


class FqdnKey(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("addr", ct.c_uint8 * 16)]


class FqdnValue(ct.Structure):
    _fields_ = [("expires_ns", ct.c_uint64), ("portset_id", ct.c_uint32), ("flags", ct.c_uint8),
                ("pad", ct.c_uint8 * 3)]


class DecisionKey(ct.Structure):
    _fields_ = [
        ("policy_id", ct.c_uint32),
        ("verdict", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("hook", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class ErrorKey(ct.Structure):
    _fields_ = [("error", ct.c_uint32), ("file_id", ct.c_uint16), ("line", ct.c_uint16)]


class Event(ct.Structure):
    _fields_ = [
        ("time_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("sock_cookie", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("gid", ct.c_uint32),
        ("policy_id", ct.c_uint32),
        ("ruleset_id", ct.c_uint32),
        ("daddr", ct.c_uint8 * 16),
        ("dport", ct.c_uint16),
        ("rule", ct.c_uint16),
        ("family", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("hook", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("generation", ct.c_uint32),
        ("comm", ct.c_char * 16),
    ]


# name in abi.h -> mirror, for the alignment test
class FlowOrigin(ct.Structure):
    _fields_ = [
        ("start_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("gid", ct.c_uint32),
        ("policy_id", ct.c_uint32),
        ("ruleset_id", ct.c_uint32),
        ("generation", ct.c_uint32),
        ("rule", ct.c_uint16),
        ("verdict", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("comm", ct.c_char * 16),
    ]


class CloseEvent(ct.Structure):
    """A ring record whose event.hook is Hook.TCP_CLOSE."""

    _fields_ = [
        ("event", Event),
        ("bytes_sent", ct.c_uint64),
        ("bytes_received", ct.c_uint64),
        ("duration_ns", ct.c_uint64),
    ]


STRUCTS = {
    "config": Config,
    "binding": Binding,
    "rule_key": RuleKey,
    "rule_value": RuleValue,
    "port_range": PortRange,
    "portset": PortSet,
    "metadata_key": MetadataKey,
    "protected_filter": ProtectedFilter,
    "dns_config": DnsConfig,
    "dns_origin": DnsOrigin,
    "dns_client_key": DnsClientKey,
    "dns_client": DnsClient,
    "fqdn_key": FqdnKey,
    "fqdn_value": FqdnValue,
    "decision_key": DecisionKey,
    "error_key": ErrorKey,
    "event": Event,
    "flow_origin": FlowOrigin,
    "close_event": CloseEvent,
}

# C enum name -> (IntEnum, prefix of its C constants)
ENUMS = {
    "hostagent_verdict": (Verdict, "VERDICT_"),
    "hostagent_reason": (Reason, "REASON_"),
    "hostagent_hook": (Hook, "HOOK_"),
    "hostagent_mode": (BindingMode, "MODE_"),
    "hostagent_error": (KernelError, "ERROR_"),
    "hostagent_file": (SourceFile, "FILE_"),
}

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def as_v6_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    """The key form of a prefix: IPv4 becomes its IPv4-mapped IPv6 prefix (::ffff:a.b.c.d/96+n)."""
    if net.version == 4:
        base = int(_V4_MAPPED.network_address) | int(net.network_address)
        return ipaddress.IPv6Network((base, 96 + net.prefixlen))
    return net


def key_prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """as_v6_network() as (128-bit address, prefix length), without building a network object:
    the compiler does this for every CIDR of a policy."""
    if net.version == 4:
        return _V4_MAPPED_INT | int(net.network_address), 96 + net.prefixlen
    return int(net.network_address), net.prefixlen


_V4_MAPPED_INT = int(_V4_MAPPED.network_address)


def address_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The kernel's 16-byte form of an address (IPv4 as ::ffff:a.b.c.d); address_of() reverses
    it."""
    if addr.version == 4:
        return (_V4_MAPPED_INT | int(addr)).to_bytes(16, "big")
    return addr.packed


def address_of(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode a 16-byte kernel address; IPv4-mapped ones come back as IPv4."""
    addr = ipaddress.IPv6Address(bytes(raw))
    return addr.ipv4_mapped or addr


_MAPPED_TOP96 = _V4_MAPPED_INT >> 32


def protected_filter_bits(prefixes) -> tuple[int, int]:
    """The (v4, v6) bits of protected_filter_v1 for metadata_v1 keys given as (128-bit address,
    prefix length), each bitmap as an int whose bit i is the filter's bit i (see abi.h).

    A set of bits that covers every address of every prefix: for IPv4-mapped addresses the top
    16 bits of the IPv4 address, for the rest of the IPv6 space the fold of the top 32 bits. A
    prefix shorter than that granularity sets every index it can reach (a /8 sets 256 v4 bits,
    ::/0 every bit of both); one that contains ::ffff:0:0/96 sets all v4 bits as well.
    """
    v4 = v6 = 0
    for addr, plen in prefixes:
        if plen <= 96:
            # a prefix this short holds all of ::ffff:0:0/96 or none of it
            if (addr ^ _V4_MAPPED_INT) >> (128 - plen) == 0:
                v4 = (1 << PROTECTED_FILTER_BITS) - 1
        elif addr >> 32 == _MAPPED_TOP96:
            # inside ::ffff:0:0/96: an IPv4 prefix, and no address of the v6 bitmap
            v4 |= _range_bits((addr & 0xFFFFFFFF) >> 16, plen - 96)
            continue
        top = addr >> 96
        if plen >= 32:
            v6 |= 1 << _fold(top)
        elif plen <= 16:
            v6 = (1 << PROTECTED_FILTER_BITS) - 1
        else:
            first = top & ~((1 << (32 - plen)) - 1)
            for t in range(first, first + (1 << (32 - plen))):
                v6 |= 1 << _fold(t)
    return v4, v6


def _fold(top32: int) -> int:
    return (top32 >> 16) ^ (top32 & 0xFFFF)


def _range_bits(top16: int, v4_plen: int) -> int:
    """Bits of the top-16 values an IPv4 prefix of v4_plen bits starting at top16 reaches."""
    if v4_plen >= 16:
        return 1 << top16
    span = 1 << (16 - v4_plen)
    return ((1 << span) - 1) << (top16 & ~(span - 1))


def protected_filter(prefixes, ready: bool = True) -> ProtectedFilter:
    """The protected_filter_v1 value for these metadata_v1 keys."""
    v4, v6 = protected_filter_bits(prefixes)
    f = ProtectedFilter(ready=1 if ready else 0)
    ct.memmove(ct.addressof(f.v4), v4.to_bytes(PROTECTED_FILTER_BITS // 8, sys.byteorder),
               PROTECTED_FILTER_BITS // 8)
    ct.memmove(ct.addressof(f.v6), v6.to_bytes(PROTECTED_FILTER_BITS // 8, sys.byteorder),
               PROTECTED_FILTER_BITS // 8)
    return f


def maybe_protected(f: ProtectedFilter, key: bytes) -> bool:
    """What the kernel's __maybe_protected() answers for a 16-byte address key (tests)."""
    if not f.ready:
        return True
    addr = int.from_bytes(key, "big")
    if addr >> 32 == _MAPPED_TOP96:
        i, words = (addr & 0xFFFFFFFF) >> 16, f.v4
    else:
        i, words = _fold(addr >> 96), f.v6
    return bool(words[i // 64] >> (i % 64) & 1)


def allow_count_key(slot: int) -> tuple[int, int, int, int]:
    """The (policy_id, verdict, reason, hook) decision an allow_counts_v1 slot counts."""
    policy_id, rest = divmod(slot, ALLOW_COUNT_STRIDE)
    reason = Reason.NODE_DEFAULT if rest & ALLOW_COUNT_NODE_DEFAULT else Reason.POLICY_RULE
    return policy_id, int(Verdict.ALLOW), int(reason), rest & (ALLOW_COUNT_NODE_DEFAULT - 1)
