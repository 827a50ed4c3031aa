"""Cgroup path globs: normalisation, matching, specificity, and exact overlap vs brute force."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.policy.selector import (
    compile_cgroup_pattern,
    matches,
    normalize_cgroup_pattern,
    overlap_example,
    patterns_overlap,
    specificity,
)

# --- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("/", "/"),
        ("//", "/"),
        ("a", "/a"),
        ("/a/", "/a"),
        ("a//b///c/", "/a/b/c"),
        ("/workloads/agent-a", "/workloads/agent-a"),
        ("system.slice/foo@1.service", "/system.slice/foo@1.service"),
        ("/**", "/**"),
        ("/**/**/a/**/**", "/**/a/**"),
        ("/a*?*b", "/a?*b"),
        ("/*?", "/?*"),
        ("/?*?", "/??*"),
        ("/a b/c:d", "/a b/c:d"),
        ("/ünïcode", "/ünïcode"),
        ("/.hidden/..dots", "/.hidden/..dots"),
    ],
)
def test_normalize_accept(raw, normalised):
    assert normalize_cgroup_pattern(raw) == normalised
    assert normalize_cgroup_pattern(normalised) == normalised  # idempotent


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "must not be empty"),
        ("/a/../b", "'.' and '..' segments are not allowed"),
        ("./a", "'.' and '..' segments are not allowed"),
        ("/a/.", "'.' and '..' segments are not allowed"),
        ("/a**", "'**' must be a whole path segment"),
        ("/**a", "'**' must be a whole path segment"),
        ("/***", "'**' must be a whole path segment"),
        ("/a/[ab]", "'[' is not allowed"),
        ("/a/b]", "']' is not allowed"),
        ("/a/{b,c}", "'{' is not allowed"),
        ("/a\\*", "'\\\\' is not allowed"),
        ("/a\nb", "control characters are not allowed"),
        ("/a\0b", "control characters are not allowed"),
    ],
)
def test_normalize_reject(raw, reason):
    with pytest.raises(ValueError) as info:
        normalize_cgroup_pattern(raw)
    assert str(info.value).startswith(repr(raw))
    assert reason in str(info.value)


def test_normalize_rejects_non_strings():
    with pytest.raises(ValueError):
        normalize_cgroup_pattern(None)  # type: ignore[arg-type]


# --- matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("/", "/", True),
        ("/", "/a", False),
        ("/a", "/a", True),
        ("/a", "/a/b", False),  # descendants are governed by the kernel, not selected
        ("/a", "/ab", False),
        ("/*", "/a", True),
        ("/*", "/", False),
        ("/*", "/a/b", False),  # * does not cross /
        ("/a/*", "/a", False),  # * never matches an empty segment
        ("/a/*", "/a/b", True),
        ("/a/*", "/a/b/c", False),
        ("/a*", "/a", True),
        ("/a*", "/abc", True),
        ("/a*c", "/ac", True),
        ("/a*c", "/abbc", True),
        ("/a*c", "/ab/c", False),
        ("/a?", "/ab", True),
        ("/a?", "/a", False),
        ("/a?", "/abc", False),
        ("/a?c", "/a/c", False),  # ? does not match /
        ("/**", "/", True),
        ("/**", "/a/b/c", True),
        ("/a/**", "/a", True),  # ** matches zero segments
        ("/a/**", "/a/b/c", True),
        ("/a/**", "/ab", False),
        ("/**/c", "/c", True),
        ("/**/c", "/a/b/c", True),
        ("/**/c", "/a/b/cd", False),
        ("/a/**/c", "/a/c", True),
        ("/a/**/c", "/a/b/b/c", True),
        ("/a/**/c", "/a/b/b/d", False),
        ("/kubepods.slice/*/cri-containerd-*.scope", "/kubepods.slice/burstable/cri-containerd-0a1.scope", True),
        ("/a.b", "/axb", False),  # . is literal, not a regex
        ("/a+", "/aa", False),
        ("/(a)", "/(a)", True),
        ("/$x^", "/$x^", True),
    ],
)
def test_matches(pattern, path, expected):
    assert matches(pattern, path) is expected
    assert (compile_cgroup_pattern(pattern).fullmatch(path) is not None) is expected


def test_compile_is_anchored_and_cached():
    regex = compile_cgroup_pattern("/a/*")
    assert regex.match("/a/b/c") is None
    assert regex.search("/x/a/b") is None
    assert compile_cgroup_pattern("/a/*") is regex
    assert isinstance(regex, re.Pattern)


def test_compile_normalises():
    assert compile_cgroup_pattern("a//b/").fullmatch("/a/b")
    with pytest.raises(ValueError):
        compile_cgroup_pattern("/a/../b")


# --- specificity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("/", (0, 0)),
        ("/**", (0, 0)),
        ("/*", (0, 0)),
        ("/workloads/agent-a", (2, 16)),
        ("/workloads/agent-*", (1, 15)),
        ("/workloads/*", (1, 9)),
        ("/workloads/**", (1, 9)),
        ("/a?c", (0, 2)),
    ],
)
def test_specificity(pattern, expected):
    assert specificity(pattern) == expected


def test_specificity_orders_more_specific_first():
    ordered = ["/workloads/agent-a", "/workloads/agent-*", "/workloads/*", "/**"]
    assert sorted(ordered, key=specificity, reverse=True) == ordered


# --- overlap --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, example",
    [
        ("/a", "/a", "/a"),
        ("/a", "/b", None),
        ("/", "/**", "/"),
        ("/", "/*", None),
        ("/a/*", "/*/b", "/a/b"),
        ("/a/*", "/b/*", None),
        ("/a/**", "/a", "/a"),
        ("/**/x", "/y/**", "/y/x"),
        ("/**/a/**", "/**/b/**", "/a/b"),
        ("/a*", "/*b", "/ab"),
        ("/aa*", "/*bb", "/aabb"),
        ("/a*", "/b*", None),
        ("/?", "/??", None),
        ("/?*", "/??", "/xx"),
        ("/*", "/*", "/x"),
        ("/a/*/c", "/a/**", "/a/x/c"),
        ("/a/*/c", "/a/*", None),
        ("/*/*", "/**/c/**/d", "/c/d"),
    ],
)
def test_overlap_examples(a, b, example):
    assert overlap_example(a, b) == example
    assert patterns_overlap(a, b) is (example is not None)
    assert patterns_overlap(b, a) is (example is not None)
    if example is not None:
        assert matches(a, example) and matches(b, example)


# Reference implementation: plain recursion straight from the definition, sharing no code with
# the module (no regexes, no automata).


def ref_segment(p: str, s: str) -> bool:
    if not p:
        return not s
    if p[0] == "*":
        return ref_segment(p[1:], s) or (bool(s) and ref_segment(p, s[1:]))
    return bool(s) and (p[0] == "?" or p[0] == s[0]) and ref_segment(p[1:], s[1:])


def ref_path(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return ref_path(pattern[1:], path) or (bool(path) and ref_path(pattern, path[1:]))
    return bool(path) and ref_segment(pattern[0], path[0]) and ref_path(pattern[1:], path[1:])


def split(pattern: str) -> tuple[str, ...]:
    return tuple(s for s in pattern.split("/") if s)


def strings(alphabet: str, max_len: int) -> list[str]:
    return ["".join(t) for n in range(1, max_len + 1) for t in itertools.product(alphabet, repeat=n)]


def paths(segments: list[str], max_segments: int) -> list[tuple[str, ...]]:
    return [t for n in range(max_segments + 1) for t in itertools.product(segments, repeat=n)]


def segment_patterns(max_len: int) -> st.SearchStrategy[str]:
    return st.text(alphabet="ab*?", min_size=1, max_size=max_len).filter(lambda s: "**" not in s)


def path_patterns(max_segments: int, max_len: int) -> st.SearchStrategy[str]:
    segment = st.one_of(st.just("**"), segment_patterns(max_len))
    return st.lists(segment, max_size=max_segments).map(lambda segs: normalize_cgroup_pattern("/" + "/".join(segs)))


PROPERTY = settings(max_examples=400, deadline=None)

# Why these brute-force bounds are exhaustive: in a shortest common string, every character is
# consumed by a non-"*" on at least one side (a character both "*"s consume can be dropped), so
# two segment patterns of length <= 3 (at most 2 non-"*" each when they have a "*") have a
# common string of length <= 4 if they have one at all. The same argument over segments and
# "**" bounds the number of segments of a shortest common path by the non-"**" segments.
SEGMENT_STRINGS_4 = strings("ab", 4)


@PROPERTY
@given(segment_patterns(3), segment_patterns(3))
def test_segment_overlap_matches_brute_force(p, q):
    expected = any(ref_segment(p, s) and ref_segment(q, s) for s in SEGMENT_STRINGS_4)
    example = overlap_example("/" + p, "/" + q)
    assert (example is not None) is expected
    if example is not None:
        assert ref_segment(p, example[1:]) and ref_segment(q, example[1:])


# Patterns of <= 3 segments of length <= 2: a shortest common path has <= 4 segments, each of
# length <= 2.
PATHS_4x2 = paths(strings("ab", 2), 4)


@PROPERTY
@given(path_patterns(3, 2), path_patterns(3, 2))
def test_path_overlap_matches_brute_force(a, b):
    pa, pb = split(a), split(b)
    expected = any(ref_path(pa, p) and ref_path(pb, p) for p in PATHS_4x2)
    example = overlap_example(a, b)
    assert (example is not None) is expected, (a, b)
    assert patterns_overlap(b, a) is expected
    if example is not None:
        assert ref_path(pa, split(example)) and ref_path(pb, split(example))


# Patterns of <= 2 segments of length <= 3: <= 2 segments of length <= 4 suffice.
PATHS_2x4 = paths(SEGMENT_STRINGS_4, 2)


@PROPERTY
@given(path_patterns(2, 3), path_patterns(2, 3))
def test_path_overlap_long_segments_matches_brute_force(a, b):
    pa, pb = split(a), split(b)
    expected = any(ref_path(pa, p) and ref_path(pb, p) for p in PATHS_2x4)
    assert patterns_overlap(a, b) is expected, (a, b)


@PROPERTY
@given(path_patterns(4, 3), st.lists(st.text(alphabet="ab", min_size=1, max_size=4), max_size=5))
def test_matches_agrees_with_reference(pattern, segments):
    path = "/" + "/".join(segments)
    assert matches(pattern, path) is ref_path(split(pattern), tuple(segments))


@PROPERTY
@given(st.text(max_size=30))
def test_normalize_only_raises_value_error(raw):
    try:
        pattern = normalize_cgroup_pattern(raw)
    except ValueError as exc:
        assert str(exc).startswith(repr(raw))
    else:
        assert normalize_cgroup_pattern(pattern) == pattern
        compile_cgroup_pattern(pattern)
        specificity(pattern)


@PROPERTY
@given(path_patterns(3, 3))
def test_pattern_overlaps_itself(pattern):
    example = overlap_example(pattern, pattern)
    assert example is not None
    assert matches(pattern, example)
