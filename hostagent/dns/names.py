"""DNS names in policies (``fqdn``, ``fqdnPattern``), and matching query names against them.

The rules, with examples, are in docs/fqdn.md. In short:

* Case and the root's trailing dot do not matter: ``API.example.com.`` is ``api.example.com``.
  Both are normalised away first (lower case, one trailing dot stripped).
* A name is written as it travels in DNS: labels of 1-63 characters from ``[a-z0-9-]``, not
  starting or ending with ``-``, with ``_`` allowed as a label's first character (service labels
  such as ``_sip._tcp.example.com``), at most 253 characters. A single label (``kubernetes``) is
  a name too: resolvers complete it from their search list.
* Internationalised names are written in their A-label (``xn--``) form. Non-ASCII input is
  refused, and the message gives the A-label form: queries carry A-labels, and the two IDNA
  standards convert a few letters differently (``faß.de``), so a silent conversion could allow
  a different name than the author meant. An ``xn--`` label must be valid punycode of what an
  internationalised label can hold.
* ``*`` appears only in patterns, and only as whole leftmost labels. A leading ``*`` matches ONE
  OR MORE labels: ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, never
  ``example.com`` itself (list it as an ``fqdn`` too), ``evilexample.com`` or
  ``example.com.evil.net``. ``*.*.example.com`` requires at least two labels in front. One or
  more, not exactly one, because whoever controls a zone controls every name below it: stopping
  at one level protects nothing and breaks clients of deeper names (CDNs, storage accounts).
* A pattern keeps at least ``min_labels`` fixed labels (the node config's
  ``dns.fqdnPatternMinLabels``), so that ``*.com`` cannot open a whole top-level domain.

Names are validated here when policies load; at runtime, query names are only matched
(NameMatcher), which never raises: a query name that no policy could have written (non-ASCII,
escaped dots, empty labels, characters other than letters, digits, ``-`` and ``_``) matches
nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from types import MappingProxyType

__all__ = ["MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "NameMatcher", "normalize_name", "normalize_pattern"]

# RFC 1035: 255 octets on the wire, which is 253 characters of text without the root's dot.
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_WILDCARD = "*"
_LABEL_RE = re.compile(r"_?[a-z0-9](?:[-a-z0-9]*[a-z0-9])?", re.ASCII)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")  # letters, digits, hyphen
_NAME_CHARS = _LDH | {"_", "."}
# What the U-label of an xn-- label may hold besides _LDH, after RFC 5892 (IDNA 2008): letters,
# marks and digits ("LetterDigits") that NFKC case folding leaves alone, the exceptions it lists
# as valid (2.6: ß, final sigma, ...), and the joiners and middle dots it allows in context.
_IDN_CATEGORIES = frozenset({"Ll", "Lu", "Lo", "Lm", "Mn", "Mc", "Nd"})
_IDN_EXCEPTIONS = frozenset("\u00df\u03c2\u06fd\u06fe\u0f0b\u3007")
_IDN_CONTEXT_CHARS = frozenset("\u200c\u200d\u00b7\u0375\u05f3\u05f4\u30fb")
# Characters someone writing a regular expression would use; '.' and '*' have their own meaning.
_REGEX_CHARS = frozenset("\\^$|?+()[]{}")
# What NameMatcher accepts as a query name: looser than a policy name (a '*'-matched label may be
# anything DNS servers answer for in practice), but with no empty label, no escaped dot ("\.") and
# nothing non-ASCII, so that a name never splits into labels differently from how DNS reads it.
_QNAME_RE = re.compile(r"[-a-z0-9_]+(?:\.[-a-z0-9_]+)*", re.ASCII)
_SHOW_MAX = 80
_NOTHING: frozenset[int] = frozenset()


# --- validation -----------------------------------------------------------------------------


def normalize_name(text: str) -> str:
    """``text`` as a policy ``fqdn``: lower case, one trailing dot stripped, validated.

    Raises ValueError saying what is wrong, e.g. ``"'a..b': has an empty label ('..')"``.
    """
    name = _prepared(text, wildcard=False)
    labels = name.split(".")
    problem = _empty_label_problem(text, labels) or _labels_problem(labels) or _length_problem(name)
    if problem is not None:
        raise ValueError(f"{_show(text)}: {problem}")
    return name


def normalize_pattern(text: str, min_labels: int) -> str:
    """``text`` as a policy ``fqdnPattern``: lower case, one trailing dot stripped, validated.

    One or more leading ``*`` labels, each matching one or more labels of a name, then at least
    ``min_labels`` (>= 1) fixed labels. Raises ValueError saying what is wrong: a misplaced or
    partial ``*``, no ``*`` at all, a pattern too broad for ``min_labels``, or a bad label.
    """
    if min_labels < 1:
        raise ValueError(f"min_labels must be at least 1, got {min_labels}")
    name = _prepared(text, wildcard=True)
    labels = name.split(".")
    problem = _empty_label_problem(text, labels)
    if problem is None:
        stars = _leading_stars(labels)
        fixed = labels[stars:]
        problem = (
            _wildcard_problem(stars, fixed)
            or _labels_problem(fixed)
            or _breadth_problem(len(fixed), min_labels)
            or _length_problem(name)
        )
    if problem is not None:
        raise ValueError(f"{_show(text)}: {problem}")
    return name


def _prepared(text: str, wildcard: bool) -> str:
    """Lower case without the trailing dot, once the characters are known to be allowed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    if not text:
        raise ValueError("empty name")
    if not text.isascii():
        raise ValueError(f"{_show(text)}: {_non_ascii_problem(text)}")
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("'.' is the root of DNS, not a name")
    if not _NAME_CHARS.issuperset(name):
        for char in name:
            problem = _character_problem(char, wildcard)
            if problem is not None:
                raise ValueError(f"{_show(text)}: {problem}")
    return name


