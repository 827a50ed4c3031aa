"""The gRPC event API of a real agent enforcing real traffic: what each event says, resuming
by seq (after a reconnect and after the agent was killed), a stalled subscriber, TLS and
mutual TLS, health and reflection, and generated code that matches proto/."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hostagent.api.client import AgentClient, Tls
from hostagent.events.convert import from_proto
from hostagent.v1 import events_pb2 as pb
from tests.harness import REPO, policy, wait_for
from tests.pki import make_pki

pytestmark = pytest.mark.privileged

DENY_ALL_BUT_2 = "    - to: [{cidr: 127.0.0.2/32}]\n      ports: [{port: 443, protocol: TCP}]\n"


def collect(client: AgentClient, n: int, timeout: float = 20, into: list | None = None,
            **kw) -> list[pb.Event]:
    """The first n events of a stream (lost records included), appended to `into` as they
    arrive."""
    out: list[pb.Event] = [] if into is None else into
    call = client.events(timeout=timeout, **kw)
    for batch in call:
        out.extend(batch.events)
        if len(out) >= n:
            call.cancel()
            break
    return out


def cgroup_count(node) -> int:
    """Cgroups under the agent's root, itself included: a workload event each at start."""
    return sum(1 for _ in os.walk(node.cgroup("")))


def denies(events):
    return [e for e in events if e.kind == pb.KIND_CONNECTION and e.verdict == pb.VERDICT_DENY]


@pytest.fixture
def governed(node):
    node.write_policy("a", policy("agent-a", "/app", DENY_ALL_BUT_2))
    return node.workload("app")


def test_events_say_who_did_what_and_under_which_decision(node, governed):
    agent = node.start_agent()
    addr = node.grpc_address()
    assert governed.verdict("connect", host="127.0.0.3", port=443) == "EPERM"
    out = node.hostagent("events", "--server", addr, "--from-oldest", "--json",
                         "--verdict", "deny", "--count", "1")
    assert out.returncode == 0, out.stderr
    e = json.loads(out.stdout)
    assert e["kind"] == "connection" and e["verdict"] == "deny"
    assert e["reason"] == "policy_default" and e["policy"] == "agent-a"
    assert e["seq"] > 0 and e["node"] and e["agent_version"]
    assert e["workload"]["cgroup_path"] == "/app" and e["workload"]["pid"] == governed.pid
    assert e["destination"] == {"ip": "127.0.0.3", "port": 443, "protocol": "tcp", "name": None}
    # the same event, field for field, as the event log wrote it
    logged = node.wait_event(seq=e["seq"])
    assert logged == e
    # the stream's first events: the policy generation, then the agent's start (between them,
    # the workloads present, test_workloads_already_there_at_start_are_events)
    first = collect(AgentClient(addr), 2, from_oldest=True, kinds=["policy", "agent"])
    assert [x.kind for x in first[:2]] == [pb.KIND_POLICY, pb.KIND_AGENT]
    assert first[0].policy_change.ok and list(first[0].policy_change.added) == ["agent-a"]
    assert first[1].agent.phase == "started" and first[1].agent.pid == agent.proc.pid
    # the readable form
    out = node.hostagent("events", "--server", addr, "--since", str(e["seq"] - 1), "--count",
                         "1")
    assert "connection deny" in out.stdout and "-> 127.0.0.3:443/tcp" in out.stdout


