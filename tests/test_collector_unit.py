"""The collector's pure parts: config, times, addresses, workload keys, the sequence
bookkeeping, discovery sources, and the draft policy's port grouping."""

from __future__ import annotations

import fnmatch
import os
import re
import time

import pytest

from hostagent.collector import times
from hostagent.collector.config import agent_address, dns_target, load_config
from hostagent.collector.discovery import DnsSource, FileSource, resolve_all
from hostagent.collector.policy_draft import _ports, policy_name
from hostagent.collector.rows import address_key, pod_owner, workload_of
from hostagent.collector.sequence import BEFORE_COLLECTOR, UNEXPLAINED, Sequencer
from hostagent.collector.store import glob_regex, sqlite_path
from hostagent.errors import ConfigError
from hostagent.events.convert import to_proto
from hostagent.v1 import events_pb2 as pb

# -- times -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("30d", 30 * 86400), ("12h", 43200), ("90s", 90), ("1h30m", 5400), ("2w", 14 * 86400),
    ("45", 45), ("0.5h", 1800), (60, 60), (1.5, 1.5)])
def test_duration_accepts(text, seconds):
    assert times.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30x", "1h 30m", "-5m", "0", "0s", True, None,
                                  [1], "1.h", "h1"])
def test_duration_rejects(text):
    with pytest.raises(ValueError):
        times.duration(text)


def test_points_in_time():
    now = 1_800_000_000.0
    assert times.point("1h", now) == int((now - 3600) * 1e6)
    assert times.point("2026-11-21T09:00:00Z") == \
        times.point("2026-11-21T09:00:00+00:00") == times.point("2026-11-21T09:00:00")
    assert times.point("2026-11-21T10:00:00+01:00") == times.point("2026-11-21T09:00:00Z")
    assert times.point("2026-11-21") == times.point("2026-11-21T00:00:00Z")
    assert times.iso(times.point("2026-11-21T09:07:48.300975Z")) == \
        "2026-11-21T09:07:48.300975Z"
    assert times.iso(None) is None
    with pytest.raises(ValueError):
        times.point("yesterday")


# -- config ----------------------------------------------------------------------------------------


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text(
        "agents: ['10.0.0.5:50051', 'node-b', '[fd00::5]:7000', 'unix:///run/h.sock']\n"
        "discovery:\n  dns: ['agents.example:50051', 'plain.example']\n"
        f"  files: ['{tmp_path}/agents.txt']\n  interval: 1m\n"
        "tls: {ca: /etc/c/ca.pem, cert: /etc/c/c.pem, key: /etc/c/c.key, serverName: agent}\n"
        "database: postgresql://collector@db/events\n"
        "retention: {maxAge: 7d, interval: 5m}\nmaxBatch: 1000\nprobeInterval: 10s\n"
        "metrics: {listen: '127.0.0.1:9403'}\nlogLevel: debug\n")
    cfg = load_config(str(path), {"agents": ["10.0.0.6:50051", "10.0.0.5:50051"],
                                  "retention.maxAge": "forever"})
    assert cfg.agents == ("10.0.0.5:50051", "node-b:50051", "[fd00::5]:7000",
                          "unix:///run/h.sock", "10.0.0.6:50051")
    assert cfg.discover_dns == (("agents.example", 50051), ("plain.example", 50051))
    assert cfg.discover_files == (f"{tmp_path}/agents.txt",)
    assert cfg.discovery_interval == 60.0
    assert (cfg.tls.ca, cfg.tls.server_name) == ("/etc/c/ca.pem", "agent")
    assert cfg.database == "postgresql://collector@db/events"
    assert cfg.retention is None and cfg.retention_interval == 300.0
    assert (cfg.max_batch, cfg.probe_interval, cfg.log_level) == (1000, 10.0, "debug")
    assert cfg.metrics_listen == ("127.0.0.1", 9403)


def test_config_defaults():
    cfg = load_config(None)
    assert cfg.database == "sqlite:///var/lib/hostagent-collector/events.db"
    assert cfg.retention == 30 * 86400 and cfg.agents == () and cfg.tls.ca is None


@pytest.mark.parametrize("text,where,what", [
    ("agents: [x:1]\ndatabse: sqlite:///x\n", ":2", "databse: unknown key"),
    ("tls:\n  ca: /a\n  certificate: /b\n", ":3", "tls.certificate: unknown key"),
    ("agents: ['a:99999']\n", ":1", "port must be a number"),
    ("retention: {maxAge: 30 days}\n", ":1", "expected a duration"),
    ("database: mysql://x\n", ":1", "expected sqlite:///PATH or postgresql://"),
    ("database: sqlite://relative.db\n", ":1", "must be absolute"),
    ("maxBatch: 5000\n", ":1", "at most 4096"),
    ("discovery: {dns: [':53']}\n", ":1", "missing host"),
    ("agents: 10.0.0.5:50051\n", ":1", "expected a list"),
])
def test_config_errors_name_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}{where}: "), str(err.value)
    assert what in str(err.value)


