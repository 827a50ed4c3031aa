"""The kernel enforcement core against a real kernel: real programs, real cgroups, real sockets.

Each test builds its own cgroup subtree and runs a real agent on it; workloads are separate
processes placed in those cgroups, and the test asserts both what the process saw (EPERM, or
success) and the event that names its cgroup.
"""

from __future__ import annotations

import pytest

from tests.harness import policy

pytestmark = pytest.mark.privileged

ALLOW_8080 = """    - name: web
      to: [{cidr: 127.0.0.2/32}, {cidr: "::1/128"}]
      ports: [{port: PORT, protocol: TCP}]
"""


@pytest.fixture
def listener(node):
    """A listener outside the governed subtree, on 127.0.0.2 and ::1, TCP and UDP."""
    w = node.workload(None)
    ports = {
        "tcp4": w.do("listen_tcp", host="127.0.0.2")["port"],
        "tcp4b": w.do("listen_tcp", host="127.0.0.2")["port"],
        "tcp6": w.do("listen_tcp", host="::1")["port"],
        "udp4": w.do("listen_udp", host="127.0.0.2")["port"],
    }
    w.ports = ports
    return w


def allow_port(port: int, extra: str = "") -> str:
    return ALLOW_8080.replace("PORT", str(port)) + extra


def test_allowed_destination_connects_denied_port_gets_eperm(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    w = node.workload("agent-a")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["tcp4"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=p["tcp4b"]) == "EPERM"
    e = node.wait_event(verdict="deny", destination__port=p["tcp4b"])
    assert e["reason"] == "policy_default"
    assert e["policy"] == "agent-a"
    assert e["workload"]["cgroup_path"] == "/agent-a"
    assert e["workload"]["pid"] == w.pid
    assert e["destination"] == {"ip": "127.0.0.2", "port": p["tcp4b"], "protocol": "tcp",
                                "name": None}
    assert e["hook"] == "connect4"


def test_ipv6_and_ipv4_mapped_are_judged_like_ipv4(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"]) +
                                  allow_port(p["tcp6"]).replace("name: web", "name: web6")))
    w = node.workload("agent-a")
    node.start_agent()
    assert w.verdict("connect", host="::1", port=p["tcp6"]) == "ok"
    assert w.verdict("connect", host="::ffff:127.0.0.2", port=p["tcp4"]) == "ok"
    assert w.verdict("connect", host="::ffff:127.0.0.2", port=p["tcp4b"]) == "EPERM"
    assert w.verdict("connect", host="::1", port=p["tcp4b"]) == "EPERM"
    e = node.wait_event(verdict="deny", hook="connect6", destination__ip="127.0.0.2")
    assert e["destination"]["port"] == p["tcp4b"]
    assert e["socket"]["family"] == "ipv6"


