"""Repeat queries, answered without parsing them.

A stub resolver asks the same question with the same bytes again and again: only the two-byte
transaction id changes. Once a workload's query has been answered from the cache (checked,
allowed, its addresses opened in the kernel), the answer to that exact byte string for that
workload is kept here, keyed by (cgroup id, the query after its id). A repeat then costs a dict
lookup, the checks that must run per query (the workload's rate limit; the answer, its
decision and the policy generation still current), and the splice of the client's id.

What stays out: TCP (its framing and flow control go through the full path), answers that emit
an event per query (audit, rebinding drops, allow events asked for), truncated answers. Anything
that no longer matches sends the query down the full path, which decides again.
"""

from __future__ import annotations

from hostagent.dns.cache import CacheEntry, Template

__all__ = ["HotAnswer", "HotAnswers", "REFRESH"]

# Seconds between a hot answer's visits to what the full path touches on every hit: the tunnel
# guard's record of the name (so the name stays counted as one the workload is using) and the
# cache's LRU position (so a name in use is not evicted). Once a second keeps both within a
# second of what the full path would leave.
REFRESH = 1.0
# Hot answers kept; past this the table is dropped wholesale and refills from the full path
# (a workload cycling through random names, or ids in the question bytes, cannot grow it).
MAX_HOT = 65536


class HotAnswer:
    """The answer to one workload's exact query bytes, for as long as ``decision`` is the
    entry's decision for that workload and the entry lives."""

    __slots__ = ("entry", "decision", "cache_key", "qname", "_prefix", "_template", "_suffix",
                 "_age", "_body", "refreshed")

    def __init__(self, entry: CacheEntry, decision: object, cache_key: tuple, qname: str,
                 prefix: bytes, template: Template, suffix: bytes, now: float) -> None:
        self.entry = entry
        self.decision = decision
        self.cache_key = cache_key
        self.qname = qname
        self._prefix = prefix      # header after the id, and the client's question
        self._template = template  # the answer section, TTLs by age
        self._suffix = suffix      # our OPT record, when the client sent one
        self._age = -1
        self._body = b""
        self.refreshed = now

    def body(self, now: float) -> bytes:
        """Everything after the id, with TTLs reduced by the entry's age."""
        age = int(now - self.entry.created)
        if age != self._age:
            self._body = self._prefix + self._template.at(age) + self._suffix
            self._age = age
        return self._body


class HotAnswers:
    """(cgroup id, query bytes after the id) -> HotAnswer; the loop thread's alone."""

    def __init__(self, size: int = MAX_HOT) -> None:
        self._size = size
        self._answers: dict[tuple[int, bytes], HotAnswer] = {}
        self.get = self._answers.get

    def put(self, key: tuple[int, bytes], answer: HotAnswer) -> None:
        if len(self._answers) >= self._size:
            self._answers.clear()
        self._answers[key] = answer

    def discard(self, key: tuple[int, bytes]) -> None:
        self._answers.pop(key, None)

    def clear(self) -> None:
        self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)
