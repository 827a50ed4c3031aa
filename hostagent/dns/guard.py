"""The resolver's guards: per-workload rate limit, tunnel detection, rebinding, TTL clamp, and
rate limits on its own logs and events.

Everything keyed by workload or name is bounded: a workload controls what it queries, so any
per-name state it can grow must have a cap and a way to shed old entries.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import re
from collections.abc import Iterable

from hostagent.dns.hooks import IPAddress

__all__ = [
    "EventLimiter",
    "RateLimitedLog",
    "RateLimiter",
    "RebindFilter",
    "TunnelGuard",
    "clamp_ttl",
    "label_entropy",
]

# Workloads (cgroups) with rate-limit state; past this, idle (full) buckets are dropped first.
MAX_BUCKETS = 65536
# (workload, zone) pairs whose recent names are remembered for the unique-subdomain limit; past
# this the least recently used pair is forgotten (it can then restart its count: an attacker
# spraying zones to push its own tunnel zone out still needs 65536 zones a window).
MAX_TRACKED_ZONES = 65536

_HEX_RUN = re.compile(rb"[0-9a-f]+\Z")


def clamp_ttl(ttl: int, lo: int, hi: int) -> int:
    return lo if ttl < lo else hi if ttl > hi else ttl


class RateLimiter:
    """One token bucket per key (a workload's cgroup id): ``rate`` per second, ``burst`` deep."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_BUCKETS) -> None:
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: dict[object, list[float]] = {}

    def take(self, key: object, now: float) -> bool:
        """Spend one token; False when the bucket is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._shed(now)
            self._buckets[key] = [self._burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _shed(self, now: float) -> None:
        full = [k for k, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self._rate >= self._burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:  # all busy: forget the oldest
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


def label_entropy(label: bytes) -> float:
    """Shannon entropy in bits per character."""
    n = len(label)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(label).values())


class TunnelGuard:
    """Refuses query names shaped like data smuggled over DNS (iodine, dnscat2, dns2tcp).

    Two signs, per the node config: a label longer than names people or CDNs pick, or long
    runs with the character spread of encoded data (random base32 averages 4.0 bits per
    character at 24 characters and 4.5 at 52; see shape() for what is not measured); and a
    workload asking for more distinct names under one zone within a window than normal clients
    do (each tunnel query must be new, or a cache would answer it).
    """

    def __init__(self, max_label: int, entropy_min_length: int, entropy_bits: float,
                 max_unique: int, window: float, max_zones: int = MAX_TRACKED_ZONES) -> None:
        self._max_label = max_label
        self._entropy_min_length = entropy_min_length
        self._entropy_bits = entropy_bits
        self._max_unique = max_unique
        self._window = window
        self._max_zones = max_zones
        # (workload, zone) -> {name: last seen}, each dict ordered by last seen.
        self._zones: collections.OrderedDict[tuple[int, str], dict[str, float]] = \
            collections.OrderedDict()

    def shape(self, name_wire: bytes) -> str | None:
        """Why a name looks like a tunnel by itself ("label_length", "entropy"), or None.

        Entropy is measured per run of a label between hyphens, and runs of hex digits only
        are not measured. Measured over whole labels, the configured defaults (3.8 bits from 24
        characters) refuse everyday cloud names: "internal-my-internal-lb-1234567890" (an AWS
        internal load balancer) carries 4.2 bits, "my-company-production-artifacts-bucket" 4.0,
        the 32-hex-digit ids of Kubernetes load balancers and EKS endpoints up to 4.0. Encoders
        (base32, base64, base128) do not emit hyphens, so their labels are measured whole; hex
        (dnscat2) fills labels past the length limit, and every encoding still meets the
        unique-name limit, which is the check a tunnel cannot avoid.
        """
        pos = 0
        while True:
            length = name_wire[pos]
            if length == 0:
                return None
            if length > self._max_label:
                return "label_length"
            if length >= self._entropy_min_length:
                for run in name_wire[pos + 1:pos + 1 + length].split(b"-"):
                    if (len(run) >= self._entropy_min_length and not _HEX_RUN.match(run)
                            and label_entropy(run) >= self._entropy_bits):
                        return "entropy"
            pos += 1 + length

    def admit(self, workload: int, qname: str, now: float) -> bool:
        """Record that ``workload`` asked for ``qname``; False once it asked for too many
        distinct names under the same zone (qname minus its first label) within the window."""
        key = (workload, qname.partition(".")[2])
        zones = self._zones
        names = zones.get(key)
        if names is None:
            if len(zones) >= self._max_zones:
                zones.popitem(last=False)
            names = zones[key] = {}
        else:
            zones.move_to_end(key)
        if names.pop(qname, None) is not None:
            names[qname] = now  # seen before: refresh, it is not new data
            return True
        if len(names) >= self._max_unique:
            cutoff = now - self._window
            while names:
                oldest = next(iter(names))
                if names[oldest] > cutoff:
                    break
                del names[oldest]
            if len(names) >= self._max_unique:
                return False
        names[qname] = now
        return True

    def forget(self, workload: int | None = None) -> None:
        if workload is None:
            self._zones.clear()
        else:
            for key in [k for k in self._zones if k[0] == workload]:
                del self._zones[key]


class RebindFilter:
    """Is an answer address inside the rebind-protected networks (DnsConfig.rebind_protect)?"""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in networks:
            self._nets[net.version].append((int(net.network_address), int(net.netmask)))

    def protected(self, addr: IPAddress) -> bool:
        value = int(addr)
        return any(value & mask == base for base, mask in self._nets[addr.version])


class EventLimiter:
    """At most one event per key per ``interval`` seconds; counts what it held back.

    For events an attacker can generate at line rate (floods refused by the rate limiter,
    garbage from unknown sources): the first one in each interval still tells the story.
    """

    def __init__(self, interval: float = 1.0, max_keys: int = 4096) -> None:
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[object, float] = {}
        self.suppressed = 0

    def allow(self, key: object, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self.suppressed += 1
            return False
        if last is None and len(self._last) >= self._max_keys:
            cutoff = now - self._interval
            self._last = {k: t for k, t in self._last.items() if t > cutoff}
            if len(self._last) >= self._max_keys:
                self.suppressed += 1
                return False
        self._last[key] = now
        return True


class RateLimitedLog:
    """A logger that says each kind of thing at most once per ``interval`` seconds, then how
    many times it kept quiet."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def log(self, level: int, key: str, now: float, msg: str, *args: object,
            exc_info: bool = False) -> None:
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        if quiet:
            msg += f" ({quiet} similar messages suppressed)"
        self._log.log(level, msg, *args, exc_info=exc_info)
