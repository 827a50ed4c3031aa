"""Durations ("30d", "1h30m") and points in time (ISO-8601, or relative: "1h" = an hour ago).

The store keeps times as integer microseconds since the Unix epoch (UTC); everything here
converts to and from that.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from hostagent.events.convert import iso_time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:([0-9]+(?:\.[0-9]+)?)([smhdw]))", re.ASCII)
US = 1_000_000


def duration(value: object) -> float:
    """``"30d"``, ``"1h30m"``, ``"90s"``, ``"2w"`` -> seconds; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: expected a duration such as 30d, 12h, 90s")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{value!r}: a duration must be positive")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected a duration such as 30d, 12h, 90s")
    s = value.strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", s):
        seconds = float(s)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(f"{value!r}: expected a duration such as 30d, 12h, 1h30m, 90s "
                             "(units s, m, h, d, w)")
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be positive")
    return seconds


def point(value: str, now: float | None = None) -> int:
    """A point in time as microseconds: ISO-8601 (``2026-11-21T09:00:00Z``, ``2026-11-21``; no
    zone means UTC) or a duration back from now (``1h``, ``30m``, ``7d``)."""
    now = time.time() if now is None else now
    s = value.strip()
    try:
        return int((now - duration(s)) * US)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r}: expected ISO-8601 (2026-11-21T09:00:00Z) or a time back "
                         "from now (30m, 1h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * US + dt.microsecond


def iso(us: int | None, precision: str = "microseconds") -> str | None:
    """Microseconds -> ``2026-11-21T09:07:48.300975Z`` (None stays None)."""
    return None if us is None else iso_time(us, precision)


def now_us() -> int:
    return time.time_ns() // 1000