def test_config_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--retention: 'x': expected a duration"):
        load_config(None, {"retention.maxAge": "x"}, {"retention.maxAge": "--retention"})
    with pytest.raises(ConfigError, match="cert and key go together"):
        load_config(None, {"tls.ca": "/a", "tls.cert": "/b"})
    with pytest.raises(ConfigError, match="need ca"):
        load_config(None, {"tls.cert": "/b", "tls.key": "/c"})


@pytest.mark.parametrize("text,address", [
    ("10.0.0.5:50051", "10.0.0.5:50051"), ("10.0.0.5", "10.0.0.5:50051"),
    ("node-a.example", "node-a.example:50051"), ("[::1]:7000", "[::1]:7000"),
    ("fd00::5", "[fd00::5]:50051"), ("unix:///run/x.sock", "unix:///run/x.sock"),
    ("unix:/run/x.sock", "unix:///run/x.sock")])
def test_agent_address(text, address):
    assert agent_address(text) == address


@pytest.mark.parametrize("text", ["", "10.0.0.5:0", "unix:relative.sock", "a b:1", 5,
                                  "[zz]:1", "10.0.0.999:1"])
def test_agent_address_rejects(text):
    with pytest.raises(ValueError):
        agent_address(text)


def test_dns_target():
    assert dns_target("agents.kube-system.svc:50051") == ("agents.kube-system.svc", 50051)
    assert dns_target("agents") == ("agents", 50051)
    with pytest.raises(ValueError):
        dns_target("agents:0")


def test_sqlite_urls():
    assert sqlite_path("sqlite:///var/lib/x.db") == "/var/lib/x.db"
    assert sqlite_path("sqlite:////var/lib/x.db") == "/var/lib/x.db"
    assert sqlite_path("sqlite://x.db") == "x.db"
    assert sqlite_path("/var/x.db") == "/var/x.db"
    assert sqlite_path("postgresql://h/db") is None


# -- rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pod,labels,owner", [
    ("api-7d9c4b5f6-x2x9q", {"pod-template-hash": "7d9c4b5f6", "app": "api"}, "api"),
    ("web-0", {"statefulset.kubernetes.io/pod-name": "web-0",
               "controller-revision-hash": "web-5d8"}, "web"),
    ("web-12", {"statefulset.kubernetes.io/pod-name": "web-12"}, "web"),
    ("fluentd-8xk2p", {"controller-revision-hash": "6c9f", "pod-template-generation": "3"},
     "fluentd"),
    ("backup-28345678-abcde", {"job-name": "backup-28345678"}, "backup"),
    ("migrate-xkz2p", {"batch.kubernetes.io/job-name": "migrate"}, "migrate"),
    ("standalone", {}, "standalone"),
    ("web-12345", {}, "web-12345"),   # a bare pod: nothing says a controller named it
    ("odd-7d9c4", {"pod-template-hash": "zzz"}, "odd-7d9c4")])
def test_pod_owner(pod, labels, owner):
    assert pod_owner(pod, labels) == owner


def _workload(**w) -> pb.Workload:
    return to_proto({"kind": "connection", "workload": w}).workload


def test_workload_keys():
    pod = workload_of(_workload(kind="container", namespace="pay", pod="api-6f-abcde",
                                labels={"app": "api", "pod-template-hash": "6f"},
                                container="main", container_id="ab" * 32,
                                service_account="api", unit="cri-containerd-x.scope",
                                cgroup_path="/kubepods.slice/x"))
    assert (pod.key, pod.kind, pod.owner, pod.labels) == ("pod:pay/api", "pod", "api",
                                                          '{"app":"api"}')
    pending = workload_of(_workload(kind="container", container_id="cd" * 32,
                                    unit="cri-containerd-y.scope", cgroup_path="/k/y"))
    assert pending.key == "container:" + "cd" * 6
    assert workload_of(_workload(kind="service", unit="nginx.service",
                                 cgroup_path="/system.slice/nginx.service")).key == \
        "unit:nginx.service"
    assert workload_of(_workload(kind="cgroup", cgroup_path="/w/a")).key == "cgroup:/w/a"
    assert workload_of(_workload()).key == "unknown"


