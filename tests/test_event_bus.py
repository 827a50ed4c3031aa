"""The event stream's numbering, replay buffer, spool and filters (hostagent.events), without
the kernel: these are the pure parts of what tests/test_events_api.py checks end to end."""

from __future__ import annotations

import os
import random

import pytest

from hostagent.events.bus import EventBus, SeqFile
from hostagent.events.convert import from_proto, to_proto
from hostagent.events.filter import EventFilter, FilterError
from hostagent.events.spool import Spool
from hostagent.v1 import events_pb2 as pb


def conn(i: int, verdict: str = "deny", ip: str = "10.0.0.1", name: str | None = None,
         pod: str | None = None) -> dict:
    return {"kind": "connection", "time": "2026-01-02T03:04:05.123456Z", "verdict": verdict,
            "reason": "policy_default", "policy": "p", "rule": None, "generation": 3,
            "hook": "connect4",
            "workload": {"kind": "pod" if pod else "cgroup", "namespace": "prod" if pod else None,
                         "pod": pod, "pod_uid": None, "container": None, "container_id": None,
                         "runtime": None, "service_account": None, "labels": {"app": "web"},
                         "unit": None, "spiffe_id": None, "cgroup_path": f"/w/{i}",
                         "cgroup_id": 1000 + i, "pending": False, "exe": "/usr/bin/curl",
                         "ppid": 1, "pid": 10 + i, "tid": 10 + i, "comm": "curl", "uid": 0,
                         "gid": 0},
            "destination": {"ip": ip, "port": 443, "protocol": "tcp", "name": name},
            "socket": {"cookie": 7, "family": "ipv4", "protocol": "tcp"}}


def decode(framed: list[bytes]) -> list[pb.Event]:
    """read() gives batch elements: joined, they are an EventBatch."""
    return list(pb.EventBatch.FromString(b"".join(framed)).events)


def published(bus: EventBus) -> EventBus:
    """Events reach readers once a tick's wake() has spooled them."""
    bus.wake()
    return bus


def seqs(wires):
    return [e.seq for e in decode(wires)]


def test_dict_and_protobuf_forms_say_the_same():
    d = conn(1, name="api.example.com", pod="api-0")
    d.update(seq=5, node="n1", agent_version="1.2.3", ticket=None)
    back = from_proto(to_proto(d))
    assert back == {**d, "ticket": None}
    dns = {"kind": "dns", "seq": 6, "node": "n1", "agent_version": "1", "time":
           "2026-01-02T03:04:05.000001Z", "verdict": "allow", "reason": "policy_rule",
           "policy": "p", "rule": "egress[0]", "generation": 2, "ticket": None,
           "query": {"name": "a.example.com", "type": "A"}, "rcode": "NOERROR",
           "answers": [{"ip": "192.0.2.1", "ttl": 30}], "cnames": ["b.example.com"],
           "dropped": ["10.0.0.1"], "socket": {"cookie": 9},
           "client": {"ip": "127.0.0.1", "port": 5353, "protocol": "udp"},
           "workload": {**conn(1)["workload"]}}
    for key in ("exe", "ppid", "pid", "tid", "comm", "uid", "gid"):
        dns["workload"].pop(key)
    assert from_proto(to_proto(dns)) == dns
    close = {**conn(2), "kind": "connection_close", "hook": "tcp_close", "seq": 7,
             "node": "n1", "agent_version": "1", "ticket": "CHG-1", "verdict": "allow",
             "close": {"bytes_sent": 100002, "bytes_received": 50001, "duration_ns": 342336}}
    assert from_proto(to_proto(close)) == close


def test_numbers_without_gaps_and_readers_resume_anywhere():
    bus = EventBus(100, "n", "v")
    for i in range(10):
        bus.publish(conn(i))
    wires, cursor = published(bus).read(0, 4)
    assert seqs(wires) == [1, 2, 3, 4] and cursor == 4
    wires, cursor = published(bus).read(cursor, 100)
    assert seqs(wires) == list(range(5, 11)) and cursor == 10
    assert published(bus).read(10, 100) == ([], 10)


def test_a_reader_that_fell_behind_is_told_exactly_what_it_missed():
    bus = EventBus(1000, "n", "v")
    for i in range(2500):
        bus.publish(conn(i))
    wires, cursor = published(bus).read(100, 5000)
    events = decode(wires)
    lost = events[0]
    assert lost.kind == pb.KIND_LOST and lost.seq == 0
    assert (lost.lost.first_seq, lost.lost.last_seq, lost.lost.count) == (101, 1500, 1400)
    assert [e.seq for e in events[1:]] == list(range(1501, 2501))
    assert cursor == 2500 and bus.lost_by_subscribers == 1400


def test_filters_select_and_lost_records_always_pass():
    bus = EventBus(10, "n", "v")
    bus.publish(conn(0, verdict="allow", ip="10.1.2.3"))
    bus.publish(conn(1, verdict="deny", ip="192.0.2.7", name="api.openai.com", pod="api-1"))
    bus.publish({"kind": "lost", "time": "2026-01-02T03:04:05Z",
                 "lost": {"source": "kernel_ringbuf", "count": 3}})
    only = EventFilter.build(verdicts=["deny"])
    assert seqs(published(bus).read(0, 10, only)[0]) == [2, 3]
    assert seqs(published(bus).read(0, 10, EventFilter.build(destinations=["10.0.0.0/8"]))[0]) == [1, 3]
    assert seqs(published(bus).read(0, 10, EventFilter.build(destinations=["*.openai.com"]))[0]) == [2, 3]
    assert seqs(published(bus).read(0, 10, EventFilter.build(workloads=["pod=api-*"]))[0]) == [2, 3]
    assert seqs(published(bus).read(0, 10, EventFilter.build(workloads=["label:app=web"],
                                                  kinds=["connection"]))[0]) == [1, 2, 3]
    with pytest.raises(FilterError, match="key=pattern"):
        EventFilter.build(workloads=["prod"])


