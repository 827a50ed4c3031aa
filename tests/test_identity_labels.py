"""Kubernetes label selectors: matching semantics, every validation error, and fuzzing.

Reject cases assert the whole message, location included, so that errors keep pointing at the
offending part of the selector.
"""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.errors import HostAgentError, PolicyError
from hostagent.identity import (
    LabelSelector,
    Requirement,
    parse_label_selector,
    validate_label_key,
    validate_label_value,
)

W = "spec.selector.kubernetes.podSelector"


def sel(obj: object) -> LabelSelector:
    return parse_label_selector(obj, W)


# --- semantics ------------------------------------------------------------------------------

WEB = {"app": "web", "tier": "frontend"}
DB = {"app": "db", "tier": "backend", "pci": ""}
NONE: dict[str, str] = {}


def expr(key, operator, *values):
    item = {"key": key, "operator": operator}
    if values:
        item["values"] = list(values)
    return {"matchExpressions": [item]}


@pytest.mark.parametrize(
    "selector, labels, selected",
    [
        # the empty selector selects everything
        ({}, NONE, True),
        ({}, WEB, True),
        ({"matchLabels": {}, "matchExpressions": []}, DB, True),
        # matchLabels: present with that value
        ({"matchLabels": {"app": "web"}}, WEB, True),
        ({"matchLabels": {"app": "web"}}, DB, False),
        ({"matchLabels": {"app": "web"}}, NONE, False),
        ({"matchLabels": {"app": "web", "tier": "frontend"}}, WEB, True),
        ({"matchLabels": {"app": "web", "tier": "backend"}}, WEB, False),
        # an empty value is a value: it needs the label present and empty
        ({"matchLabels": {"pci": ""}}, DB, True),
        ({"matchLabels": {"pci": ""}}, WEB, False),
        # In: key absent does not match
        (expr("app", "In", "web", "api"), WEB, True),
        (expr("app", "In", "web", "api"), DB, False),
        (expr("app", "In", "web", "api"), NONE, False),
        (expr("pci", "In", ""), DB, True),
        # NotIn: key absent matches
        (expr("app", "NotIn", "db"), WEB, True),
        (expr("app", "NotIn", "db"), DB, False),
        (expr("app", "NotIn", "db"), NONE, True),
        (expr("pci", "NotIn", "x"), WEB, True),
        # Exists / DoesNotExist: presence only, empty values count as present
        (expr("pci", "Exists"), DB, True),
        (expr("pci", "Exists"), WEB, False),
        (expr("pci", "DoesNotExist"), DB, False),
        (expr("pci", "DoesNotExist"), WEB, True),
        (expr("anything", "DoesNotExist"), NONE, True),
        # everything is ANDed
        (
            {
                "matchLabels": {"app": "db"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["backend"]},
                    {"key": "pci", "operator": "Exists"},
                ],
            },
            DB,
            True,
        ),
        (
            {
                "matchLabels": {"app": "db"},
                "matchExpressions": [{"key": "pci", "operator": "DoesNotExist"}],
            },
            DB,
            False,
        ),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["backend"]}],
            },
            WEB,
            True,
        ),
        (
            {
                "matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["web", "db"]},
                    {"key": "app", "operator": "NotIn", "values": ["db"]},
                ]
            },
            DB,
            False,
        ),
    ],
)
def test_matches(selector, labels, selected):
    assert sel(selector).matches(labels) is selected


def test_model_is_canonical():
    a = sel(
        {
            "matchLabels": {"tier": "frontend", "app": "web"},
            "matchExpressions": [
                {"key": "zone", "operator": "NotIn", "values": ["b", "a", "b"]},
                {"key": "env", "operator": "Exists", "values": []},
            ],
        }
    )
    assert a == LabelSelector(
        match_labels=(("app", "web"), ("tier", "frontend")),
        match_expressions=(
            Requirement("env", "Exists", ()),
            Requirement("zone", "NotIn", ("a", "b")),
        ),
    )
    # the same selector written in another order is equal, so a reload sees no change
    b = sel(
        {
            "matchExpressions": [
                {"key": "env", "operator": "Exists"},
                {"key": "zone", "operator": "NotIn", "values": ["a", "b"]},
            ],
            "matchLabels": {"app": "web", "tier": "frontend"},
        }
    )
    assert a == b and hash(a) == hash(b)