def test_address_keys_sort_like_addresses():
    ips = ["0.0.0.0", "9.255.255.255", "10.0.0.0", "10.0.0.1", "10.255.255.255", "11.0.0.0",
           "255.255.255.255", "::", "::1", "2001:db8::", "2001:db8::ffff", "fe80::1"]
    keys = [address_key(ip) for ip in ips]
    assert all(len(k) == 16 for k in keys)
    v4 = keys[:7]
    assert v4 == sorted(v4)
    assert address_key("not-an-ip") is None


# -- the sequence bookkeeping ----------------------------------------------------------------------


def _ev(seq: int, **kw) -> pb.Event:
    d = {"seq": seq, "kind": "connection", "time": "2026-11-21T09:00:00Z", "verdict": "deny",
         "reason": "policy_default", "workload": {"kind": "cgroup", "cgroup_path": "/w"},
         "destination": {"ip": "10.0.0.1", "port": 443, "protocol": "tcp"}, **kw}
    return to_proto(d)


def _lost(seq: int, source: str, first: int = 0, last: int = 0, count: int = 0) -> pb.Event:
    return to_proto({"seq": seq, "kind": "lost", "time": "2026-11-21T09:00:00Z",
                     "lost": {"source": source, "count": count or max(0, last - first + 1),
                              "first_seq": first, "last_seq": last}})


def _seqs(batch) -> list[int]:
    return [r[1] for r in batch.events]


def _lost_rows(batch) -> list[tuple]:
    return [(lo, hi, n, src, seq) for lo, hi, n, src, seq, _t in batch.lost]


def test_contiguous_events_move_the_cursor():
    s = Sequencer(1, 10)
    b = s.feed([_ev(11), _ev(12), _ev(13)])
    assert (b.after, b.last_seq, _seqs(b), b.lost, b.duplicates) == (10, 13, [11, 12, 13], [], 0)
    assert b.data is not None and len(b.identities) == 1


def test_events_already_stored_are_dropped_and_counted():
    s = Sequencer(1, 10)
    b = s.feed([_ev(9), _ev(10), _ev(11)])
    assert (_seqs(b), b.duplicates, b.last_seq) == ([11], 2, 11)


def test_replay_buffer_gap_is_recorded_with_the_agents_source():
    s = Sequencer(1, 10)
    b = s.feed([_lost(0, "replay_buffer", 11, 20), _ev(21)])
    assert _lost_rows(b) == [(11, 20, 10, "replay_buffer", 0)]
    assert (_seqs(b), b.last_seq) == ([21], 21)


def test_replay_buffer_gap_overlapping_the_cursor_is_clipped():
    s = Sequencer(1, 15)
    b = s.feed([_lost(0, "replay_buffer", 11, 20), _ev(21)])
    assert _lost_rows(b) == [(16, 20, 5, "replay_buffer", 0)]


def test_agent_restart_gap_with_its_own_seq():
    # an agent without a spool reserves numbers ahead; killed, its successor says so
    s = Sequencer(1, 100)
    b = s.feed([_lost(1000001, "agent_restart", 101, 1000000), _ev(1000002)])
    assert _lost_rows(b) == [(101, 1000000, 999900, "agent_restart", 1000001)]
    assert _seqs(b) == [1000001, 1000002]


def test_global_loss_without_range_is_a_count():
    s = Sequencer(1, 5)
    b = s.feed([_ev(6), _lost(7, "kernel_ringbuf", count=42), _ev(8)])
    assert _seqs(b) == [6, 7, 8]
    assert _lost_rows(b) == [(None, None, 42, "kernel_ringbuf", 7)]


def test_unexplained_jump_is_recorded():
    s = Sequencer(1, 5)
    b = s.feed([_ev(6), _ev(9)])
    assert _lost_rows(b) == [(7, 8, 2, UNEXPLAINED, 0)]
    assert _seqs(b) == [6, 9]


def test_first_connection_to_an_agent_that_no_longer_has_its_first_events():
    s = Sequencer(1, 0)
    b = s.feed([_ev(50), _ev(52)])
    assert _lost_rows(b) == [(1, 49, 49, BEFORE_COLLECTOR, 0), (51, 51, 1, UNEXPLAINED, 0)]


def test_partly_explained_jump():
    s = Sequencer(1, 5)
    b = s.feed([_lost(20, "agent_restart", 10, 19)])
    assert _lost_rows(b) == [(10, 19, 10, "agent_restart", 20), (6, 9, 4, UNEXPLAINED, 0)]