def test_filters_are_applied_by_the_agent(node, governed):
    other = node.workload("other")
    node.start_agent()
    client = AgentClient(node.grpc_address())
    assert governed.verdict("connect", host="127.0.0.3", port=443) == "EPERM"
    assert other.verdict("connect", host="127.0.0.2", port=9) in ("ECONNREFUSED", "ok")
    assert governed.verdict("connect", host="127.0.0.4", port=443) == "EPERM"
    got = collect(client, 2, from_oldest=True, workloads=["cgroup_path=/app"],
                  destinations=["127.0.0.4/32", "127.0.0.3"])
    assert [e.destination.ip for e in got] == ["127.0.0.3", "127.0.0.4"]
    with pytest.raises(grpc.RpcError) as err:
        collect(client, 1, workloads=["no-equals-sign"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_resume_by_seq_across_a_reconnect_and_an_agent_kill(node, governed):
    node.start_agent()
    client = AgentClient(node.grpc_address())
    assert governed.do("connect_many", host="127.0.0.3", port=443, count=20)["results"] == \
        {"EPERM": 20}
    present = cgroup_count(node)
    # policy, the workloads present, agent, 20 denies
    seen = collect(client, 22 + present, from_oldest=True)
    assert [e.seq for e in seen] == list(range(1, 23 + present))
    last = seen[-1].seq
    # the agent dies without a word; a new one takes over the pinned state and the spool
    node.agents[-1].stop(signal.SIGKILL)
    client.close()
    # denied while no agent runs: the pinned ring keeps the events for the next agent
    assert governed.do("connect_many", host="127.0.0.4", port=443, count=10)["results"] == \
        {"EPERM": 10}
    node.start_agent()
    client = AgentClient(node.grpc_address())
    assert governed.do("connect_many", host="127.0.0.3", port=443, count=30)["results"] == \
        {"EPERM": 30}
    # policy, the workloads present, agent started, 40 denies
    resumed = collect(client, 42 + present, since=last)
    numbers = [e.seq for e in resumed]
    assert numbers == list(range(last + 1, last + 43 + present))   # nothing missing or twice
    assert sorted(e.destination.ip for e in denies(resumed)) == ["127.0.0.3"] * 30 + \
        ["127.0.0.4"] * 10
    assert any(e.kind == pb.KIND_AGENT and e.agent.adopted for e in resumed)
    # and the first agent's events are still there for a subscriber that starts from scratch
    everything = collect(client, last + 42 + present, from_oldest=True)
    assert [e.seq for e in everything] == list(range(1, last + 43 + present))


def test_a_stalled_subscriber_slows_nothing_and_learns_what_it_missed(node, governed):
    node.write_config(events={"replayBuffer": 1000, "spool": {"maxBytes": 0}})
    node.start_agent()
    addr = node.grpc_address()
    # no window growth: a client that reads nothing stops the stream after 64 KiB in flight
    stalled = AgentClient(addr, options=[("grpc.http2.bdp_probe", 0)])
    call = stalled.events(from_oldest=True, max_batch=1)
    first = next(call)           # subscribed; from now on it reads nothing
    start = first.events[0].seq if first.events else 0
    assert governed.verdict("connect", host="127.0.0.3", port=443) == "EPERM"
    live = AgentClient(addr)
    got: list[pb.Event] = []
    since = collect(live, 1, from_oldest=True, kinds=["connection"])[0].seq
    reader = threading.Thread(target=collect, args=(live, 2000), kwargs=dict(
        since=since, timeout=60, into=got))
    reader.start()
    wait_for(lambda: node.status().get("events", {}).get("subscribers") == 2, 10,
             "both subscribers connected")
    # bursts the live subscriber keeps up with, 2000 events in all: twice the replay buffer
    for burst in range(1, 5):
        assert governed.do("connect_many", host="127.0.0.3", port=443,
                           count=500)["results"] == {"EPERM": 500}
        wait_for(lambda: len(denies(got)) >= 500 * burst or not reader.is_alive(), 20,
                 f"the live subscriber to read burst {burst}")
    reader.join(30)
    assert len(denies(got)) == 2000, "the live subscriber got every event despite the stalled one"
    assert [e.seq for e in got] == list(range(since + 1, since + 2001))
    assert not [e for e in got if e.kind == pb.KIND_LOST]
    # the stalled one now reads on: what the buffer no longer holds is named, then the rest
    rest: list[pb.Event] = []
    for batch in call:
        rest.extend(batch.events)
        if rest and rest[-1].seq == got[-1].seq:
            break
    call.cancel()
    lost = [e for e in rest if e.kind == pb.KIND_LOST]
    assert lost and lost[0].lost.source == "replay_buffer"
    delivered = {e.seq for e in rest if e.seq} | {e.seq for e in first.events}
    missed = set().union(*(range(e.lost.first_seq, e.lost.last_seq + 1) for e in lost))
    assert delivered.isdisjoint(missed)
    assert delivered | missed >= set(range(start, got[-1].seq + 1)), "every seq accounted for"
    assert sum(e.lost.count for e in lost) == len(missed)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(node, governed, pki):
    cert, key = pki.pair("agent")
    node.write_config(grpc={"listen": "127.0.0.1:0",
                            "tls": {"cert": cert, "key": key, "clientCA": pki.ca}})
    node.start_agent()
    addr = node.grpc_address()
    good = AgentClient(addr, Tls(pki.ca, *pki.pair("collector")))
    assert good.status().ready
    assert governed.verdict("connect", host="127.0.0.3", port=443) == "EPERM"
    assert denies(collect(good, 1, from_oldest=True, kinds=["connection"]))
    for bad in (AgentClient(addr, Tls(pki.ca)),                          # no certificate
                AgentClient(addr, Tls(pki.ca, *pki.pair("intruder"))),   # another CA's
                AgentClient(addr)):                                        # plain text
        with pytest.raises(grpc.RpcError) as err:
            collect(bad, 1, from_oldest=True, timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
        bad.close()


def test_plain_text_beyond_loopback_is_refused_at_start(node):
    node.write_config(grpc={"listen": "0.0.0.0:0"})
    agent = node.start_agent(wait=False)
    assert agent.proc.wait(30) != 0
    assert "plain text is allowed only on loopback or a Unix socket" in agent.log()


def test_unix_socket_health_and_reflection(node, governed):
    sock = node.tmp / "api.sock"
    node.write_config(grpc={"listen": f"unix://{sock}"})
    node.start_agent()
    assert (sock.stat().st_mode & 0o777) == 0o600
    channel = grpc.insecure_channel(f"unix://{sock}")
    health = health_pb2_grpc.HealthStub(channel)
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(
        service="hostagent.v1.AgentService")).status == health_pb2.HealthCheckResponse.SERVING,
        10, "SERVING")
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"hostagent.v1.AgentService", "grpc.health.v1.Health"} <= names
    policy_set = AgentClient(f"unix://{sock}").policy()
    assert policy_set.generation == 1 and list(policy_set.policies) == ["agent-a"]
    assert "cgroupPath: \"/app\"" in policy_set.files[0].content


