"""Reloads, failures and takeovers of a real agent: the node stays enforced throughout."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from tests.harness import policy, wait_for

pytestmark = pytest.mark.privileged


@pytest.fixture
def ports(node):
    w = node.workload(None)
    return {"good": w.do("listen_tcp", host="127.0.0.2")["port"],
            "other": w.do("listen_tcp", host="127.0.0.2")["port"]}


def rule(port: int, name: str = "web") -> str:
    return f"""    - name: {name}
      to: [{{cidr: 127.0.0.2/32}}]
      ports: [{{port: {port}}}]
"""


def test_reload_under_a_connect_loop_never_gives_a_wrong_verdict(node, ports):
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    good, bad = node.workload("agent-a"), node.workload("agent-a")
    agent = node.start_agent()
    results = {"good": {}, "bad": {}}
    stop = threading.Event()

    def loop(w, key, port):
        while not stop.is_set():
            r = w.do("connect_many", host="127.0.0.2", port=port, count=50)["results"]
            for k, v in r.items():
                results[key][k] = results[key].get(k, 0) + v

    threads = [threading.Thread(target=loop, args=(good, "good", ports["good"])),
               threading.Thread(target=loop, args=(bad, "bad", ports["other"]))]
    for t in threads:
        t.start()
    try:
        # each generation keeps "good" allowed and "other" denied, with different rule sets
        for gen in range(2, 7):
            extra = "".join(rule(20000 + gen * 10 + i, f"r{i}") for i in range(gen))
            node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"]) + extra))
            agent.wait_generation(gen)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert set(results["good"]) == {"ok"}, results
    assert set(results["bad"]) == {"EPERM"}, results
    assert results["good"]["ok"] >= 100


def test_bad_policy_is_rejected_and_the_last_good_one_stays(node, ports):
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    w = node.workload("agent-a")
    agent = node.start_agent()
    node.write_policy("a", policy("agent-a", "/agent-a", """    - to: [{cidr: 10.0.0.1/8}]
      ports: [{port: 70000}]
"""))
    agent.wait_log("policy rejected")
    log = agent.log()
    assert "a.yaml:" in log and "70000" in log
    assert w.verdict("connect", host="127.0.0.2", port=ports["good"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    _, metrics = agent.scrape()
    assert 'hostagent_policy_reloads_total{result="failure"} 1.0' in metrics
    wait_for(lambda: "REJECTED" in node.hostagent("status").stdout, 5, "status to show it")
    status = node.hostagent("status").stdout
    assert "70000" in status
    # fixing the file applies the next generation
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["other"])))
    agent.wait_generation(2)
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "ok"


def test_policy_larger_than_the_maps_is_rejected_whole(node, ports):
    node.write_config(limits={"maxRules": 64})
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    w = node.workload("agent-a")
    agent = node.start_agent()
    cidrs = ", ".join(f"{{cidr: 10.1.{i}.0/24}}" for i in range(100))
    node.write_policy("a", policy("agent-a", "/agent-a", f"""    - to: [{cidrs}]
""" + rule(ports["other"], "other")))
    agent.wait_log("policy rejected")
    assert "limits.maxRules is 64" in agent.log()
    assert w.verdict("connect", host="127.0.0.2", port=ports["good"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"


def test_sigkill_leaves_the_node_enforced_and_a_new_agent_takes_over(node, ports):
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    w = node.workload("agent-a")
    first = node.start_agent()
    first.stop(signal.SIGKILL)
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    assert w.verdict("connect", host="127.0.0.2", port=ports["good"]) == "ok"

    # the new agent adopts the pinned state; probes during its start never see a wrong verdict
    results = {}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for k, v in w.do("connect_many", host="127.0.0.2", port=ports["other"],
                             count=20)["results"].items():
                results[k] = results.get(k, 0) + v

    t = threading.Thread(target=loop)
    t.start()
    try:
        second = node.start_agent()
    finally:
        stop.set()
        t.join(timeout=30)
    assert set(results) == {"EPERM"}, results
    assert "replaced" in second.log()
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    e = node.wait_event(verdict="deny", destination__port=ports["other"])
    assert e["policy"] == "agent-a"


def test_uninstall_leaves_nothing_attached_or_pinned(node, ports):
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    w = node.workload("agent-a")
    agent = node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    assert agent.stop() == 0
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    out = node.hostagent("uninstall")
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(node.bpffs)
    status = json.loads(node.hostagent("status", "--json").stdout)
    assert not any(p["attached"] for p in status["programs"])
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "ok"
    # the kernel agrees: no program is attached to the test's cgroup
    import subprocess
    shown = subprocess.run(["bpftool", "cgroup", "show", str(node.cgroot)], capture_output=True,
                           text=True)
    assert "sock4_connect" not in shown.stdout and "skb_egress" not in shown.stdout


def test_metrics_and_readiness(node, ports):
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    w = node.workload("agent-a")
    agent = node.start_agent()
    code, body = agent.scrape("/readyz")
    assert code == 200
    assert w.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    assert w.verdict("connect", host="127.0.0.2", port=ports["good"]) == "ok"
    _, metrics = agent.scrape()
    assert ('hostagent_decisions_total{hook="connect4",policy="agent-a",reason="policy_default",'
            'verdict="deny"} 1.0') in metrics
    assert ('hostagent_decisions_total{hook="connect4",policy="agent-a",reason="policy_rule",'
            'verdict="allow"} 1.0') in metrics
    assert 'hostagent_map_entries{map="rules"} 1.0' in metrics
    assert "hostagent_policy_generation 1.0" in metrics
    assert 'hostagent_program_attached{program="skb_egress"} 1.0' in metrics
    assert "hostagent_ringbuf_dropped_events_total 0.0" in metrics


def test_decision_counts_are_exact_in_both_counter_maps(node, ports):
    """Allows by a rule or the node default are counted in allow_counts_v1 slots, the rest in
    decisions_v1 (bpf/lib/abi.h): the metrics add both up, each decision once."""
    node.write_policy("a", policy("agent-a", "/agent-a", rule(ports["good"])))
    governed, free = node.workload("agent-a"), node.workload("elsewhere")
    agent = node.start_agent()
    for _ in range(3):
        assert governed.verdict("connect", host="127.0.0.2", port=ports["good"]) == "ok"
        assert free.verdict("connect", host="127.0.0.2", port=ports["other"]) == "ok"
    assert governed.verdict("connect", host="127.0.0.2", port=ports["other"]) == "EPERM"
    _, metrics = agent.scrape()
    for line in ('hostagent_decisions_total{hook="connect4",policy="agent-a",'
                 'reason="policy_rule",verdict="allow"} 3.0',
                 'hostagent_decisions_total{hook="connect4",policy="",reason="node_default",'
                 'verdict="allow"} 3.0',
                 'hostagent_decisions_total{hook="connect4",policy="agent-a",'
                 'reason="policy_default",verdict="deny"} 1.0'):
        assert line in metrics, line


def test_agent_refuses_to_start_on_a_bad_policy_with_nothing_pinned(node):
    node.write_policy("a", "apiVersion: hostagent.io/v1\nkind: EgressPolicy\nspec: 3\n")
    agent = node.start_agent(wait=False)
    assert agent.proc.wait(timeout=30) == 1
    assert "a.yaml:" in agent.log()
    assert not os.path.exists(os.path.join(node.bpffs, "hostagent_link_sock4_connect"))