def _character_problem(char: str, wildcard: bool) -> str | None:
    if char in _NAME_CHARS or (wildcard and char == _WILDCARD):
        return None
    if char.isspace():
        return f"contains whitespace ({char!r})"
    if char == _WILDCARD:
        return "'*' is a wildcard, which only fqdnPattern allows (use fqdnPattern for a pattern)"
    if char in _REGEX_CHARS:
        return (
            f"{char!r} cannot appear in a DNS name: names and patterns are not regular expressions "
            "(the only wildcard is a whole leading '*' label in fqdnPattern)"
        )
    return (
        f"{char!r} cannot appear in a DNS name (expected letters, digits, '-', '.', and '_' at "
        "the start of a label)"
    )


def _non_ascii_problem(text: str) -> str:
    """The refusal of a name with non-ASCII letters, giving its A-label form if it has one."""
    labels = (text[:-1] if text.endswith(".") else text).split(".")
    try:
        a_form = ".".join(label if label.isascii() else _a_label(label) for label in labels)
    except UnicodeError as exc:
        return f"non-ASCII characters, and it is not a valid internationalised name ({exc})"
    return (
        "non-ASCII characters; write internationalised names in their A-label form: "
        f"{a_form.lower()!r}"
    )


def _a_label(label: str) -> str:
    """A non-ASCII label in A-label form (raises UnicodeError)."""
    # IDNA 2008 with the UTS 46 mapping, as registries and browsers convert names (the stdlib
    # codec is IDNA 2003: ß -> ss). Imported here: only this error message needs it.
    import idna

    return idna.encode(label, uts46=True).decode("ascii")


def _empty_label_problem(text: str, labels: list[str]) -> str | None:
    if "" not in labels:
        return None
    # One trailing dot was stripped, so an empty label is a leading dot or two dots in a row.
    return "starts with '.'" if text.startswith(".") else "has an empty label ('..')"


def _labels_problem(labels: Iterable[str]) -> str | None:
    """What is wrong with the first bad label (no wildcards), or with the name's last label."""
    last = ""
    for label in labels:
        problem = _label_problem(label)
        if problem is not None:
            return problem
        last = label
    if last.isdigit():
        # Resolvers read a name whose last label is all digits as an IPv4 address ("10.1" is
        # 10.0.0.1 to getaddrinfo); no top-level domain is numeric.
        return "ends in an all-digit label, so it reads as an IP address (use a cidr peer for addresses)"
    return None


def _label_problem(label: str) -> str | None:
    if len(label) > MAX_LABEL_LENGTH:
        return (
            f"label {_show(label)} has {len(label)} characters, more than the {MAX_LABEL_LENGTH} "
            "DNS allows"
        )
    if not _LABEL_RE.fullmatch(label):
        if "_" in label[1:]:
            return f"label {label!r}: '_' may only start a label (as in '_sip._tcp.example.com')"
        if label == "_":
            return "label '_' has nothing after the '_'"
        return f"label {label!r} starts or ends with '-'"
    if label.startswith("xn--"):
        return _a_label_problem(label)
    return None