def test_udp_sendto_and_connected_udp(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", f"""    - to: [{{cidr: 127.0.0.2/32}}]
      ports: [{{port: {p['udp4']}, protocol: UDP}}]
"""))
    w = node.workload("agent-a")
    node.start_agent()
    assert w.verdict("udp_sendto", host="127.0.0.2", port=p["udp4"]) == "ok"
    assert w.verdict("udp_sendto", host="127.0.0.2", port=p["udp4"] + 1) == "EPERM"
    assert w.verdict("udp_connect_send", host="127.0.0.2", port=p["udp4"] + 1) == "EPERM"
    # a UDP-only rule does not open TCP on the same port
    assert w.verdict("connect", host="127.0.0.2", port=p["udp4"]) == "EPERM"
    e = node.wait_event(verdict="deny", hook="sendmsg4")
    assert e["destination"]["protocol"] == "udp"


def test_tcp_fast_open_is_judged(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    w = node.workload("agent-a")
    node.start_agent()
    assert w.verdict("fastopen", host="127.0.0.2", port=p["tcp4b"]) == "EPERM"


def test_child_cgroup_stays_governed(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    w = node.workload("agent-a")
    node.start_agent()
    # created by the workload itself, after the agent started: no time for a resync
    assert w.verdict("mkdir_join", path=str(node.cgroot / "agent-a" / "escape" / "deeper")) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=p["tcp4b"]) == "EPERM"
    assert w.verdict("connect", host="127.0.0.2", port=p["tcp4"]) == "ok"
    e = node.wait_event(verdict="deny", destination__port=p["tcp4b"])
    assert e["policy"] == "agent-a"


def test_raw_and_ping_sockets_denied_unless_policy_allows(node):
    node.write_policy("a", policy("agent-a", "/agent-a"))
    node.write_policy("b", policy("agent-b", "/agent-b", extra_spec="  allowRawSockets: true\n"))
    a, b = node.workload("agent-a"), node.workload("agent-b")
    node.start_agent()
    for kind in ("raw_icmp", "raw_tcp", "raw6_icmp"):
        assert a.verdict("raw_socket", kind=kind) == "EPERM", kind
        assert b.verdict("raw_socket", kind=kind) == "ok", kind
    e = node.wait_event(verdict="deny", reason="raw_socket")
    assert e["workload"]["cgroup_path"] == "/agent-a"
    assert e["destination"] is None


def test_audit_mode_allows_and_reports(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"]), mode="audit"))
    w = node.workload("agent-a")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["tcp4b"]) == "ok"
    e = node.wait_event(verdict="audit", destination__port=p["tcp4b"])
    assert e["reason"] == "policy_default"
    assert e["policy"] == "agent-a"


@pytest.mark.parametrize("action,seen,verdict", [("allow", "ok", None),
                                                 ("audit", "ok", "audit"),
                                                 ("deny", "EPERM", "deny")])
def test_default_action_for_unselected_workloads(node, listener, action, seen, verdict):
    node.write_config(defaultAction=action)
    node.write_policy("a", policy("agent-a", "/agent-a"))
    w = node.workload("unselected")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=listener.ports["tcp4"]) == seen
    if verdict:
        e = node.wait_event(verdict=verdict, workload__cgroup_path="/unselected")
        assert e["reason"] == "node_default"
        assert e["policy"] is None


def test_more_specific_selector_wins(node, listener):
    p = listener.ports
    node.write_policy("broad", policy("broad", "/team/*", allow_port(p["tcp4"])))
    node.write_policy("narrow", policy("narrow", "/team/agent-a", allow_port(p["tcp4b"])))
    a, other = node.workload("team/agent-a"), node.workload("team/other")
    node.start_agent()
    assert a.verdict("connect", host="127.0.0.2", port=p["tcp4b"]) == "ok"
    assert a.verdict("connect", host="127.0.0.2", port=p["tcp4"]) == "EPERM"
    assert other.verdict("connect", host="127.0.0.2", port=p["tcp4"]) == "ok"
    assert node.wait_event(verdict="deny")["policy"] == "narrow"


def test_new_cgroup_matching_a_pattern_is_bound_by_resync(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agents", "/agents/*", allow_port(p["tcp4"])))
    agent = node.start_agent()
    node.cgroup("agents/late")
    agent.wait_log("", timeout=1)
    from tests.harness import wait_for

    w = node.workload("agents/late")
    wait_for(lambda: w.verdict("connect", host="127.0.0.2", port=p["tcp4b"]) == "EPERM", 5,
             "resync to bind the new cgroup")


# -- sockets used outside the cgroup that created them (threat model: "a socket keeps the cgroup it
#    was created in"). connect/sendmsg judge by the caller's cgroup, the skb backstop by the
#    socket's, so the creator's policy holds wherever the socket goes.

def _counts(listener):
    return listener.do("counts")


def test_task_moved_after_socket_keeps_creator_policy(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    free = node.cgroup("free")
    w = node.workload("agent-a")
    node.start_agent()
    before = _counts(listener)["accepted"][f"tcp:127.0.0.2:{p['tcp4b']}"]
    # socket() in /agent-a, connect() from /free: the SYN is dropped by the creator's policy
    assert w.verdict("connect_after_move", cgroup=free, host="127.0.0.2", port=p["tcp4b"],
                     timeout=1.5) == "TIMEOUT"
    e = node.wait_event(verdict="deny", hook="skb_egress")
    assert e["workload"]["cgroup_path"] == "/agent-a"
    assert e["policy"] == "agent-a"
    assert e["destination"] == {"ip": "127.0.0.2", "port": p["tcp4b"], "protocol": "tcp",
                                "name": None}
    assert _counts(listener)["accepted"][f"tcp:127.0.0.2:{p['tcp4b']}"] == before
    # an allowed destination still works from the new cgroup: nothing else was broken
    w2 = node.workload("agent-a")
    assert w2.verdict("connect_after_move", cgroup=free, host="127.0.0.2", port=p["tcp4"]) == "ok"


def test_socket_brought_into_a_governed_cgroup_is_judged_there_too(node, listener):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    governed = node.cgroup("agent-a")
    w = node.workload("free")
    node.start_agent()
    # socket() outside any policy, connect() from /agent-a: the caller's policy applies at once
    assert w.verdict("connect_after_move", cgroup=governed, host="127.0.0.2",
                     port=p["tcp4b"]) == "EPERM"
    assert node.wait_event(verdict="deny", hook="connect4")["workload"]["cgroup_path"] == "/agent-a"


def test_scm_rights_passed_sockets_keep_creator_policy(node, listener, tmp_path):
    p = listener.ports
    node.write_policy("a", policy("agent-a", "/agent-a", allow_port(p["tcp4"])))
    creator, user = node.workload("agent-a"), node.workload("free")
    node.start_agent()
    key = f"udp:127.0.0.2:{p['udp4']}"
    for kind in ("tcp", "udp"):
        path = str(tmp_path / f"pass-{kind}.sock")
        assert user.verdict("recv_fd_listen", path=path) == "ok"
        assert creator.verdict("send_new_socket", path=path, host="127.0.0.2",
                               udp=kind == "udp") == "ok"
        if kind == "tcp":
            assert user.verdict("use_received", host="127.0.0.2", port=p["tcp4b"],
                                timeout=1.5) == "TIMEOUT"
            e = node.wait_event(verdict="deny", hook="skb_egress", destination__protocol="tcp")
        else:
            before = _counts(listener)["received"][key]
            # sendto "succeeds" (the drop happens below the socket layer); nothing arrives
            user.verdict("use_received", host="127.0.0.2", port=p["udp4"])
            e = node.wait_event(verdict="deny", hook="skb_egress", destination__protocol="udp")
            assert _counts(listener)["received"][key] == before
        assert e["workload"]["cgroup_path"] == "/agent-a"
        assert e["policy"] == "agent-a"
