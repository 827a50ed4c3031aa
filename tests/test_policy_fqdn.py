"""fqdn and fqdnPattern peers: YAML -> model, file:line errors, the node's pattern limit, and
what the compiler makes of them (no LPM entries; a name matcher and each rule's ports)."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from hostagent.bpf.abi import MAX_PORT_RANGES, as_v6_network
from hostagent.dns.names import NameMatcher
from hostagent.errors import PolicyCapacityError
from hostagent.policy import (
    CIDRPeer,
    FQDNPatternPeer,
    FQDNPeer,
    PolicyErrors,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
)
from hostagent.policy.compile import ALL_PORTS, FqdnRules, PortEntry, compile_ruleset

PATH = "policies/a.yaml"
META = [ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128")]

# Line numbers are part of the expectations below: the peers start on line 8.
HEAD = """\
apiVersion: hostagent.io/v1
kind: EgressPolicy
metadata: {name: a}
spec:
  selector: {cgroupPath: /a}
  egress:
    - to:
"""


def policy_text(peers: str, ports: str = "      ports: [{port: 443, protocol: TCP}]\n") -> str:
    return HEAD + peers + ports


def load(peers: str, **kwargs):
    return load_policy_text(policy_text(peers), PATH, **kwargs)[0]


def errors_of(peers: str, **kwargs) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        load(peers, **kwargs)
    return [str(e) for e in info.value.errors]


def key(cidr: str):
    n = as_v6_network(ipaddress.ip_network(cidr))
    return (int(n.network_address), n.prefixlen)


# --- YAML -> model ----------------------------------------------------------------------------


def test_fqdn_peers_load_normalised_in_order():
    p = load(
        "        - fqdn: API.OpenAI.com.\n"
        "        - fqdnPattern: \"*.Blob.Core.Windows.Net\"\n"
        "        - cidr: 10.0.0.0/8\n"
        "        - fqdn: kubernetes\n"
    )
    rule = p.egress[0]
    assert rule.to == (
        FQDNPeer("api.openai.com"),
        FQDNPatternPeer("*.blob.core.windows.net"),
        CIDRPeer(ipaddress.ip_network("10.0.0.0/8")),
        FQDNPeer("kubernetes"),
    )
    assert rule.cidrs == (CIDRPeer(ipaddress.ip_network("10.0.0.0/8")),)
    assert rule.fqdns == (FQDNPeer("api.openai.com"), FQDNPatternPeer("*.blob.core.windows.net"),
                          FQDNPeer("kubernetes"))
    assert not rule.any_destination


def test_a_rule_of_names_only_is_not_any_destination():
    rule = load("        - fqdn: api.openai.com\n").egress[0]
    assert rule.cidrs == () and not rule.any_destination


def test_peers_are_frozen():
    peer = FQDNPeer("example.com")
    with pytest.raises(AttributeError):
        peer.name = "other.com"  # type: ignore[misc]


@pytest.mark.parametrize(
    "peer, min_labels, expected",
    [
        ("fqdnPattern: '*.example.com'", 2, FQDNPatternPeer("*.example.com")),
        ("fqdnPattern: '*.*.example.com'", 2, FQDNPatternPeer("*.*.example.com")),
        ("fqdnPattern: '*.com'", 1, FQDNPatternPeer("*.com")),
        ("fqdnPattern: '*.a.example.com'", 3, FQDNPatternPeer("*.a.example.com")),
        ("fqdn: _sip._tcp.example.com", 2, FQDNPeer("_sip._tcp.example.com")),
        ("fqdn: xn--bcher-kva.example", 2, FQDNPeer("xn--bcher-kva.example")),
        ("fqdn: localhost", 2, FQDNPeer("localhost")),
    ],
)
def test_accept(peer, min_labels, expected):
    assert load(f"        - {peer}\n", fqdn_min_labels=min_labels).egress[0].to == (expected,)


# (peer line, fqdn_min_labels, how the error after "file:line: " starts)
REJECT = [
    ("fqdn: ''", 2, "spec.egress[0].to[0].fqdn: empty name"),
    ("fqdn:", 2, "spec.egress[0].to[0].fqdn: expected a string, got an empty value (null)"),
    ("fqdn: 443", 2, "spec.egress[0].to[0].fqdn: expected a string, got the integer 443; quote it to make it a string"),
    ("fqdn: [a.com]", 2, "spec.egress[0].to[0].fqdn: expected a string, got a list"),
    ("fqdn: a..example.com", 2, "spec.egress[0].to[0].fqdn: 'a..example.com': has an empty label ('..')"),
    ("fqdn: .example.com", 2, "spec.egress[0].to[0].fqdn: '.example.com': starts with '.'"),
    ("fqdn: 'api.openai.com '", 2, "spec.egress[0].to[0].fqdn: 'api.openai.com ': contains whitespace (' ')"),
    ("fqdn: 'api\\.openai\\.com'", 2, "spec.egress[0].to[0].fqdn: 'api\\\\.openai\\\\.com': '\\\\' cannot appear in a DNS name: names and patterns are not regular expressions"),
    ("fqdn: '^api.openai.com$'", 2, "spec.egress[0].to[0].fqdn: '^api.openai.com$': '^' cannot appear in a DNS name"),
    ("fqdn: '*.example.com'", 2, "spec.egress[0].to[0].fqdn: '*.example.com': '*' is a wildcard, which only fqdnPattern allows (use fqdnPattern for a pattern)"),
    ("fqdn: https://api.openai.com/", 2, "spec.egress[0].to[0].fqdn: 'https://api.openai.com/': ':' cannot appear in a DNS name"),
    ("fqdn: 10.0.0.1", 2, "spec.egress[0].to[0].fqdn: '10.0.0.1': ends in an all-digit label, so it reads as an IP address (use a cidr peer for addresses)"),
    ("fqdn: bücher.example", 2, "spec.egress[0].to[0].fqdn: 'bücher.example': non-ASCII characters; write internationalised names in their A-label form: 'xn--bcher-kva.example'"),
    ("fqdn: xn--zzzz.example", 2, "spec.egress[0].to[0].fqdn: 'xn--zzzz.example': label 'xn--zzzz' starts with 'xn--' but is not a valid A-label (invalid punycode)"),
    ("fqdn: a_b.example.com", 2, "spec.egress[0].to[0].fqdn: 'a_b.example.com': label 'a_b': '_' may only start a label"),
    ("fqdnPattern: '*'", 2, "spec.egress[0].to[0].fqdnPattern: '*': too broad: 0 fixed labels after the '*', and this node requires at least 2 (dns.fqdnPatternMinLabels)"),
    ("fqdnPattern: '*.com'", 2, "spec.egress[0].to[0].fqdnPattern: '*.com': too broad: 1 fixed label after the '*', and this node requires at least 2 (dns.fqdnPatternMinLabels)"),
    ("fqdnPattern: '*.example.com'", 3, "spec.egress[0].to[0].fqdnPattern: '*.example.com': too broad: 2 fixed labels after the '*', and this node requires at least 3 (dns.fqdnPatternMinLabels)"),
    ("fqdnPattern: '*.*.com'", 2, "spec.egress[0].to[0].fqdnPattern: '*.*.com': too broad: 1 fixed label"),
    ("fqdnPattern: 'a*.example.com'", 2, "spec.egress[0].to[0].fqdnPattern: 'a*.example.com': '*' must be a whole label, as in '*.example.com'; partial wildcards such as 'a*' are not supported"),
    ("fqdnPattern: '*foo.com'", 2, "spec.egress[0].to[0].fqdnPattern: '*foo.com': '*' must be a whole label"),
    ("fqdnPattern: 'a.*.example.com'", 2, "spec.egress[0].to[0].fqdnPattern: 'a.*.example.com': '*' may only be the leftmost label(s), as in '*.example.com'"),
    ("fqdnPattern: '**.example.com'", 2, "spec.egress[0].to[0].fqdnPattern: '**.example.com': '**' is not a wildcard: a single '*' label already matches one or more labels"),
    ("fqdnPattern: example.com", 2, "spec.egress[0].to[0].fqdnPattern: 'example.com': has no '*' label; use fqdn for a single name"),
    ("fqdnPattern: '.*\\.example\\.com'", 2, "spec.egress[0].to[0].fqdnPattern: '.*\\\\.example\\\\.com': '\\\\' cannot appear in a DNS name: names and patterns are not regular expressions"),
    ("fqdnPattern: ''", 2, "spec.egress[0].to[0].fqdnPattern: empty name"),
    ("{cidr: 10.0.0.0/8, fqdn: example.com}", 2, "spec.egress[0].to[0]: expected exactly one of: cidr, fqdn, fqdnPattern (this entry has cidr and fqdn; write each peer as its own list item)"),
    ("{fqdnPattern: '*.example.com', cidr: 10.0.0.0/8}", 2, "spec.egress[0].to[0]: expected exactly one of: cidr, fqdn, fqdnPattern (this entry has fqdnPattern and cidr; write each peer as its own list item)"),
    ("{fqdn: a.example.com, fqdnPattern: '*.example.com'}", 2, "spec.egress[0].to[0]: expected exactly one of: cidr, fqdn, fqdnPattern (this entry has fqdn and fqdnPattern; write each peer as its own list item)"),
    ("FQDN: example.com", 2, "spec.egress[0].to[0]: unknown key 'FQDN' (allowed keys: cidr, fqdn, fqdnPattern)"),
    ("fqdnpattern: '*.example.com'", 2, "spec.egress[0].to[0]: unknown key 'fqdnpattern' (allowed keys: cidr, fqdn, fqdnPattern); did you mean 'fqdnPattern'?"),
]


@pytest.mark.parametrize("peer, min_labels, message", REJECT)
def test_reject(peer, min_labels, message):
    errors = errors_of(f"        - {peer}\n", fqdn_min_labels=min_labels)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{PATH}:8: {message}"), errors


def test_every_bad_peer_is_reported_with_its_line():
    errors = errors_of(
        "        - fqdn: ok.example.com\n"
        "        - fqdn: a..b\n"
        "        - fqdnPattern: '*.com'\n"
        "        - cidr: 10.0.0.1/8\n"
    )
    assert [e.split(": ", 1)[0] for e in errors] == [f"{PATH}:9", f"{PATH}:10", f"{PATH}:11"]
    assert "to[1].fqdn" in errors[0] and "to[2].fqdnPattern" in errors[1] and "to[3].cidr" in errors[2]


def test_the_limit_reaches_files_and_directories(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text("        - fqdnPattern: '*.example.com'\n"))
    assert load_policy_file(tmp_path / "a.yaml")[0].egress[0].to == (FQDNPatternPeer("*.example.com"),)
    assert load_policy_dir(tmp_path)[0].name == "a"
    for loader, arg in ((load_policy_file, tmp_path / "a.yaml"), (load_policy_dir, tmp_path)):
        with pytest.raises(PolicyErrors, match=r"a\.yaml:8: .*too broad: 2 fixed labels .* at least 3"):
            loader(arg, fqdn_min_labels=3)


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2", None])
def test_a_bad_limit_is_the_callers_mistake(value):
    with pytest.raises(ValueError, match="fqdn_min_labels must be an integer >= 1"):
        load_policy_text(policy_text("        - fqdn: a.example.com\n"), PATH, fqdn_min_labels=value)


# --- compile ----------------------------------------------------------------------------------


def compiled(egress: str):
    text = ("apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {name: a}\n"
            "spec:\n  selector: {cgroupPath: /a}\n  egress:\n" + egress)
    return compile_ruleset(load_policy_text(text)[0], META)


def test_a_rule_of_names_only_adds_no_lpm_entry():
    rs = compiled("    - to: [{fqdn: api.openai.com}, {fqdnPattern: '*.example.com'}]\n"
                  "      ports: [{port: 443}]\n")
    assert rs.entries == {} and len(rs) == 0
    assert key("0.0.0.0/0") not in rs.entries and key("::/0") not in rs.entries
    assert isinstance(rs.fqdn, FqdnRules)
    assert rs.fqdn.matcher == NameMatcher([(0, "api.openai.com", False), (0, "*.example.com", True)])
    assert rs.fqdn.ports == {0: (PortEntry(443, 443, 1, 0),)}
    assert rs.fqdn.matcher.match("a.b.example.com") == {0}


def test_a_mixed_rule_keeps_its_cidrs_and_adds_its_names():
    rs = compiled("    - to: [{cidr: 10.0.0.0/8}, {fqdn: api.openai.com}]\n"
                  "      ports: [{port: 443}]\n"
                  "    - to: [{fqdn: pypi.org}]\n")
    ports, grant = rs.entries[key("10.0.0.0/8")]
    assert ports == (PortEntry(443, 443, 1, 0),) and not grant
    assert set(rs.entries) == {key("10.0.0.0/8")}  # rule 1 (names only, all ports) adds nothing
    assert rs.fqdn is not None
    assert rs.fqdn.ports == {0: (PortEntry(443, 443, 1, 0),), 1: (PortEntry(*ALL_PORTS, 1),)}
    assert rs.fqdn.matcher.match("pypi.org") == {1}
    assert rs.fqdn.matcher.match("api.openai.com") == {0}


def test_rules_without_names_still_mean_what_they_did():
    rs = compiled("    - ports: [{port: 53, protocol: UDP}]\n    - to: [{fqdn: pypi.org}]\n")
    assert key("0.0.0.0/0") in rs.entries and key("::/0") in rs.entries  # rule 0 omits 'to'
    assert {e.rule for e in rs.entries[key("0.0.0.0/0")][0]} == {0}
    assert rs.fqdn is not None and set(rs.fqdn.ports) == {1}


def test_a_policy_without_names_has_no_fqdn_rules_and_its_old_digest():
    rs = compiled("    - to: [{cidr: 10.0.0.0/8}]\n      ports: [{port: 443}]\n")
    assert rs.fqdn is None
    # The digest formula of CIDR-only policies is unchanged: installed rulesets keep matching.
    old = hashlib.sha256(repr((rs.rule_names, sorted(rs.entries.items()))).encode()).hexdigest()
    assert rs.digest == old


def test_digest_changes_when_only_a_name_changes():
    base = "    - to: [{cidr: 10.0.0.0/8}, {fqdn: api.openai.com}]\n      ports: [{port: 443}]\n"
    a, b = compiled(base), compiled(base)
    assert a.digest == b.digest and a.fqdn == b.fqdn
    digests = {
        a.digest,
        compiled(base.replace("api.openai.com", "api.anthropic.com")).digest,
        compiled(base.replace("{fqdn: api.openai.com}", "{fqdnPattern: '*.openai.com'}")).digest,
        compiled(base.replace("443", "8443")).digest,
        compiled(base.replace(", {fqdn: api.openai.com}", "")).digest,
    }
    assert len(digests) == 5


def test_portentries_is_the_sorted_union():
    rs = compiled("    - to: [{fqdnPattern: '*.example.com'}]\n"
                  "      ports: [{port: 443}, {port: 80}]\n"
                  "    - to: [{fqdn: a.example.com}]\n"
                  "      ports: [{port: 443}, {port: 53, protocol: UDP}]\n"
                  "    - to: [{fqdn: b.example.com}]\n")
    fq = rs.fqdn
    assert fq is not None
    assert fq.ports[0] == (PortEntry(80, 80, 1, 0), PortEntry(443, 443, 1, 0))  # sorted per rule
    assert fq.portentries(fq.matcher.match("a.example.com")) == (
        PortEntry(53, 53, 2, 1), PortEntry(80, 80, 1, 0), PortEntry(443, 443, 1, 0), PortEntry(443, 443, 1, 1))
    assert fq.portentries(fq.matcher.match("b.example.com")) == (
        PortEntry(*ALL_PORTS, 2), PortEntry(80, 80, 1, 0), PortEntry(443, 443, 1, 0))
    assert fq.portentries(fq.matcher.match("other.org")) == ()
    with pytest.raises(KeyError):
        fq.portentries([7])


def test_names_do_not_grant_metadata_endpoints():
    rs = compiled("    - to: [{fqdn: metadata.google.internal}]\n      ports: [{port: 80}]\n")
    assert rs.entries == {}  # the resolver's answers go through the metadata block at runtime


def test_fqdn_rules_whose_ports_cannot_share_one_entry_are_a_capacity_error():
    rules = "".join(f"    - to: [{{fqdn: h{i}.example.com}}]\n      ports: [{{port: {1000 + i}}}]\n"
                    for i in range(MAX_PORT_RANGES))
    assert compiled(rules).fqdn is not None  # exactly at the limit
    extra = "    - to: [{fqdnPattern: '*.example.org'}]\n      ports: [{port: 443}]\n"
    with pytest.raises(PolicyCapacityError) as info:
        compiled(rules + extra)
    message = str(info.value)
    assert message.startswith("<string>:7: policy a: its 17 fqdn/fqdnPattern rules have 17 port ranges together")
    assert f"at most {MAX_PORT_RANGES} per destination" in message


def test_cidr_rules_do_not_count_against_the_fqdn_limit():
    rules = "".join(f"    - to: [{{cidr: 10.{i}.0.0/16}}]\n      ports: [{{port: {1000 + i}}}]\n"
                    for i in range(MAX_PORT_RANGES + 4))
    rs = compiled(rules + "    - to: [{fqdn: a.example.com}]\n")
    assert rs.fqdn is not None and rs.fqdn.ports == {MAX_PORT_RANGES + 4: (PortEntry(*ALL_PORTS, 20),)}


# --- policy check -----------------------------------------------------------------------------


@pytest.fixture
def check(tmp_path, capsys):
    """Runs ``hostagent policy check`` on one policy with a node config; returns (rc, output)."""
    from hostagent.cli import main

    policies = tmp_path / "policies"
    policies.mkdir()

    def run(peer: str, config: str) -> tuple[int, str]:
        (policies / "a.yaml").write_text(policy_text(f"        - {peer}\n"))
        (tmp_path / "node.yaml").write_text(config)
        rc = main(["policy", "check", "--config", str(tmp_path / "node.yaml"), str(policies)])
        out = capsys.readouterr()
        return rc, out.out + out.err

    return run


def test_policy_check_uses_the_node_limit(check):
    rc, out = check("fqdnPattern: '*.example.com'", "dns:\n  fqdnPatternMinLabels: 2\n")
    assert rc == 0 and "1 policies, 1 rules: OK" in out
    rc, out = check("fqdnPattern: '*.example.com'", "dns:\n  fqdnPatternMinLabels: 3\n")
    assert rc == 1
    assert "a.yaml:8: spec.egress[0].to[0].fqdnPattern: '*.example.com': too broad: 2 fixed labels" in out
    assert "at least 3 (dns.fqdnPatternMinLabels)" in out


def test_policy_check_default_limit_rejects_a_top_level_domain(check):
    rc, out = check("fqdnPattern: '*.com'", "logLevel: info\n")
    assert rc == 1 and "too broad: 1 fixed label after the '*', and this node requires at least 2" in out
