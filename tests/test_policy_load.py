"""Policy loading and validation: accept/reject tables, directories, and fuzzing.

Every reject case asserts the rendered ``file:line: message`` so that error locations stay
pointed at the offending YAML node.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent.errors import HostAgentError, PolicyError
from hostagent.policy import (
    CIDRPeer,
    EgressRule,
    Mode,
    Policy,
    PolicyErrors,
    PortRange,
    Protocol,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
)
from hostagent.policy import load as load_module

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "policies"
PATH = "policies/a.yaml"

# Line numbers are part of the expectations below: keep this text's layout.
BASE = """\
apiVersion: hostagent.io/v1
kind: EgressPolicy
metadata:
  name: agent-a
spec:
  selector:
    cgroupPath: /workloads/agent-a
  mode: enforce
  allowRawSockets: false
  egress:
    - name: api
      to:
        - cidr: 10.20.0.0/16
        - cidr: 2001:db8::/32
      ports:
        - {port: 443, protocol: TCP}
        - {port: 8000, endPort: 8100, protocol: ANY}
"""


SPEC = BASE[BASE.index("spec:\n") :]
EGRESS = BASE[BASE.index("  egress:\n") :]
PORTS = BASE[BASE.index("      ports:\n") :]


def policy_doc(name: str = "agent-a", cgroup: str = "/workloads/agent-a", extra: str = "") -> str:
    return (
        f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n"
        f"spec:\n  selector:\n    cgroupPath: {cgroup!r}\n{extra}"
    )


def errors_of(text: str, path: str = PATH) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        load_policy_text(text, path)
    assert str(info.value) == "\n".join(str(e) for e in info.value.errors)
    return [str(e) for e in info.value.errors]


def replaced(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


# --- accept ---------------------------------------------------------------------------------


def test_base_policy_model():
    [policy] = load_policy_text(BASE, PATH)
    assert policy == Policy(
        name="agent-a",
        selector=policy.selector,
        mode=Mode.ENFORCE,
        allow_raw_sockets=False,
        egress=(
            EgressRule(
                index=0,
                name="api",
                to=(
                    CIDRPeer(ipaddress.ip_network("10.20.0.0/16")),
                    CIDRPeer(ipaddress.ip_network("2001:db8::/32")),
                ),
                ports=(PortRange(443, 443, Protocol.TCP), PortRange(8000, 8100, Protocol.ANY)),
                line=11,
            ),
        ),
        path=PATH,
        line=1,
    )
    assert policy.selector.cgroup_path == "/workloads/agent-a"
    assert policy.selector.line == 7
    assert not policy.egress[0].any_destination
    assert not policy.egress[0].all_ports


def test_defaults():
    [policy] = load_policy_text(policy_doc(extra="  egress:\n    - {}\n    - ports: []\n"))
    assert policy.mode is Mode.ENFORCE
    assert policy.allow_raw_sockets is False
    first, second = policy.egress
    assert (first.name, first.index, first.to, first.ports) == ("egress[0]", 0, (), ())
    assert first.any_destination and first.all_ports
    assert second.name == "egress[1]" and second.all_ports


def test_missing_egress_allows_nothing():
    [policy] = load_policy_text(policy_doc())
    assert policy.egress == ()
    [policy] = load_policy_text(policy_doc(extra="  egress: []\n"))
    assert policy.egress == ()


@pytest.mark.parametrize(
    "old, new, check",
    [
        ("mode: enforce", "mode: audit", lambda p: p.mode is Mode.AUDIT),
        ("allowRawSockets: false", "allowRawSockets: true", lambda p: p.allow_raw_sockets is True),
        ("cidr: 10.20.0.0/16", "cidr: 10.20.0.7", lambda p: str(p.egress[0].to[0].network) == "10.20.0.7/32"),
        ("cidr: 2001:db8::/32", "cidr: '2001:db8::1'", lambda p: p.egress[0].to[1].network.prefixlen == 128),
        ("protocol: TCP}", "}", lambda p: p.egress[0].ports[0].protocols is Protocol.TCP),
        ("protocol: TCP}", "protocol: UDP}", lambda p: p.egress[0].ports[0].protocols is Protocol.UDP),
        ("endPort: 8100", "endPort: 8000", lambda p: p.egress[0].ports[1] == PortRange(8000, 8000, Protocol.ANY)),
        ("port: 443,", "port: 65535,", lambda p: p.egress[0].ports[0].first == 65535),
        ("port: 443,", "port: 1,", lambda p: p.egress[0].ports[0].first == 1),
        ("cgroupPath: /workloads/agent-a", "cgroupPath: workloads//agent-a/", lambda p: p.selector.cgroup_path == "/workloads/agent-a"),
        ("cgroupPath: /workloads/agent-a", "cgroupPath: '*/agent-?'", lambda p: p.selector.cgroup_path == "/*/agent-?"),
        ("cgroupPath: /workloads/agent-a", "cgroupPath: /", lambda p: p.selector.cgroup_path == "/"),
        ("name: agent-a", "name: a.b-c.0", lambda p: p.name == "a.b-c.0"),
        ("name: agent-a", "name: '0'", lambda p: p.name == "0"),
        ("name: api", "name: Allow API (v2)", lambda p: p.egress[0].name == "Allow API (v2)"),
        ("  name: agent-a\n", "  name: " + "a" * 253 + "\n", lambda p: len(p.name) == 253),
    ],
)
def test_accept(old, new, check):
    [policy] = load_policy_text(replaced(old, new), PATH)
    assert check(policy)


def test_multiple_documents_and_empty_documents():
    text = "---\n# nothing\n---\n" + policy_doc("b", "/b") + "---\n---\n" + policy_doc("a", "/a") + "...\n"
    policies = load_policy_text(text)
    assert [p.name for p in policies] == ["a", "b"]  # sorted by name
    assert [p.line for p in policies] == [13, 4]


def test_empty_text():
    assert load_policy_text("") == []
    assert load_policy_text("# only a comment\n") == []


def test_policy_objects_are_frozen():
    [policy] = load_policy_text(BASE)
    with pytest.raises(AttributeError):
        policy.name = "other"  # type: ignore[misc]
    assert hash(policy) == hash(load_policy_text(BASE)[0])


# --- reject ---------------------------------------------------------------------------------

REJECT = [
    # (old, new, line, message)
    ("apiVersion: hostagent.io/v1", "apiVersion: hostagent.io/v2", 1, "apiVersion: 'hostagent.io/v2' is not supported (expected hostagent.io/v1)"),
    ("kind: EgressPolicy", "kind: NetworkPolicy", 2, "kind: 'NetworkPolicy' is not supported (expected EgressPolicy)"),
    ("kind: EgressPolicy", "kind: [EgressPolicy]", 2, "kind: expected a string, got a list"),
    ("kind: EgressPolicy\n", "kind: EgressPolicy\nstatus: {}\n", 3, "unknown key 'status' (allowed keys: apiVersion, kind, metadata, spec)"),
    ("kind: EgressPolicy\n", "", 1, "missing required key 'kind'"),
    ("  name: agent-a\n", "  name: agent-a\n  labels: {}\n", 5, "metadata: unknown key 'labels' (allowed keys: name, ticket)"),
    ("  name: agent-a\n", "  nme: agent-a\n", 4, "metadata: unknown key 'nme' (allowed keys: name, ticket); did you mean 'name'?"),
    ("name: agent-a", "name: Agent-A", 4, "metadata.name: 'Agent-A' is not a valid policy name"),
    ("name: agent-a", "name: agent-", 4, "metadata.name: 'agent-' is not a valid policy name"),
    ("name: agent-a", "name: -agent", 4, "metadata.name: '-agent' is not a valid policy name"),
    ("name: agent-a", "name: agent_a", 4, "metadata.name: 'agent_a' is not a valid policy name"),
    ("name: agent-a", "name: ''", 4, "metadata.name: '' is not a valid policy name"),
    ("  name: agent-a\n", "  name: " + "a" * 254 + "\n", 4, "is not a valid policy name (expected at most 253"),
    ("name: agent-a", "name: 123", 4, "metadata.name: expected a string, got the integer 123; quote it to make it a string"),
    ("name: agent-a", "name: no", 4, "metadata.name: expected a string, got the boolean no"),
    ("metadata:\n  name: agent-a\n", "metadata: agent-a\n", 3, "metadata: expected a mapping with keys name, ticket, got the string 'agent-a'"),
    ("  selector:\n    cgroupPath: /workloads/agent-a\n", "  selector: {}\n", 6, "spec.selector: expected exactly one of: cgroupPath"),
    ("  mode: enforce\n", "  mode2: enforce\n", 8, "spec: unknown key 'mode2' (allowed keys: selector, mode, allowRawSockets, egress); did you mean 'mode'?"),
    ("  selector:\n    cgroupPath: /workloads/agent-a\n", "", 6, "spec: missing required key 'selector'"),
    ("    cgroupPath: /workloads/agent-a", "    pods: {}", 7, "spec.selector: unknown key 'pods' (allowed keys: cgroupPath, systemdUnit, kubernetes, container)"),
    ("cgroupPath: /workloads/agent-a", "cgroupPath: /workloads/../agent-a", 7, "spec.selector.cgroupPath: invalid cgroup path pattern: '/workloads/../agent-a'"),
    ("cgroupPath: /workloads/agent-a", "cgroupPath: /workloads/[ab]", 7, "spec.selector.cgroupPath: invalid cgroup path pattern: '/workloads/[ab]'"),
    ("cgroupPath: /workloads/agent-a", "cgroupPath: /workloads/a**", 7, "'**' must be a whole path segment"),
    ("cgroupPath: /workloads/agent-a", "cgroupPath: ''", 7, "spec.selector.cgroupPath: invalid cgroup path pattern: '': "),
    ("cgroupPath: /workloads/agent-a", "cgroupPath: [/a]", 7, "spec.selector.cgroupPath: expected a string, got a list"),
    ("mode: enforce", "mode: Enforce", 8, "spec.mode: 'Enforce' is not a mode (expected enforce or audit)"),
    ("mode: enforce", "mode: block", 8, "spec.mode: 'block' is not a mode (expected enforce or audit)"),
    ("allowRawSockets: false", "allowRawSockets: no", 9, "spec.allowRawSockets: expected true or false, got the boolean no"),
    ("allowRawSockets: false", "allowRawSockets: 'false'", 9, "spec.allowRawSockets: expected true or false, got the string 'false'"),
    ("allowRawSockets: false", "allowRawSockets: 0", 9, "spec.allowRawSockets: expected true or false, got the integer 0"),
    ("allowRawSockets: false", "allowRawSockets: False", 9, "spec.allowRawSockets: expected true or false"),
    ("allowRawSockets: false", "allowRawSockets:", 9, "spec.allowRawSockets: expected true or false, got an empty value (null)"),
    (EGRESS, "  egress: allow-all\n", 10, "spec.egress: expected a list of rules, got the string 'allow-all'"),
    ("    - name: api\n", "    - name: api\n      from: []\n", 12, "spec.egress[0]: unknown key 'from' (allowed keys: name, to, ports, ticket)"),
    ("name: api", "name: ''", 11, "spec.egress[0].name: expected 1-253 printable characters"),
    ("name: api", "name: [api]", 11, "spec.egress[0].name: expected a string, got a list"),
    ("      to:\n        - cidr: 10.20.0.0/16\n        - cidr: 2001:db8::/32\n", "      to: []\n", 12, "spec.egress[0].to: an empty list would allow nothing; omit 'to' to allow any destination"),
    ("      to:\n        - cidr: 10.20.0.0/16\n        - cidr: 2001:db8::/32\n", "      to:\n", 12, "spec.egress[0].to: expected a list of peers, got an empty value (null)"),
    ("      to:\n        - cidr: 10.20.0.0/16\n        - cidr: 2001:db8::/32\n", "      to: {cidr: 10.0.0.0/8}\n", 12, "spec.egress[0].to: expected a list of peers, got a mapping"),
    ("cidr: 10.20.0.0/16", "cidr: 10.20.0.1/16", 13, "spec.egress[0].to[0].cidr: '10.20.0.1/16': host bits set (did you mean 10.20.0.0/16?)"),
    ("cidr: 2001:db8::/32", "cidr: 2001:db8::1/32", 14, "spec.egress[0].to[1].cidr: '2001:db8::1/32': host bits set (did you mean 2001:db8::/32?)"),
    ("cidr: 10.20.0.0/16", "cidr: 10.20.0.0/33", 13, "spec.egress[0].to[0].cidr: '10.20.0.0/33': not an IP address or CIDR"),
    ("cidr: 10.20.0.0/16", "cidr: 10.20.0.0/255.255.0.0", 13, "spec.egress[0].to[0].cidr: '10.20.0.0/255.255.0.0': prefix length must be a number"),
    ("cidr: 10.20.0.0/16", "cidr: example.com", 13, "spec.egress[0].to[0].cidr: 'example.com': not an IP address or CIDR"),
    ("cidr: 10.20.0.0/16", "cidr: 'fe80::1%eth0'", 13, "scoped addresses are not allowed"),
    ("cidr: 10.20.0.0/16", "cidr: 167772160", 13, "spec.egress[0].to[0].cidr: expected a string, got the integer 167772160"),
    ("- cidr: 10.20.0.0/16", "- fqdns: example.com", 13, "spec.egress[0].to[0]: unknown key 'fqdns' (allowed keys: cidr, fqdn, fqdnPattern); did you mean 'fqdn'?"),
    ("- cidr: 10.20.0.0/16", "- {}", 13, "spec.egress[0].to[0]: expected exactly one of: cidr, fqdn, fqdnPattern"),
    ("- cidr: 10.20.0.0/16", "- {cidr: 10.20.0.0/16, fqdn: example.com}", 13, "spec.egress[0].to[0]: expected exactly one of: cidr, fqdn, fqdnPattern (this entry has cidr and fqdn; write each peer as its own list item)"),
    ("- cidr: 10.20.0.0/16", "- 10.20.0.0/16", 13, "spec.egress[0].to[0]: expected a mapping with keys cidr, fqdn, fqdnPattern, got the string '10.20.0.0/16'"),
    (PORTS, "      ports: 443\n", 15, "spec.egress[0].ports: expected a list of ports, got the integer 443"),
    ("port: 443,", "port: 70000,", 16, "spec.egress[0].ports[0].port: 70000 is not a port number (1-65535)"),
    ("port: 443,", "port: 0,", 16, "spec.egress[0].ports[0].port: 0 is not a port number (1-65535)"),
    ("port: 443,", "port: -1,", 16, "spec.egress[0].ports[0].port: -1 is not a port number (1-65535)"),
    ("port: 443,", "port: 99999999999999999999999999,", 16, "99999999999999999999999999 is not a port number"),
    ("port: 443,", "port: '443',", 16, "spec.egress[0].ports[0].port: expected a port number (1-65535) as a decimal integer, got the string '443'"),
    ("port: 443,", "port: https,", 16, "spec.egress[0].ports[0].port: expected a port number (1-65535) as a decimal integer, got the string 'https'"),
    ("port: 443,", "port: 443.0,", 16, "got the number 443.0"),
    ("port: 443,", "port: 0x1bb,", 16, "as a decimal integer, got the integer 0x1bb"),
    ("port: 443,", "port: 0443,", 16, "as a decimal integer, got the integer 0443"),
    ("port: 443,", "port: 4_43,", 16, "as a decimal integer"),
    ("port: 443,", "port: true,", 16, "got the boolean true"),
    ("{port: 443, protocol: TCP}", "{protocol: TCP}", 16, "spec.egress[0].ports[0]: missing required key 'port'"),
    ("{port: 443, protocol: TCP}", "{port: 443, proto: TCP}", 16, "spec.egress[0].ports[0]: unknown key 'proto' (allowed keys: port, endPort, protocol); did you mean 'protocol'?"),
    ("{port: 443, protocol: TCP}", "{port: 443, port: 80}", 16, "spec.egress[0].ports[0].port: duplicate key"),
    ("protocol: TCP}", "protocol: tcp}", 16, "spec.egress[0].ports[0].protocol: 'tcp' is not a protocol (expected TCP, UDP or ANY)"),
    ("protocol: TCP}", "protocol: SCTP}", 16, "spec.egress[0].ports[0].protocol: 'SCTP' is not a protocol (expected TCP, UDP or ANY)"),
    ("endPort: 8100", "endPort: 7999", 17, "spec.egress[0].ports[1].endPort: 7999 is less than port 8000 (expected endPort >= port)"),
    ("endPort: 8100", "endPort: 65536", 17, "spec.egress[0].ports[1].endPort: 65536 is not a port number (1-65535)"),
    ("        - {port: 443, protocol: TCP}\n", "        - 443\n", 16, "spec.egress[0].ports[0]: expected a mapping with keys port, endPort, protocol, got the integer 443"),
    ("    - name: api\n", "    - name: api\n    - name: api\n", 12, "spec.egress[1].name: rule name 'api' is already used by spec.egress[0]"),
    ("    - name: api\n", "    - {}\n    - name: egress[0]\n", 12, "spec.egress[1].name: rule name 'egress[0]' is already used by spec.egress[0]"),
    (SPEC, "spec: !!set {a}\n", 5, "spec: expected a mapping with keys selector, mode, allowRawSockets, egress, got a value tagged tag:yaml.org,2002:set"),
    ("mode: enforce", "mode: !custom enforce", 8, "spec.mode: expected a string, got a value tagged !custom"),
    ("mode: enforce", "mode: !!python/object:os.system enforce", 8, "spec.mode: expected a string, got a value tagged tag:yaml.org,2002:python/object:os.system"),
    ("mode: enforce", "mode: 2024-01-01", 8, "spec.mode: expected a string, got '2024-01-01' (a YAML timestamp); quote it to make it a string"),
    ("  name: agent-a\n", "  name: agent-a\n  ? [a]\n  : b\n", 5, "metadata: keys must be plain strings, got a list"),
    ("  name: agent-a\n", "  name: agent-a\n  1: b\n", 5, "metadata: unknown key '1' (allowed keys: name, ticket)"),
]


@pytest.mark.parametrize("old, new, line, message", REJECT)
def test_reject(old, new, line, message):
    errors = errors_of(replaced(old, new))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{PATH}:{line}: "), errors
    assert message in errors[0], errors


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("[a, b", 1, "invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("a: b\n c: d\n", 2, "invalid YAML: mapping values are not allowed here"),
        ("a: b\n\tc: d\n", 2, "invalid YAML: "),
        ("key: 'unterminated\n", 2, "invalid YAML: "),
        ("a: \x00\n", 1, "invalid YAML: character U+0000 is not allowed"),
        ("a: &x [1]\nb: *x\n", 1, "invalid YAML: anchors and aliases (&name, *name) are not supported"),
        ("a: *x\n", 1, "invalid YAML: anchors and aliases"),
        ("cgroupPath: */agent-*\n", 1, "quote values that start with * or &"),
        ("[" * 100 + "]" * 100, 1, "invalid YAML: nested deeper than 32 levels"),
        ("- a\n- b\n", 1, "expected a mapping with keys apiVersion, kind, metadata, spec, got a list"),
        ("just a string\n", 1, "expected a mapping with keys apiVersion, kind, metadata, spec, got the string 'just a string'"),
        ("42\n", 1, "got the integer 42"),
        ("apiVersion: hostagent.io/v1\napiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {name: a}\nspec: {selector: {cgroupPath: /a}}\n", 2, "apiVersion: duplicate key"),
    ],
)
def test_reject_documents(text, line, message):
    errors = errors_of(text)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{PATH}:{line}: "), errors
    assert message in errors[0], errors


def test_alias_bomb_is_refused_quickly():
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(c)}: &{chr(c)} [*{chr(c - 1)},*{chr(c - 1)},*{chr(c - 1)},*{chr(c - 1)},*{chr(c - 1)}]\n"
        for c in range(ord("b"), ord("k"))
    )
    [error] = errors_of(bomb)
    assert "anchors and aliases" in error


def test_all_errors_in_a_document_are_reported():
    text = (
        BASE.replace("mode: enforce", "mode: audited")
        .replace("port: 443,", "port: 0,")
        .replace("cidr: 10.20.0.0/16", "cidr: 10.20.0.1/16")
        .replace("endPort: 8100", "endPort: 1")
    )
    errors = errors_of(text)
    assert [e.split(": ")[0] for e in errors] == [f"{PATH}:8", f"{PATH}:13", f"{PATH}:16", f"{PATH}:17"]


def test_errors_across_documents_and_after_syntax_error():
    text = policy_doc("a", "/a", "  mode: x\n") + "---\n" + policy_doc("b", "/b", "  mode: y\n") + "---\n[\n"
    errors = errors_of(text)
    assert len(errors) == 3
    assert errors[0].startswith(f"{PATH}:8: spec.mode: 'x'")
    assert errors[1].startswith(f"{PATH}:17: spec.mode: 'y'")
    assert errors[2].startswith(f"{PATH}:20: invalid YAML")


def test_wrong_api_version_stops_at_header():
    # Another version may have another schema: do not drown the real error in unknown keys.
    text = "apiVersion: hostagent.io/v2\nkind: EgressPolicy\nmetadata: {name: a}\nspec: {newThing: 1}\n"
    assert errors_of(text) == [f"{PATH}:1: apiVersion: 'hostagent.io/v2' is not supported (expected hostagent.io/v1)"]


def test_policy_errors_is_a_policy_error():
    with pytest.raises(PolicyError) as info:
        load_policy_text("[", "x.yaml")
    assert isinstance(info.value, HostAgentError)
    assert isinstance(info.value, PolicyErrors)
    [error] = info.value.errors
    assert (error.path, error.line) == ("x.yaml", 1)


def test_text_size_limit(monkeypatch):
    monkeypatch.setattr(load_module, "MAX_FILE_BYTES", 100)
    assert errors_of("#" * 101) == [f"{PATH}: file is larger than 100 bytes"]
    assert load_policy_text("#" * 100) == []


# --- cross-policy checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, message",
    [
        ("/workloads/agent-a", "workloads/agent-a/", "have equal specificity (2, 16) and both select '/workloads/agent-a'"),
        ("/w/*", "/*/b", "have equal specificity (1, 1) and both select '/w/b' (patterns '/w/*' and '/*/b')"),
        ("/a/**", "/**/a", "have equal specificity (1, 1) and both select '/a'"),
        ("/x*y", "/xy*", "have equal specificity (0, 2) and both select '/xy'"),
        ("/x*y", "/*yx*", "both select '/xyxy'"),
    ],
)
def test_equal_specificity_overlap_rejected(a, b, message):
    text = policy_doc("p1", a) + "---\n" + policy_doc("p2", b)
    [error] = errors_of(text)
    assert error.startswith(f"{PATH}:15: spec.selector.cgroupPath: policies 'p1' ({PATH}:7) and 'p2' "), error
    assert message in error


@pytest.mark.parametrize(
    "a, b",
    [
        ("/workloads/agent-a", "/workloads/agent-b"),  # same specificity, disjoint
        ("/workloads/*", "/workloads/agent-a"),  # overlap, but one is more specific
        ("/**", "/workloads/**"),
        ("/a/*", "/b/*"),
        ("/x*y", "/*z"),
        ("/*", "/*/*"),
        ("/*/x", "/x/*/*"),
    ],
)
def test_distinguishable_selectors_accepted(a, b):
    policies = load_policy_text(policy_doc("p1", a) + "---\n" + policy_doc("p2", b))
    assert len(policies) == 2


def test_duplicate_name_in_text():
    text = policy_doc("p", "/a") + "---\n" + policy_doc("p", "/b")
    assert errors_of(text) == [f"{PATH}:12: metadata.name: policy name 'p' is already used at {PATH}:4"]


# --- files and directories ------------------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_load_dir_fixture():
    policies = load_policy_dir(DATA / "valid")
    assert [p.name for p in policies] == ["batch", "web", "web-admin"]
    batch, web, admin = policies
    assert batch.path == os.path.join(str(DATA / "valid"), "batch.yml")
    assert batch.selector.cgroup_path == "/system.slice/batch-*.service"
    assert batch.egress[0].ports == (PortRange(5000, 5010, Protocol.UDP),)
    assert batch.egress[0].any_destination
    assert web.egress[0].name == "egress[0]"
    assert admin.mode is Mode.AUDIT and admin.allow_raw_sockets
    assert admin.line == 15


def test_load_dir_fixture_errors():
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(DATA / "invalid")
    a, b = (str(DATA / "invalid" / n) for n in ("a.yaml", "b.yaml"))
    assert [str(e) for e in info.value.errors] == [
        f"{a}:10: spec.egress[0].to[0].cidr: '10.20.0.1/16': host bits set (did you mean 10.20.0.0/16?)",
        f"{a}:12: spec.egress[0].ports[0].port: 70000 is not a port number (1-65535)",
        f"{b}:8: spec.mode: 'block' is not a mode (expected enforce or audit)",
        f"{b}:13: metadata.name: policy name 'agent-b' is already used at {b}:4",
    ]


def test_default_policy_dir_loads():
    policies = load_policy_dir(REPO / "policies")
    assert len(policies) >= 1
    demo = policies[0]
    assert demo.selector.cgroup_path.startswith("/hostagent-demo")
    # The bundled example must show every feature users copy from.
    ports = [r for rule in demo.egress for r in rule.ports]
    assert any(p.protocols is Protocol.ANY for p in ports)
    assert any(p.first != p.last for p in ports)
    networks = [peer.network for rule in demo.egress for peer in rule.to]
    assert {n.version for n in networks} == {4, 6}


def test_empty_dir(tmp_path):
    assert load_policy_dir(tmp_path) == []


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(missing)
    assert str(info.value) == f"{missing}: policy directory does not exist"


def test_dir_is_a_file(tmp_path):
    path = write(tmp_path, "x.yaml", "")
    with pytest.raises(PolicyError, match="is not a directory"):
        load_policy_dir(path)


def test_dir_selection(tmp_path):
    write(tmp_path, "a.yaml", policy_doc("a", "/a"))
    write(tmp_path, "b.yml", policy_doc("b", "/b"))
    write(tmp_path, "c.json", "{not yaml")
    write(tmp_path, "d.yaml.bak", "{not yaml")
    write(tmp_path, ".e.yaml", "{not yaml")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "f.yaml", "{not yaml")
    # Kubernetes ConfigMap mounts: a.yaml -> ..data/a.yaml with ..data a symlinked directory.
    (tmp_path / "..2024").mkdir()
    write(tmp_path / "..2024", "g.yaml", policy_doc("g", "/g"))
    (tmp_path / "..data").symlink_to("..2024")
    (tmp_path / "g.yaml").symlink_to("..data/g.yaml")
    assert [p.name for p in load_policy_dir(tmp_path)] == ["a", "b", "g"]


def test_dir_non_regular_policy_file(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "broken.yaml").symlink_to("missing")
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    messages = [str(e) for e in info.value.errors]
    assert messages == [
        f"{tmp_path / 'broken.yaml'}: cannot read policy file: No such file or directory",
        f"{tmp_path / 'dir.yaml'}: not a regular file",
    ]


def test_dir_collects_errors_from_all_files(tmp_path):
    write(tmp_path, "a.yaml", policy_doc("a", "/a", "  mode: x\n"))
    write(tmp_path, "b.yaml", "[")
    write(tmp_path, "c.yaml", policy_doc("c", "/c", "  allowRawSockets: 1\n"))
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    assert [e.path for e in info.value.errors] == [str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml")]


def test_duplicate_name_across_files_names_both(tmp_path):
    write(tmp_path, "a.yaml", policy_doc("same", "/a"))
    write(tmp_path, "b.yaml", "# comment\n" + policy_doc("same", "/b"))
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'b.yaml'}:5: metadata.name: policy name 'same' is already used at {tmp_path / 'a.yaml'}:4"
    )


def test_duplicate_name_reported_even_if_the_first_is_invalid(tmp_path):
    write(tmp_path, "a.yaml", policy_doc("same", "/a", "  mode: x\n"))
    write(tmp_path, "b.yaml", policy_doc("same", "/b"))
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    assert len(info.value.errors) == 2
    assert "already used at" in str(info.value.errors[1])


def test_overlap_across_files(tmp_path):
    write(tmp_path, "a.yaml", policy_doc("a", "/w/*"))
    write(tmp_path, "b.yaml", policy_doc("b", "/*/x"))
    with pytest.raises(PolicyErrors) as info:
        load_policy_dir(tmp_path)
    [error] = info.value.errors
    assert str(error).startswith(
        f"{tmp_path / 'b.yaml'}:7: spec.selector.cgroupPath: policies 'a' ({tmp_path / 'a.yaml'}:7) and 'b' "
        "have equal specificity (1, 1) and both select '/w/x'"
    )


def test_load_policy_file(tmp_path):
    path = write(tmp_path, "a.yaml", BASE)
    [policy] = load_policy_file(path)
    assert policy.path == str(path)
    with pytest.raises(PolicyErrors, match="cannot read policy file"):
        load_policy_file(tmp_path / "missing.yaml")


def test_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "MAX_FILE_BYTES", 1024 * 1024)
    path = write(tmp_path, "big.yaml", "#" * (1024 * 1024 + 1))
    with pytest.raises(PolicyErrors) as info:
        load_policy_file(path)
    assert str(info.value) == f"{path}: file is larger than 1 MiB"
    with pytest.raises(PolicyErrors):
        load_policy_dir(tmp_path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(PolicyErrors) as info:
        load_policy_file(path)
    assert str(info.value) == f"{path}:2: invalid UTF-8 at byte 8"


def test_utf8_bom_accepted(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert len(load_policy_file(path)) == 1


# --- fuzz -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_or_policy_error(text: str) -> None:
    try:
        policies = load_policy_text(text, "fuzz.yaml")
    except PolicyErrors as err:
        assert err.errors
        for e in err.errors:
            assert isinstance(e, PolicyError)
            assert str(e).startswith("fuzz.yaml")
    else:
        assert all(isinstance(p, Policy) for p in policies)


@FUZZ
@given(st.text())
def test_fuzz_arbitrary_text(text):
    _load_or_policy_error(text)


@FUZZ
@given(st.text(alphabet="[]{}:,-?*&!|>'\"#%@`\n\t abc01/.~"))
def test_fuzz_yaml_punctuation(text):
    _load_or_policy_error(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["enforce", "audit", "TCP", "UDP", "ANY", "10.0.0.0/8", "::/0", "/a/*", "**", "hostagent.io/v1", "EgressPolicy",
                     "example.com", "*.example.com", "*.com", "xn--bcher-kva.example"]),
)
keys = st.sampled_from(
    ["apiVersion", "kind", "metadata", "spec", "name", "selector", "cgroupPath", "mode", "allowRawSockets",
     "egress", "to", "ports", "cidr", "fqdn", "fqdnPattern", "port", "endPort", "protocol", "other"]
)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys | st.text(max_size=5), children, max_size=5),
    max_leaves=30,
)


@FUZZ
@given(structures)
def test_fuzz_arbitrary_structures(value):
    _load_or_policy_error(yaml.safe_dump(value))


def _mutate(doc: object, draw, depth: int = 0) -> object:
    """Replace or keep each subtree of a valid policy, so most of the document stays well-formed."""
    if draw(st.integers(0, 5)) == 0:
        return draw(structures)
    if isinstance(doc, dict):
        return {k: _mutate(v, draw, depth + 1) for k, v in doc.items() if draw(st.integers(0, 9))}
    if isinstance(doc, list):
        return [_mutate(v, draw, depth + 1) for v in doc]
    return doc


@FUZZ
@given(st.data())
def test_fuzz_mutated_policies(data):
    base = yaml.safe_load(BASE)
    _load_or_policy_error(yaml.safe_dump(_mutate(base, data.draw)))


def test_libyaml_fast_path_agrees_with_the_python_composer():
    """The fast composer must give the same tree, and hand anything unusual to the slow one."""
    from hostagent.policy.load import _compose_libyaml, _compose_python

    def shape(node):
        if isinstance(node.value, str):
            return (node.tag, node.value, node.start_mark.line)
        if node.tag.endswith("map"):
            return (node.tag, [(shape(k), shape(v)) for k, v in node.value])
        return (node.tag, [shape(c) for c in node.value])

    text = ("apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {name: a}\n"
            "spec:\n  selector: {cgroupPath: '/a/*'}\n  egress:\n"
            "    - to: [{cidr: 10.0.0.0/8}]\n      ports: [{port: 443}]\n---\n---\nfoo: [1, 'x']\n")
    fast = _compose_libyaml(text)
    slow, err = _compose_python(text, "p.yaml")
    assert err is None and fast is not None
    assert [shape(n) for n in fast] == [shape(n) for n in slow]
    # anchors, deep nesting and syntax errors are left to the composer that words the error
    assert _compose_libyaml("a: &x [1]\nb: *x\n") is None
    assert _compose_libyaml("a: *x\n") is None
    assert _compose_libyaml("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)) + "  " * 40 + "v\n") is None
    assert _compose_libyaml("[" * 40 + "]" * 40) is None
    assert _compose_libyaml("a: [\n") is None


def test_tickets_on_rules_and_policies(tmp_path):
    """metadata.ticket is the default of every rule's ticket; a rule's own ticket wins."""
    (tmp_path / "p.yaml").write_text(
        "apiVersion: hostagent.io/v1\nkind: EgressPolicy\n"
        "metadata: {name: a, ticket: CHG-1}\n"
        "spec:\n  selector: {cgroupPath: /a}\n  egress:\n"
        "    - {to: [{cidr: 10.0.0.0/8}], ticket: 'https://jira.example/CHG-2'}\n"
        "    - {to: [{cidr: 10.1.0.0/16}]}\n")
    (p,) = load_policy_dir(str(tmp_path))
    assert p.ticket == "CHG-1"
    assert [r.ticket for r in p.egress] == ["https://jira.example/CHG-2", None]
    from hostagent.policy.compile import compile_policies
    assert compile_policies([p], ())["a"].rule_tickets == ("https://jira.example/CHG-2", "CHG-1")
    (tmp_path / "p.yaml").write_text(
        "apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {name: a, ticket: ''}\n"
        "spec:\n  selector: {cgroupPath: /a}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:3: metadata.ticket: expected 1-256"):
        load_policy_dir(str(tmp_path))


# --- the fast paths: long CIDR lists, per-file reuse ----------------------------------------
#
# Each must give exactly what the plain path gives: the same Policy objects (lines included,
# they are part of ==) for valid files, the same errors for invalid ones.


def _outcome(text: str) -> list[Policy] | list[str]:
    """Policies, or the rendered errors."""
    try:
        return load_policy_text(text, PATH)
    except PolicyErrors as err:
        return [str(e) for e in err.errors]


def _both_paths(text: str, monkeypatch) -> tuple[object, object, bool]:
    """(bulk path, plain path, whether the bulk path applied) for text."""
    monkeypatch.setattr(load_module, "BULK_MIN_RUN", 3)
    used = load_module._compose_bulk(text) is not None
    fast = _outcome(text)
    with monkeypatch.context() as m:
        m.setattr(load_module, "_compose_bulk", lambda text: None)
        plain = _outcome(text)
    return fast, plain, used


def _long_list(values, indent: int = 8) -> str:
    return "".join(f"{' ' * indent}- cidr: {v}\n" for v in values)


def _doc(to: str, name: str = "agent-a", rest: str = "      ports: [{port: 443}]\n") -> str:
    return (f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  selector: {{cgroupPath: /w/{name}}}\n  egress:\n    - name: r\n"
            f"      to:\n{to}{rest}")


V4 = [f"10.{i // 256}.{i % 256}.0/24" for i in range(40)]
V6 = [f"2001:db8:{i:x}::/48" for i in range(40)]

BULK_VALID = {
    "ipv4 /24": _doc(_long_list(V4)),
    "bare dotted quads": _doc(_long_list(f"192.0.2.{i}" for i in range(40))),
    "ipv6 canonical": _doc(_long_list(V6)),
    "ipv6 not canonical (upper case, zeros)": _doc(_long_list(f"2001:DB8:{i:04x}::/48" for i in range(40))),
    "mixed families and /0": _doc(_long_list(["0.0.0.0/0", "::/0", *V4[:10], *V6[:10], "1.2.3.4"])),
    "trailing spaces": _doc("".join(f"        - cidr: {v}   \n" for v in V4)),
    "indentless list": _doc(_long_list(V4, indent=6)),
    "two runs split by a comment": _doc(_long_list(V4[:10]) + "        # half\n" + _long_list(V4[10:])),
    "two runs split by an fqdn": _doc(_long_list(V4[:10]) + "        - fqdn: example.com\n" + _long_list(V4[10:])),
    "run at the end of the file": _doc(_long_list(V4), rest=""),
    "run at the end without a newline": _doc(_long_list(V4), rest="").rstrip("\n"),
    "duplicates": _doc(_long_list(V4 + V4)),
    "two rules, two documents": _doc(_long_list(V4), rest="    - to:\n" + _long_list(V6) + "      ports: [{port: 80}]\n")
    + "---\n" + _doc(_long_list(V4[::-1]), name="b"),
    "block metadata with a ticket": _doc(_long_list(V4)).replace(
        "metadata: {name: agent-a}", "metadata:\n  name: agent-a\n  ticket: CHG-1"),
}

BULK_INVALID = {
    "host bits": _doc(_long_list(V4[:5] + ["10.0.0.1/24"] + V4[5:])),
    "/33": _doc(_long_list(V4[:5] + ["10.0.0.0/33"] + V4[5:])),
    "not an address": _doc(_long_list(V4[:5] + ["10.0.0.256/32", "1.2.3/24"] + V4[5:])),
    "ipv6 host bits": _doc(_long_list(V6[:5] + ["2001:db8::1/32"] + V6[5:])),
    "first and last bad": _doc(_long_list(["10.0.0.1/8"] + V4 + ["10.0.0.1/8"])),
    "a list under metadata": _doc(_long_list(V4)).replace(
        "metadata: {name: agent-a}", "metadata:\n  name: agent-a\n  extra:\n" + _long_list(V4, indent=4)),
    "a list of ports": _doc(_long_list(V4[:2]), rest="      ports:\n" + _long_list(V4)),
    "a list as a top-level document": "---\n" + _long_list(V4, indent=0),
    "a run inside a block scalar": _doc(_long_list(V4[:3])).replace(
        "kind: EgressPolicy\n", "kind: |\n" + _long_list(V4, indent=2)),
    "a run continued by a plain scalar": _doc(_long_list(V4) + "            more\n"),
    "a run in a flow list": _doc("        [\n" + _long_list(V4) + "        ]\n"),
    "errors before and after": _doc(_long_list(V4)).replace("kind: EgressPolicy", "kind: Egress")
    + "---\n" + _doc(_long_list(V4), rest="      ports: [{port: 0}]\n"),
    "rule errors and bad cidrs": _doc(_long_list(["1.2.3.4/8"] + V4), rest="      ports: [{port: 0}]\n      other: 1\n"),
    "two to lists in a rule": _doc(_long_list(V4), rest="      to:\n" + _long_list(V6 + ["::1/64"])),
    "two specs": _doc(_long_list(V4)) + "spec:\n  egress:\n    - to:\n" + _long_list(V6),
}


@pytest.mark.parametrize("text", BULK_VALID.values(), ids=BULK_VALID.keys())
def test_bulk_path_gives_the_same_policies(text, monkeypatch):
    fast, plain, used = _both_paths(text, monkeypatch)
    assert plain and isinstance(plain[0], Policy), plain
    assert fast == plain
    assert used


# where libyaml does not confirm the runs, the text is composed as written
BULK_NOT_APPLIED = {"a list under metadata", "a list of ports", "a list as a top-level document",
                    "a run inside a block scalar", "a run continued by a plain scalar",
                    "a run in a flow list"}


@pytest.mark.parametrize("name", BULK_INVALID)
def test_bulk_path_gives_the_same_errors(name, monkeypatch):
    fast, plain, used = _both_paths(BULK_INVALID[name], monkeypatch)
    assert plain and isinstance(plain[0], str), plain
    assert fast == plain
    assert used == (name not in BULK_NOT_APPLIED)


def test_bulk_path_applies_to_the_bench_policy(monkeypatch):
    """The case it is for: a long list in the bench's layout; and the errors of its lines."""
    from bench import rules

    text = rules.policy_yaml("big", "/big", rules.allowlist(2000, seed=3))
    assert load_module._compose_bulk(text) is not None
    fast, plain, _ = _both_paths(text, monkeypatch)
    assert fast == plain and len(fast[0].egress[0].to) == 2000
    bad = text.replace("- cidr: 127.0.0.1/32\n", "- cidr: 127.0.0.1/8\n", 1)
    fast, plain, _ = _both_paths(bad, monkeypatch)
    assert fast == plain == [f"{PATH}:9: spec.egress[0].to[0].cidr: '127.0.0.1/8': host bits set "
                             "(did you mean 127.0.0.0/8?)"]
    lines = text.split("\n")
    lines[700] = lines[700].replace("/32", "/33")
    fast, plain, _ = _both_paths("\n".join(lines), monkeypatch)
    assert fast == plain and len(fast) == 1 and fast[0].startswith(f"{PATH}:701: spec.egress[0].to[692].cidr:")


