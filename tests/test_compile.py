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


# --- the compiler against the straightforward version it replaced ---------------------------
#
# compile_ruleset() groups work by port tuple and prefix length and writes its digest text
# directly; _reference_ruleset() is the plain per-prefix version (as compile.py had it), kept
# here as the specification: entries, digest, fqdn rules and capacity errors must all agree.

import hashlib  # noqa: E402
import random  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hostagent.bpf.abi import MAX_PORT_RANGES, key_prefix  # noqa: E402
from hostagent.policy import compile as compile_module  # noqa: E402
from hostagent.policy.compile import (  # noqa: E402
    ALL_PORTS,
    PortEntry,
    RulesetCache,
    compile_policies,
)


def _reference_ruleset(policy, metadata):
    full = (1 << 128) - 1

    def mask(plen):
        return full ^ ((1 << (128 - plen)) - 1) if plen else 0

    def order(e):
        return (e.first, e.last, e.protocols, e.rule)

    def within(p, outer):
        addr, plen = p
        return any(plen >= olen and addr & mask(olen) == oaddr for oaddr, olen in outer)

    fqdn = compile_module._fqdn_rules(policy)
    meta = [key_prefix(n) for n in metadata]
    any_dest = [key_prefix(ipaddress.ip_network(n)) for n in ("0.0.0.0/0", "::/0")]
    direct = {}
    for rule in policy.egress:
        ports = tuple(PortEntry(p.first, p.last, int(p.protocols), rule.index) for p in rule.ports)
        ports = ports or (PortEntry(*ALL_PORTS, rule.index),)
        prefixes = any_dest if rule.any_destination else [key_prefix(p.network) for p in rule.cidrs]
        for prefix in prefixes:
            direct.setdefault(prefix, set()).update(ports)
    lengths = sorted({plen for _, plen in direct})
    inside_meta = {p for p in direct if within(p, meta)}
    entries = {}
    for prefix in direct:
        addr, plen = prefix
        inside = prefix in inside_meta
        ranges = set()
        for length in lengths:
            if length > plen:
                break
            outer = (addr & mask(length), length)
            if outer in direct and (not inside or outer in inside_meta):
                ranges |= direct[outer]
        if len(ranges) > MAX_PORT_RANGES:
            raise PolicyCapacityError(f"destination {compile_module._show(prefix)} is covered by")
        entries[prefix] = (tuple(sorted(ranges, key=order)), inside or plen == 128)
    names = tuple(rule.name for rule in policy.egress)
    tickets = tuple(rule.ticket or policy.ticket for rule in policy.egress)
    content = (names, sorted(entries.items()))
    if fqdn is not None:
        content += (fqdn.matcher.digest(), sorted(fqdn.ports.items()))
    if any(tickets):
        content += (tickets,)
    return entries, hashlib.sha256(repr(content).encode()).hexdigest(), fqdn, tickets


_NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "169.254.0.0/16",
         "169.254.169.254/32", "169.254.169.0/24", "::/0", "2001:db8::/32", "2001:db8:1::/48",
         "fd00:ec2::254/128", "fd00:ec2::/64", "::ffff:10.1.0.0/112", "192.0.2.0/24", "192.0.2.7/32"]


