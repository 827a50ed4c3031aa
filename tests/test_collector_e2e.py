"""A real agent enforcing real traffic, streaming over mutual TLS on loopback to a real
collector process, both killed and restarted mid-stream; the store is then checked seq by seq
against the agent: every seq is stored exactly once, or lies in a lost range that an agent's
KIND_LOST record named, and every stored event equals the one in the agent's event log.

Also: certificates the agent does not trust (or that the collector does not) get nothing; an
agent whose state was wiped numbers a new stream, kept apart; and the questions asked of the
store over the command line, on this real traffic.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostagent.api.client import AgentClient, Tls
from hostagent.collector import query
from hostagent.collector.config import load_config
from hostagent.collector.ingest import Collector
from hostagent.collector.store import open_store
from hostagent.events.convert import from_proto
from hostagent.policy.load import load_policy_dir
from tests import harness
from tests.harness import REPO, policy, wait_for
pytest_plugins = ("tests.pgserver",)     # the pg_server fixture
from tests.pki import Pki, make_pki

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(400)]

WORKLOAD = "w"
DENIED = "127.0.0.3"        # the workload's traffic: denied connects, one event each


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_agent(node: harness.TestNode, pki: Pki, listen: str = "127.0.0.1:0", **extra) -> None:
    cert, key = pki.pair("agent")
    node.write_config(grpc={"listen": listen,
                            "tls": {"cert": cert, "key": key, "clientCA": pki.ca}}, **extra)
    node.write_policy("w", policy("w", f"/{WORKLOAD}", "    - to: [{cidr: 127.0.0.4/32}]"))


def collector_tls(pki: Pki, name: str = "collector") -> dict:
    cert, key = pki.pair(name)
    return {"tls.ca": pki.ca, "tls.cert": cert, "tls.key": key}


class CollectorProcess:
    """`python -m hostagent.collector run`, its output in a file."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.log_path = tmp / f"collector-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hostagent.collector", "run", *args],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self._log.close()
        return rc