def test_bulk_path_needs_libyaml_to_confirm_every_run(monkeypatch):
    monkeypatch.setattr(load_module, "BULK_MIN_RUN", 3)
    assert load_module._compose_bulk(BULK_VALID["ipv4 /24"]) is not None
    for text in (BULK_INVALID["a list under metadata"], BULK_INVALID["a run inside a block scalar"],
                 BULK_INVALID["a run continued by a plain scalar"], BULK_INVALID["a list of ports"],
                 BULK_VALID["ipv4 /24"].replace("\n", "\r\n"), BULK_VALID["ipv4 /24"] + "x: &a 1\n"):
        assert load_module._compose_bulk(text) is None, text


_cidr_lines = st.lists(
    st.one_of(
        st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(0, 34)),
        st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1), st.integers(0, 130)),
        st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(0, 2**32 - 1)),
        st.sampled_from(["10.0.0.0/8", "::/0", "1.2.3.4/32", "fe80::/10", "2001:DB8::/32", "01.2.3.4/32"]),
    ),
    min_size=3, max_size=12,
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["run", "comment", "fqdn", "blank", "junk", "deeper"]),
                          _cidr_lines), min_size=1, max_size=4), st.sampled_from([6, 8, 10]))
def test_fuzz_bulk_path_agrees_with_the_plain_path(parts, indent):
    """Runs of list lines with random values, between other kinds of line, at an indentation
    that may or may not be the list's: both paths must agree, policies or errors."""
    body = ""
    for kind, values in parts:
        body += _long_list(values, indent if kind != "deeper" else indent + 2)
        body += {"run": "", "comment": f"{' ' * indent}# c\n", "fqdn": f"{' ' * indent}- fqdn: a.example\n",
                 "blank": "\n", "junk": f"{' ' * indent}junk: 1\n", "deeper": ""}[kind]
    text = _doc(body)
    with pytest.MonkeyPatch.context() as m:
        fast, plain, _ = _both_paths(text, m)
    assert fast == plain


