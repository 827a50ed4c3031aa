"""Identity selectors in policies: kubernetes, systemdUnit and container.

Accept tables check the model objects built (fields, label selectors, lines); reject tables check
the rendered ``file:line: dotted.location: message``; cross-policy tables check which pairs of
policies of one kind are refused. The CLI is run as a subprocess for ``policy check``.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.identity.labels import LabelSelector, Requirement
from hostagent.policy import PolicyErrors, load_policy_dir, load_policy_text
from hostagent.policy.model import ContainerSelector, KubernetesSelector, SelectorKind
from hostagent.policy.selector import (
    name_glob_overlap_example,
    name_glob_specificity,
    normalize_name_glob,
    overlap_example,
    specificity,
)

REPO = Path(__file__).resolve().parents[1]
PATH = "policies/a.yaml"
ID64 = "3f1c" + "0123456789abcdef" * 3 + "0123456789ab"
assert len(ID64) == 64


def doc(name: str, selector: str) -> str:
    """A policy whose selector YAML (indented by 4) starts on line 7 of the document."""
    return (
        "apiVersion: hostagent.io/v1\n"
        "kind: EgressPolicy\n"
        "metadata:\n"
        f"  name: {name}\n"
        "spec:\n"
        "  selector:\n"
        f"{selector}"
        "  egress: []\n"
    )


def one(selector: str):
    [policy] = load_policy_text(doc("p", selector), PATH)
    return policy.selector


def errors_of(text: str, path: str = PATH) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        load_policy_text(text, path)
    return [str(e) for e in info.value.errors]


# --- accepted forms -------------------------------------------------------------------------


def test_kubernetes_full_form():
    selector = one(
        "    kubernetes:\n"
        "      namespace: payments\n"
        "      serviceAccount: agent-runner\n"
        "      podSelector:\n"
        "        matchLabels: {app: summarizer}\n"
        "        matchExpressions: [{key: tier, operator: In, values: [b, a, b]}]\n"
    )
    assert selector.kind is SelectorKind.KUBERNETES
    assert selector.line == 8  # the first line of the mapping
    assert (selector.cgroup_path, selector.systemd_unit, selector.container) == (None, None, None)
    assert selector.kubernetes == KubernetesSelector(
        namespace="payments",
        namespace_selector=None,
        service_account="agent-runner",
        pod_selector=LabelSelector(
            match_labels=(("app", "summarizer"),),
            match_expressions=(Requirement("tier", "In", ("a", "b")),),
        ),
    )
    assert selector.kubernetes.specificity() == 4


def test_kubernetes_namespace_selector_and_flow_style():
    selector = one(
        "    kubernetes: {namespaceSelector: {matchLabels: {team: ml, env: prod},"
        " matchExpressions: [{key: restricted, operator: DoesNotExist}, {key: tier, operator: NotIn, values: [x]}]}}\n"
    )
    assert selector.line == 7
    k = selector.kubernetes
    assert k.namespace is None and k.service_account is None and k.pod_selector is None
    assert k.namespace_selector.match_labels == (("env", "prod"), ("team", "ml"))
    assert k.namespace_selector.match_expressions == (
        Requirement("restricted", "DoesNotExist", ()),
        Requirement("tier", "NotIn", ("x",)),
    )
    assert k.namespace_selector.matches({"team": "ml", "env": "prod"})
    assert not k.namespace_selector.matches({"team": "ml", "env": "prod", "restricted": ""})


def test_kubernetes_explicit_empty_pod_selector_selects_every_pod():
    k = one("    kubernetes: {podSelector: {}}\n").kubernetes
    assert k.pod_selector == LabelSelector((), ())
    assert k.pod_selector.empty and k.pod_selector.matches({"any": "thing"})
    assert (k.namespace, k.namespace_selector, k.service_account) == (None, None, None)
    assert k.specificity() == 0


@pytest.mark.parametrize(
    "yaml_value, expected",
    [
        ("{serviceAccount: build.runner-1}", KubernetesSelector(None, None, "build.runner-1", None)),
        ("{namespace: " + "a" * 63 + "}", KubernetesSelector("a" * 63, None, None, None)),
        ("{namespace: '0x'}", KubernetesSelector("0x", None, None, None)),
        (
            "{podSelector: {matchLabels: {example.com/app: 'v1.2_x', empty: ''}}}",
            KubernetesSelector(None, None, None, LabelSelector((("empty", ""), ("example.com/app", "v1.2_x")), ())),
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: Exists, values: null}]}}",
            KubernetesSelector(None, None, None, LabelSelector((), (Requirement("a", "Exists", ()),))),
        ),
    ],
)
def test_kubernetes_accepted(yaml_value, expected):
    assert one(f"    kubernetes: {yaml_value}\n").kubernetes == expected


@pytest.mark.parametrize(
    "glob, stored",
    [
        ("agent-*.service", "agent-*.service"),
        ("getty@tty1.service", "getty@tty1.service"),
        ("agent@*.service", "agent@*.service"),
        ("kubepods-burstable.slice", "kubepods-burstable.slice"),
        ("run-r?????.scope", "run-r?????.scope"),
        ("foo\\x2dbar.service", "foo\\x2dbar.service"),  # systemd's escape for "-" is a literal
        ("dev:x_y.service", "dev:x_y.service"),
        ("a*?*.service", "a?*.service"),  # wildcard runs canonical, as for cgroup paths
        ("a**.service", "a*.service"),  # "**" means nothing special in a name
        ("*.scope", "*.scope"),
        ("a" * 247 + ".service", "a" * 247 + ".service"),  # 255 characters
    ],
)
def test_systemd_unit_accepted(glob, stored):
    selector = one(f"    systemdUnit: '{glob}'\n")
    assert selector.kind is SelectorKind.SYSTEMD_UNIT
    assert selector.systemd_unit == stored
    assert selector.line == 7
    assert (selector.cgroup_path, selector.kubernetes, selector.container) == (None, None, None)


@pytest.mark.parametrize(
    "yaml_value, expected",
    [
        (f"{{id: '{ID64}'}}", ContainerSelector(ID64, None)),
        (f"{{id: '{ID64[:12]}'}}", ContainerSelector(ID64[:12], None)),
        (f"{{id: '{ID64[:63]}'}}", ContainerSelector(ID64[:63], None)),
        ("{name: summarizer}", ContainerSelector(None, "summarizer")),
        (f"{{id: '{ID64}', name: app-2}}", ContainerSelector(ID64, "app-2")),
    ],
)
def test_container_accepted(yaml_value, expected):
    selector = one(f"    container: {yaml_value}\n")
    assert selector.kind is SelectorKind.CONTAINER
    assert selector.container == expected
    assert selector.line == 7
    assert selector.container.specificity() == (expected.id is not None) + (expected.name is not None)


def test_container_block_form_line():
    selector = one(f"    container:\n      name: app\n      id: '{ID64}'\n")
    assert selector.container == ContainerSelector(ID64, "app")
    assert selector.line == 8


# --- rejected forms -------------------------------------------------------------------------

REJECT = [
    # kubernetes
    ("    kubernetes: {}\n", 7, "spec.selector.kubernetes: an empty selector would select every pod on the node"),
    ("    kubernetes: {}\n", 7, "or write 'podSelector: {}' if every pod is really meant"),
    ("    kubernetes:\n", 7, "spec.selector.kubernetes: expected a mapping with keys namespace, namespaceSelector"),
    ("    kubernetes: {pods: {}}\n", 7,
     "spec.selector.kubernetes: unknown key 'pods' (allowed keys: namespace, namespaceSelector, serviceAccount, podSelector)"),
    ("    kubernetes: {namespce: a}\n", 7, "unknown key 'namespce' (allowed keys: namespace, namespaceSelector, serviceAccount, podSelector); did you mean 'namespace'?"),
    ("    kubernetes:\n      namespace: a\n      namespaceSelector: {}\n", 9,
     "spec.selector.kubernetes.namespaceSelector: cannot be combined with namespace"),
    ("    kubernetes: {namespace: Payments}\n", 7,
     "spec.selector.kubernetes.namespace: 'Payments' is not a valid namespace name (expected at most 63 lower-case"),
    ("    kubernetes: {namespace: a.b}\n", 7, "spec.selector.kubernetes.namespace: 'a.b' is not a valid namespace name"),
    ("    kubernetes: {namespace: -a}\n", 7, "spec.selector.kubernetes.namespace: '-a' is not a valid namespace name"),
    ("    kubernetes: {namespace: " + "a" * 64 + "}\n", 7, "is not a valid namespace name (expected at most 63"),
    ("    kubernetes: {namespace: 123}\n", 7,
     "spec.selector.kubernetes.namespace: expected a string, got the integer 123; quote it to make it a string"),
    ("    kubernetes: {serviceAccount: a_b}\n", 7,
     "spec.selector.kubernetes.serviceAccount: 'a_b' is not a valid service account name (expected at most 253"),
    ("    kubernetes: {serviceAccount: a.}\n", 7, "spec.selector.kubernetes.serviceAccount: 'a.' is not a valid service account name"),
    ("    kubernetes: {serviceAccount: " + "a" * 254 + "}\n", 7, "is not a valid service account name (expected at most 253"),
    ("    kubernetes: {podSelector: []}\n", 7,
     "spec.selector.kubernetes.podSelector: expected a mapping with keys matchLabels, matchExpressions, got a list"),
    ("    kubernetes: {podSelector: {labels: {a: b}}}\n", 7,
     "spec.selector.kubernetes.podSelector: unknown key 'labels' (allowed keys: matchLabels, matchExpressions)"),
    ("    kubernetes: {podSelector: {matchLabels: null}}\n", 7,
     "spec.selector.kubernetes.podSelector.matchLabels: expected a mapping of label keys to values, got an empty "
     "value (null) (write {} for no labels, or leave matchLabels out)"),
    ("    kubernetes: {podSelector: {matchLabels: {app: 1}}}\n", 7,
     "spec.selector.kubernetes.podSelector.matchLabels['app']: expected a string, got the integer 1; quote it"),
    ("    kubernetes: {podSelector: {matchLabels: {app: }}}\n", 7,
     "spec.selector.kubernetes.podSelector.matchLabels['app']: expected a string label value, got an empty value (null); write ''"),
    ("    kubernetes: {podSelector: {matchLabels: {true: x}}}\n", 7,
     "spec.selector.kubernetes.podSelector.matchLabels: expected a string, got the boolean true; quote it"),
    ("    kubernetes:\n      podSelector:\n        matchLabels:\n          app: a\n          app: b\n", 11,
     "spec.selector.kubernetes.podSelector.matchLabels['app']: duplicate key"),
    ("    kubernetes:\n      podSelector:\n        matchLabels:\n          ok: a\n          a/b/c: x\n", 11,
     "spec.selector.kubernetes.podSelector.matchLabels['a/b/c']: label key 'a/b/c' has more than one '/'"),
    ("    kubernetes:\n      podSelector:\n        matchLabels:\n          ok: a\n          app: -x\n", 11,
     "spec.selector.kubernetes.podSelector.matchLabels['app']: label value '-x' must be empty or consist of"),
    ("    kubernetes: {namespaceSelector: {matchExpressions: null}}\n", 7,
     "spec.selector.kubernetes.namespaceSelector.matchExpressions: expected a list of {key, operator, values} "
     "requirements, got an empty value (null) (write [] for none, or leave matchExpressions out)"),
    ("    kubernetes: {namespaceSelector: {matchExpressions: {key: a}}}\n", 7,
     "spec.selector.kubernetes.namespaceSelector.matchExpressions: expected a list of {key, operator, values} requirements, got a mapping"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: tier\n            operator: in\n            values: [a]\n", 11,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].operator: 'in' is not a valid operator "
     "(one of In, NotIn, Exists, DoesNotExist); did you mean 'In'?"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: a, operator: Exists}\n          - {operator: In, values: [a]}\n", 11,
     "spec.selector.kubernetes.podSelector.matchExpressions[1]: missing required key 'key'"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: tier\n            operator: In\n            values:\n              - a\n              - -bad-\n", 14,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].values[1]: label value '-bad-' must be empty"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: tier\n            operator: In\n            values:\n              - a\n              - 2\n", 14,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].values[1]: expected a string, got the integer 2; quote it"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: tier\n            operator: In\n            values: []\n", 12,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].values: must be a non-empty list when operator is In"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: tier\n            operator: Exists\n            values: [a]\n", 12,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].values: must not be given when operator is Exists"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: -tier\n            operator: Exists\n", 10,
     "spec.selector.kubernetes.podSelector.matchExpressions[0].key: label key '-tier': name part must consist of"),
    ("    kubernetes:\n      podSelector:\n        matchExpressions:\n          - key: a\n            operator: Exists\n            extra: 1\n", 12,
     "spec.selector.kubernetes.podSelector.matchExpressions[0]: unknown key 'extra' (allowed keys: key, operator, values)"),
    # systemdUnit
    ("    systemdUnit: 'agent-*'\n", 7,
     "spec.selector.systemdUnit: 'agent-*' is not a systemd unit name glob: it must end in .service, .scope or "
     ".slice, the units whose cgroups the agent selects (did you mean 'agent-*.service'?)"),
    ("    systemdUnit: 'agent.socket'\n", 7, "(did you mean 'agent.service'?)"),
    ("    systemdUnit: 'agent-*.'\n", 7, "(did you mean 'agent-*.service'?)"),
    ("    systemdUnit: 'agent.serv*'\n", 7, "it must end in .service, .scope or .slice"),
    ("    systemdUnit: '*'\n", 7, "(did you mean '*.service'?)"),
    ("    systemdUnit: '.service'\n", 7, "spec.selector.systemdUnit: '.service' is not a systemd unit name glob: no name before .service"),
    ("    systemdUnit: 'a@b@c.service'\n", 7, "more than one '@' (a template instance is written 'name@instance.service')"),
    ("    systemdUnit: 'system.slice/agent.service'\n", 7, "'/' cannot appear in a unit name"),
    ("    systemdUnit: 'agent [1].service'\n", 7, "' ', '[' or ']' cannot appear in a unit name"),
    ("    systemdUnit: 'agent-ü.service'\n", 7, "'ü' cannot appear in a unit name"),
    ("    systemdUnit: ''\n", 7, "spec.selector.systemdUnit: '' is not a systemd unit name glob: it must end in .service"),
    ("    systemdUnit: '" + "a" * 248 + ".service'\n", 7, "longer than 255 characters, the limit for unit names"),
    ("    systemdUnit: [a.service]\n", 7, "spec.selector.systemdUnit: expected a string, got a list"),
    # container
    ("    container: {}\n", 7, "spec.selector.container: expected id, name or both (an empty selector would select every container)"),
    ("    container: {nme: app}\n", 7, "spec.selector.container: unknown key 'nme' (allowed keys: id, name); did you mean 'name'?"),
    ("    container: 'abc'\n", 7, "spec.selector.container: expected a mapping with keys id, name, got the string 'abc'"),
    ("    container: {id: '3f1c0123456'}\n", 7,
     "spec.selector.container.id: '3f1c0123456' has 11 hex digits (expected the full 64-digit hex id, or a prefix of at least 12"),
    (f"    container: {{id: '{ID64}0'}}\n", 7, "spec.selector.container.id: '3f1c0123456789abcdef0123456789abcdef0123456789abcdef01234...' has 65 hex digits"),
    ("    container: {id: '3F1C0123456789'}\n", 7, "spec.selector.container.id: '3F1C0123456789' is not a container id (expected"),
    ("    container: {id: '3F1C0123456789'}\n", 7, "in lower case); write '3f1c0123456789'"),
    (f"    container: {{id: 'containerd://{ID64}'}}\n", 7, "is not a container id (expected the full 64-digit hex id, or a prefix of at least 12 digits, in lower case); leave out 'containerd://'"),
    ("    container: {id: 'g1c0123456789'}\n", 7, "spec.selector.container.id: 'g1c0123456789' is not a container id"),
    ("    container: {id: 301234567890123}\n", 7, "spec.selector.container.id: expected a string, got the integer 301234567890123; quote it"),
    ("    container: {name: App}\n", 7, "spec.selector.container.name: 'App' is not a valid container name (expected at most 63"),
    ("    container: {name: a_b}\n", 7, "spec.selector.container.name: 'a_b' is not a valid container name"),
    # one kind only
    ("    systemdUnit: a.service\n    container: {name: a}\n", 7,
     "spec.selector: expected exactly one of: cgroupPath, systemdUnit, kubernetes, container"),
]


@pytest.mark.parametrize("selector, line, message", REJECT)
def test_reject(selector, line, message):
    errors = errors_of(doc("p", selector))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{PATH}:{line}: "), errors
    assert message in errors[0], errors


def test_every_error_of_a_selector_is_reported():
    errors = errors_of(
        doc(
            "p",
            "    kubernetes:\n"
            "      namespace: Bad\n"
            "      serviceAccount: also_bad\n"
            "      podSelector: {matchLabels: {a: 1, b: 2}}\n",
        )
    )
    assert [e.split(": ")[0:2] for e in errors] == [
        [f"{PATH}:8", "spec.selector.kubernetes.namespace"],
        [f"{PATH}:9", "spec.selector.kubernetes.serviceAccount"],
        [f"{PATH}:10", "spec.selector.kubernetes.podSelector.matchLabels['a']"],
        [f"{PATH}:10", "spec.selector.kubernetes.podSelector.matchLabels['b']"],
    ], errors


# --- checks across policies -----------------------------------------------------------------


def pair(a: str, b: str) -> str:
    return doc("p1", a) + "---\n" + doc("p2", b)


# The second document starts on line 10, so its selector is on line 16 (17 for block forms).
CLASH = [
    # kubernetes: only selectors with the same requirements
    ("    kubernetes: {namespace: payments}\n", "    kubernetes: {namespace: payments}\n", "kubernetes", 16,
     "both select the same pods (their selectors state the same requirements)"),
    ("    kubernetes: {namespace: a}\n", "    kubernetes: {namespace: a, podSelector: {}}\n", "kubernetes", 16,
     "both select the same pods"),
    ("    kubernetes: {podSelector: {matchLabels: {app: x}}}\n",
     "    kubernetes: {podSelector: {matchExpressions: [{key: app, operator: In, values: [x]}]}}\n", "kubernetes", 16,
     "both select the same pods"),
    ("    kubernetes: {podSelector: {}}\n", "    kubernetes: {namespaceSelector: {}}\n", "kubernetes", 16,
     "both select the same pods"),
    ("    kubernetes: {serviceAccount: s, podSelector: {matchExpressions: [{key: a, operator: In, values: [x, y]}]}}\n",
     "    kubernetes:\n      podSelector:\n        matchExpressions: [{key: a, operator: In, values: [y, x, x]}]\n      serviceAccount: s\n",
     "kubernetes", 17, "both select the same pods"),
    # systemdUnit: equal specificity and overlapping globs
    ("    systemdUnit: agent.service\n", "    systemdUnit: agent.service\n", "systemdUnit", 16,
     "have equal specificity (1, 13) and both select 'agent.service'; make one pattern more specific or merge the policies"),
    ("    systemdUnit: 'x*y.service'\n", "    systemdUnit: 'xy*.service'\n", "systemdUnit", 16,
     "have equal specificity (0, 10) and both select 'xy.service' (patterns 'x*y.service' and 'xy*.service')"),
    ("    systemdUnit: 'a*?.service'\n", "    systemdUnit: 'a?*.service'\n", "systemdUnit", 16,
     "both select 'a?*.service'"),
    ("    systemdUnit: 'batch-?.service'\n", "    systemdUnit: 'batch?1.service'\n", "systemdUnit", 16,
     "have equal specificity (0, 14) and both select 'batch-1.service'"),
    ("    systemdUnit: 'foo\\x2d*.service'\n", "    systemdUnit: '*\\x2dbar.service'\n", "systemdUnit", 16,
     "both select 'foo\\\\x2dbar.service'"),
    # container: the same selector, or prefix ids with the same name
    (f"    container: {{id: '{ID64}'}}\n", f"    container: {{id: '{ID64}'}}\n", "container", 16,
     f"both select the container id '{ID64}' (their selectors are identical)"),
    ("    container: {name: app}\n", "    container: {name: app}\n", "container", 16,
     "both select the containers named 'app' (their selectors are identical)"),
    (f"    container: {{id: '{ID64[:12]}', name: app}}\n", f"    container: {{id: '{ID64}', name: app}}\n", "container", 16,
     f"both select the container id '{ID64}' named 'app' with equal specificity (id '{ID64[:12]}' is a prefix of '{ID64}')"),
    (f"    container: {{id: '{ID64}'}}\n", f"    container: {{id: '{ID64[:20]}'}}\n", "container", 16,
     f"(id '{ID64[:20]}' is a prefix of '{ID64}')"),
]


@pytest.mark.parametrize("a, b, kind, line, message", CLASH)
def test_same_kind_clash_rejected(a, b, kind, line, message):
    [error] = errors_of(pair(a, b))
    assert error.startswith(f"{PATH}:{line}: spec.selector.{kind}: policies 'p1' ({PATH}:7) and 'p2' "), error
    assert message in error, error


@pytest.mark.parametrize(
    "a, b",
    [
        # kubernetes: different requirements are never refused statically, even when the same
        # pod may match both at runtime (the agent resolves that tie, failing closed)
        ("    kubernetes: {namespace: a}\n", "    kubernetes: {namespace: b}\n"),
        ("    kubernetes: {namespace: a}\n", "    kubernetes: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}}\n"),
        ("    kubernetes: {podSelector: {matchLabels: {app: x}}}\n", "    kubernetes: {podSelector: {matchLabels: {tier: y}}}\n"),
        ("    kubernetes: {podSelector: {matchLabels: {app: x}}}\n",
         "    kubernetes: {podSelector: {matchLabels: {app: x}, matchExpressions: [{key: app, operator: In, values: [x]}]}}\n"),
        ("    kubernetes: {namespace: a}\n", "    kubernetes: {namespace: a, serviceAccount: a}\n"),
        ("    kubernetes: {podSelector: {matchExpressions: [{key: a, operator: In, values: [x]}]}}\n",
         "    kubernetes: {podSelector: {matchExpressions: [{key: a, operator: NotIn, values: [x]}]}}\n"),
        # systemdUnit
        ("    systemdUnit: 'agent-*.service'\n", "    systemdUnit: 'agent-a.service'\n"),  # literal wins
        ("    systemdUnit: 'a*.service'\n", "    systemdUnit: 'b*.service'\n"),  # disjoint
        ("    systemdUnit: 'ab*.service'\n", "    systemdUnit: 'ab*.slice.x.scope'\n"),
        ("    systemdUnit: 'x*.service'\n", "    systemdUnit: '*.service'\n"),  # different specificity
        ("    systemdUnit: 'agent.service'\n", "    systemdUnit: 'other.service'\n"),
        # container
        (f"    container: {{id: '{ID64[:12]}', name: a}}\n", f"    container: {{id: '{ID64}', name: b}}\n"),
        (f"    container: {{id: '{ID64}', name: a}}\n", f"    container: {{id: '{ID64}'}}\n"),  # more specific wins
        (f"    container: {{id: '{ID64[:12]}'}}\n", f"    container: {{id: '{ID64[:11]}f'}}\n"),
        ("    container: {name: a}\n", "    container: {name: b}\n"),
    ],
)
def test_same_kind_without_static_clash_accepted(a, b):
    assert [p.name for p in load_policy_text(pair(a, b), PATH)] == ["p1", "p2"]


def test_all_clashing_container_prefixes_reported():
    text = "---\n".join(
        doc(f"p{i}", f"    container: {{id: '{cid}'}}\n")
        for i, cid in enumerate([ID64[:12], ID64[:12] + "0", ID64[:12] + "1"])
    )
    errors = errors_of(text)
    # p0 clashes with both longer ids; p1 and p2 are not prefixes of each other.
    assert len(errors) == 2, errors
    assert all("policies 'p0' " in e for e in errors), errors
    assert "and 'p1' " in errors[0] and "and 'p2' " in errors[1], errors


def test_mixed_kinds_load():
    """Every policy below may select the same cgroup; different kinds never clash statically."""
    text = "---\n".join(
        [
            doc("by-path", "    cgroupPath: /system.slice/agent.service\n"),
            doc("by-path-all", "    cgroupPath: '/**'\n"),
            doc("by-unit", "    systemdUnit: agent.service\n"),
            doc("by-unit-glob", "    systemdUnit: '*.service'\n"),
            doc("by-pods", "    kubernetes: {podSelector: {}}\n"),
            doc("by-namespace", "    kubernetes: {namespace: payments}\n"),
            doc("by-container", "    container: {name: app}\n"),
            doc("by-container-id", f"    container: {{id: '{ID64}'}}\n"),
        ]
    )
    policies = load_policy_text(text, PATH)
    kinds = {p.name: p.selector.kind for p in policies}
    assert kinds == {
        "by-container": SelectorKind.CONTAINER,
        "by-container-id": SelectorKind.CONTAINER,
        "by-namespace": SelectorKind.KUBERNETES,
        "by-path": SelectorKind.CGROUP_PATH,
        "by-path-all": SelectorKind.CGROUP_PATH,
        "by-pods": SelectorKind.KUBERNETES,
        "by-unit": SelectorKind.SYSTEMD_UNIT,
        "by-unit-glob": SelectorKind.SYSTEMD_UNIT,
    }


def test_clash_across_files_in_a_directory(tmp_path):
    (tmp_path / "a.yaml").write_text(doc("a", "    kubernetes: {namespace: payments}\n"))
    (tmp_path / "b.yaml").write_text(doc("b", "    kubernetes:\n      namespace: payments\n"))
    (tmp_path / "c.yaml").write_text(doc("c", "    systemdUnit: agent.service\n"))
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    [error] = [str(e) for e in info.value.errors]
    assert error.startswith(
        f"{tmp_path / 'b.yaml'}:8: spec.selector.kubernetes: policies 'a' ({tmp_path / 'a.yaml'}:7) and 'b' "
    ), error


def test_duplicate_name_reported_once_not_as_selector_clash():
    errors = errors_of(pair("    container: {name: a}\n", "    container: {name: a}\n").replace("p2", "p1"))
    assert len(errors) == 1 and "policy name 'p1' is already used" in errors[0], errors


# --- name globs: the same precedence and overlap as one-segment cgroup path patterns ----------

_name_globs = st.text(alphabet="ab-*?", min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(_name_globs, _name_globs)
def test_name_globs_agree_with_one_segment_path_patterns(a, b):
    a, b = normalize_name_glob(a), normalize_name_glob(b)
    assert name_glob_specificity(a) == specificity("/" + a)
    example = name_glob_overlap_example(a, b)
    path_example = overlap_example("/" + a, "/" + b)
    assert (example is None) == (path_example is None)
    if example is not None:
        assert fnmatch.fnmatchcase(example, a) and fnmatch.fnmatchcase(example, b)
        assert len(example) == len(path_example) - 1  # both shortest


@pytest.mark.parametrize(
    "a, b, example",
    [
        ("foo\\x2d*.service", "*bar.service", "foo\\x2dbar.service"),  # "\" is literal, not rejected
        ("a?.service", "?b.service", "ab.service"),
        ("a*.service", "b*.service", None),
        ("*.service", "*.scope", None),
    ],
)
def test_name_glob_overlap_example(a, b, example):
    assert name_glob_overlap_example(a, b) == example


# --- hostagent policy check -----------------------------------------------------------------


def run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hostagent", "policy", "check", str(directory)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_policy_check_cli_bad_kubernetes_selector(tmp_path):
    (tmp_path / "good.yaml").write_text(doc("good", "    systemdUnit: agent.service\n"))
    (tmp_path / "bad.yaml").write_text(
        doc("bad", "    kubernetes:\n      namespace: payments\n      podSelector: {matchLabels: {App: -x}}\n")
    )
    result = run_check(tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert (
        f"{tmp_path / 'bad.yaml'}:9: spec.selector.kubernetes.podSelector.matchLabels['App']: label value '-x'"
        in result.stderr
    ), result.stderr


def test_policy_check_cli_good_kubernetes_selector(tmp_path):
    (tmp_path / "pods.yaml").write_text(
        doc(
            "pods",
            "    kubernetes:\n"
            "      namespace: payments\n"
            "      serviceAccount: agent-runner\n"
            "      podSelector: {matchLabels: {app: summarizer}, matchExpressions: [{key: tier, operator: In, values: [a, b]}]}\n",
        )
    )
    result = run_check(tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"{tmp_path}: 1 policies, 0 rules: OK" in result.stdout, result.stdout