def test_batch_workloads():
    s = Sequencer(3, 0)
    b = s.feed([_ev(1, verdict="allow", rule="r", time="2026-11-21T09:00:01Z"), _ev(2),
                _ev(3, workload={"kind": "service", "unit": "a.service"})])
    assert {k: (w[1], w[2]) for k, w in b.workloads.items()} == {
        "cgroup:/w": (times.point("2026-11-21T09:00:00Z"), times.point("2026-11-21T09:00:01Z")),
        "unit:a.service": (times.point("2026-11-21T09:00:00Z"),) * 2}
    assert b.last_time_us == times.point("2026-11-21T09:00:01Z")
    assert sorted(r[1] for r in b.identities) == ["cgroup:/w", "unit:a.service"]


# -- glob translation for PostgreSQL ---------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["*", "/w/*", "api-?", "[ab]*", "[!a]x", "a.b+c(d)|e$",
                                     "x[", "*.example.com", "pod:prod/*"])
@pytest.mark.parametrize("text", ["", "/w/a", "/w/a/b", "api-1", "api-12", "bx", "ax", "cx",
                                  "a.b+c(d)|e$", "x[", "api.example.com", "pod:prod/web",
                                  "aXb+c(d)|e$"])
def test_glob_regex_matches_like_fnmatch(pattern, text):
    assert bool(re.search(glob_regex(pattern), text)) == fnmatch.fnmatchcase(text, pattern)


# -- discovery -------------------------------------------------------------------------------------


def test_file_source_reads_on_change(tmp_path, caplog):
    path = tmp_path / "agents.txt"
    src = FileSource(str(path))
    assert src.addresses() == frozenset()                       # missing: nothing, logged
    path.write_text("# agents\n10.0.0.5:50051\n\n10.0.0.6  # b\nnot an address\n")
    assert src.addresses() == {"10.0.0.5:50051", "10.0.0.6:50051"}
    assert "agents.txt:5" in caplog.text
    path.write_text("[::1]:7000\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert src.addresses() == {"[::1]:7000"}
    path.unlink()
    assert src.addresses() == {"[::1]:7000"}                    # a failure keeps the last


def test_dns_source_resolves_every_record_and_keeps_them_on_failure():
    answers = {"n": ["10.0.0.1", "fd00::2"]}
    clock = [0.0]

    def resolver(name, port):
        if answers["n"] is None:
            raise OSError(-2, "Name or service not known")
        return answers["n"]

    src = DnsSource("agents", 50051, 30.0, resolver, lambda: clock[0])
    assert src.addresses() == {"10.0.0.1:50051", "[fd00::2]:50051"}
    answers["n"] = ["10.0.0.3"]
    assert src.addresses() == {"10.0.0.1:50051", "[fd00::2]:50051"}   # not due yet
    clock[0] = 31.0
    assert src.addresses() == {"10.0.0.3:50051"}
    answers["n"] = None
    clock[0] = 62.0
    assert src.addresses() == {"10.0.0.3:50051"} and src.failures == 1


def test_real_dns_resolution_of_localhost():
    # the system resolver, for real: /etc/hosts has localhost as 127.0.0.1 (and ::1)
    assert "127.0.0.1" in resolve_all("localhost", 50051)
    src = DnsSource("localhost", 50051, 30.0)
    assert "127.0.0.1:50051" in src.addresses()


# -- draft policy pieces ---------------------------------------------------------------------------


def test_ports_are_grouped_into_ranges_and_any():
    assert _ports({(443, "TCP"), (8000, "TCP"), (8001, "TCP"), (8002, "TCP"), (53, "UDP"),
                   (53, "TCP"), (9000, "UDP")}) == [
        {"port": 53, "protocol": "ANY"}, {"port": 443, "protocol": "TCP"},
        {"port": 8000, "endPort": 8002, "protocol": "TCP"}, {"port": 9000, "protocol": "UDP"}]


def test_policy_names_are_valid():
    assert policy_name("pod:payments/api") == "draft-pod-payments-api"
    assert policy_name("cgroup:/w/A_b") == "draft-cgroup-w-a-b"
    assert policy_name("unit:nginx.service") == "draft-unit-nginx.service"
    assert len(policy_name("cgroup:/" + "x" * 400)) <= 253


def test_register_adds_the_collector_commands():
    import argparse

    from hostagent.collector.cli import register

    p = argparse.ArgumentParser(prog="hostagent")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["collector", "who", "--destination", "10.0.0.0/8", "--db", "x.db",
                         "--json"])
    assert (args.destination, args.db, args.json, args.func.__name__) == \
        ("10.0.0.0/8", "x.db", True, "cmd_who")
    args = p.parse_args(["collector", "run", "--agent", "a:1", "--agent", "b:2",
                         "--retention", "7d"])
    assert (args.agent, args.retention, args.func.__name__) == (["a:1", "b:2"], "7d",
                                                                 "cmd_run")