@FUZZ
@given(st.from_regex(load_module._BULK_VALUE, fullmatch=True))
def test_bulk_values_are_always_strings(value):
    """The bulk path reads its values as strings without asking YAML: YAML must agree."""
    from yaml.nodes import ScalarNode

    for loader in (yaml.SafeLoader(""), yaml.CSafeLoader("")):
        assert loader.resolve(ScalarNode, value, (True, False)) == "tag:yaml.org,2002:str"


@FUZZ
@given(st.one_of(
    st.builds(lambda a, n, s: f"{ipaddress.IPv4Address(a)}{s}{n}", st.integers(0, 2**32 - 1),
              st.integers(0, 40), st.sampled_from(["/", "/0", "//", ""])),
    st.builds(lambda a, n, up: (f"{ipaddress.IPv6Address(a)}/{n}".upper() if up else
                                f"{ipaddress.IPv6Address(a).exploded}/{n}"),
              st.integers(0, 2**128 - 1), st.integers(0, 130), st.booleans()),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1), st.integers(0, 130)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(96, 128)),
    st.text(alphabet="0123456789abcdefABCDEF:./%", max_size=45),
))
def test_fuzz_canonical_networks_agree_with_the_converter(text):
    """The loader's own reading of common CIDR spellings is converters.cidr's, or none."""
    from hostagent import converters

    key = load_module._canonical_key(text)
    try:
        want = converters.cidr(text)
    except ValueError:
        assert key is None
        with pytest.raises(ValueError):
            load_module.cidr(text)
        return
    if key is not None:
        fast = CIDRPeer.from_key(*key)
        assert fast == CIDRPeer(want) and hash(fast) == hash(CIDRPeer(want))
        assert type(fast.network) is type(want) and fast.network == want and str(fast.network) == str(want)
        assert vars(fast.network).keys() == vars(want).keys()
    assert load_module.cidr(text) == want


