"""Cloud metadata endpoints, probed inside a network namespace the test creates: the endpoint
addresses live on that namespace's loopback with the test's own listeners behind them, so a
probe the agent fails to stop reaches the test (and is counted), never the real network, and
"blocked" (EPERM, nothing received) is told apart from "nothing there" (ECONNREFUSED)."""

from __future__ import annotations

import pytest

from tests.harness import policy, wait_for

pytestmark = pytest.mark.privileged

IMDS = "169.254.169.254"
IMDS6 = "fd00:ec2::254"
NAT64 = "64:ff9b::a9fe:a9fe"      # 169.254.169.254 in the NAT64 well-known prefix
ECS = "169.254.170.2"


@pytest.fixture
def cloud(node):
    ns = node.namespace([IMDS, IMDS6, NAT64, ECS])
    server = node.workload(None, ns)          # outside the governed subtree
    ports = {addr: server.do("listen_tcp", host=addr, port=80)["port"]
             for addr in (IMDS, IMDS6, NAT64, ECS)}
    server.do("listen_udp", host=IMDS, port=53)
    server.ns, server.ports = ns, ports
    return server


def accepted(server, addr, proto="tcp", port=80):
    counts = server.do("counts")
    table = counts["accepted"] if proto == "tcp" else counts["received"]
    return table.get(f"{proto}:{addr}:{port}", 0)


def wait_accepted(server, addr, n):
    """The listener's thread counts an accept after the client's connect returned: wait."""
    wait_for(lambda: accepted(server, addr) == n, 5, f"{n} accepted on {addr}")


@pytest.mark.parametrize("host", [IMDS, f"::ffff:{IMDS}", IMDS6, NAT64, ECS])
def test_metadata_blocked_for_unselected_workload(node, cloud, host):
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("connect", host=host, port=80) == "EPERM"
    target = host.removeprefix("::ffff:")
    assert accepted(cloud, target) == 0
    e = node.wait_event(verdict="deny", reason="metadata_block")
    assert e["workload"]["cgroup_path"] == "/app"
    assert e["destination"]["ip"] == target


def test_metadata_blocked_over_udp(node, cloud):
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("udp_sendto", host=IMDS, port=53) == "EPERM"
    assert w.verdict("udp_connect_send", host=IMDS, port=53) == "EPERM"
    assert accepted(cloud, IMDS, "udp", 53) == 0
    node.wait_event(verdict="deny", reason="metadata_block", destination__protocol="udp")


def test_a_broad_rule_does_not_open_metadata(node, cloud):
    node.write_policy("a", policy("wide", "/app", """    - to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
"""))
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"
    assert w.verdict("connect", host=IMDS6, port=80) == "EPERM"
    # the same rule does open ordinary addresses: the listener on ECS's neighbour is absent,
    # so the connect is refused by the namespace, not by us
    assert w.verdict("connect", host="127.0.0.1", port=9) == "ECONNREFUSED"


def test_policy_naming_the_endpoint_grants_it(node, cloud):
    node.write_policy("a", policy("imds-reader", "/app", f"""    - to: [{{cidr: {IMDS}/32}}]
      ports: [{{port: 80}}]
"""))
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("connect", host=IMDS, port=80) == "ok"
    wait_accepted(cloud, IMDS, 1)
    assert w.verdict("connect", host=ECS, port=80) == "EPERM"


def test_exempt_selector_reaches_metadata(node, cloud):
    node.write_config(metadata={"exempt": [{"cgroupPath": "/system.slice/**"}]})
    sysd = node.workload("system.slice/cloud-init.service", cloud.ns)
    app = node.workload("app", cloud.ns)
    node.start_agent()
    assert sysd.verdict("connect", host=IMDS, port=80) == "ok"
    assert app.verdict("connect", host=IMDS, port=80) == "EPERM"
    wait_accepted(cloud, IMDS, 1)


def test_nat64_spelling_not_blocked_when_nat64_off(node, cloud):
    node.write_config(metadata={"nat64": False})
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("connect", host=NAT64, port=80) == "ok"
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"


