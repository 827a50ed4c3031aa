"""Kubernetes label selectors: syntax checked as the API server does, matched as Kubernetes does.

Policies select pods with the same ``{matchLabels, matchExpressions}`` selector users already
write in NetworkPolicy and Deployments, so it has to mean exactly the same thing here
(apimachinery's metav1.LabelSelector, LabelSelectorAsSelector and labels.Requirement.Matches):

* every requirement must hold (they are ANDed); an empty selector ``{}`` selects every pod;
* ``matchLabels: {k: v}`` is ``k In (v)``: the label must be present with that value;
* ``In`` needs the label present with one of the values; ``NotIn`` holds when the label is absent
  or has another value; ``Exists`` / ``DoesNotExist`` test presence only.

Validation follows apimachinery too (ValidateLabelSelector, ValidateLabelName,
IsValidLabelValue), so a selector the API server would refuse is refused here with the same
reason, and one it accepts is accepted. Where YAML is ambiguous this module is stricter than the
API server: a YAML number or boolean (``version: 1``, ``enabled: true``) is refused with a hint to
quote it instead of being converted, and ``matchLabels:`` / ``matchExpressions:`` left empty
(null) are refused rather than read as "no requirement", because a selector that silently
selects every pod would grant the policy's egress to all of them.

Errors are PolicyError whose message starts with the dotted location given as ``where``
(``spec.selector.kubernetes.podSelector.matchExpressions[1].operator: ...``); the caller, which
knows the file and line, can attach them.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from hostagent.errors import PolicyError

__all__ = [
    "OPERATORS",
    "Requirement",
    "LabelSelector",
    "parse_label_selector",
    "validate_label_key",
    "validate_label_value",
]

# metav1.LabelSelectorOperator. (labels.Selector also knows Gt/Lt and "=", "!=", but a
# LabelSelector object cannot express them.)
IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)

_SELECTOR_KEYS = ("matchLabels", "matchExpressions")
_REQUIREMENT_KEYS = ("key", "operator", "values")

# apimachinery/pkg/util/validation: qualifiedNameFmt, DNS1123SubdomainFmt, labelValueFmt.
_NAME_MAX = 63
_PREFIX_MAX = 253
_VALUE_MAX = 63
_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?", re.ASCII)
_DNS1123_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(?:\.{_DNS1123_LABEL})*", re.ASCII)
_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?", re.ASCII)

_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName', 'my.name', or '123-abc')"
)
_PREFIX_RULE = (
    "must be a lowercase DNS subdomain: lowercase alphanumeric characters, '-' or '.', starting "
    "and ending with an alphanumeric character (e.g. 'example.com')"
)


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``matchExpressions`` entry: ``key operator values``.

    ``values`` is sorted and without duplicates (Kubernetes treats it as a set), non-empty for
    In/NotIn and ``()`` for Exists/DoesNotExist.
    """

    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a pod with ``labels`` satisfies this requirement (labels.Requirement.Matches)."""
        present = self.key in labels
        if self.operator == IN:
            return present and labels[self.key] in self.values
        if self.operator == NOT_IN:
            return not present or labels[self.key] not in self.values
        if self.operator == EXISTS:
            return present
        if self.operator == DOES_NOT_EXIST:
            return not present
        # Only reachable for a Requirement built by hand: never guess what it meant.
        raise ValueError(f"{self.operator!r}: not a label selector operator")


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A validated Kubernetes label selector; all requirements are ANDed.

    ``match_labels`` is sorted by key; ``match_expressions`` is sorted too, so that selectors
    that mean the same compare equal whatever order the YAML listed them in (a reload then sees
    no change).
    """

    match_labels: tuple[tuple[str, str], ...]
    match_expressions: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a pod with ``labels`` is selected. The empty selector selects every pod."""
        for key, value in self.match_labels:
            if key not in labels or labels[key] != value:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    def specificity(self) -> int:
        """The number of requirements, to rank selectors: more requirements, narrower intent."""
        return len(self.match_labels) + len(self.match_expressions)

    @property
    def empty(self) -> bool:
        """Selects every pod."""
        return not self.match_labels and not self.match_expressions


# --- validation -----------------------------------------------------------------------------


def validate_label_key(key: object, where: str = "") -> str:
    """Return ``key`` if it is a valid label key (a Kubernetes qualified name), else raise.

    ``[prefix/]name``: the optional prefix is a lowercase DNS subdomain of at most 253
    characters; the name is 1-63 characters of ``[A-Za-z0-9-_.]`` that start and end with an
    alphanumeric character. Raises PolicyError, located at ``where``.
    """
    if not isinstance(key, str):
        raise _error(where, f"expected a string label key, got {_describe(key)}{_quote_hint(key)}")
    prefix, slash, name = key.rpartition("/")
    shown = f"label key {_short(key)!r}"
    if slash:
        if "/" in prefix:
            raise _error(
                where,
                f"{shown} has more than one '/': a key is an optional DNS subdomain prefix and "
                "'/', then a name (e.g. 'example.com/MyName')",
            )
        if not prefix:
            raise _error(where, f"{shown}: prefix part must be non-empty")
        if len(prefix) > _PREFIX_MAX:
            raise _error(where, f"{shown}: prefix part must be no more than {_PREFIX_MAX} characters")
        if not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            raise _error(where, f"{shown}: prefix part {_PREFIX_RULE}")
    if not name:
        raise _error(where, f"{shown}: name part must be non-empty")
    if len(name) > _NAME_MAX:
        raise _error(where, f"{shown}: name part must be no more than {_NAME_MAX} characters")
    if not _NAME.fullmatch(name):
        raise _error(where, f"{shown}: name part {_NAME_RULE}")
    return key


def validate_label_value(value: object, where: str = "") -> str:
    """Return ``value`` if it is a valid label value, else raise PolicyError located at ``where``.

    A value is empty, or 1-63 characters of ``[A-Za-z0-9-_.]`` that start and end with an
    alphanumeric character.
    """
    if not isinstance(value, str):
        raise _error(where, f"expected a string label value, got {_describe(value)}{_quote_hint(value)}")
    if len(value) > _VALUE_MAX:
        raise _error(where, f"label value {_short(value)!r} must be no more than {_VALUE_MAX} characters")
    if not _VALUE.fullmatch(value):
        raise _error(
            where,
            f"label value {_short(value)!r} must be empty or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character "
            "(e.g. 'MyValue', 'my_value', or '12345')",
        )
    return value


def parse_label_selector(obj: object, where: str) -> LabelSelector:
    """Validate the YAML value of a label selector and return it.

    ``obj`` is the mapping ``{matchLabels: {...}, matchExpressions: [{key, operator, values}]}``
    as YAML loaded it (either key may be omitted; ``{}`` selects everything). ``where`` is its
    dotted location, used in every error message. Raises PolicyError on the first problem.
    """
    fields = _mapping(obj, where, _SELECTOR_KEYS, "a label selector")

    labels: dict[str, str] = {}
    if "matchLabels" in fields:
        at = _at(where, "matchLabels")
        raw = fields["matchLabels"]
        if not isinstance(raw, Mapping):
            raise _error(
                at,
                f"expected a mapping of label keys to values, got {_describe(raw)}"
                + (" (write {} for no labels, or leave matchLabels out)" if raw is None else ""),
            )
        for key, value in raw.items():
            key_at = f"{at}[{_short(key)!r}]" if isinstance(key, str) else at
            validate_label_key(key, key_at)
            labels[key] = validate_label_value(value, key_at)

    requirements: list[Requirement] = []
    if "matchExpressions" in fields:
        at = _at(where, "matchExpressions")
        raw = fields["matchExpressions"]
        if not isinstance(raw, (list, tuple)):
            raise _error(
                at,
                f"expected a list of {{key, operator, values}} requirements, got {_describe(raw)}"
                + (" (write [] for none, or leave matchExpressions out)" if raw is None else ""),
            )
        for i, item in enumerate(raw):
            requirements.append(_requirement(item, f"{at}[{i}]"))

    return LabelSelector(
        match_labels=tuple(sorted(labels.items())),
        match_expressions=tuple(sorted(requirements, key=lambda r: (r.key, r.operator, r.values))),
    )


def _requirement(obj: object, where: str) -> Requirement:
    fields = _mapping(obj, where, _REQUIREMENT_KEYS, "a requirement")
    for required in ("key", "operator"):
        if required not in fields:
            raise _error(where, f"missing required key {required!r}")
    key = validate_label_key(fields["key"], _at(where, "key"))

    operator = fields["operator"]
    op_at = _at(where, "operator")
    if not isinstance(operator, str):
        raise _error(op_at, f"expected one of {', '.join(OPERATORS)}, got {_describe(operator)}")
    if operator not in OPERATORS:
        hint = [op for op in OPERATORS if op.lower() == operator.lower()]
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise _error(
            op_at, f"{_short(operator)!r} is not a valid operator (one of {', '.join(OPERATORS)}){suggestion}"
        )

    raw = fields.get("values")
    values_at = _at(where, "values")
    if raw is not None and not isinstance(raw, (list, tuple)):
        raise _error(values_at, f"expected a list of strings, got {_describe(raw)}")
    raw = raw or []
    if operator in (IN, NOT_IN) and not raw:
        raise _error(values_at, f"must be a non-empty list when operator is {operator}")
    if operator in (EXISTS, DOES_NOT_EXIST) and raw:
        raise _error(values_at, f"must not be given when operator is {operator}")
    values = {validate_label_value(v, f"{values_at}[{j}]") for j, v in enumerate(raw)}
    return Requirement(key, operator, tuple(sorted(values)))


# --- helpers --------------------------------------------------------------------------------


def _mapping(obj: object, where: str, allowed: tuple[str, ...], what: str) -> Mapping[str, object]:
    """``obj`` as a mapping whose keys are all in ``allowed``."""
    keys = ", ".join(allowed)
    if not isinstance(obj, Mapping):
        raise _error(where, f"expected {what} (a mapping with keys {keys}), got {_describe(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise _error(where, f"keys must be strings, got {_describe(key)}{_quote_hint(key)}")
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise _error(where, f"unknown key {_short(key)!r} (allowed keys: {keys}){suggestion}")
    return obj


def _error(where: str, msg: str) -> PolicyError:
    return PolicyError(f"{where}: {msg}" if where else msg)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _describe(value: object) -> str:
    """How a YAML value reads in an error message: 'a list', "the string 'x'", 'the integer 5'."""
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_short(value)!r}"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _quote_hint(value: object) -> str:
    """What to do when YAML made a non-string out of something meant as a string."""
    if value is None:
        return "; write '' for an empty value"
    if isinstance(value, (bool, int, float, datetime.date)):
        return "; quote it to make it a string"
    return ""