def test_cidr_peer_is_a_frozen_value():
    """CIDRPeer keeps its network as integers until asked (model.CIDRPeer): it must still be
    what a frozen dataclass of one field was."""
    import copy
    import dataclasses
    import pickle

    net = ipaddress.ip_network("10.0.0.0/8")
    lazy, eager = CIDRPeer.from_key(4, 10 << 24, 8), CIDRPeer(network=net)
    assert lazy == eager and hash(lazy) == hash(eager) and lazy.key == eager.key == (4, 10 << 24, 8)
    assert repr(lazy) == repr(eager) == "CIDRPeer(network=IPv4Network('10.0.0.0/8'))"
    assert lazy.network == net and lazy.network is lazy.network
    assert lazy != CIDRPeer(ipaddress.ip_network("10.0.0.0/9")) and lazy != net
    assert CIDRPeer(ipaddress.ip_network("::/0")) != CIDRPeer(ipaddress.ip_network("0.0.0.0/0"))
    assert pickle.loads(pickle.dumps(lazy)) == lazy and copy.deepcopy(lazy) == lazy
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.key = (4, 0, 0)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del lazy.key
    with pytest.raises(TypeError):
        CIDRPeer("10.0.0.0/8")  # type: ignore[arg-type]
    match lazy:
        case CIDRPeer(network=n):
            assert n == net