def test_specificity():
    assert sel({}).specificity() == 0
    assert sel({}).empty
    assert sel({"matchLabels": {"app": "web"}}).specificity() == 1
    assert not sel({"matchLabels": {"app": "web"}}).empty
    two = sel({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "x", "operator": "Exists"}]})
    assert two.specificity() == 2
    three = sel(
        {
            "matchLabels": {"app": "web", "tier": "a"},
            "matchExpressions": [{"key": "x", "operator": "In", "values": ["1", "2"]}],
        }
    )
    assert three.specificity() == 3


def test_hand_built_requirement_with_unknown_operator_never_matches_silently():
    with pytest.raises(ValueError, match="'Gt': not a label selector operator"):
        Requirement("a", "Gt", ("1",)).matches({"a": "2"})


# --- keys and values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "a",
        "A",
        "0",
        "app.kubernetes.io/name",
        "k8s.io/a",
        "example.com/MyName",
        "my.name",
        "123-abc",
        "A_b.c-D",
        "a" * 63,
        ("a" * 63 + ".") * 3 + "b" * 61 + "/x",  # 253-character prefix
    ],
)
def test_label_key_accept(key):
    assert validate_label_key(key) == key


@pytest.mark.parametrize(
    "key, message",
    [
        ("", "label key '': name part must be non-empty"),
        ("-app", "label key '-app': name part must consist of alphanumeric characters, '-', '_' or "
                 "'.', and must start and end with an alphanumeric character (e.g. 'MyName', "
                 "'my.name', or '123-abc')"),
        ("app-", "label key 'app-': name part must consist of"),
        ("_app", "label key '_app': name part must consist of"),
        ("a b", "label key 'a b': name part must consist of"),
        ("ünï", "label key 'ünï': name part must consist of"),
        ("a" * 64, "name part must be no more than 63 characters"),
        ("example.com/", "label key 'example.com/': name part must be non-empty"),
        ("/app", "label key '/app': prefix part must be non-empty"),
        ("Example.com/app", "label key 'Example.com/app': prefix part must be a lowercase DNS subdomain"),
        ("-example.com/app", "prefix part must be a lowercase DNS subdomain"),
        ("example..com/app", "prefix part must be a lowercase DNS subdomain"),
        ("example_com/app", "prefix part must be a lowercase DNS subdomain"),
        ("a" * 254 + "/x", "prefix part must be no more than 253 characters"),
        ("a/b/c", "label key 'a/b/c' has more than one '/'"),
        (1, "expected a string label key, got the integer 1; quote it to make it a string"),
        (True, "expected a string label key, got the boolean true; quote it to make it a string"),
        (None, "expected a string label key, got an empty value (null); write '' for an empty value"),
        (["a"], "expected a string label key, got a list"),
    ],
)
def test_label_key_reject(key, message):
    with pytest.raises(PolicyError) as err:
        validate_label_key(key, "here")
    assert str(err.value).startswith("here: ")
    assert message in str(err.value)


@pytest.mark.parametrize("value", ["", "a", "web", "1.0", "v1_2-3", "A" * 63, "MyValue", "12345"])
def test_label_value_accept(value):
    assert validate_label_value(value) == value


@pytest.mark.parametrize(
    "value, message",
    [
        ("-web", "label value '-web' must be empty or consist of alphanumeric characters, '-', '_' "
                 "or '.', and must start and end with an alphanumeric character (e.g. 'MyValue', "
                 "'my_value', or '12345')"),
        ("web.", "label value 'web.' must be empty or consist of"),
        ("a b", "label value 'a b' must be empty or consist of"),
        ("a/b", "label value 'a/b' must be empty or consist of"),
        ("a" * 64, "must be no more than 63 characters"),
        (1, "expected a string label value, got the integer 1; quote it to make it a string"),
        (1.5, "expected a string label value, got the number 1.5; quote it to make it a string"),
        (False, "expected a string label value, got the boolean false; quote it to make it a string"),
        (datetime.date(2024, 1, 2), "expected a string label value, got the date 2024-01-02; quote it"),
        (None, "expected a string label value, got an empty value (null); write '' for an empty value"),
        ({"a": "b"}, "expected a string label value, got a mapping"),
    ],
)
def test_label_value_reject(value, message):
    with pytest.raises(PolicyError) as err:
        validate_label_value(value, "here")
    assert str(err.value).startswith("here: ")
    assert message in str(err.value)