def test_policy_and_workload_changes_are_events(node, governed):
    node.start_agent()
    client = AgentClient(node.grpc_address())
    since = node.status()["events"]["last_seq"]
    bad = node.write_policy("b", "apiVersion: hostagent.io/v1\nkind: EgressPolicy\n"
                            "metadata: {name: b}\nspec: {selector: {cgroupPath: /b}, mode: nope}\n")
    node.agents[-1].proc.send_signal(signal.SIGHUP)
    os.makedirs(node.cgroup("late"), exist_ok=True)
    got = collect(client, 2, since=since, kinds=["policy", "workload"])
    by_kind = {e.kind: e for e in got}
    rejected = by_kind[pb.KIND_POLICY].policy_change
    assert not rejected.ok and "mode" in rejected.error and list(rejected.files) == [str(bad)]
    assert by_kind[pb.KIND_POLICY].generation == 1
    seen = by_kind[pb.KIND_WORKLOAD]
    assert seen.workload_change.change == "seen" and seen.workload.cgroup_path == "/late"
    os.rmdir(node.cgroup("late"))
    gone = collect(client, 1, since=seen.seq, kinds=["workload"])[0]
    assert gone.workload_change.change == "gone" and gone.workload.cgroup_id == \
        seen.workload.cgroup_id
    assert from_proto(gone)["workload"]["cgroup_path"] == "/late"


def test_workloads_already_there_at_start_are_events(node, governed):
    os.makedirs(node.cgroup("early/child"), exist_ok=True)
    node.start_agent()
    client = AgentClient(node.grpc_address())
    got = collect(client, cgroup_count(node) + 1, from_oldest=True, kinds=["workload", "agent"])
    present = [e for e in got if e.kind == pb.KIND_WORKLOAD]
    assert {e.workload_change.change for e in present} == {"present"}
    paths = [e.workload.cgroup_path for e in present]
    assert "/early" in paths and "/early/child" in paths
    started = next(e for e in got if e.kind == pb.KIND_AGENT)
    assert started.agent.phase == "started"
    assert all(e.seq < started.seq for e in present)