def _touch_like(path: Path, like: os.stat_result) -> None:
    os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns))


def test_dir_loader_parses_only_changed_files(tmp_path):
    write(tmp_path, "a.yaml", _doc(_long_list(V4), name="a"))
    write(tmp_path, "b.yaml", _doc(_long_list(V6), name="b"))
    loader = load_module.PolicyDirLoader(tmp_path)
    first = loader.load()
    assert loader.parsed == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    assert loader.files == [(str(tmp_path / n), (tmp_path / n).read_bytes()) for n in ("a.yaml", "b.yaml")]
    again = loader.load()
    assert loader.parsed == [] and again == first
    assert all(x is y for x, y in zip(again, first))        # the very same objects
    write(tmp_path, "b.yaml", _doc(_long_list(V6[:-1] + ["2001:db8:ffff::/48"]), name="b"))
    third = loader.load()
    assert loader.parsed == [str(tmp_path / "b.yaml")]
    assert third[0] is first[0] and third[1] != first[1]
    assert third == load_policy_dir(tmp_path)
    # the unchanged lines of the edited file kept their peers
    old, new = first[1].egress[0].to, third[1].egress[0].to
    assert all(x is y for x, y in zip(old[:-1], new[:-1])) and old[-1] != new[-1]


def test_dir_loader_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    """Same size, same mtime (and inode): the content decides."""
    path = write(tmp_path, "a.yaml", _doc(_long_list(V4), name="a"))
    loader = load_module.PolicyDirLoader(tmp_path)
    [before] = loader.load()
    st0 = path.stat()
    text = path.read_text().replace("10.0.39.0/24", "10.0.93.0/24")
    with open(path, "r+") as f:   # in place: the same inode
        f.write(text)
    _touch_like(path, st0)
    st1 = path.stat()
    assert (st1.st_size, st1.st_mtime_ns, st1.st_ino) == (st0.st_size, st0.st_mtime_ns, st0.st_ino)
    [after] = loader.load()
    assert loader.parsed == [str(path)]
    assert after != before and str(after.egress[0].to[39].network) == "10.0.93.0/24"
    assert [after] == load_policy_dir(tmp_path)