class Traffic:
    """The workload connecting to a denied address in a loop, in a thread, until stopped."""

    def __init__(self, node: harness.TestNode) -> None:
        self.w = node.workload(WORKLOAD)
        self.stop_event = threading.Event()
        self.connects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            reply = self.w.do("connect_many", host=DENIED, port=9, count=25)
            self.connects += sum(reply["results"].values())
            time.sleep(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


def cursor(url: str, node_name: str | None = None) -> int:
    try:
        store = open_store(url, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    try:
        rows = [a for a in query.agents(store) if node_name in (None, a["node"])]
        return rows[-1]["last_seq"] if rows else 0       # the newest epoch's
    finally:
        store.close()


def agent_status(address: str, pki: Pki):
    cert, key = pki.pair("collector")
    with AgentClient(address, Tls(pki.ca, cert, key)) as client:
        return client.status(timeout=10)


def wait_caught_up(url: str, address: str, pki: Pki, timeout: float = 90) -> int:
    """Until the store holds everything the agent has numbered (twice in a row, 0.5 s apart:
    the agent numbers its own events too)."""
    state = {"last": None}

    def caught_up():
        last = agent_status(address, pki).last_seq
        done = cursor(url) == last and state["last"] == last
        state["last"] = last
        return last if done else None

    return wait_for(caught_up, timeout, "the collector to store every event", interval=0.5)


def logged_events(node: harness.TestNode) -> list[dict]:
    """The event log's events. An agent SIGKILLed in the middle of writing a line leaves it
    torn, and the next agent appends after it: such a line is skipped (its event is checked
    against the store no further)."""
    out = []
    for line in node.event_log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def event_log(node: harness.TestNode) -> dict[int, dict]:
    """The agent's event log by seq. The log gets each event when it is numbered, before it is
    in the spool, so an agent killed in between logged seqs that its successor numbers again:
    the last version of a seq is the one the agent kept (and may have sent)."""
    by_seq: dict[int, dict] = {}
    for e in logged_events(node):
        by_seq[e["seq"]] = e
    return by_seq


def differences(stored: dict, logged: dict, where: str = "") -> list[str]:
    """Where from_proto's form of a stored event differs from the agent's event log line. The
    log leaves out keys the protobuf form holds as empty (null, 0, false): those are equal."""
    out = []
    for k in set(stored) | set(logged):
        a, b = stored.get(k), logged.get(k)
        if k not in logged:
            if a not in (None, 0, False, "", [], {}):
                out.append(f"{where}{k}: {a!r} (not in the log)")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}: {a!r} != {b!r}")
    return out


def check_store(url: str, node: harness.TestNode, last_seq: int, agent_sources: set[str]) -> dict:
    """Every seq 1..last_seq of the node's stream is stored once or in a lost range one of the
    agent's records named; stored events equal the agent's event log."""
    logged = event_log(node)
    store = open_store(url, readonly=True)
    try:
        agents = query.agents(store)
        assert len(agents) == 1, (
            "the agent gave seqs it had sent to other events after a restart, and the "
            f"collector kept them apart as a new epoch: {agents}")
        assert [(a["epoch"], a["last_seq"]) for a in agents] == [(1, last_seq)], agents
        agent_id = agents[0]["agent_id"]
        assert agents[0]["duplicates"] == 0, "events received twice"
        seqs = [r["seq"] for r in store.rows("SELECT seq FROM events WHERE agent_id = ? "
                                             "ORDER BY seq", (agent_id,))]
        assert len(seqs) == len(set(seqs))
        covered = set(seqs)
        lost = query.lost(store)
        for r in lost:
            assert r["source"] in agent_sources, f"a loss the agent did not report: {r}"
            if r["first_seq"] is None:
                continue   # a count of events that never got a seq (kernel ring buffer)
            span = set(range(r["first_seq"], r["last_seq"] + 1))
            assert not span & covered, f"lost range {r} overlaps stored or lost seqs"
            covered |= span
        missing = sorted(set(range(1, last_seq + 1)) - covered)
        assert not missing, f"{len(missing)} seqs neither stored nor reported lost: " \
                            f"{missing[:20]}"
        assert covered == set(range(1, last_seq + 1))
        stored = store.load_events([(agent_id, s) for s in seqs])
        assert len(stored) == len(seqs)
        diffs = {seq: d for (_, seq), e in stored.items() if seq in logged
                 for d in [differences(from_proto(e), logged[seq])] if d}
        assert not diffs, f"stored events differ from the event log: {diffs}"
        in_log_not_stored = sorted(set(logged) - set(seqs) - covered)
        assert not in_log_not_stored, in_log_not_stored[:20]
        return {"events": len(seqs), "lost": lost,
                "connections": store.scalar("SELECT COUNT(*) FROM events WHERE agent_id = ? "
                                            "AND kind = 'connection'", (agent_id,))}
    finally:
        store.close()


# -- the delivery guarantee ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,spool", [("sqlite", "spool"), ("postgresql", "spool"),
                                           ("sqlite", "no-spool")])
