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
STRUCTS = {
    "config": Config,
    "binding": Binding,
    "rule_key": RuleKey,
    "rule_value": RuleValue,
    "port_range": PortRange,
    "portset": PortSet,
    "metadata_key": MetadataKey,
    "dns_config": DnsConfig,
    "dns_origin": DnsOrigin,
    "dns_client_key": DnsClientKey,
    "dns_client": DnsClient,
    "fqdn_key": FqdnKey,
    "fqdn_value": FqdnValue,
    "decision_key": DecisionKey,
    "error_key": ErrorKey,
    "event": Event,
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
