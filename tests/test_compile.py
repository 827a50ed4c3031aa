"""Policy -> LPM entries and bindings: accept/reject tables, no kernel needed."""

from __future__ import annotations

import ipaddress

import pytest

from hostagent.bpf.abi import BindingMode, as_v6_network
from hostagent.errors import PolicyCapacityError
from hostagent.policy.bind import Binder
from hostagent.policy.compile import compile_ruleset
from hostagent.policy.load import load_policy_text

META = [ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128")]


def one(text: str):
    return load_policy_text(text)[0]


def doc(name, path, egress, extra=""):
    return (f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  selector: {{cgroupPath: \"{path}\"}}\n{extra}  egress:\n{egress}")


def key(cidr):
    n = as_v6_network(ipaddress.ip_network(cidr))
    return (int(n.network_address), n.prefixlen)


def test_nested_prefix_carries_the_ports_of_every_covering_rule():
    p = one(doc("a", "/a", """    - to: [{cidr: 10.0.0.0/8}]
      ports: [{port: 443}]
    - to: [{cidr: 10.1.0.0/16}]
      ports: [{port: 80}]
"""))
    rs = compile_ruleset(p, META)
    inner, grant = rs.entries[key("10.1.0.0/16")]
    assert {(r.first, r.rule) for r in inner} == {(443, 0), (80, 1)}
    assert not grant
    outer, _ = rs.entries[key("10.0.0.0/8")]
    assert {r.first for r in outer} == {443}


def test_metadata_granted_only_by_rules_naming_it():
    p = one(doc("a", "/a", """    - to: [{cidr: 0.0.0.0/0}]
    - to: [{cidr: 169.254.169.254/32}]
      ports: [{port: 80}]
"""))
    rs = compile_ruleset(p, META)
    ports, grant = rs.entries[key("169.254.169.254/32")]
    assert grant
    assert [(r.first, r.last) for r in ports] == [(80, 80)]   # the /0 rule's ports do not leak
    assert not rs.entries[key("0.0.0.0/0")][1]


def test_missing_to_means_any_destination_both_families():
    rs = compile_ruleset(one(doc("a", "/a", "    - ports: [{port: 443}]\n")), META)
    assert key("0.0.0.0/0") in rs.entries and key("::/0") in rs.entries


def test_too_many_port_ranges_for_one_destination_is_a_capacity_error():
    ports = ", ".join(f"{{port: {1000 + i}}}" for i in range(17))
    p = one(doc("a", "/a", f"    - to: [{{cidr: 10.0.0.0/8}}]\n      ports: [{ports}]\n"))
    with pytest.raises(PolicyCapacityError, match="10.0.0.0/8"):
        compile_ruleset(p, META)


def test_digest_changes_with_content_only():
    a = compile_ruleset(one(doc("a", "/a", "    - to: [{cidr: 10.0.0.0/8}]\n")), META)
    b = compile_ruleset(one(doc("a", "/a", "    - to: [{cidr: 10.0.0.0/8}]\n")), META)
    c = compile_ruleset(one(doc("a", "/a", "    - to: [{cidr: 10.0.0.0/9}]\n")), META)
    assert a.digest == b.digest != c.digest


def test_binding_nearest_selection_and_specificity():
    broad = one(doc("broad", "/team/*", "    []\n"))
    narrow = one(doc("narrow", "/team/agent-a", "    []\n", "  mode: audit\n"))
    binder = Binder([broad, narrow], exempt=["/system.slice/**"])
    cgroups = {"/": 1, "/team": 2, "/team/agent-a": 3, "/team/agent-a/child": 4,
               "/team/other": 5, "/system.slice": 6, "/system.slice/x.service": 7}
    b = binder.bind(cgroups)
    assert b[1].policy is None and not b[1].exempt
    assert b[2].policy is None
    assert (b[3].policy, b[3].mode) == ("narrow", BindingMode.AUDIT)
    assert b[4].policy == "narrow"          # descendants inherit
    assert b[5].policy == "broad"
    assert b[6].exempt and b[7].exempt and b[7].policy is None


def test_single_address_rules_are_named_and_broader_ones_are_not():
    from hostagent.policy.load import load_policy_text
    text = """apiVersion: hostagent.io/v1
kind: EgressPolicy
metadata: {name: a}
spec:
  selector: {cgroupPath: /a}
  egress:
    - to: [{cidr: 192.0.2.7/32}, {cidr: 198.51.100.0/24}, {cidr: "2001:db8::1"}]
      ports: [{port: 853}]
"""
    rs = compile_ruleset(load_policy_text(text)[0], [])
    named = {plen: grant for (_, plen), (_, grant) in rs.entries.items()}
    assert named == {128: True, 96 + 24: False}