def test_kills_and_restarts_lose_and_duplicate_nothing(node, pki, tmp_path, request, backend,
                                                      spool):
    """SIGKILL the collector, the agent, and both, mid-stream; every seq once, or lost only
    where the agent said so. Without a spool (once, on SQLite: the store code is the same) the
    agent can only say so: a collector that stayed away longer than the agent's replay buffer,
    and the numbers a killed agent had reserved, get their gap named (source replay_buffer)."""
    if backend == "sqlite":
        db_url = f"sqlite://{tmp_path}/events.db"
    else:
        server = request.getfixturevalue("pg_server")
        db_url = server.database()
        request.addfinalizer(lambda: server.drop(db_url))
    port = free_port()
    address = f"127.0.0.1:{port}"
    extra = {} if spool == "spool" else {"events": {"spool": {"maxBytes": 0},
                                                    "replayBuffer": 1000}}
    configure_agent(node, pki, address, **extra)
    agent = node.start_agent()
    metrics = f"127.0.0.1:{free_port()}"
    if backend == "postgresql":     # the config file, once; flags otherwise
        cert, key = pki.pair("collector")
        config = tmp_path / "collector.yaml"
        config.write_text(f"agents: ['{address}']\ndatabase: '{db_url}'\n"
                          f"tls: {{ca: {pki.ca}, cert: {cert}, key: {key}}}\n"
                          f"retention: {{maxAge: 30d}}\nmetrics: {{listen: '{metrics}'}}\n")
        args = ["--config", str(config)]
    else:
        args = ["--agent", address, "--db", db_url, "--ca", pki.ca,
                "--cert", pki.pair("collector")[0], "--key", pki.pair("collector")[1],
                "--metrics-listen", metrics]
    collectors = [CollectorProcess(tmp_path, args)]
    traffic = Traffic(node)
    try:
        def progress(more: int = 200) -> None:
            start = cursor(db_url)
            wait_for(lambda: cursor(db_url) >= start + more, 60,
                     f"the collector to store {more} more events")

        progress()
        # 1. the collector dies mid-stream and comes back
        collectors[-1].stop(signal.SIGKILL)
        if spool == "no-spool":
            # away for longer than the agent's replay buffer holds
            wait_for(lambda: agent_status(address, pki).last_seq > cursor(db_url) + 1500, 60,
                     "the agent to number more than its replay buffer holds")
        else:
            time.sleep(1.0)
        collectors.append(CollectorProcess(tmp_path, args))
        progress()
        # 2. the agent dies mid-stream and comes back (same state directory, same port)
        agent.stop(signal.SIGKILL)
        time.sleep(0.5)
        agent = node.start_agent()
        progress()
        # 3. both die; the agent comes back first, then the collector
        collectors[-1].stop(signal.SIGKILL)
        agent.stop(signal.SIGKILL)
        agent = node.start_agent()
        time.sleep(0.5)
        collectors.append(CollectorProcess(tmp_path, args))
        progress()
        # 4. a graceful restart of the collector
        assert collectors[-1].stop(signal.SIGTERM) == 0
        collectors.append(CollectorProcess(tmp_path, args))
        progress()
    finally:
        traffic.stop()
    try:
        last = wait_caught_up(db_url, address, pki)
        result = check_store(db_url, node, last, {"kernel_ringbuf", "dns_queue",
                                                  "agent_restart", "replay_buffer"})
        # the collectors resumed where the store stood, never from the start
        resumed = [c.log() for c in collectors[1:]]
        assert all("streaming from seq 1 " not in text for text in resumed), resumed
        assert result["connections"] > 500
        # the collector's own metrics say where each agent stands
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
                       for f in text_string_to_metric_families(r.read().decode())
                       for m in f.samples}
        node_name = (("node", agent_status(address, pki).node),)
        assert samples[("hostagent_collector_agent_connected", node_name)] == 1.0
        assert samples[("hostagent_collector_agent_cursor", node_name)] == last
        assert samples[("hostagent_collector_events_stored_total", ())] > 0
        if spool == "no-spool":
            # the collector's absence and the agent's kills left gaps, each named by the agent
            # (a replay-buffer record spans the numbers a killed agent had reserved unused)
            assert "replay_buffer" in {r["source"] for r in result["lost"]}, result["lost"]
        else:
            assert result["lost"] == [], result["lost"]
    finally:
        for c in collectors:
            c.stop(signal.SIGKILL)
        for c in collectors:
            print(c.log()[-3000:])


# -- certificates ----------------------------------------------------------------------------------


