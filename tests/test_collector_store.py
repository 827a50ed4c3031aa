"""The collector's store and queries, each test run against SQLite and against a real
PostgreSQL server (tests/pgserver.py): the same rows in, the same answers out."""

from __future__ import annotations

import threading
import time

import pytest

from hostagent.collector import query
from hostagent.collector.ingest import Writer
from hostagent.collector.metrics import CollectorMetrics
from hostagent.collector.policy_draft import drafts
from hostagent.collector.sequence import Sequencer
from hostagent.collector.store import Conflict, StoreError, open_store
from hostagent.collector.times import point
from hostagent.config import default_config
from hostagent.events.convert import from_proto, to_proto
from hostagent.policy.compile import compile_policies
from hostagent.policy.load import load_policy_dir
from hostagent.v1 import events_pb2 as pb
from tests.harness import wait_for
pytest_plugins = ("tests.pgserver",)     # the PostgreSQL fixtures: pg_server, db_url

T0 = "2026-11-20T08:00:00.000001Z"     # an old day
T1 = "2026-11-21T09:00:00Z"            # the day of the incident

API_POD = {"kind": "container", "namespace": "payments", "pod": "api-6f5d-abcde",
           "pod_uid": "5f0e2b4a-8c1d-4e7f-9a3b-6d2c1e0f4a5b", "container": "main",
           "container_id": "ab" * 32, "runtime": "containerd", "service_account": "api",
           "labels": {"app": "api", "tier": "backend", "pod-template-hash": "6f5d"},
           "unit": "cri-containerd-abab.scope", "spiffe_id": "spiffe://cluster.local/ns/"
           "payments/sa/api", "cgroup_path": "/kubepods.slice/pod5f0e/cri-containerd-abab.scope",
           "pid": 10, "tid": 10, "comm": "python3", "uid": 1000, "gid": 1000}
API_POD_2 = dict(API_POD, pod="api-6f5d-zzzzz", container_id="cd" * 32,
                 cgroup_path="/kubepods.slice/pod77/cri-containerd-cdcd.scope")
NGINX = {"kind": "service", "unit": "nginx.service", "cgroup_path": "/system.slice/nginx.service",
         "spiffe_id": "spiffe://cluster.local/node/vm/unit/nginx.service", "pid": 20}
BARE = {"kind": "cgroup", "cgroup_path": "/w", "pid": 30}


def conn(seq, time, workload, ip, port, proto="tcp", name=None, verdict="deny",
         reason="policy_default", policy="p", rule=None, count=0) -> dict:
    return {"seq": seq, "kind": "connection", "time": time, "verdict": verdict,
            "reason": reason, "policy": policy, "rule": rule, "generation": 1,
            "hook": "connect4", "count": count, "workload": workload,
            "destination": {"ip": ip, "port": port, "protocol": proto, "name": name},
            "socket": {"cookie": seq, "family": "ipv6" if ":" in ip else "ipv4",
                       "protocol": proto}}


def dns(seq, time, workload, name, verdict="allow", answers=()) -> dict:
    return {"seq": seq, "kind": "dns", "time": time, "verdict": verdict,
            "reason": "policy_rule" if verdict == "allow" else "policy_default",
            "policy": "p", "query": {"name": name, "type": "A"}, "rcode": "NOERROR",
            "answers": [{"ip": a, "ttl": 30} for a in answers], "workload": workload,
            "client": {"ip": "127.0.0.1", "port": 5353, "protocol": "udp"}}


def number(events: list[dict], node: str) -> list[pb.Event]:
    return [to_proto(dict(e, node=node, agent_version="0.1.0")) for e in events]


