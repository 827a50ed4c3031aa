"""Cgroup path patterns: normalisation, matching, specificity and exact overlap.

A policy selects workloads by a glob over cgroup v2 paths relative to the cgroup root, e.g.
``/workloads/agent-*``. Matching decides which cgroups a policy *selects*; the kernel programs are
attached to those cgroups, and cgroup v2 attachment also governs every descendant cgroup. So
``/workloads/agent-a`` already covers ``/workloads/agent-a/worker``; ``/**`` is only needed to
select cgroups *by name* at any depth.

The glob language is deliberately small, so that two questions stay cheap and exact:

* ``*`` matches any run of characters within one path segment (never ``/``);
* ``?`` matches exactly one character (never ``/``);
* ``**`` as a whole segment matches zero or more segments (``**`` next to other characters in a
  segment, e.g. ``a**``, is an error);
* every other character is literal, except ``[ ] { } \\`` which are rejected so that a future
  character-class or brace syntax can be added without changing the meaning of existing files.

Real cgroup paths have non-empty segments, so a segment pattern never matches an empty segment
(``/a/*`` does not match ``/a``), and ``/`` alone is the root cgroup (zero segments).

Precedence between policies is by :func:`specificity`; two policies of equal specificity that can
select the same cgroup would be ambiguous, which :func:`patterns_overlap` detects exactly (by
automaton intersection, not by sampling paths).
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Sequence

__all__ = [
    "normalize_cgroup_pattern",
    "compile_cgroup_pattern",
    "matches",
    "specificity",
    "patterns_overlap",
    "overlap_example",
    "normalize_name_glob",
    "name_glob_specificity",
    "name_glob_overlap_example",
]

GLOBSTAR = "**"
_REJECTED = frozenset("[]{}\\")
_WILDCARDS = frozenset("*?")
# Characters put into example paths where a wildcard allows anything.
_FILLER = "x"


def normalize_cgroup_pattern(value: str) -> str:
    """Return the canonical form of a cgroup path pattern, or raise ValueError.

    Canonical means: one leading "/", no trailing "/", no empty segments, consecutive ``**``
    segments collapsed into one, and each run of wildcards inside a segment written as its
    ``?``s followed by at most one ``*`` (``*?`` and ``?*`` match the same strings). Equal
    canonical forms therefore mean equal patterns, which keeps error messages and duplicate
    detection stable. The error message starts with ``repr(value)`` and says what is wrong.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: a cgroup path pattern must be a string")
    if not value:
        raise ValueError(f"{value!r}: a cgroup path pattern must not be empty")
    segments: list[str] = []
    for segment in value.split("/"):
        if not segment:
            continue
        segment = _normalize_segment(value, segment)
        if segment == GLOBSTAR and segments and segments[-1] == GLOBSTAR:
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _normalize_segment(value: str, segment: str) -> str:
    """Validate one segment of ``value`` and return it with wildcard runs in canonical order."""
    if segment in (".", ".."):
        raise ValueError(f"{value!r}: '.' and '..' segments are not allowed")
    for char in segment:
        if char in _REJECTED:
            raise ValueError(f"{value!r}: {char!r} is not allowed (only * ? ** are wildcards)")
        if char == "\0" or not char.isprintable():
            raise ValueError(f"{value!r}: control characters are not allowed")
    if segment == GLOBSTAR:
        return segment
    if GLOBSTAR in segment:
        raise ValueError(f"{value!r}: '**' must be a whole path segment")
    # Put each wildcard run into canonical order: "?"s then at most one "*".
    return re.sub(
        r"[*?]{2,}",
        lambda m: "?" * m.group().count("?") + ("*" if "*" in m.group() else ""),
        segment,
    )


@functools.lru_cache(maxsize=4096)
def _normalized(pattern: str) -> str:
    return normalize_cgroup_pattern(pattern)


def _segments(pattern: str) -> tuple[str, ...]:
    """Segments of a normalised pattern or path; the root "/" has none."""
    return tuple(s for s in pattern.split("/") if s)