class _Replier:
    """A loopback server outside the governed tree: reads a request to its end, answers
    ``reply`` bytes, closes."""

    def __init__(self, reply: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[int] = []
        self._reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                n = 0
                while chunk := c.recv(65536):
                    n += len(chunk)
                self.received.append(n)
                c.sendall(b"y" * self._reply)


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_connection_close_events_say_what_a_connection_carried(node, enabled):
    server = _Replier(reply=50_000)
    node.write_config(events={"connectionClose": enabled, "allow": True})
    node.write_policy("a", policy("agent-a", "/app", "    - name: upload\n      to: [{cidr: "
                                  f"127.0.0.1/32}}]\n      ports: [{{port: {server.port}}}]\n"))
    w = node.workload("app")
    agent = node.start_agent()
    assert (f'hostagent_program_attached{{program="sock_ops"}} {float(enabled)}'
            in agent.scrape()[1])
    client = AgentClient(node.grpc_address())
    since = node.status()["events"]["last_seq"]
    assert w.do("exchange", host="127.0.0.1", port=server.port, send=100_000)["received"] == \
        50_000
    assert server.received == [100_000]
    got = collect(client, 2 if enabled else 1, since=since,
                  kinds=["connection", "connection_close"])
    opened = next(e for e in got if e.kind == pb.KIND_CONNECTION)
    assert opened.verdict == pb.VERDICT_ALLOW and opened.rule == "upload"
    assert sock_ops_attached(node) is enabled
    if not enabled:
        assert all(e.kind == pb.KIND_CONNECTION for e in got)
        return
    closed = next(e for e in got if e.kind == pb.KIND_CONNECTION_CLOSE)
    # the decision the connection was opened under, and who opened it
    assert (closed.verdict, closed.reason, closed.policy, closed.rule) == \
        (pb.VERDICT_ALLOW, "policy_rule", "agent-a", "upload")
    assert closed.hook == "tcp_close" and closed.seq > opened.seq
    assert closed.workload.cgroup_path == "/app"
    assert closed.workload.pid == opened.workload.pid and closed.workload.comm
    assert closed.socket.cookie == opened.socket.cookie
    assert (closed.destination.ip, closed.destination.port, closed.destination.protocol) == \
        ("127.0.0.1", server.port, "tcp")
    # what it carried, counted as the kernel does (tcp_info's bytes_acked/bytes_received): the
    # SYN and FIN acknowledged count one byte each, the peer's FIN one byte
    assert 100_000 <= closed.close.bytes_sent <= 100_002
    assert 50_000 <= closed.close.bytes_received <= 50_001
    assert 0 < closed.close.duration_ns < 30 * 10**9
    as_dict = from_proto(closed)
    assert as_dict["kind"] == "connection_close" and as_dict["close"]["bytes_sent"] >= 100_000
    assert as_dict["destination"]["port"] == server.port
    out = node.hostagent("events", "--server", node.grpc_address(), "--since",
                         str(closed.seq - 1), "--count", "1", "--kind", "connection_close")
    assert f"-> 127.0.0.1:{server.port}/tcp sent={closed.close.bytes_sent} " in out.stdout
    # an agent started without it takes the program away again
    node.agents[-1].stop()
    node.write_config(events={"connectionClose": False})
    node.start_agent()
    assert not sock_ops_attached(node)


def sock_ops_attached(node) -> bool:
    status = json.loads(node.hostagent("status", "--json").stdout)
    entry = next(p for p in status["programs"] if p["program"] == "sock_ops")
    assert entry["optional"]
    return entry["attached"]


def test_generated_code_matches_proto(tmp_path):
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", *protos], check=True, cwd=REPO)
    fresh = tmp_path / "hostagent" / "v1"
    installed = REPO / "hostagent" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "protoc generated nothing"
    match, mismatch, errors = filecmp.cmpfiles(fresh, installed, names, shallow=False)
    assert not mismatch and not errors, (
        f"hostagent/v1 is stale against proto/ ({mismatch or errors}): run scripts/setup.sh")
    assert Path(installed, "events_pb2.py").exists()


def test_repeated_allowed_flows_are_aggregated_and_denies_never(node):
    node.write_config(events={"allow": True, "aggregate": {"window": 1.0}})
    server = node.workload(None)
    port = server.do("listen_tcp", host="127.0.0.2", port=0)["port"]
    node.write_policy("a", policy("agent-a", "/app", f"""    - to: [{{cidr: 127.0.0.2/32}}]
      ports: [{{port: {port}, protocol: TCP}}]
      ticket: CHG-7
"""))
    w = node.workload("app")
    node.start_agent()
    client = AgentClient(node.grpc_address())
    assert w.do("connect_many", host="127.0.0.2", port=port, count=50)["results"] == {"ok": 50}
    assert w.do("connect_many", host="127.0.0.3", port=port, count=20)["results"] == \
        {"EPERM": 20}
    got = collect(client, 22, from_oldest=True, kinds=["connection"], timeout=15)
    allowed = [e for e in got if e.verdict == pb.VERDICT_ALLOW]
    assert len(denies(got)) == 20, "every deny is its own event"
    # the first contact at once; the other 49 folded into one event when the window closed
    assert [e.count for e in allowed] == [0, 49]
    assert allowed[1].destination.ip == "127.0.0.2" and allowed[1].workload.cgroup_path == "/app"
    assert from_proto(allowed[1])["count"] == 49
    # the allowing rule's change ticket travels with the evidence; a deny has none
    assert {e.ticket for e in allowed} == {"CHG-7"} and {e.ticket for e in denies(got)} == {""}