def ingest(store, node: str, events: list[dict], batch: int = 3):
    msgs = number(events, node)
    stream = store.stream(node, f"{node}:50051", "0.1.0")
    seq = Sequencer(stream.agent_id, stream.last_seq)
    for i in range(0, len(msgs), batch):
        part = msgs[i:i + batch]
        store.write([seq.feed(part, pb.EventBatch(events=part).SerializeToString())])
    store.rollup()
    return stream.agent_id


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def incident(store):
    """Two nodes' events: a pod (two instances), nginx, a bare cgroup, a gone cgroup."""
    a = [
        {"seq": 1, "kind": "agent", "time": T0, "agent": {"phase": "started", "pid": 1}},
        conn(2, T0, API_POD, "203.0.113.9", 443, name="api.example.com", verdict="allow",
             reason="policy_rule", rule="api"),
        dns(3, T1, API_POD, "api.example.com", answers=["203.0.113.9"]),
        conn(4, T1, API_POD, "203.0.113.9", 443, name="api.example.com", verdict="allow",
             reason="policy_rule", rule="api", count=4),
        conn(5, T1, API_POD, "10.1.2.3", 5432),
        conn(6, T1, NGINX, "2001:db8::5", 443, verdict="audit"),
        conn(7, T1, NGINX, "2001:db8::5", 443, verdict="audit"),
        conn(8, T1, BARE, "169.254.169.254", 80, reason="metadata_block"),
        conn(9, T1, BARE, "127.0.0.3", 9),
        conn(10, T1, BARE, "1.1.1.1", 443, reason="encrypted_dns"),
        conn(11, T1, {}, "10.9.9.9", 1),
        conn(12, T1, BARE, "127.0.0.3", 9, proto="udp"),
        conn(13, T1, BARE, "127.0.0.3", 10),
    ]
    b = [conn(1, T1, API_POD_2, "10.1.2.3", 5432),
         conn(2, "2026-11-21T09:30:00Z", API_POD_2, "10.1.2.4", 6379, proto="tcp")]
    ingest(store, "node-a", a)
    ingest(store, "node-b", b)
    return store


# -- schema, streams, the write transaction --------------------------------------------------------


def test_schema_is_created_once_and_read_only_opens_check_it(db_url, tmp_path):
    for _ in range(2):
        open_store(db_url).close()
    ro = open_store(db_url, readonly=True)
    assert ro.scalar("SELECT COUNT(*) FROM events") == 0
    ro.close()
    with pytest.raises(StoreError, match="no such database"):
        open_store(f"sqlite://{tmp_path}/missing.db", readonly=True)


def test_stream_resume_and_new_epoch(store):
    first = store.stream("node-a", "10.0.0.1:50051", "0.1.0")
    assert (first.epoch, first.last_seq, first.last_event) == (1, 0, None)
    events = [conn(s, T1, BARE, "10.0.0.1", 443) for s in (1, 2, 3)]
    ingest(store, "node-a", events)
    again = store.stream("node-a", "10.0.0.2:50051", "0.1.1")
    assert (again.agent_id, again.epoch, again.last_seq) == (first.agent_id, 1, 3)
    assert again.last_event == number(events, "node-a")[2]
    # the agent numbers anew (state lost): a new stream from 0
    reset = store.new_epoch("node-a", "10.0.0.2:50051", "0.1.1")
    assert (reset.epoch, reset.last_seq) == (2, 0) and reset.agent_id != first.agent_id
    assert store.stream("node-a", "x", "v").agent_id == reset.agent_id
    # the agent renumbered from seq 3 on: the new epoch continues after 2
    renumbered = store.new_epoch("node-a", "x", "v", after=2)
    assert (renumbered.epoch, renumbered.last_seq) == (3, 2)
    assert [(a["node"], a["epoch"], a["first_seq"], a["last_seq"])
            for a in query.agents(store)] == [("node-a", 1, 1, 3), ("node-a", 2, 1, 0),
                                             ("node-a", 3, 3, 2)]