def test_wrong_certificates_get_nothing(node, pki, tmp_path):
    configure_agent(node, pki)
    node.start_agent()
    address = node.grpc_address()
    w = node.workload(WORKLOAD)
    w.do("connect_many", host=DENIED, port=9, count=5)

    def attempt(tag: str, **tls) -> tuple[str | None, str]:
        url = f"sqlite://{tmp_path}/{tag}.db"
        cfg = load_config(None, {"agents": [address], "database": url, **tls})
        c = Collector(cfg)
        c.start()
        try:
            stream = c.streams[address]
            wait_for(lambda: stream.error or stream.state == "streaming", 20,
                     f"{tag}: a verdict on the connection")
            time.sleep(1.0)
            return stream.error, url
        finally:
            c.stop()

    intruder = collector_tls(pki, "intruder")          # a client certificate of another CA
    error, url = attempt("intruder", **intruder)
    assert error and "UNAVAILABLE" in error, error
    no_client_cert = {"tls.ca": pki.ca}                # TLS, but no client certificate
    error2, url2 = attempt("anonymous", **no_client_cert)
    assert error2 and "UNAVAILABLE" in error2, error2
    distrust = dict(collector_tls(pki), **{"tls.ca": pki.path("rogue-ca.pem")})
    error3, url3 = attempt("distrust", **distrust)     # the collector does not trust the agent
    assert error3 and "UNAVAILABLE" in error3, error3
    for u in (url, url2, url3):
        store = open_store(u, readonly=True)
        try:
            assert store.scalar("SELECT COUNT(*) FROM events") == 0
            assert store.scalar("SELECT COUNT(*) FROM agents") == 0
        finally:
            store.close()
    # the agent is fine and serves the collector it trusts
    error4, ok = attempt("collector", **collector_tls(pki))
    assert error4 is None
    store = open_store(ok, readonly=True)
    try:
        assert store.scalar("SELECT COUNT(*) FROM events WHERE kind = 'connection'") >= 5
    finally:
        store.close()


# -- an agent whose state was lost -----------------------------------------------------------------


def test_agent_with_lost_state_is_a_new_stream(node, pki, tmp_path):
    """The agent's state directory is wiped: it numbers from 1 again, on a new port (file
    discovery follows it). The collector keeps the old and new numbering apart."""
    configure_agent(node, pki)
    agent = node.start_agent()
    agents_file = tmp_path / "agents.txt"
    agents_file.write_text(node.grpc_address() + "\n")
    url = f"sqlite://{tmp_path}/events.db"
    cfg = load_config(None, {"discovery.files": [str(agents_file)], "database": url,
                             **collector_tls(pki)})
    c = Collector(cfg)
    c.start()
    try:
        w = node.workload(WORKLOAD)
        w.do("connect_many", host=DENIED, port=9, count=50)
        wait_for(lambda: cursor(url) >= 50, 30, "the first agent's events")
        first_run = cursor(url)
        agent.stop()
        (node.tmp / "state" / "status.json").unlink()
        import shutil

        shutil.rmtree(node.tmp / "state")
        node.event_log.unlink()
        agent = node.start_agent()
        agents_file.write_text(node.grpc_address() + "\n")
        w.do("connect_many", host=DENIED, port=9, count=10)
        wait_for(lambda: len(query_agents(url)) == 2 and query_agents(url)[1]["last_seq"]
                 >= 10, 60, "the second stream")
        wait_for(lambda: all(s.state == "streaming" for s in c.streams.values()),
                 10, "one stream")
        assert list(c.streams) == [node.grpc_address()]
        a1, a2 = query_agents(url)
        assert (a1["epoch"], a2["epoch"], a2["first_seq"]) == (1, 2, 1)
        assert a1["last_seq"] >= first_run     # and the stopping agent's last events
        last = wait_caught_up(url, node.grpc_address(), pki)
        store = open_store(url, readonly=True)
        try:
            seqs = [r["seq"] for r in store.rows("SELECT seq FROM events WHERE agent_id = ? "
                                                 "ORDER BY seq", (a2["agent_id"],))]
            assert seqs == list(range(1, last + 1))
            stored = store.load_events([(a2["agent_id"], s) for s in seqs])
            logged = event_log(node)
            assert not [s for s in seqs
                        if differences(from_proto(stored[(a2["agent_id"], s)]), logged[s])]
        finally:
            store.close()
    finally:
        c.stop()