def test_validators_without_location():
    with pytest.raises(PolicyError) as err:
        validate_label_value("-x")
    assert str(err.value).startswith("label value '-x' must be")


# --- selector validation --------------------------------------------------------------------

ME = f"{W}.matchExpressions"


@pytest.mark.parametrize(
    "obj, message",
    [
        (None, f"{W}: expected a label selector (a mapping with keys matchLabels, matchExpressions), "
               "got an empty value (null)"),
        ([], f"{W}: expected a label selector (a mapping with keys matchLabels, matchExpressions), got a list"),
        ("app=web", f"{W}: expected a label selector (a mapping with keys matchLabels, matchExpressions), "
                    "got the string 'app=web'"),
        ({"matchLabel": {"a": "b"}},
         f"{W}: unknown key 'matchLabel' (allowed keys: matchLabels, matchExpressions); did you mean 'matchLabels'?"),
        ({"app": "web"}, f"{W}: unknown key 'app' (allowed keys: matchLabels, matchExpressions)"),
        ({1: "x"}, f"{W}: keys must be strings, got the integer 1; quote it to make it a string"),
        # matchLabels
        ({"matchLabels": None},
         f"{W}.matchLabels: expected a mapping of label keys to values, got an empty value (null) "
         "(write {} for no labels, or leave matchLabels out)"),
        ({"matchLabels": ["app=web"]}, f"{W}.matchLabels: expected a mapping of label keys to values, got a list"),
        ({"matchLabels": {"-app": "web"}}, f"{W}.matchLabels['-app']: label key '-app': name part must consist of"),
        ({"matchLabels": {"app": "-web"}}, f"{W}.matchLabels['app']: label value '-web' must be empty or consist of"),
        ({"matchLabels": {"version": 1}},
         f"{W}.matchLabels['version']: expected a string label value, got the integer 1; quote it to make it a string"),
        ({"matchLabels": {"enabled": True}},
         f"{W}.matchLabels['enabled']: expected a string label value, got the boolean true; quote it"),
        ({"matchLabels": {"app": None}},
         f"{W}.matchLabels['app']: expected a string label value, got an empty value (null); write '' for an empty value"),
        ({"matchLabels": {1: "x"}},
         f"{W}.matchLabels: expected a string label key, got the integer 1; quote it to make it a string"),
        # matchExpressions
        ({"matchExpressions": None},
         f"{ME}: expected a list of {{key, operator, values}} requirements, got an empty value (null) "
         "(write [] for none, or leave matchExpressions out)"),
        ({"matchExpressions": {"key": "a", "operator": "Exists"}},
         f"{ME}: expected a list of {{key, operator, values}} requirements, got a mapping"),
        ({"matchExpressions": ["a"]},
         f"{ME}[0]: expected a requirement (a mapping with keys key, operator, values), got the string 'a'"),
        ({"matchExpressions": [{"operator": "Exists"}]}, f"{ME}[0]: missing required key 'key'"),
        ({"matchExpressions": [{"key": "a"}]}, f"{ME}[0]: missing required key 'operator'"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "value": ["x"]}]},
         f"{ME}[0]: unknown key 'value' (allowed keys: key, operator, values); did you mean 'values'?"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b b", "operator": "Exists"}]},
         f"{ME}[1].key: label key 'b b': name part must consist of"),
        ({"matchExpressions": [{"key": 7, "operator": "Exists"}]},
         f"{ME}[0].key: expected a string label key, got the integer 7; quote it"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "in", "values": ["x"]}]},
         f"{ME}[1].operator: 'in' is not a valid operator (one of In, NotIn, Exists, DoesNotExist); did you mean 'In'?"),
        ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]},
         f"{ME}[0].operator: 'Gt' is not a valid operator (one of In, NotIn, Exists, DoesNotExist)"),
        ({"matchExpressions": [{"key": "a", "operator": "="}]},
         f"{ME}[0].operator: '=' is not a valid operator (one of In, NotIn, Exists, DoesNotExist)"),
        ({"matchExpressions": [{"key": "a", "operator": None}]},
         f"{ME}[0].operator: expected one of In, NotIn, Exists, DoesNotExist, got an empty value (null)"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]},
         f"{ME}[0].values: must be a non-empty list when operator is In"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
         f"{ME}[0].values: must be a non-empty list when operator is In"),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": None}]},
         f"{ME}[0].values: must be a non-empty list when operator is NotIn"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
         f"{ME}[0].values: must not be given when operator is Exists"),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": [""]}]},
         f"{ME}[0].values: must not be given when operator is DoesNotExist"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": "x"}]},
         f"{ME}[0].values: expected a list of strings, got the string 'x'"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x", 1]}]},
         f"{ME}[0].values[1]: expected a string label value, got the integer 1; quote it to make it a string"),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["yes", True]}]},
         f"{ME}[0].values[1]: expected a string label value, got the boolean true; quote it"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x y"]}]},
         f"{ME}[0].values[0]: label value 'x y' must be empty or consist of"),
    ],
)
def test_selector_reject(obj, message):
    with pytest.raises(PolicyError) as err:
        sel(obj)
    assert isinstance(err.value, HostAgentError)
    assert str(err.value).startswith(message), str(err.value)