def test_raw_socket_packets_to_metadata_are_dropped(node, cloud):
    """The skb backstop: a workload allowed raw sockets still cannot ping the endpoint."""
    node.write_policy("a", policy("raw-ok", "/app", extra_spec="  allowRawSockets: true\n"))
    w = node.workload("app", cloud.ns)
    node.start_agent()
    assert w.verdict("raw_send", host=IMDS) == "EPERM"
    e = node.wait_event(verdict="deny", hook="skb_egress")
    assert e["reason"] == "metadata_block"
    assert e["destination"]["protocol"] == "icmp"


# -- the metadata pre-check (protected_filter_v1) ------------------------------------------------
# The kernel consults the metadata trie only where the filter's bit for the destination is set
# (bpf/lib/abi.h). These endpoints are chosen to hit its corners: prefixes shorter than its
# granularity (/16 of IPv4, a fold of the top 32 bits of IPv6), whose covered addresses fall on
# bits other than the prefix's first one, each reached in every spelling a workload can use.
SHORT4 = "100.64.0.0/10"               # granularity /16: 100.100.x.x is another bit than 100.64
SHORT4_HOST = "100.100.100.200"
SHORT4_NAT64 = "64:ff9b::6464:64c8"    # 100.100.100.200 in the NAT64 well-known prefix
SHORT6 = "fd00:ec0::/28"               # granularity /32: fd00:eca::/32 is another bit
SHORT6_HOST = "fd00:eca::7"
PRECHECK_HOSTS = [IMDS, IMDS6, NAT64, SHORT4_HOST, SHORT4_NAT64, SHORT6_HOST]


@pytest.fixture
def precheck_cloud(node):
    ns = node.namespace(PRECHECK_HOSTS + ["10.9.8.7"])
    server = node.workload(None, ns)
    for addr in PRECHECK_HOSTS + ["10.9.8.7"]:
        server.do("listen_tcp", host=addr, port=80)
    server.ns = ns
    return server


def _filter_ready(node) -> int:
    """protected_filter_v1's ready flag, read from its pin (bpftool), so that the tests below
    are known to exercise the pre-check and not the look-up-everything fallback."""
    import json
    import subprocess

    out = subprocess.run(["bpftool", "--json", "map", "lookup", "pinned",
                          f"{node.bpffs}/hostagent_protected_filter_v1", "key", "0", "0", "0",
                          "0"], check=True, capture_output=True, text=True).stdout
    value = json.loads(out)
    raw = value.get("value") or value.get("formatted", {}).get("value")
    if isinstance(raw, dict):
        return int(raw["ready"])
    return int.from_bytes(bytes(int(b, 16) for b in raw[:4]), "little")


@pytest.mark.parametrize("host", [IMDS, f"::ffff:{IMDS}", IMDS6, NAT64, SHORT4_HOST,
                                  f"::ffff:{SHORT4_HOST}", SHORT4_NAT64, SHORT6_HOST])
def test_precheck_still_blocks_every_spelling(node, precheck_cloud, host):
    node.write_config(metadata={"endpoints": [f"{IMDS}/32", f"{IMDS6}/128", SHORT4, SHORT6],
                                "nat64": True})
    node.write_policy("a", policy("wide", "/app", """    - to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
"""))
    w = node.workload("app", precheck_cloud.ns)
    node.start_agent()
    assert _filter_ready(node) == 1
    assert w.verdict("connect", host=host, port=80) == "EPERM"
    assert accepted(precheck_cloud, host.removeprefix("::ffff:")) == 0
    # the wide rule does open an address no protected prefix covers
    assert w.verdict("connect", host="10.9.8.7", port=80) == "ok"


def test_precheck_follows_a_config_change(node, precheck_cloud):
    """Endpoints added by a restart with another config are blocked, endpoints dropped from it
    are no longer: the filter is rewritten with the trie (bits before entries, on the way in)."""
    node.write_config(metadata={"endpoints": [f"{IMDS}/32"], "nat64": False})
    w = node.workload("app", precheck_cloud.ns)
    agent = node.start_agent()
    assert w.verdict("connect", host=SHORT4_HOST, port=80) == "ok"
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"
    agent.stop()
    node.write_config(metadata={"endpoints": [SHORT4], "nat64": False})
    node.start_agent()
    assert _filter_ready(node) == 1
    assert w.verdict("connect", host=SHORT4_HOST, port=80) == "EPERM"
    assert w.verdict("connect", host=IMDS, port=80) == "ok"
