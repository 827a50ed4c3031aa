"""DNS names and patterns of policies (hostagent.dns.names): accept/reject tables, matching
tables, and a property test of NameMatcher against a slow label-by-label reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.dns.names import MAX_NAME_LENGTH, NameMatcher, normalize_name, normalize_pattern

# --- normalize_name ---------------------------------------------------------------------------

NAME_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
NAME_254 = NAME_253 + "d"
PATTERN_253 = "*." + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 59])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("api.openai.com", "api.openai.com"),
        ("API.OpenAI.com", "api.openai.com"),
        ("api.openai.com.", "api.openai.com"),
        ("localhost", "localhost"),  # single labels are cluster / search-list names
        ("kubernetes", "kubernetes"),
        ("_sip._tcp.example.com", "_sip._tcp.example.com"),
        ("_acme-challenge.example.com", "_acme-challenge.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),  # '--' outside xn-- is fine
        ("1password.com", "1password.com"),
        ("a.b-c.d0", "a.b-c.d0"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (NAME_253, NAME_253),
        ("xn--fa-hia.de", "xn--fa-hia.de"),  # IDNA 2008 'faß.de' (IDNA 2003 would make it fass.de)
        ("xn--mgbh0fb.xn--kgbechtv", "xn--mgbh0fb.xn--kgbechtv"),  # Arabic
        ("xn--r8jz45g.jp", "xn--r8jz45g.jp"),  # Japanese
    ],
)
def test_normalize_name_accepts(text, expected):
    assert normalize_name(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty name"),
        (".", "'.' is the root of DNS, not a name"),
        ("a..b", "'a..b': has an empty label ('..')"),
        ("a.b..", "'a.b..': has an empty label ('..')"),
        (".a.b", "'.a.b': starts with '.'"),
        ("*.example.com", "'*.example.com': '*' is a wildcard, which only fqdnPattern allows (use fqdnPattern"),
        ("a*.example.com", "use fqdnPattern"),
        ("api.openai.com ", "'api.openai.com ': contains whitespace (' ')"),
        ("api .openai.com", "contains whitespace"),
        ("a\tb.com", "contains whitespace ('\\t')"),
        ("api\\.openai\\.com", "'\\\\' cannot appear in a DNS name: names and patterns are not regular expressions"),
        ("^api.openai.com$", "'^' cannot appear in a DNS name: names and patterns are not regular expressions"),
        ("api.openai.(com|net)", "'(' cannot appear in a DNS name"),
        ("a+.com", "'+' cannot appear"),
        ("a?.com", "'?' cannot appear"),
        ("[ab].com", "'[' cannot appear"),
        ("https://api.openai.com", "':' cannot appear in a DNS name (expected letters, digits, '-', '.', and '_' at"),
        ("api.openai.com/v1", "'/' cannot appear"),
        ("a@b.com", "'@' cannot appear"),
        ("-a.com", "label '-a' starts or ends with '-'"),
        ("a-.com", "label 'a-' starts or ends with '-'"),
        ("_-a.com", "label '_-a' starts or ends with '-'"),
        ("a_b.example.com", "label 'a_b': '_' may only start a label (as in '_sip._tcp.example.com')"),
        ("__a.com", "'_' may only start a label"),
        ("_.com", "label '_' has nothing after the '_'"),
        ("a" * 64 + ".com", "has 64 characters, more than the 63 DNS allows"),
        (NAME_254, "has 254 characters, more than the 253 a DNS name can have"),
        ("xn--zzzz.com", "label 'xn--zzzz' starts with 'xn--' but is not a valid A-label (invalid punycode)"),
        ("xn--bcher-kv.example", "invalid punycode"),
        # valid punycode of things no name has: control characters, upper case, a symbol, ASCII
        ("xn--abc.com", "label 'xn--abc' starts with 'xn--' but is not a valid A-label (its punycode does not decode"),
        ("xn--a.com", "not a valid A-label"),
        ("xn--bcher-2pa.example", "not a valid A-label"),  # 'bÜcher', upper case
        ("xn--n3h.com", "not a valid A-label"),  # a snowman
        ("xn--4lb.com", "not a valid A-label"),  # a lone combining mark
        ("xn--abc-.com", "label 'xn--abc-' starts or ends with '-'"),
        ("10.0.0.1", "'10.0.0.1': ends in an all-digit label, so it reads as an IP address (use a cidr peer"),
        ("10.1", "reads as an IP address"),
        ("123", "reads as an IP address"),
        ("bücher.example", "'bücher.example': non-ASCII characters; write internationalised names in their A-label form: 'xn--bcher-kva.example'"),
        ("Bücher.Example.", "A-label form: 'xn--bcher-kva.example'"),
        ("☃☃☃.com", "non-ASCII characters, and it is not a valid internationalised name"),
        # The Kelvin sign lower-cases to an ASCII 'k': refused as non-ASCII, never silently folded.
        ("\u212aubernetes", "non-ASCII characters"),
    ],
)
def test_normalize_name_rejects(text, message):
    with pytest.raises(ValueError) as info:
        normalize_name(text)
    assert message in str(info.value)


def test_idna_2008_is_suggested_where_the_standards_differ():
    with pytest.raises(ValueError, match="'xn--fa-hia.de'"):
        normalize_name("faß.de")


def test_a_long_name_is_shortened_in_messages():
    with pytest.raises(ValueError) as info:
        normalize_name("a" * 300)
    assert len(str(info.value)) < 250 and "..." in str(info.value)


# --- normalize_pattern ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, min_labels, expected",
    [
        ("*.example.com", 2, "*.example.com"),
        ("*.Example.COM.", 2, "*.example.com"),
        ("*.*.example.com", 2, "*.*.example.com"),
        ("*.blob.core.windows.net", 2, "*.blob.core.windows.net"),
        ("*.blob.core.windows.net", 4, "*.blob.core.windows.net"),
        ("*.com", 1, "*.com"),
        ("*._tcp.example.com", 2, "*._tcp.example.com"),
        ("*.xn--bcher-kva.example", 2, "*.xn--bcher-kva.example"),
    ],
)
def test_normalize_pattern_accepts(text, min_labels, expected):
    assert normalize_pattern(text, min_labels) == expected


@pytest.mark.parametrize(
    "text, min_labels, message",
    [
        ("*", 2, "'*': too broad: 0 fixed labels after the '*', and this node requires at least 2 (dns.fqdnPatternMinLabels)"),
        ("*.*", 1, "too broad: 0 fixed labels"),
        ("*.com", 2, "'*.com': too broad: 1 fixed label after the '*', and this node requires at least 2"),
        ("*.example.com", 3, "'*.example.com': too broad: 2 fixed labels after the '*', and this node requires at least 3"),
        ("*.*.com", 2, "too broad: 1 fixed label"),  # stars are not fixed labels
        ("a*.example.com", 2, "'a*.example.com': '*' must be a whole label, as in '*.example.com'; partial wildcards such as 'a*' are not supported"),
        ("*foo.com", 2, "partial wildcards such as '*foo'"),
        ("*a.example.com", 2, "partial wildcards such as '*a'"),
        ("a.*.example.com", 2, "'a.*.example.com': '*' may only be the leftmost label(s), as in '*.example.com'"),
        ("*.example.*", 2, "'*' may only be the leftmost label(s)"),
        ("*.a.*.example.com", 2, "'*' may only be the leftmost label(s)"),
        ("**.example.com", 2, "'**' is not a wildcard: a single '*' label already matches one or more labels"),
        ("example.com", 2, "'example.com': has no '*' label; use fqdn for a single name"),
        ("", 2, "empty name"),
        ("*..com", 2, "has an empty label ('..')"),
        (".*.example.com", 2, "starts with '.'"),
        ("*.example.com.*", 2, "'*' may only be the leftmost label(s)"),
        (".*\\.example\\.com", 2, "'\\\\' cannot appear in a DNS name: names and patterns are not regular expressions"),
        ("*.example.com$", 2, "'$' cannot appear"),
        ("* .example.com", 2, "contains whitespace"),
        ("*.ex ample.com", 2, "contains whitespace"),
        ("*.-a.com", 2, "label '-a' starts or ends with '-'"),
        ("*.xn--zzzz.com", 2, "not a valid A-label"),
        ("*.10.0.0.1", 2, "reads as an IP address"),
        ("*.bücher.example", 2, "A-label form: '*.xn--bcher-kva.example'"),
        ("*." + "a" * 250, 2, "more than the 63 DNS allows"),
        (PATTERN_253 + "d", 2, "has 254 characters, more than the 253"),
    ],
)
def test_normalize_pattern_rejects(text, min_labels, message):
    with pytest.raises(ValueError) as info:
        normalize_pattern(text, min_labels)
    assert message in str(info.value)


def test_a_pattern_as_long_as_a_name_may_be():
    # a '*' stands for at least one character, so the shortest name it matches is as long
    assert len(PATTERN_253) == MAX_NAME_LENGTH and normalize_pattern(PATTERN_253, 2) == PATTERN_253
    assert len(NAME_253) == MAX_NAME_LENGTH


def test_normalize_pattern_needs_a_positive_limit():
    with pytest.raises(ValueError, match="min_labels must be at least 1"):
        normalize_pattern("*.example.com", 0)


# --- NameMatcher ------------------------------------------------------------------------------

RULES = [
    (0, "api.openai.com", False),
    (1, "*.example.com", True),
    (2, "*.*.deep.example.com", True),
    (3, "example.com", False),
    (4, "*.blob.core.windows.net", True),
    (5, "api.openai.com", False),
    (5, "*.example.com", True),
    (6, "xn--bcher-kva.example", False),
    (7, "_sip._tcp.example.com", False),
    (8, "kubernetes", False),
]


@pytest.mark.parametrize(
    "qname, rules",
    [
        ("api.openai.com", {0, 5}),
        ("API.OpenAI.Com.", {0, 5}),
        ("openai.com", set()),
        ("x.api.openai.com", set()),  # a name is not a pattern
        ("example.com", {3}),  # the apex only by fqdn
        ("a.example.com", {1, 5}),
        ("A.B.Example.com.", {1, 5}),  # one OR MORE labels
        ("a.b.c.d.e.example.com", {1, 5}),
        ("evilexample.com", set()),
        ("a.evilexample.com", set()),
        ("example.com.evil.net", set()),
        ("a.example.com.evil.net", set()),
        ("example.co", set()),
        ("deep.example.com", {1, 5}),
        ("a.deep.example.com", {1, 5}),  # *.*.deep needs two labels in front
        ("a.b.deep.example.com", {1, 2, 5}),
        ("a.b.c.deep.example.com", {1, 2, 5}),
        ("account.blob.core.windows.net", {4}),
        ("blob.core.windows.net", set()),
        ("xn--bcher-kva.example", {6}),
        ("XN--BCHER-KVA.EXAMPLE.", {6}),
        ("_sip._tcp.example.com", {1, 5, 7}),
        ("kubernetes", {8}),
        ("kubernetes.", {8}),
        ("_x.example.com", {1, 5}),
        ("a_b.example.com", {1, 5}),  # a '*' label may be anything DNS answers for
        ("-a.example.com", {1, 5}),
        # Names that no policy could write match nothing, whatever they end in.
        ("", set()),
        (".", set()),
        ("..example.com", set()),
        ("a..example.com", set()),
        (".example.com", set()),
        ("example.com..", set()),
        ("evil\\.example.com", set()),  # one label "evil.example" in presentation form
        ("a b.example.com", set()),
        ("*.example.com", set()),
        ("bücher.example", set()),
        ("a.\u212aample.com", set()),
        ("\u212aubernetes", set()),  # the Kelvin sign lower-cases to 'k'
        ("a\x00.example.com", set()),
        ("a." * 130 + "example.com", set()),  # longer than any DNS name
    ],
)
def test_match(qname, rules):
    matcher = NameMatcher(RULES)
    assert matcher.match(qname) == rules


@pytest.mark.parametrize(
    "qname, rules",
    [
        ("api.openai.com", {0, 5}),
        ("Example.COM.", {3}),
        ("a.example.com", set()),  # patterns are not consulted
        ("_sip._tcp.example.com", {7}),
        ("a..b", set()),
    ],
)
def test_exact(qname, rules):
    assert NameMatcher(RULES).exact(qname) == rules


@pytest.mark.parametrize("qname", [None, 5, b"example.com", ["example.com"], object()])
def test_match_never_raises_on_non_strings(qname):
    matcher = NameMatcher(RULES)
    assert matcher.match(qname) == frozenset() and matcher.exact(qname) == frozenset()


def test_views_equality_and_digest():
    matcher = NameMatcher(RULES)
    assert matcher.names["api.openai.com"] == {0, 5}
    assert matcher.patterns["*.example.com"] == {1, 5}
    assert "example.com" in matcher.names and "*.example.com" not in matcher.names
    with pytest.raises(TypeError):
        matcher.names["x.com"] = frozenset({9})  # type: ignore[index]
    same = NameMatcher(reversed(RULES + RULES))  # order and repetition do not matter
    assert same == matcher and hash(same) == hash(matcher) and same.digest() == matcher.digest()
    other = NameMatcher(RULES + [(9, "other.example.org", False)])
    assert other != matcher and other.digest() != matcher.digest()
    moved = NameMatcher([(r + 1, t, p) for r, t, p in RULES])  # same names, other rules
    assert moved != matcher and moved.digest() != matcher.digest()
    assert bool(matcher) and not NameMatcher() and not NameMatcher([])
    assert NameMatcher().match("example.com") == frozenset()


def test_matcher_is_immutable():
    matcher = NameMatcher(RULES)
    with pytest.raises(AttributeError, match="immutable"):
        matcher._exact = {}  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del matcher._exact
    with pytest.raises(AttributeError):
        matcher.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "entry, message",
    [
        ((0, "Example.com", False), "'Example.com' is not normalised (expected 'example.com')"),
        ((0, "example.com.", False), "is not normalised"),
        ((0, "*.Example.com", True), "is not normalised"),
        ((0, "a..b", False), "has an empty label"),
        ((0, "*.example.com", False), "use fqdnPattern"),
        ((0, "example.com", True), "has no '*' label"),
        (("0", "example.com", False), "rule index must be an int"),
        ((True, "example.com", False), "rule index must be an int"),
        ((0, "example.com", 1), "is_pattern must be a bool"),
    ],
)
def test_matcher_refuses_entries_that_could_never_match(entry, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        NameMatcher([entry])


# --- property: NameMatcher agrees with a slow reference ---------------------------------------

# A small alphabet of labels so that random names and entries share suffixes often.
LABELS = st.sampled_from(["a", "b", "com", "example", "x-y", "_t", "0", "xn--bcher-kva"])


def reference(entries, qname: str) -> set[int]:
    """Label-by-label: what docs/fqdn.md says, written the slow and obvious way."""
    if not qname.isascii():
        return set()
    name = qname.lower()
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if not name or len(name) > MAX_NAME_LENGTH or any(
        not label or not set(label) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_") for label in labels
    ):
        return set()
    found = set()
    for rule, text, is_pattern in entries:
        entry = text.split(".")
        if not is_pattern:
            if labels == entry:
                found.add(rule)
            continue
        stars = 0
        while entry[stars] == "*":
            stars += 1
        fixed = entry[stars:]
        if len(labels) - len(fixed) >= stars and labels[len(labels) - len(fixed):] == fixed:
            found.add(rule)
    return found


@st.composite
def entries(draw):
    out = []
    for rule in range(draw(st.integers(0, 6))):
        fixed = draw(st.lists(LABELS, min_size=1, max_size=3))
        if fixed[-1] == "0":
            fixed[-1] = "com"  # an all-digit last label is not a name
        stars = draw(st.integers(0, 2))
        text = ".".join(["*"] * stars + fixed)
        out.append((rule, text, stars > 0))
    return out


@st.composite
def qnames(draw):
    labels = draw(st.lists(LABELS | st.text(max_size=3), min_size=0, max_size=6))
    text = ".".join(labels)
    if draw(st.booleans()):
        text = text.upper()
    if draw(st.booleans()):
        text += "."
    return text


@settings(max_examples=500, deadline=None)
@given(entries(), qnames())
def test_matcher_agrees_with_the_reference(entries, qname):
    matcher = NameMatcher(entries)
    assert matcher.match(qname) == reference(entries, qname)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_match_never_raises(qname):
    matcher = NameMatcher(RULES)
    assert isinstance(matcher.match(qname), frozenset)
    assert isinstance(matcher.exact(qname), frozenset)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(min_codepoint=0xA0, max_codepoint=0x2FFFF), min_size=1, max_size=8))
def test_every_idna_2008_name_is_accepted_in_its_a_label_form(label):
    """The stdlib approximation of IDNA 2008 must never refuse what the idna package encodes
    (it may accept a little more: it has no per-script context rules)."""
    import idna
    try:
        a_form = idna.encode(label + ".example", uts46=True).decode("ascii")
    except UnicodeError:  # idna.IDNAError included: not a name in any form
        return
    assert normalize_name(a_form) == a_form.lower()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_normalize_raises_only_value_error(text):
    """Any text is either a valid name/pattern or a ValueError, and valid output is stable."""
    for normalize in (normalize_name, lambda t: normalize_pattern(t, 1)):
        try:
            normal = normalize(text)
        except ValueError:
            continue
        assert normalize(normal) == normal