def _a_label_problem(label: str) -> str | None:
    """An ``xn--`` label must be the punycode of a non-ASCII label, spelt as it encodes, whose
    characters an internationalised name can have.

    The character check follows RFC 5892's derivation with the standard library only, so that
    every node accepts the same policies whatever idna version is installed; it is
    not the full IDNA 2008 table (no per-script context rules), only enough to refuse what no
    name can hold: punycode alone decodes garbage such as 'xn--abc' to control characters.
    """
    encoded = label[4:]
    try:
        decoded = encoded.encode("ascii").decode("punycode")
        canonical = decoded.encode("punycode").decode("ascii") == encoded
    except (UnicodeError, ValueError, OverflowError):
        return f"label {label!r} starts with 'xn--' but is not a valid A-label (invalid punycode)"
    valid = (
        canonical
        and not decoded.isascii()
        and all(map(_idn_character, decoded))
        and unicodedata.is_normalized("NFC", decoded)
        # RFC 5891 4.2.3.2: a combining mark cannot begin a label (it has nothing to combine with)
        and not unicodedata.category(decoded[0]).startswith("M")
    )
    if not valid:
        return (
            f"label {label!r} starts with 'xn--' but is not a valid A-label (its punycode does not "
            "decode to the letters, marks and digits of an internationalised name, in lower case)"
        )
    return None


def _idn_character(char: str) -> bool:
    if char.isascii():
        return char in _LDH
    if char in _IDN_EXCEPTIONS or char in _IDN_CONTEXT_CHARS:
        return True
    # RFC 5892 "Unstable": a character that case folding or NFKC changes is written as the
    # character it changes into (upper case 'Ü' as 'ü'), so it never appears in a U-label.
    stable = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", char).casefold()) == char
    return stable and unicodedata.category(char) in _IDN_CATEGORIES


def _length_problem(name: str) -> str | None:
    if len(name) <= MAX_NAME_LENGTH:
        return None
    return f"has {len(name)} characters, more than the {MAX_NAME_LENGTH} a DNS name can have"


def _leading_stars(labels: list[str]) -> int:
    stars = 0
    while stars < len(labels) and labels[stars] == _WILDCARD:
        stars += 1
    return stars


def _wildcard_problem(stars: int, fixed: list[str]) -> str | None:
    for label in fixed:
        if label == _WILDCARD:
            return "'*' may only be the leftmost label(s), as in '*.example.com'"
        if label == "**":
            return "'**' is not a wildcard: a single '*' label already matches one or more labels"
        if _WILDCARD in label:
            return (
                f"'*' must be a whole label, as in '*.example.com'; partial wildcards such as "
                f"{label!r} are not supported"
            )
    if not stars:
        return "has no '*' label; use fqdn for a single name"
    return None


def _breadth_problem(fixed: int, min_labels: int) -> str | None:
    if fixed >= min_labels:
        return None
    return (
        f"too broad: {fixed} fixed label{'' if fixed == 1 else 's'} after the '*', and this node "
        f"requires at least {min_labels} (dns.fqdnPatternMinLabels)"
    )


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "...")


# --- matching -------------------------------------------------------------------------------