def test_dir_loader_files_come_and_go_and_errors_stay(tmp_path):
    a = write(tmp_path, "a.yaml", policy_doc("a", "/a"))
    loader = load_module.PolicyDirLoader(tmp_path)
    assert [p.name for p in loader.load()] == ["a"]
    b = write(tmp_path, "b.yaml", policy_doc("b", "/b", "  mode: x\n"))
    for _ in range(2):   # the broken file's errors come back from the cache, unchanged
        with pytest.raises(PolicyErrors) as info:
            loader.load()
        assert [str(e) for e in info.value.errors] == [f"{b}:8: spec.mode: 'x' is not a mode (expected enforce or audit)"]
    assert loader.parsed == []
    assert loader.files == [(str(a), a.read_bytes())]   # still the last good load's
    # an unchanged file still clashes with a changed one: checks across files run every time
    write(tmp_path, "b.yaml", policy_doc("a", "/b"))
    with pytest.raises(PolicyErrors, match="policy name 'a' is already used"):
        loader.load()
    write(tmp_path, "b.yaml", policy_doc("b", "/b"))
    assert [p.name for p in loader.load()] == ["a", "b"]
    a.unlink()
    assert [p.name for p in loader.load()] == ["b"] and loader.files == [(str(b), b.read_bytes())]
    b.write_bytes(b"\xff")
    with pytest.raises(PolicyErrors, match="invalid UTF-8"):
        loader.load()
    b.unlink()
    assert loader.load() == [] and loader.files == []