def test_cursor_is_compare_and_set_and_a_conflict_writes_nothing(db_url):
    one, two = open_store(db_url), open_store(db_url)
    try:
        events = number([conn(s, T1, BARE, "10.0.0.1", 443) for s in range(1, 6)], "n")
        s1 = one.stream("n", "a", "v")
        s2 = two.stream("n", "b", "v")          # a second collector on the same database
        one.write([Sequencer(s1.agent_id, 0).feed(events)])
        with pytest.raises(Conflict, match="another collector"):
            two.write([Sequencer(s2.agent_id, 0).feed(events)])
        assert one.scalar("SELECT COUNT(*) FROM events") == 5
        assert one.cursor(s1.agent_id) == 5
        # batches of one stream that do not chain are refused as a whole
        seq = Sequencer(s1.agent_id, 5)
        b1 = seq.feed(number([conn(6, T1, BARE, "10.0.0.1", 443)], "n"))
        seq.cursor = 10
        b2 = seq.feed(number([conn(11, T1, BARE, "10.0.0.1", 443)], "n"))
        with pytest.raises(Conflict):
            one.write([b1, b2])
        assert one.cursor(s1.agent_id) == 5 and one.scalar("SELECT COUNT(*) FROM events") == 5
    finally:
        one.close()
        two.close()


def test_stored_events_are_the_agents_events(store):
    events = [conn(1, T1, API_POD, "203.0.113.9", 443, name="api.example.com"),
              dns(2, T1, API_POD, "api.example.com", answers=["203.0.113.9"]),
              {"seq": 3, "kind": "policy", "time": T1, "generation": 2,
               "policy_change": {"ok": True, "policies": ["p"], "added": ["p"]}}]
    agent_id = ingest(store, "node-a", events, batch=2)
    stored = store.load_events([(agent_id, s) for s in (3, 1, 2, 4)])
    assert list(stored) == [(agent_id, 3), (agent_id, 1), (agent_id, 2)]
    for e in number(events, "node-a"):
        assert stored[(agent_id, e.seq)] == e
        assert from_proto(stored[(agent_id, e.seq)]) == from_proto(e)


# -- the questions ---------------------------------------------------------------------------------


class Rows(list):
    """Rows compared in any order (queries order by time; ties are the database's choice)."""

    def __eq__(self, other):
        return sorted(self, key=repr) == sorted(other, key=repr)


def _dest(rows):
    return Rows((r["workload"], r["kind"], r["dst_name"], r["dst_ip"], r["dst_port"],
                 r["allow_n"], r["audit_n"], r["deny_n"]) for r in rows)


def test_reached(incident):
    sel = query.Selector.parse(["namespace=payments"])
    assert _dest(query.reached(incident, sel)) == [
        ("pod:payments/api", "connection", None, "10.1.2.3", 5432, 0, 0, 2),
        ("pod:payments/api", "connection", None, "10.1.2.4", 6379, 0, 0, 1),
        ("pod:payments/api", "connection", "api.example.com", "203.0.113.9", 443, 5, 0, 0),
        ("pod:payments/api", "dns", "api.example.com", None, None, 1, 0, 0)]
    # one pod instance, in a time range, on one node
    assert _dest(query.reached(incident, query.Selector.parse(["pod=api-6f5d-zzzzz"]),
                               since=point("2026-11-21T09:10:00Z"))) == \
        [("pod:payments/api", "connection", None, "10.1.2.4", 6379, 0, 0, 1)]
    assert len(query.reached(incident, sel, until=point(T1))) == 1          # T0's only
    assert len(query.reached(incident, query.Selector.parse(["node=node-b"]))) == 2
    # commas AND, flags OR; labels through the workload
    assert query.reached(incident, query.Selector.parse(["namespace=payments,label:app=web"])) \
        == []
    both = query.reached(incident, query.Selector.parse(["label:tier=back*", "unit=nginx.*"]))
    assert {r["workload"] for r in both} == {"pod:payments/api", "unit:nginx.service"}
    gone = query.reached(incident, query.Selector.parse(["workload=unknown"]))
    assert _dest(gone) == [("unknown", "connection", None, "10.9.9.9", 1, 0, 0, 1)]
    with pytest.raises(query.QueryError, match="unknown key 'podname'"):
        query.Selector.parse(["podname=x"])
    with pytest.raises(query.QueryError, match="expected KEY=PATTERN"):
        query.Selector.parse(["payments"])


