"""Small, pure value converters for the node config (and, later, policies).

In the style of supervisor's datatypes.py: each function takes one value as YAML (or the command
line) delivered it, returns the normalised Python value, and raises ``ValueError`` whose message
starts with ``repr(value)`` followed by a short reason. The caller adds the file, line and key.

They check types strictly, because YAML decides types before we see the value: ``maxRules: "5"``
is a string and is rejected rather than guessed at. Nothing here touches the host; checks that need
the machine (is this a cgroup2 mount?) happen once, at load, in the code that uses the value.
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
import socket
from collections.abc import Callable, Iterable

__all__ = [
    "LOG_LEVELS",
    "absolute_path",
    "boolean",
    "cidr",
    "host_port",
    "log_level",
    "one_of",
    "positive_int",
    "seconds",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOG_LEVELS = ("debug", "info", "warning", "error")

# RFC 1123 host name label; the whole name is also capped at 253 characters below.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_PREFIX_LEN = re.compile(r"[0-9]{1,3}\Z")


def _fail(value: object, reason: str) -> ValueError:
    return ValueError(f"{value!r}: {reason}")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(value, f"expected {what}, got {_type_name(value)}")
    return value


def host_port(value: object) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; IPv6 hosts are bracketed in the input, bare in the output.

    HOST is an IPv4 address, a bracketed IPv6 address or a DNS name. PORT is 0..65535; 0 asks the
    kernel for a free port.
    """
    s = _string(value, "a string HOST:PORT")
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            raise _fail(value, "expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(value, "not an IPv6 address inside the brackets") from None
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            raise _fail(value, "missing :PORT")
        if ":" in host:
            raise _fail(value, "an IPv6 address must be bracketed, as in [::1]:9402")
        if not host:
            raise _fail(value, "missing host (use 0.0.0.0 or [::] for all addresses)")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _fail(value, "not a valid IPv4 address") from None
        elif len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
            raise _fail(value, "not a valid host name")
    if not _PORT.match(port) or int(port) > 65535:
        raise _fail(value, "port must be a number from 0 to 65535")
    return host, int(port)


def _ipv4_network(addr: str, prefix: str) -> ipaddress.IPv4Network | None:
    """The common case, ~10x faster than ipaddress's string parser (which dominates loading a
    100k-rule policy); None sends anything else, errors included, to the full parser."""
    try:
        packed = socket.inet_pton(socket.AF_INET, addr)  # dotted quad only, no leading zeros
    except OSError:
        return None
    bits = int(prefix)
    if bits > 32:
        return None
    value = int.from_bytes(packed, "big")
    if value & ((1 << (32 - bits)) - 1):
        return None  # host bits set: the full parser words the error
    return ipaddress.IPv4Network((value, bits))


def cidr(value: object) -> IPNetwork:
    """``"10.0.0.0/8"`` -> network, strictly: host bits set is an error. A bare address is a /32 or /128."""
    s = _string(value, "a string CIDR")
    addr, slash, prefix = s.partition("/")
    # ipaddress also takes netmasks ("/255.0.0.0"), integers and scoped addresses ("fe80::1%eth0");
    # none of those belong in a rule, so only ADDRESS[/PREFIXLEN] gets through.
    if slash and not _PREFIX_LEN.match(prefix):
        raise _fail(value, "prefix length must be a number")
    if "%" in addr:
        raise _fail(value, "scoped addresses are not allowed")
    fast = _ipv4_network(addr, prefix if slash else "32")
    if fast is not None:
        return fast
    try:
        return ipaddress.ip_network(s, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise _fail(value, "not an IP address or CIDR") from None
    raise _fail(value, f"host bits set (did you mean {loose}?)")


def absolute_path(value: object) -> str:
    """An absolute filesystem path, lexically normalised ("//a/./b/" -> "/a/b"); ".." is refused."""
    s = _string(value, "an absolute path")
    if not s.startswith("/"):
        raise _fail(value, "not an absolute path")
    if "\0" in s:
        raise _fail(value, "contains a NUL byte")
    # Refused rather than normalised: "/a/../b" is not "/b" when "a" is a symlink.
    if ".." in s.split("/"):
        raise _fail(value, "must not contain '..'")
    return "/" + posixpath.normpath(s).lstrip("/")


def boolean(value: object) -> bool:
    """A YAML boolean (true/false; YAML 1.1 also spells them yes/no/on/off). Strings are refused."""
    if not isinstance(value, bool):
        raise _fail(value, f"expected true or false, got {_type_name(value)}")
    return value


def positive_int(value: object, hi: int | None = None) -> int:
    """An integer >= 1, and <= ``hi`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(value, f"expected an integer, got {_type_name(value)}")
    if value < 1:
        raise _fail(value, "must be at least 1")
    if hi is not None and value > hi:
        raise _fail(value, f"must be at most {hi}")
    return value


def seconds(value: object, lo: float, hi: float) -> float:
    """A duration in seconds (integer or decimal) within ``lo .. hi``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(value, f"expected a number of seconds, got {_type_name(value)}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _fail(value, f"must be between {lo:g} and {hi:g} seconds")
    return float(value)


def one_of(choices: Iterable[str]) -> Callable[[object], str]:
    """A converter accepting exactly one of ``choices`` (case-sensitive)."""
    allowed = tuple(choices)

    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _fail(value, f"expected one of {', '.join(allowed)}")
        return value

    convert.__name__ = f"one_of({', '.join(allowed)})"
    return convert


def log_level(value: object) -> str:
    """One of debug, info, warning, error (the lower-case names of the logging levels)."""
    return one_of(LOG_LEVELS)(value)


def is_local(listen: str) -> bool:
    """A listen address only this host can reach: loopback, or a Unix socket (unix:...)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