def _random_policy_text(rng: random.Random) -> str:
    rules = []
    for _ in range(rng.randint(1, 5)):
        rule = []
        if rng.random() < 0.8:   # else: any destination
            peers = [f"{{cidr: '{rng.choice(_NETS)}'}}" for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.2:
                peers.append("{fqdn: api.example.com}")
            rule.append(f"to: [{', '.join(peers)}]")
        if rng.random() < 0.7:
            ports = []
            for _ in range(rng.choice([1, 2, 3, 9])):   # 9: unions may not fit (capacity)
                first = rng.choice([53, 80, 443, 8000, 9000, 9100, 9200, 9300])
                end = f", endPort: {first + rng.randint(0, 10)}" if rng.random() < 0.3 else ""
                ports.append(f"{{port: {first}{end}, protocol: {rng.choice(['TCP', 'UDP', 'ANY'])}}}")
            rule.append(f"ports: [{', '.join(ports)}]")
        if rng.random() < 0.2:
            rule.append("ticket: CHG-9")
        rules.append("    - {" + ", ".join(rule) + "}\n")
    extra = "  mode: audit\n" if rng.random() < 0.3 else ""
    text = doc("p", "/p", "".join(rules), extra)
    if rng.random() < 0.2:
        text = text.replace("metadata: {name: p}", "metadata: {name: p, ticket: CHG-1}")
    return text


def _same_as_reference(policy, meta):
    try:
        want = _reference_ruleset(policy, meta)
    except PolicyCapacityError as err:
        with pytest.raises(PolicyCapacityError) as info:
            compile_ruleset(policy, meta)
        assert str(err) in str(info.value)
        return
    got = compile_ruleset(policy, meta)
    entries, digest, fqdn, tickets = want
    assert got.entries == entries and list(got.entries) == sorted(entries)   # address order
    assert got.digest == digest
    assert got.fqdn == fqdn and got.rule_tickets == tickets
    assert got.rule_names == tuple(r.name for r in policy.egress)


@pytest.mark.parametrize("seed", range(300))
def test_compile_agrees_with_the_reference(seed):
    rng = random.Random(seed)
    meta = rng.choice([META, [], META + [ipaddress.ip_network("10.1.0.0/16")]])
    _same_as_reference(one(_random_policy_text(rng)), meta)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=1, max_size=60),
       st.integers(1, 3))
def test_compile_of_random_prefixes_agrees_with_the_reference(nets, rules):
    """Dense, nested IPv4 prefixes split over rules with different ports."""
    lines = []
    for r in range(rules):
        peers = ", ".join(f"{{cidr: '{ipaddress.ip_network((a, n), strict=False)}'}}"
                          for a, n in nets[r::rules])
        if peers:
            lines.append(f"    - {{to: [{peers}], ports: [{{port: {100 + r}}}]}}\n")
    _same_as_reference(one(doc("a", "/a", "".join(lines))), META)


def test_compile_of_the_bench_policy_agrees_with_the_reference():
    from bench import rules

    p = one(rules.policy_yaml("big", "/big", rules.allowlist(3000, seed=5)))
    compile_ruleset(p, META)
    # neither loading nor compiling a long list builds its ipaddress objects (CIDRPeer.key)
    assert all(peer._network is None for peer in p.egress[0].to)
    _same_as_reference(p, META)


def test_capacity_error_names_the_first_destination_in_yaml_order():
    ports = ", ".join(f"{{port: {1000 + i}}}" for i in range(9))
    more = ", ".join(f"{{port: {2000 + i}}}" for i in range(9))
    p = one(doc("a", "/a", f"    - to: [{{cidr: 10.2.0.0/16}}, {{cidr: 10.1.0.0/16}}]\n      ports: [{ports}]\n"
                           f"    - to: [{{cidr: 10.0.0.0/8}}]\n      ports: [{more}]\n"))
    with pytest.raises(PolicyCapacityError, match="destination 10.2.0.0/16 is covered by 18"):
        compile_ruleset(p, META)


def test_ruleset_cache_compiles_only_new_policy_objects():
    a = one(doc("a", "/a", "    - to: [{cidr: 10.0.0.0/8}]\n"))
    b = one(doc("b", "/b", "    - to: [{cidr: 10.1.0.0/16}]\n"))
    cache = RulesetCache()
    first = cache.compile([a, b], META)
    assert first == compile_policies([a, b], META) and cache.compiled == ["a", "b"]
    again = cache.compile([a, b], META)
    assert cache.compiled == [] and all(again[n] is first[n] for n in "ab")
    # an equal but different object is compiled again (identity, not equality)
    a2 = one(doc("a", "/a", "    - to: [{cidr: 10.0.0.0/8}]\n"))
    third = cache.compile([a2, b], META)
    assert cache.compiled == ["a"] and third["a"] == first["a"] and third["b"] is first["b"]
    # other protected networks: everything again
    cache.compile([a2, b], [])
    assert cache.compiled == ["a", "b"]
    # a failure leaves the cache as it was
    ports = ", ".join(f"{{port: {1000 + i}}}" for i in range(17))
    bad = one(doc("c", "/c", f"    - to: [{{cidr: 10.0.0.0/8}}]\n      ports: [{ports}]\n"))
    with pytest.raises(PolicyCapacityError):
        cache.compile([a2, b, bad], [])
    cache.compile([a2, b], [])
    assert cache.compiled == []