def test_who(incident):
    def who(dest, **kw):
        return Rows((r["workload"], r["kind"], r["dst_ip"], r["dst_port"], r["n"], r["agents"])
                    for r in query.who(incident, query.Destination.parse(dest), **kw))

    assert who("10.0.0.0/8") == [("pod:payments/api", "connection", "10.1.2.3", 5432, 2, 2),
                                 ("pod:payments/api", "connection", "10.1.2.4", 6379, 1, 1),
                                 ("unknown", "connection", "10.9.9.9", 1, 1, 1)]
    assert who("10.1.2.3") == [("pod:payments/api", "connection", "10.1.2.3", 5432, 2, 2)]
    assert who("API.example.com.") == [
        ("pod:payments/api", "connection", "203.0.113.9", 443, 5, 1),
        ("pod:payments/api", "dns", None, None, 1, 1)]
    assert who("*.example.com", port=443) == [
        ("pod:payments/api", "connection", "203.0.113.9", 443, 5, 1)]
    assert who("2001:db8::/32") == [("unit:nginx.service", "connection", "2001:db8::5", 443,
                                     2, 1)]
    # the IPv4-mapped spelling is the same address (events show it as IPv4)
    assert who("::ffff:127.0.0.3") == who("127.0.0.3") and len(who("127.0.0.3")) == 3
    assert who("127.0.0.0/8", port=9) == [
        ("cgroup:/w", "connection", "127.0.0.3", 9, 1, 1),
        ("cgroup:/w", "connection", "127.0.0.3", 9, 1, 1)]
    assert who("203.0.113.0/24", since=point(T1)) == [
        ("pod:payments/api", "connection", "203.0.113.9", 443, 4, 1)]
    with pytest.raises(query.QueryError):
        query.Destination.parse("not a name")


def test_inventory_and_first_seen(incident):
    inv = query.inventory(incident, query.Selector.parse(["workload=pod:payments/*"]))
    assert [(r["dst_name"], r["dst_ip"], r["dst_port"], r["protocol"], r["n"], r["allow_n"],
             r["deny_n"], r["first_node"]) for r in inv] == [
        ("", "10.1.2.3", 5432, "tcp", 2, 0, 2, "node-a"),
        ("", "10.1.2.4", 6379, "tcp", 1, 0, 1, "node-b"),
        ("api.example.com", "203.0.113.9", 443, "tcp", 5, 5, 0, "node-a")]
    assert {r["workload"] for r in query.inventory(incident)} == {
        "pod:payments/api", "unit:nginx.service", "cgroup:/w", "unknown"}
    first = query.first_seen(incident, since=point(T1))
    assert ("api.example.com", "203.0.113.9") not in [(r["dst_name"], r["dst_ip"])
                                                      for r in first]   # first seen on T0
    assert ("pod:payments/api", "10.1.2.4", "node-b", 2) in [
        (r["workload"], r["dst_ip"], r["first_node"], r["first_seq"]) for r in first]
    newest = query.last_dependency_id(incident)
    assert query.first_seen(incident, after_id=newest) == []
    ingest(incident, "node-a", [conn(14, T1, BARE, "192.0.2.1", 443)], batch=1)
    new = query.first_seen(incident, after_id=newest)
    assert [(r["workload"], r["dst_ip"], r["first_seq"]) for r in new] == \
        [("cgroup:/w", "192.0.2.1", 14)]