class NameMatcher:
    """Which rules' ``fqdn`` / ``fqdnPattern`` entries a query name matches.

    Built once from ``(rule_index, text, is_pattern)`` entries whose text is already normalised
    (normalize_name / normalize_pattern; anything else is a ValueError, so a name that could
    never match is not kept silently), and immutable afterwards: compiled rulesets compare
    matchers by value (``==``, ``hash``, ``digest()``).

    Matching costs one dict lookup for exact names and one per proper suffix of the query name
    for patterns: patterns are kept by their fixed part, with the rules of each number of
    leading ``*`` labels accumulated, so "at least k labels in front" is a bisect.
    """

    __slots__ = ("_exact", "_patterns", "_suffixes", "_key")

    _exact: Mapping[str, frozenset[int]]
    _patterns: Mapping[str, frozenset[int]]
    # fixed part -> (leading star counts ascending, rules of patterns with at most that many)
    _suffixes: dict[str, tuple[tuple[int, ...], tuple[frozenset[int], ...]]]
    _key: tuple[tuple[str, bool, tuple[int, ...]], ...]

    def __init__(self, entries: Iterable[tuple[int, str, bool]] = ()) -> None:
        exact: dict[str, set[int]] = {}
        patterns: dict[str, set[int]] = {}
        for rule, text, is_pattern in entries:
            _check_entry(rule, text, is_pattern)
            (patterns if is_pattern else exact).setdefault(text, set()).add(rule)
        set_ = object.__setattr__  # the class refuses assignment once built
        set_(self, "_exact", MappingProxyType({n: frozenset(r) for n, r in exact.items()}))
        set_(self, "_patterns", MappingProxyType({p: frozenset(r) for p, r in patterns.items()}))
        set_(self, "_suffixes", _by_suffix(self._patterns))
        key = [(n, False, tuple(sorted(r))) for n, r in exact.items()]
        key += [(p, True, tuple(sorted(r))) for p, r in patterns.items()]
        set_(self, "_key", tuple(sorted(key)))

    def match(self, qname: str) -> frozenset[int]:
        """The rules whose fqdn or fqdnPattern matches ``qname`` (any case, trailing dot or
        not). Never raises: a name no policy could list (see _QNAME_RE) matches nothing."""
        name = _query_name(qname)
        if name is None:
            return _NOTHING
        found = self._exact.get(name)
        hits = [found] if found is not None else []
        if self._suffixes:
            in_front = 0
            dot = name.find(".")
            while dot != -1:
                in_front += 1
                entry = self._suffixes.get(name[dot + 1 :])
                if entry is not None:
                    stars, rules = entry
                    at = bisect.bisect_right(stars, in_front)
                    if at:
                        hits.append(rules[at - 1])
                dot = name.find(".", dot + 1)
        if not hits:
            return _NOTHING
        return hits[0] if len(hits) == 1 else frozenset().union(*hits)

    def exact(self, qname: str) -> frozenset[int]:
        """The rules listing ``qname`` itself as an ``fqdn`` (patterns are not consulted)."""
        name = _query_name(qname)
        return _NOTHING if name is None else self._exact.get(name, _NOTHING)

    @property
    def names(self) -> Mapping[str, frozenset[int]]:
        """Exact names -> the rules listing them (read-only)."""
        return self._exact

    @property
    def patterns(self) -> Mapping[str, frozenset[int]]:
        """Patterns -> the rules listing them (read-only)."""
        return self._patterns

    def digest(self) -> str:
        """A stable hex digest of the entries: equal matchers have equal digests, in any process."""
        return hashlib.sha256(repr(self._key).encode()).hexdigest()

    def __bool__(self) -> bool:
        return bool(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NameMatcher):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"NameMatcher({len(self._exact)} names, {len(self._patterns)} patterns)"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"NameMatcher is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"NameMatcher is immutable (cannot delete {name!r})")


def _check_entry(rule: object, text: object, is_pattern: object) -> None:
    if not isinstance(rule, int) or isinstance(rule, bool):
        raise ValueError(f"rule index must be an int, got {rule!r}")
    if not isinstance(is_pattern, bool):
        raise ValueError(f"is_pattern must be a bool, got {is_pattern!r}")
    # The fixed-label limit is the loader's business (it depends on the node config); here any
    # valid pattern is accepted, and only the normal form is required.
    normal = normalize_pattern(text, 1) if is_pattern else normalize_name(text)  # type: ignore[arg-type]
    if normal != text:
        raise ValueError(f"{text!r} is not normalised (expected {normal!r})")


def _by_suffix(
    patterns: Mapping[str, frozenset[int]],
) -> dict[str, tuple[tuple[int, ...], tuple[frozenset[int], ...]]]:
    """Patterns by fixed part: the sorted star counts, and for each the rules of every pattern
    with that many stars or fewer (a name with n labels in front matches all of those)."""
    grouped: dict[str, dict[int, set[int]]] = {}
    for pattern, rules in patterns.items():
        labels = pattern.split(".")
        stars = _leading_stars(labels)
        grouped.setdefault(".".join(labels[stars:]), {}).setdefault(stars, set()).update(rules)
    out = {}
    for suffix, by_stars in grouped.items():
        counts = tuple(sorted(by_stars))
        accumulated: list[frozenset[int]] = []
        union: frozenset[int] = frozenset()
        for count in counts:
            union = union | by_stars[count]
            accumulated.append(union)
        out[suffix] = (counts, tuple(accumulated))
    return out


def _query_name(qname: object) -> str | None:
    """``qname`` lower-cased without its trailing dot, or None if no entry could match it.

    ASCII is checked before lower-casing: str.lower() maps some non-ASCII letters to ASCII ones
    (the Kelvin sign U+212A becomes 'k'), which would let a different name match.
    """
    if not isinstance(qname, str) or not qname.isascii():
        return None
    name = qname.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > MAX_NAME_LENGTH or not _QNAME_RE.fullmatch(name):
        return None
    return name