def test_the_spool_keeps_numbering_and_events_across_restarts(tmp_path):
    spool = Spool(str(tmp_path), 1 << 20)
    bus = EventBus(1000, "n", "v", spool)
    for i in range(50):
        bus.publish(conn(i))
    bus.wake()
    # killed: no close(); what was flushed is on disk
    bus2 = EventBus(1000, "n", "v", Spool(str(tmp_path), 1 << 20))
    assert bus2.last_seq == 50 and bus2.oldest_seq == 1
    bus2.publish(conn(99))
    wires, cursor = published(bus2).read(40, 100)     # from the spool, then memory
    assert seqs(wires) == list(range(41, 52)) and cursor == 51
    assert decode(wires)[-1].workload.cgroup_id == 1099


def test_a_torn_spool_record_is_cut_off(tmp_path):
    spool = Spool(str(tmp_path), 1 << 20)
    bus = EventBus(100, "n", "v", spool)
    for i in range(5):
        bus.publish(conn(i))
    bus.wake()
    seg = os.path.join(str(tmp_path), sorted(os.listdir(tmp_path))[0])
    with open(seg, "ab") as f:
        f.write(b"\x06\x00\x00\x00\x00\x00\x00\x00\xff\x00")   # half a header
    again = Spool(str(tmp_path), 1 << 20)
    assert again.last_seq == 5 and again.truncated == 10
    assert [s for s, _ in again.read(1, 100)] == [1, 2, 3, 4, 5]


def test_the_spool_drops_whole_old_segments_at_its_cap(tmp_path):
    spool = Spool(str(tmp_path), 256 * 1024)
    bus = EventBus(1000, "n", "v", spool)
    for i in range(5000):
        bus.publish(conn(i))
        if i % 100 == 0:
            bus.wake()
    bus.wake()
    size = sum(os.path.getsize(os.path.join(tmp_path, n)) for n in os.listdir(tmp_path))
    assert size <= 256 * 1024 + spool._segment_bytes
    oldest = bus.oldest_seq
    assert 1 < oldest < 4000
    wires, _ = published(bus).read(0, 10)
    first = decode(wires)[0]
    assert first.kind == pb.KIND_LOST and first.lost.last_seq == oldest - 1


def test_spool_reads_from_any_seq_match_what_was_written(tmp_path):
    """Reads start from the sparse index (hostagent.events.spool); from every kind of start —
    a sampled record, between samples, a segment's first, before the oldest, past the end —
    they return exactly the records written, also from segments an earlier spool wrote and
    from a segment still being written."""
    rng = random.Random(7)
    written: dict[int, bytes] = {}

    def fill(spool, seqs):
        for seq in seqs:
            written[seq] = bytes([seq % 251]) * rng.choice((1, 40, 300, 1200))
            spool.append(seq, written[seq])
            if seq % 97 == 0:
                spool.flush()
        spool.flush()

    def check(spool):
        seqs = sorted(s for s in written if s >= spool.first_seq)
        starts = {0, 1, seqs[0], seqs[-1], seqs[-1] + 1, *rng.sample(seqs, 60),
                  *(s + 1 for s in spool._segments)}
        for start in sorted(starts):
            for limit in (1, 7, 512):
                want = [(s, written[s]) for s in seqs if s >= start][:limit]
                assert spool.read(start, limit) == want, (start, limit)

    spool = Spool(str(tmp_path), 2 << 20)
    fill(spool, range(1, 3001))
    assert len(spool._segments) > 3
    assert all(len(spool._index[first]) > 3 for first in spool._segments[:-1])
    check(spool)
    spool.close()
    again = Spool(str(tmp_path), 2 << 20)   # indexes of the old segments: one scan each
    check(again)
    fill(again, range(3001, 3400))
    check(again)


def test_without_a_spool_numbers_never_repeat_after_a_kill(tmp_path):
    path = str(tmp_path / "events.seq")
    bus = EventBus(100, "n", "v", seqfile=SeqFile(path))
    for i in range(7):
        bus.publish(conn(i))
    # killed without close(): the next agent starts after the reserved block, and says so
    again = SeqFile(path)
    assert again.gap == (1, SeqFile.BLOCK)
    bus2 = EventBus(100, "n", "v", seqfile=again)
    assert bus2.publish(conn(0)) == SeqFile.BLOCK + 1
    bus2.close()
    assert SeqFile(path).gap is None and SeqFile(path).last_seq == SeqFile.BLOCK + 1


def test_nothing_is_read_or_logged_before_it_is_spooled(tmp_path):
    """A subscriber or the event log never sees a seq the spool does not hold yet: an agent
    killed between publish and the tick's flush must not have given it out."""
    logged = []
    bus = EventBus(100, "n", "v", Spool(str(tmp_path), 1 << 20))
    bus.listeners.append(logged.append)
    bus.publish(conn(1))
    assert bus.read(0, 10) == ([], 0) and logged == []
    assert not bus.wait(0, 0.01)
    bus.wake()
    assert seqs(bus.read(0, 10)[0]) == [1] and [e["seq"] for e in logged] == [1]
    # the log's form is the stream's form, for every kind of event
    bus.publish({"kind": "agent", "time": "2026-01-02T03:04:05Z", "agent": {"phase": "stopping"}})
    bus.wake()
    assert logged[-1] == from_proto(decode(bus.read(1, 10)[0])[0])