def test_follow_first_seen_prints_new_destinations_as_stored(incident, db_url):
    reader = open_store(db_url, readonly=True)
    stop = threading.Event()
    seen: list[dict] = []

    def follow():
        for row in query.follow_first_seen(reader, query.Selector.parse(["workload=cgroup:*"]),
                                           None, 0.05, stop):
            seen.append(row)

    t = threading.Thread(target=follow)
    t.start()
    try:
        time.sleep(0.2)
        ingest(incident, "node-a", [conn(14, T1, BARE, "192.0.2.1", 443),
                                    conn(15, T1, NGINX, "192.0.2.2", 443),
                                    conn(16, T1, BARE, "192.0.2.1", 443)], batch=1)
        wait_for(lambda: seen, 5, "a first-seen row")
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(5)
        reader.close()
    assert [(r["workload"], r["dst_ip"]) for r in seen] == [("cgroup:/w", "192.0.2.1")]


def test_coverage(incident):
    c = query.coverage(incident)
    # connections with a destination: 13 events, 16 counting seq 4's count=4; named: 5
    # (api.example.com), ruled: the same 5; unknown: the other 11
    assert c["unknown_destination"] == {"connections": 16, "named": 5, "ruled": 5,
                                        "unknown": 11, "rate": round(11 / 16, 6)}
    # identified: the two pods (9, with the DNS query) and nginx (2); not: /w (5), gone (1)
    assert c["identity"]["events"] == 17 and c["identity"]["identified"] == 11
    assert {r["kind"]: (r["events"], r["identified"]) for r in c["identity"]["by_kind"]} == \
        {"container": (9, 9), "service": (2, 2), "cgroup": (5, 0), "(gone)": (1, 0)}
    assert c["workloads_with_unknown"][0] == {"workload": "cgroup:/w", "connections": 5,
                                              "unknown": 5, "rate": 1.0}
    pod = query.coverage(incident, query.Selector.parse(["namespace=payments"]))
    assert pod["unknown_destination"]["rate"] == round(3 / 8, 6)
    assert pod["identity"]["coverage"] == 1.0


def test_events_agents_and_lost(incident):
    keys = query.event_rows(incident, query.Selector.parse(["cgroup_path=/w"]),
                            kinds=["connection"], verdicts=["deny"],
                            destination=query.Destination.parse("127.0.0.3"))
    assert [(k["node"], k["seq"]) for k in keys] == [("node-a", 9), ("node-a", 12),
                                                    ("node-a", 13)]
    got = [from_proto(e) for e in query.events(incident, [(k["agent_id"], k["seq"])
                                                          for k in keys])]
    assert [(e["seq"], e["destination"]["port"], e["node"]) for e in got] == \
        [(9, 9, "node-a"), (12, 9, "node-a"), (13, 10, "node-a")]
    agents = {a["node"]: a for a in query.agents(incident)}
    assert (agents["node-a"]["last_seq"], agents["node-a"]["events"]) == (13, 13)
    assert agents["node-b"]["lost"] == {}
    ingest(incident, "node-b", [conn(3, T1, BARE, "10.0.0.1", 1),
                                {"seq": 0, "kind": "lost", "time": T1,
                                 "lost": {"source": "replay_buffer", "count": 5,
                                          "first_seq": 4, "last_seq": 8}},
                                conn(9, T1, BARE, "10.0.0.1", 1),
                                conn(12, T1, BARE, "10.0.0.1", 1)])
    assert [(r["node"], r["first_seq"], r["last_seq"], r["count"], r["source"])
            for r in query.lost(incident, "node-b")] == [
        ("node-b", 4, 8, 5, "replay_buffer"), ("node-b", 10, 11, 2, "unexplained")]
    assert query.agents(incident)[1]["lost"] == {"replay_buffer": 5, "unexplained": 2}


# -- draft policies --------------------------------------------------------------------------------