def test_exists_accepts_empty_or_null_values():
    for values in ([], None):
        got = sel({"matchExpressions": [{"key": "a", "operator": "Exists", "values": values}]})
        assert got.match_expressions == (Requirement("a", "Exists", ()),)


def test_where_may_be_empty():
    with pytest.raises(PolicyError) as err:
        parse_label_selector({"matchLabels": {"app": 1}}, "")
    assert str(err.value).startswith("matchLabels['app']: expected a string label value")


def test_long_names_are_shortened_in_messages():
    with pytest.raises(PolicyError) as err:
        sel({"x" * 500: 1})
    assert len(str(err.value)) < 250


# --- fuzzing against a reference ------------------------------------------------------------

KEYS = ["app", "tier", "example.com/team"]
VALUES = ["", "web", "db", "x"]
OPS = ["In", "NotIn", "Exists", "DoesNotExist"]

_labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)


@st.composite
def _requirement(draw):
    op = draw(st.sampled_from(OPS))
    item = {"key": draw(st.sampled_from(KEYS)), "operator": op}
    if op in ("In", "NotIn"):
        item["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3))
    elif draw(st.booleans()):
        item["values"] = draw(st.sampled_from([[], None]))
    return item


_selectors = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3),
        "matchExpressions": st.lists(_requirement(), max_size=4),
    },
)


def reference_matches(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes semantics written out the long way, from the YAML value itself."""
    results = []
    for key, value in selector.get("matchLabels", {}).items():
        results.append(key in labels and labels[key] == value)
    for item in selector.get("matchExpressions", []):
        key, op, values = item["key"], item["operator"], set(item.get("values") or [])
        has = key in labels
        if op == "In":
            results.append(has and labels[key] in values)
        elif op == "NotIn":
            results.append(not (has and labels[key] in values))
        elif op == "Exists":
            results.append(has)
        else:
            results.append(not has)
    return all(results)


@settings(max_examples=1000, deadline=None)
@given(_selectors, _labels)
def test_matches_agrees_with_reference(selector, labels):
    parsed = sel(selector)
    assert parsed.matches(labels) == reference_matches(selector, labels)
    n = len(selector.get("matchLabels", {})) + len(selector.get("matchExpressions", []))
    assert parsed.specificity() == n


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
                    max_leaves=10))
def test_arbitrary_yaml_is_parsed_or_refused_with_policy_error(obj):
    try:
        got = sel(obj)
    except PolicyError as err:
        assert str(err).startswith(W)
    else:
        assert isinstance(got, LabelSelector)