def cut_spool_tail(state_dir: Path, records: int) -> int:
    """What a host crash does to the agent's spool: its last records never reached the disk.
    Returns the last seq left. (Records: seq u64 | length u32 | bytes; spool.py.)"""
    segments = sorted((state_dir / "spool").glob("*.evt"))
    data = segments[-1].read_bytes()
    ends, pos = [], 0
    while pos + 12 <= len(data):
        seq, n = struct.unpack_from("<QI", data, pos)
        pos += 12 + n
        ends.append((seq, pos))
    assert len(ends) > records, "the last spool segment is too short for this test"
    keep_seq, keep_end = ends[-records - 1]
    os.truncate(segments[-1], keep_end)
    return keep_seq


def test_agent_that_renumbered_after_a_crash_continues_in_a_new_epoch(node, pki, tmp_path):
    """The agent's last events never reached its disk (a host crash): restarted, it gives their
    seqs to new events. The collector finds the first renumbered seq and stores the agent's
    events from there as a new epoch; the events it had stored under those seqs stay."""
    configure_agent(node, pki, f"127.0.0.1:{free_port()}")
    agent = node.start_agent()
    address = node.grpc_address()
    url = f"sqlite://{tmp_path}/events.db"
    c = Collector(load_config(None, {"agents": [address], "database": url,
                                     **collector_tls(pki)}))
    c.start()
    try:
        w = node.workload(WORKLOAD)
        w.do("connect_many", host=DENIED, port=9, count=40)
        before = wait_caught_up(url, address, pki)
        assert agent.stop() == 0
        kept = cut_spool_tail(node.tmp / "state", 10)
        assert kept >= before - 10          # (+ the events of the agent's stopping)
        agent = node.start_agent()
        w.do("connect_many", host=DENIED, port=9, count=30)
        last = wait_caught_up(url, address, pki)
        (a1, a2) = query_agents(url)
        before = a1["last_seq"]
        assert (a1["epoch"], a1["first_seq"]) == (1, 1) and before > kept
        assert (a2["epoch"], a2["first_seq"], a2["last_seq"]) == (2, kept + 1, last)
        # each epoch holds its own events, every seq once; the log has both versions
        logged: dict[int, list[dict]] = {}
        for e in logged_events(node):
            logged.setdefault(e["seq"], []).append(e)
        store = open_store(url, readonly=True)
        try:
            for a, pick, span in ((a1, 0, range(1, before + 1)),
                                  (a2, -1, range(kept + 1, last + 1))):
                seqs = [r["seq"] for r in store.rows(
                    "SELECT seq FROM events WHERE agent_id = ? ORDER BY seq", (a["agent_id"],))]
                assert seqs == list(span)
                stored = store.load_events([(a["agent_id"], s) for s in seqs])
                for s in seqs:
                    assert not differences(from_proto(stored[(a["agent_id"], s)]),
                                           logged[s][pick]), s
        finally:
            store.close()
    finally:
        c.stop()