def test_draft_policies_pass_policy_check(incident, tmp_path):
    made = drafts(incident, query.Selector.parse(["workload=pod:*", "unit=nginx.service",
                                                  "cgroup_path=/w"]))
    assert [d.workload for d in made] == ["cgroup:/w", "pod:payments/api", "unit:nginx.service"]
    (tmp_path / "drafts.yaml").write_text("---\n".join(d.yaml() for d in made))
    policies = load_policy_dir(tmp_path)
    compile_policies(policies, default_config().metadata.blocked_networks())   # as `check` does
    by_name = {p.name: p for p in policies}
    assert set(by_name) == {"draft-cgroup-w", "draft-pod-payments-api",
                            "draft-unit-nginx.service"}
    assert all(p.mode.value == "audit" for p in policies)
    pod = next(d for d in made if d.workload == "pod:payments/api").policy()
    assert pod["spec"]["selector"] == {"kubernetes": {
        "namespace": "payments", "serviceAccount": "api",
        "podSelector": {"matchLabels": {"app": "api", "tier": "backend"}}}}
    assert pod["spec"]["egress"] == [
        {"name": "api.example.com", "to": [{"fqdn": "api.example.com"}],
         "ports": [{"port": 443, "protocol": "TCP"}]},
        {"name": "10.1.2.3", "to": [{"cidr": "10.1.2.3/32"}],
         "ports": [{"port": 5432, "protocol": "TCP"}]},
        {"name": "10.1.2.4", "to": [{"cidr": "10.1.2.4/32"}],
         "ports": [{"port": 6379, "protocol": "TCP"}]}]
    nginx = next(d for d in made if d.workload == "unit:nginx.service").policy()
    assert nginx["spec"]["selector"] == {"systemdUnit": "nginx.service"}
    assert nginx["spec"]["egress"][0]["to"] == [{"cidr": "2001:db8::5/128"}]
    bare = next(d for d in made if d.workload == "cgroup:/w")
    # 9 over TCP and UDP, 10 over TCP: one ANY port and one TCP port (not a 9-10 range)
    assert bare.policy()["spec"]["egress"] == [
        {"name": "127.0.0.3", "to": [{"cidr": "127.0.0.3/32"}],
         "ports": [{"port": 9, "protocol": "ANY"}, {"port": 10, "protocol": "TCP"}]}]
    text = bare.yaml()
    assert "169.254.169.254:80/tcp" in text and "cloud metadata endpoint" in text
    assert "1.1.1.1:443/tcp" in text and "DNS over HTTPS/TLS" in text
    assert "cidr: \"169.254.169.254" not in text and "cidr: \"1.1.1.1" not in text
    # one name for one workload only
    with pytest.raises(Exception, match="--name names one policy"):
        drafts(incident, query.Selector.parse(["workload=*"]), name="x")
    named = drafts(incident, query.Selector.parse(["unit=nginx.service"]), name="nginx-egress")
    assert named[0].policy()["metadata"]["name"] == "nginx-egress"


# -- retention -------------------------------------------------------------------------------------


def test_retention_deletes_old_events_and_keeps_the_cursor(incident):
    before = incident.scalar("SELECT COUNT(*) FROM events")
    cutoff = point("2026-11-21T00:00:00Z")
    while incident.prune(cutoff, limit=1):      # chunk by chunk, as the writer does
        pass
    assert incident.scalar("SELECT COUNT(*) FROM events") == before - 2   # seq 1, 2 of node-a
    assert incident.scalar("SELECT MIN(time_us) FROM events") >= cutoff
    assert {a["node"]: a["last_seq"] for a in query.agents(incident)} == \
        {"node-a": 13, "node-b": 2}
    agent_a = query.agents(incident)[0]["agent_id"]
    assert incident.load_events([(agent_a, 3)]) != {}
    # the destination last seen on T0 only is gone from the inventory, the rest stays
    names = {r["dst_ip"] for r in query.inventory(incident)}
    assert "203.0.113.9" in names      # seen again on T1
    incident.prune(point("2026-11-22T00:00:00Z"))
    incident.prune(point("2026-11-22T00:00:00Z"))
    assert query.inventory(incident) == [] and incident.scalar(
        "SELECT COUNT(*) FROM batches") == 0


# -- the writer thread -----------------------------------------------------------------------------