def test_dir_loader_is_load_policy_dir(tmp_path):
    """Everything load_policy_dir promises holds for the loader, reloaded or not."""
    for name in ("valid", "invalid"):
        loader = load_module.PolicyDirLoader(DATA / name)
        for _ in range(2):
            try:
                got = loader.load()
            except PolicyErrors as err:
                got = [str(e) for e in err.errors]
            try:
                want = load_policy_dir(DATA / name)
            except PolicyErrors as err:
                want = [str(e) for e in err.errors]
            assert got == want
    with pytest.raises(ValueError):
        load_module.PolicyDirLoader(tmp_path, fqdn_min_labels=0)


def test_gc_paused_restores_the_collector():
    import gc

    assert gc.isenabled()
    with load_module.gc_paused():
        assert not gc.isenabled()
        with load_module.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), load_module.gc_paused():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with load_module.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gc_paused_moves_what_it_built_to_the_oldest_generation():
    """So that no young collection walks a freshly loaded policy again. Where the process froze
    its heap on purpose (the agent, once started), what was built is frozen beside it and the
    earlier freeze stays."""
    import gc

    with load_module.gc_paused():
        built = [[i] for i in range(1000)]
    assert any(o is built for o in gc.get_objects(generation=2))
    assert not any(o is built for o in gc.get_objects(generation=0))
    assert gc.get_freeze_count() == 0
    sentinel = [[]]
    gc.freeze()
    try:
        with load_module.gc_paused():
            more = [[i] for i in range(1000)]
        assert gc.get_freeze_count() > 0 and more
        assert not any(o is sentinel for o in gc.get_objects())   # still frozen
        assert not any(o is more for o in gc.get_objects())       # and the new ones too
    finally:
        gc.unfreeze()