def query_agents(url: str) -> list[dict]:
    try:
        store = open_store(url, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet
        return []
    try:
        return query.agents(store)
    finally:
        store.close()


# -- the questions, over the command line, on real traffic -----------------------------------------


def collector_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostagent.collector", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_questions_on_real_traffic(node, pki, tmp_path):
    cert, key = pki.pair("agent")
    node.write_config(grpc={"listen": "127.0.0.1:0",
                            "tls": {"cert": cert, "key": key, "clientCA": pki.ca}},
                      events={"allow": True})
    # audit: the would-be denials reach their (closed) ports and are reported
    node.write_policy("w", policy("w", f"/{WORKLOAD}", "    - to: [{cidr: 127.0.0.4/32}]\n"
                                  "      ports: [{port: 9, protocol: TCP}]", mode="audit"))
    w = node.workload(WORKLOAD)   # bound at start: a cgroup made later is the root's until bound
    node.start_agent()
    url = f"sqlite://{tmp_path}/events.db"
    cfg = load_config(None, {"agents": [node.grpc_address()], "database": url,
                             **collector_tls(pki)})
    c = Collector(cfg)
    c.start()
    follow = None
    try:
        w.do("connect_many", host="127.0.0.4", port=9, count=3)     # allowed by the rule
        w.do("connect_many", host=DENIED, port=9, count=4)          # audited
        wait_for(lambda: "127.0.0.3" in collector_cli("inventory", "--db", url).stdout, 30,
                 "the inventory to show the traffic")
        # alert as it happens: a follower started now sees only what is new from now on
        follow = subprocess.Popen([sys.executable, "-m", "hostagent.collector", "first-seen",
                                   "--follow", "--json", "--interval", "0.2", "--db", url],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        w.do("connect_many", host=DENIED, port=7777, count=2)       # a new destination
        line = follow.stdout.readline()
        alert = json.loads(line)
        assert (alert["workload"], alert["dst_ip"], alert["dst_port"], alert["audit_n"]) == \
            (f"cgroup:/{WORKLOAD}", DENIED, 7777, 2)

        r = collector_cli("reached", "--workload", f"cgroup_path=/{WORKLOAD}", "--since", "1h",
                          "--json", "--db", url)
        assert r.returncode == 0, r.stderr
        got = {(x["dst_ip"], x["dst_port"]): (x["allow_n"], x["audit_n"])
               for x in json.loads(r.stdout)}
        assert got == {("127.0.0.4", 9): (3, 0), (DENIED, 9): (0, 4), (DENIED, 7777): (0, 2)}
        table = collector_cli("reached", "--workload", f"cgroup_path=/{WORKLOAD}", "--db", url)
        assert "127.0.0.4:9/tcp" in table.stdout and "audit 4" in table.stdout

        r = collector_cli("who", "--destination", "127.0.0.0/24", "--port", "7777", "--json",
                          "--db", url)
        assert [x["workload"] for x in json.loads(r.stdout)] == [f"cgroup:/{WORKLOAD}"]

        r = collector_cli("coverage", "--json", "--db", url)
        cov = json.loads(r.stdout)
        assert cov["unknown_destination"]["connections"] == 9
        assert cov["unknown_destination"]["ruled"] == 3 and \
            cov["unknown_destination"]["unknown"] == 6

        r = collector_cli("events", "--workload", f"cgroup_path=/{WORKLOAD}", "--verdict",
                          "audit", "--json", "--db", url)
        events = [json.loads(x) for x in r.stdout.splitlines()]
        assert len(events) == 6 and all(e["verdict"] == "audit" for e in events)
        assert {e["node"] for e in events} == {agent_status(node.grpc_address(), pki).node}

        drafts_dir = tmp_path / "drafts"
        drafts_dir.mkdir()
        r = collector_cli("draft-policy", "--workload", f"cgroup_path=/{WORKLOAD}", "--name",
                          "w-draft", "--output", str(drafts_dir), "--db", url)
        assert r.returncode == 0, r.stderr
        text = (drafts_dir / "w-draft.yaml").read_text()
        [draft] = load_policy_dir(drafts_dir)
        assert (draft.name, draft.mode.value, draft.selector.cgroup_path) == \
            ("w-draft", "audit", f"/{WORKLOAD}")
        assert "127.0.0.3/32" in text and "127.0.0.4/32" in text
        check = subprocess.run([sys.executable, "-m", "hostagent", "policy", "check",
                                str(drafts_dir), "--config", str(node.config_path)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "OK" in check.stdout, check.stderr

        r = collector_cli("agents", "--db", url)
        assert "streaming" in r.stdout or "connected" in r.stdout
        assert collector_cli("lost", "--db", url).stdout.strip() == "nothing lost"
    finally:
        if follow is not None:
            follow.kill()
            follow.wait(10)
        c.stop()
