"""Cloud metadata endpoints, probed inside a network namespace the test creates: the endpoint
addresses live on that namespace's loopback with the test's own listeners behind them, so a
probe the agent fails to stop reaches the test (and is counted), never the real network, and
"blocked" (EPERM, nothing received) is told apart from "nothing there" (ECONNREFUSED)."""

from __future__ import annotations

import pytest

from tests.harness import policy

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
    assert accepted(cloud, IMDS) == 1
    assert w.verdict("connect", host=ECS, port=80) == "EPERM"


def test_exempt_selector_reaches_metadata(node, cloud):
    node.write_config(metadata={"exempt": [{"cgroupPath": "/system.slice/**"}]})
    sysd = node.workload("system.slice/cloud-init.service", cloud.ns)
    app = node.workload("app", cloud.ns)
    node.start_agent()
    assert sysd.verdict("connect", host=IMDS, port=80) == "ok"
    assert app.verdict("connect", host=IMDS, port=80) == "EPERM"
    assert accepted(cloud, IMDS) == 1


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