def test_writer_fences_a_stream_whose_cursor_moved(db_url):
    conflicts: list[int] = []
    w = Writer(db_url, CollectorMetrics(), on_conflict=conflicts.append)
    w.start()
    other = open_store(db_url)
    stop = threading.Event()
    try:
        stream = w.call(lambda s: s.stream("n", "a", "v"), 10)
        seq = Sequencer(stream.agent_id, 0)
        w.submit(seq.feed(number([conn(1, T1, BARE, "10.0.0.1", 1)], "n")), stop)
        wait_for(lambda: w.call(lambda s: s.cursor(stream.agent_id), 10) == 1, 10, "seq 1")
        # another writer moves the cursor (a second collector): the next batch conflicts
        s2 = other.stream("n", "b", "v")
        other.write([Sequencer(s2.agent_id, 1).feed(
            number([conn(2, T1, BARE, "10.0.0.1", 1)], "n"))])
        w.submit(seq.feed(number([conn(2, T1, BARE, "10.0.0.1", 1)], "n")), stop)
        w.submit(seq.feed(number([conn(3, T1, BARE, "10.0.0.1", 1)], "n")), stop)
        wait_for(lambda: conflicts, 10, "the conflict callback")
        assert conflicts[0] == stream.agent_id
        # both batches of the fenced stream were dropped; a resumed stream writes again
        resumed = w.call(lambda s: s.stream("n", "a", "v"), 10)
        assert resumed.last_seq == 2
        seq = Sequencer(resumed.agent_id, resumed.last_seq)
        w.submit(seq.feed(number([conn(3, T1, BARE, "10.0.0.1", 1)], "n")), stop)
    finally:
        stop.set()
        w.stop()
        other.close()
    check = open_store(db_url, readonly=True)
    try:
        assert [r["seq"] for r in check.rows("SELECT seq FROM events ORDER BY seq")] == [1, 2, 3]
    finally:
        check.close()


def test_writer_prunes_on_its_timer_and_counts_dependencies(db_url):
    metrics = CollectorMetrics()
    w = Writer(db_url, metrics, retention=3600.0, retention_interval=0.2, first_prune=0.2)
    w.start()
    stop = threading.Event()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        stream = w.call(lambda s: s.stream("n", "a", "v"), 10)
        seq = Sequencer(stream.agent_id, 0)
        w.submit(seq.feed(number([conn(1, T0, BARE, "10.0.0.1", 1),
                                  conn(2, now, BARE, "10.0.0.2", 1)], "n")), stop)
        # the day-old event goes, today's stays; the dependency of today's is counted
        wait_for(lambda: w.call(lambda s: s.scalar("SELECT COUNT(*) FROM events"), 10) == 1,
                 10, "retention")
        wait_for(lambda: w.call(lambda s: query.inventory(s), 10), 10, "the rollup")
        assert [r["dst_ip"] for r in w.call(lambda s: query.inventory(s), 10)] == ["10.0.0.2"]
        assert metrics.pruned._value.get() == 1
        assert w.call(lambda s: s.cursor(stream.agent_id), 10) == 2
    finally:
        stop.set()
        w.stop()


def test_prune_command(db_url):
    import subprocess
    import sys

    from tests.harness import REPO

    s = open_store(db_url)
    try:
        ingest(s, "n", [conn(1, T0, BARE, "10.0.0.1", 1), conn(2, T1, BARE, "10.0.0.2", 1)])
    finally:
        s.close()
    r = subprocess.run([sys.executable, "-m", "hostagent.collector", "prune", "--db", db_url,
                        "--older-than", "10000d"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("deleted 0 events"), r.stderr
    r = subprocess.run([sys.executable, "-m", "hostagent.collector", "prune", "--db", db_url,
                        "--older-than", "1s"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("deleted 2 events"), r.stderr
    bad = subprocess.run([sys.executable, "-m", "hostagent.collector", "prune", "--db", db_url,
                          "--older-than", "soon"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "--older-than 'soon'" in bad.stderr