@functools.lru_cache(maxsize=4096)
def compile_cgroup_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a pattern (normalised first) into a regex for ``fullmatch`` on cgroup paths.

    The regex is anchored with ``\\A``/``\\Z`` so ``match`` and ``search`` behave like
    ``fullmatch`` as well. Paths are expected in normalised form ("/a/b", root "/").
    """
    segments = _segments(normalize_cgroup_pattern(pattern))
    body = "".join(_segment_regex(s) for s in segments)
    if all(s == GLOBSTAR for s in segments):
        # The pattern can match zero segments, i.e. the root cgroup, spelt "/".
        body = f"(?:{body}|/)" if body else "/"
    return re.compile(rf"\A{body}\Z", re.DOTALL)


def _segment_regex(segment: str) -> str:
    if segment == GLOBSTAR:
        return "(?:/[^/]+)*"
    parts = []
    for char in segment:
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(char))
    # The lookahead keeps "*" from matching an empty segment.
    return "/(?=[^/])" + "".join(parts)


def matches(pattern: str, path: str) -> bool:
    """True if the normalised cgroup ``path`` (e.g. "/workloads/agent-a") matches ``pattern``."""
    return compile_cgroup_pattern(pattern).fullmatch(path) is not None


def specificity(pattern: str) -> tuple[int, int]:
    """How specific a pattern is, as ``(literal segments, literal characters)``; higher wins.

    The first element counts segments without any wildcard, the second counts every non-wildcard
    character in the pattern (not counting "/"). Tuples compare lexicographically, so
    ``/workloads/agent-a`` (2, 16) beats ``/workloads/agent-*`` (1, 15) beats ``/workloads/*``
    (1, 9) beats ``/**`` (0, 0). Only the pattern text counts, not which paths exist, so the
    precedence between two policies never changes as cgroups come and go.
    """
    segments = _segments(_normalized(pattern))
    literal_segments = sum(1 for s in segments if not _WILDCARDS.intersection(s))
    literal_chars = sum(1 for s in segments for c in s if c not in _WILDCARDS)
    return (literal_segments, literal_chars)


def patterns_overlap(a: str, b: str) -> bool:
    """True iff some cgroup path matches both patterns (exact, not sampled)."""
    return overlap_example(a, b) is not None


def overlap_example(a: str, b: str) -> str | None:
    """An example cgroup path matched by both patterns (few segments), or None if there is none.

    Breadth-first search over pairs of positions in the two segment lists (the product of the
    two pattern automata). ``**`` may stop, or consume one segment that the other side's current
    segment matches; two non-``**`` segments must share a non-empty string, decided by
    :func:`_segment_example`. When both sides are at ``**``, letting one of them stop first loses
    nothing: any segments both would consume can be left out of the example.
    """
    a, b = _normalized(a), _normalized(b)
    # Fast path for the common case of exact paths: a literal pattern is its only example.
    if not _WILDCARDS.intersection(a):
        return a if matches(b, a) else None
    if not _WILDCARDS.intersection(b):
        return b if matches(a, b) else None
    sa, sb = _segments(a), _segments(b)
    start = (0, 0)
    parent: dict[tuple[int, int], tuple[tuple[int, int], str | None]] = {start: (start, None)}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        i, j = state
        if i == len(sa) and j == len(sb):
            return _unwind(parent, state)
        for nxt, emitted in _segment_steps(sa, sb, i, j):
            if nxt not in parent:
                parent[nxt] = (state, emitted)
                queue.append(nxt)
    return None


def _segment_steps(
    sa: Sequence[str], sb: Sequence[str], i: int, j: int
) -> list[tuple[tuple[int, int], str | None]]:
    """Successor states of (i, j), each with the path segment it consumes (None for none)."""
    steps: list[tuple[tuple[int, int], str | None]] = []
    a = sa[i] if i < len(sa) else None
    b = sb[j] if j < len(sb) else None
    if a == GLOBSTAR:
        steps.append(((i + 1, j), None))
    if b == GLOBSTAR:
        steps.append(((i, j + 1), None))
    if a is None or b is None:
        return steps
    if a == GLOBSTAR and b != GLOBSTAR:
        steps.append(((i, j + 1), _segment_example("*", b)))
    elif b == GLOBSTAR and a != GLOBSTAR:
        steps.append(((i + 1, j), _segment_example(a, "*")))
    elif a != GLOBSTAR and b != GLOBSTAR:
        example = _segment_example(a, b)
        if example is not None:
            steps.append(((i + 1, j + 1), example))
    return steps


def _unwind(parent: dict, state: tuple[int, int]) -> str:
    segments: list[str] = []
    while True:
        previous, emitted = parent[state]
        if emitted is not None:
            segments.append(emitted)
        if previous == state:
            break
        state = previous
    return "/" + "/".join(reversed(segments))


@functools.lru_cache(maxsize=4096)
def _segment_example(p: str, q: str) -> str | None:
    """A shortest non-empty string (without "/") matched by both segment globs, or None.

    Breadth-first search over pairs of positions in ``p`` and ``q``. A ``*`` may stop (an empty
    step) or consume a character and stay; ``?`` and literals consume one character. A consumed
    character must satisfy both sides: two literals must be equal, otherwise any character
    works. Empty steps go to the front of the queue (0-1 BFS) so the result is shortest.

    The empty string matches both only if both are all ``*``; then ``x`` matches both too, which
    is why a non-empty witness exists whenever the two languages intersect at all.
    """
    if not _WILDCARDS.intersection(p):
        return p if compile_cgroup_pattern("/" + q).fullmatch("/" + p) else None
    if not _WILDCARDS.intersection(q):
        return q if compile_cgroup_pattern("/" + p).fullmatch("/" + q) else None
    start = (0, 0)
    parent: dict[tuple[int, int], tuple[tuple[int, int], str]] = {}
    dist = {start: 0}
    queue = deque([start])
    done: set[tuple[int, int]] = set()
    while queue:
        state = queue.popleft()
        if state in done:
            continue
        done.add(state)
        i, j = state
        if i == len(p) and j == len(q):
            if dist[state] == 0:
                return _FILLER
            return _unwind_chars(parent, state)
        pc = p[i] if i < len(p) else None
        qc = q[j] if j < len(q) else None
        moves: list[tuple[tuple[int, int], str | None]] = []
        if pc == "*":
            moves.append(((i + 1, j), None))
        if qc == "*":
            moves.append(((i, j + 1), None))
        if pc is not None and qc is not None and not (pc == "*" and qc == "*"):
            char = _common_char(pc, qc)
            if char is not None:
                ni = i if pc == "*" else i + 1
                nj = j if qc == "*" else j + 1
                moves.append(((ni, nj), char))
        for nxt, char in moves:
            cost = dist[state] + (0 if char is None else 1)
            if nxt in dist and dist[nxt] <= cost:
                continue
            dist[nxt] = cost
            parent[nxt] = (state, char or "")
            if char is None:
                queue.appendleft(nxt)
            else:
                queue.append(nxt)
    return None


def _common_char(pc: str, qc: str) -> str | None:
    """A character that glob characters ``pc`` and ``qc`` can both consume, or None."""
    p_literal = pc not in _WILDCARDS
    q_literal = qc not in _WILDCARDS
    if p_literal and q_literal:
        return pc if pc == qc else None
    if p_literal:
        return pc
    if q_literal:
        return qc
    return _FILLER


def _unwind_chars(parent: dict, state: tuple[int, int]) -> str:
    chars: list[str] = []
    while state in parent:
        state, char = parent[state]
        chars.append(char)
    return "".join(reversed(chars))


# --- globs over a single name -------------------------------------------------------------------
#
# Some selectors glob over a name rather than a path: systemd unit names ("agent-*.service"). A
# name glob is what one path segment is: "*" matches any run of characters, "?" exactly one, and
# every other character is literal. So its precedence and its overlap with another name glob are
# those of the one-segment path pattern "/" + glob; they are computed here directly rather than
# through the path functions because a path pattern reserves characters ("\\") that are ordinary in
# names (systemd escapes "-" in unit names as "\\x2d"), and because "**" has no special meaning in
# a name. Validating which characters a name may contain is left to the caller.


def normalize_name_glob(glob: str) -> str:
    """``glob`` with each run of wildcards written as its ``?``s followed by at most one ``*``
    (as :func:`normalize_cgroup_pattern` does within a segment), so equal globs compare equal."""
    return re.sub(
        r"[*?]{2,}",
        lambda m: "?" * m.group().count("?") + ("*" if "*" in m.group() else ""),
        glob,
    )


def name_glob_specificity(glob: str) -> tuple[int, int]:
    """:func:`specificity` of the one-segment pattern ``"/" + glob``: ``(1 if the glob has no
    wildcard else 0, number of literal characters)``. So a literal name beats any glob that also
    matches it, and otherwise the glob with more literal characters wins."""
    literal_chars = sum(1 for c in glob if c not in _WILDCARDS)
    return (0 if _WILDCARDS.intersection(glob) else 1, literal_chars)


def name_glob_overlap_example(a: str, b: str) -> str | None:
    """A shortest non-empty name matched by both name globs, or None if there is none (exact)."""
    return _segment_example(normalize_name_glob(a), normalize_name_glob(b))
