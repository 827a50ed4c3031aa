"""Benchmark: connection events from the kernel to one gRPC subscriber, next to the raw ring
buffer read rate, in one run.

    python -m bench.events            # full run (~5-8 min), rewrites the generated section of
                                      #   docs/benchmarks-events.md
    python -m bench.events --quick    # smoke run (< 1 min, small floods), prints the tables
    python -m bench.events --profile  # also py-spy the agent during one more flood per agent
                                      #   (needs `.venv/bin/pip install py-spy`)
    python -m bench.events --from-results bench/results/events-<stamp>.json
                                      # re-render a past run's tables, measuring nothing

The event generator is bench/connect_loop.c's `flood` mode: socket() + connect() + close() in a
loop, each connect one kernel decision (and one event), from a cgroup of its own inside a
network namespace of the run. Variants, every round in a fresh random order:

    raw              bench/events_raw.c, a minimal bcc cgroup/connect4 program that denies every
                     connect and submits one `struct event` (bpf/lib/abi.h) per connect to a
                     4 MiB ring buffer (the agent's size), counting failed reservations; a
                     helper process drains it every 10 ms with ring_buffer_consume and a
                     callback that only does ctypes from_buffer_copy (as
                     hostagent/events/reader.py does). Full-speed denied TCP flood.
    raw-backlog      the same program with a ring large enough for the whole flood, not read
                     during it; then drained in one timed pass: Python's decode rate alone,
                     independent of the generator.
    agent-deny       a real agent (`python -m hostagent run`), policy denying everything to the
                     flood's cgroup; one subscriber in this process (AgentClient.events) counts
                     and checks every event. Full-speed denied TCP flood.
    agent-deny-100k  the same agent, the flood paced at 100,000 connects/s (the target rate).
    agent-allow      a second agent: events.allow on, no aggregation, policy allowing
                     127.0.0.0/8; full-speed allowed UDP connects (connect4 decides, no
                     handshake: a rate comparable with the deny flood).
    agent-agg        a third agent: events.allow on, events.aggregate.window 1.0 s, the same
                     policy and the same UDP flood.
    agent-agg-tcp    agent-agg's agent, allowed TCP connects to the loopback listener (each
                     one a handshake: handshake-bound, far slower).

Per sample: the generator's rate; events/s at the subscriber from the first to the last event
of the flood; kernel ring buffer drops (the BPF side's counter) and how each was reported
(a KIND_LOST event, source kernel_ringbuf); unaccounted loss (a seq neither received nor named
by a lost record, or a connect neither delivered nor reported lost); the agent's CPU seconds
(psutil, user + system, every thread) per 10k events. Ratios are against the raw read rate of
the same round.

Raw results go to bench/results/events-<UTC stamp>.json (gitignored). Everything created
(cgroups, bpffs pins, the namespace, the agents, helper processes, temporary files) is removed in
``finally`` blocks, and the run ends with a check that nothing of it is left.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import stats, workload
from bench.env import (AgentFiles, AgentProcess, BenchError, Cleanup, exit_on_sigterm,
                       fresh_status, host_facts, make_cgroup, make_netns, nothing_left,
                       read_status, remove_cgroup_tree, start_agent, wait_until)
from bench.report import RESULTS_DIR, begin_run, keep_log, publish
from bench.workload import Place
from hostagent.cgroupfs import cgroup2_mount

log = logging.getLogger("bench.events")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks-events.md"
RAW_SOURCE = Path(__file__).resolve().with_name("events_raw.c")
BEGIN = "<!-- events-bench:begin -->"
END = "<!-- events-bench:end -->"
RUN_PREFIX = "hostagent-evbench-"

TARGET_RATE = 100_000        # connection events/s through the agent to one subscriber (issue 5)
EVENT_RECORD_BYTES = 96      # sizeof(struct event), bpf/lib/abi.h; checked by the raw helper
RINGBUF_RECORD_OVERHEAD = 8  # the kernel's per-record header in a BPF ring buffer
AGENT_RINGBUF_PAGES = 1024   # bpf/lib/maps.h RINGBUF_PAGES: the raw variant reads the same size
DENIED = "127.0.0.1"         # the flood's destination (the connect_loop's own listener)

# Timeouts and pacing, each with its reason.
AGENT_START_TIMEOUT = 120.0  # s: the BPF compile and load take 2-5 s on this busy 2-CPU VM
HELPER_TIMEOUT = 60.0        # s for the raw helper to compile its program (~0.5 s) or answer
STATUS_TIMEOUT = 15.0        # s for status.json to name the gRPC address / to be rewritten
STATUS_FRESH = 10.0          # s: status.json is rewritten every 1 s (daemon STATUS_INTERVAL);
                             # a loaded machine can delay the agent's loop by seconds
SETTLE_IDLE = 5.0            # s without progress after a flood: whatever is missing by then is
                             # unaccounted (losses are reported every 1 s, summaries of an
                             # aggregation window of 1 s follow it within 1 s)
SETTLE_MAX = 120.0           # s after a flood, at most, for the agent to deliver what it read
FLOOD_MIN_RATE = 2_000       # connects/s: a flood slower than this is a broken machine, so its
                             # timeout is count / this + FLOOD_SLACK
FLOOD_SLACK = 60.0
SUBSCRIBER_JOIN = 10.0       # s for the subscriber thread to end after its call is cancelled
COLLECTOR_START_TIMEOUT = 60.0  # s for the collector's first cursor row (it connects at once)
COLLECTOR_STOP_TIMEOUT = 15.0   # s after SIGTERM: its writer commits what it holds, then exits
COLLECTOR_POLL = 0.005       # s between reads of the store's cursor (one indexed row)
COLLECTOR_CHECK = 0.25       # s between counts of what the store holds of a flood
PROFILE_RATE = 200           # py-spy samples per second
PROFILE_STOP_TIMEOUT = 30.0  # s for py-spy to write its output after SIGINT
PROFILE_ENTRY_SHARE = 0.99   # leading frames on this share of a thread's samples are its entry
MIN_ROUNDS = 3               # the time budget never cuts a run below this many rounds
MIN_RATE_MESSAGES = 1000     # per flood: fewer messages than this give no meaningful rate


@dataclass(frozen=True)
class Settings:
    rounds: int           # interleaved rounds, at most (also bounded by budget_s)
    count: int            # connects per full-speed flood
    paced_seconds: float  # length of the 100k/s paced flood
    tcp_count: int        # connects of the handshake-bound allowed TCP flood
    profile_seconds: float  # length of each profiled flood (--profile), paced at TARGET_RATE
    budget_s: float       # stop starting rounds after this long


FULL = Settings(rounds=7, count=400_000, paced_seconds=3.0, tcp_count=60_000,
                profile_seconds=10.0, budget_s=420.0)
QUICK = Settings(rounds=1, count=50_000, paced_seconds=0.5, tcp_count=5_000,
                 profile_seconds=3.0, budget_s=60.0)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str          # raw | raw-backlog | agent
    agent: str | None  # which agent: deny | allow | agg
    proto: str         # the flood's socket type: tcp | udp
    sockets: str       # new (a socket per connect) | reuse (connect one socket again and again)
    expect: str        # what each connect must give: eperm | allowed
    rate: int          # 0 = as fast as it can
    what: str


VARIANTS = (
    Variant("raw", "raw", None, "tcp", "reuse", "eperm", 0,
            "bench/events_raw.c (deny every connect, one 96-byte record each, 4 MiB ring), a "
            "helper draining it every 10 ms; denied TCP connects, full speed"),
    Variant("raw-backlog", "raw-backlog", None, "tcp", "reuse", "eperm", 0,
            "the same program with a ring holding the whole flood, drained after it in one timed "
            "pass (decode rate alone)"),
    Variant("agent-deny", "agent", "deny", "tcp", "reuse", "eperm", 0,
            "agent, policy denying everything; denied TCP connects, full speed"),
    Variant("agent-deny-100k", "agent", "deny", "tcp", "reuse", "eperm", TARGET_RATE,
            "the same agent; denied TCP connects paced at 100,000/s"),
    Variant("agent-allow", "agent", "allow", "udp", "reuse", "allowed", 0,
            "agent with events.allow, no aggregation, policy allowing 127.0.0.0/8; allowed UDP "
            "connects, full speed"),
    Variant("agent-agg", "agent", "agg", "udp", "reuse", "allowed", 0,
            "agent with events.allow and events.aggregate.window 1.0 s, the same policy; allowed "
            "UDP connects, full speed"),
    Variant("agent-agg-tcp", "agent", "agg", "tcp", "new", "allowed", 0,
            "agent-agg's agent; allowed TCP connects to the loopback listener (handshake-bound)"),
    Variant("collector", "collector", "coll", "tcp", "reuse", "eperm", 0,
            "an agent configured as agent-deny's whose one subscriber is the collector "
            "(`python -m hostagent.collector run`, SQLite); rate: the store's cursor "
            "(seqs committed per second); denied TCP connects, full speed"),
)

AGENTS = {
    "deny": {"events": {"allow": False}, "egress": "[]",
             "what": "events.allow false, no aggregation; policy: enforce, no egress rule"},
    "allow": {"events": {"allow": True, "aggregate": {"window": 0.0}},
              "egress": "\n    - to: [{cidr: 127.0.0.0/8}]",
              "what": "events.allow true, aggregate.window 0; policy: enforce, 127.0.0.0/8 "
                      "all ports"},
    "coll": {"events": {"allow": False}, "egress": "[]",
             "what": "as deny; its one subscriber is the collector"},
    "agg": {"events": {"allow": True, "aggregate": {"window": 1.0}},
            "egress": "\n    - to: [{cidr: 127.0.0.0/8}]",
            "what": "events.allow true, aggregate.window 1.0; policy: enforce, 127.0.0.0/8 all "
                    "ports"},
}

# What the results record about the code measured: the agent changes under this benchmark.
HOT_PATH_FILES = ("hostagent/daemon.py", "hostagent/events/reader.py",
                  "hostagent/events/encode.py", "hostagent/events/record.py",
                  "hostagent/events/bus.py", "hostagent/events/aggregate.py",
                  "hostagent/events/spool.py", "hostagent/api/server.py", "bpf/lib/events.h")


# -- the raw reader (helper process) ---------------------------------------------------------------

def ring_pages_for(events: int) -> int:
    """Ring buffer pages (a power of two) holding `events` records with a quarter to spare."""
    need = events * (EVENT_RECORD_BYTES + RINGBUF_RECORD_OVERHEAD) * 5 // 4
    return max(AGENT_RINGBUF_PAGES, 1 << math.ceil(math.log2(max(1, need // 4096 + 1))))


def ring_capacity(pages: int) -> int:
    return pages * 4096 // (EVENT_RECORD_BYTES + RINGBUF_RECORD_OVERHEAD)


def _raw_reader_main(cgroup: str, pages: int) -> int:
    """``--raw-reader CGROUP PAGES``: load bench/events_raw.c, attach it to CGROUP and answer
    commands on stdin, one JSON line each on stdout:

        live     drain every DRAIN_INTERVAL (as the agent does) until "stop"
        stop     drain until every record the program submitted since "live" is read; report
        backlog  read nothing until "drain"
        drain    drain everything in one timed pass; report
        quit / EOF  detach and exit
    """
    from bcc import BPF, BPFAttachType, BPFProgType

    from hostagent.bpf import abi
    from hostagent.bpf.loader import check_kernel_headers
    from hostagent.events.reader import DRAIN_BUDGET, DRAIN_INTERVAL

    if ct.sizeof(abi.Event) != EVENT_RECORD_BYTES:
        raise BenchError(f"sizeof(struct event) is {ct.sizeof(abi.Event)}, the bench assumes "
                         f"{EVENT_RECORD_BYTES}: update EVENT_RECORD_BYTES")
    check_kernel_headers()
    bpf = BPF(src_file=str(RAW_SOURCE).encode(),
              cflags=[f"-I{REPO / 'bpf'}", f"-DRAW_RINGBUF_PAGES={pages}"])
    fn = bpf.load_func(b"raw_connect4", BPFProgType.CGROUP_SOCK_ADDR, None,
                       BPFAttachType.CGROUP_INET4_CONNECT)
    counts = bpf["raw_counts"]
    size = ct.sizeof(abi.Event)
    state = {"read": 0, "malformed": 0, "budget": DRAIN_BUDGET}

    # The callback does what hostagent/events/reader.py's does before handing the record on,
    # budget included: libbpf's consume loops until the ring is empty, so without one a drain
    # that keeps up with the flood returns only when the flood ends (no timestamps in between).
    def _cb(_ctx, data, n):
        if n < size:
            state["malformed"] += 1
        else:
            abi.Event.from_buffer_copy(ct.string_at(data, size))
            state["read"] += 1
        state["budget"] -= 1
        return -1 if state["budget"] <= 0 else 0

    bpf["raw_events"].open_ring_buffer(_cb)

    def counters() -> tuple[int, int]:
        return (sum(counts.getvalue(ct.c_int(0))), sum(counts.getvalue(ct.c_int(1))))

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf.attach_func(fn, cg_fd, BPFAttachType.CGROUP_INET4_CONNECT)
        try:
            reply({"ready": True, "pages": pages, "capacity": ring_capacity(pages)})
            stdin = sys.stdin.fileno()
            buf = b""
            live = False
            base = None
            full = False    # the last drain stopped at its budget: drain again at once
            while True:
                timeout = (0 if full else DRAIN_INTERVAL) if live else None
                ready, _, _ = select.select([stdin], [], [], timeout)
                if live:
                    full = _raw_drain(bpf, state, base, DRAIN_BUDGET)
                if not ready:
                    continue
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd in ("live", "backlog"):
                        # records of before (the bench's verdict probe) are not this sample's
                        bpf.ring_buffer_consume()
                        sub, drop = counters()
                        base = {"read": state["read"], "sub": sub, "drop": drop,
                                "cpu": time.process_time(), "first_t": None, "first_n": 0,
                                "last_t": None}
                        live = cmd == "live"
                        reply({"ok": cmd})
                    elif cmd in ("stop", "drain"):
                        reply(_raw_finish(bpf, state, base, counters, cmd == "drain"))
                        live = False
                    elif cmd == "quit":
                        return 0
                    else:
                        reply({"error": f"unknown command {cmd!r}"})
        finally:
            bpf.detach_func(fn, cg_fd, BPFAttachType.CGROUP_INET4_CONNECT)
    finally:
        os.close(cg_fd)


def _raw_drain(bpf, state: dict, base: dict, budget: int) -> bool:
    """One ring_buffer_consume of at most `budget` records, timestamped if it read any.
    True if it stopped at the budget (more may be waiting)."""
    before = state["read"]
    state["budget"] = budget
    bpf.ring_buffer_consume()
    got = state["read"] - before
    if got:
        t = time.monotonic_ns()
        if base["first_t"] is None:
            base["first_t"], base["first_n"] = t, state["read"] - base["read"]
        base["last_t"] = t
    return state["budget"] <= 0


def _raw_finish(bpf, state: dict, base: dict, counters, timed: bool) -> dict:
    """Read until everything submitted since `base` is read (bounded); the sample's figures.
    timed (backlog): one pass without a budget, timed from the first consume call."""
    from hostagent.events.reader import DRAIN_BUDGET

    t0 = time.monotonic_ns()
    deadline = time.monotonic() + HELPER_TIMEOUT / 2
    while True:
        _raw_drain(bpf, state, base, 1 << 62 if timed else DRAIN_BUDGET)
        sub, drop = counters()
        if state["read"] - base["read"] >= sub - base["sub"] or time.monotonic() > deadline:
            break
    t1 = time.monotonic_ns()
    read = state["read"] - base["read"]
    out = {"read": read, "submitted": sub - base["sub"], "dropped": drop - base["drop"],
           "malformed": state["malformed"], "cpu_s": time.process_time() - base["cpu"]}
    if timed:
        out.update(drain_s=(t1 - t0) / 1e9, rate=read / ((t1 - t0) / 1e9) if t1 > t0 else 0.0)
    else:
        span = ((base["last_t"] or 0) - (base["first_t"] or 0)) / 1e9
        out.update(first_t=base["first_t"], last_t=base["last_t"],
                   rate=(read - base["first_n"]) / span if span > 0 else 0.0)
    return out


class RawReader:
    """The bench's side of a ``--raw-reader`` helper process."""

    def __init__(self, stack: Cleanup, cgroup: str, pages: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.events", "--raw-reader", cgroup, str(pages)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1)
        stack.defer(f"stopping raw reader {self._proc.pid}", self.close)
        self.pid = self._proc.pid
        hello = self._read()
        if not hello.get("ready"):
            raise BenchError(f"raw reader did not start: {hello}")
        self.capacity = hello["capacity"]

    def _read(self) -> dict:
        ready, _, _ = select.select([self._proc.stdout], [], [], HELPER_TIMEOUT)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise BenchError(f"raw reader {'exited' if ready else 'timed out'}: "
                             f"{self._proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def command(self, cmd: str) -> dict:
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise BenchError(f"raw reader: {out['error']}")
        return out

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(HELPER_TIMEOUT / 4)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(HELPER_TIMEOUT / 4)


# -- the subscriber --------------------------------------------------------------------------------

@dataclass
class Tally:
    """What one subscriber saw while it was the current tally (one flood)."""

    conn: int = 0                 # KIND_CONNECTION messages
    weight: int = 0               # connections they stand for (count, or 1)
    kernel_lost: int = 0          # KIND_LOST source kernel_ringbuf: count
    replay_lost: int = 0          # seq-0 lost records: events this subscriber fell behind by
    other_lost: dict = field(default_factory=dict)   # other KIND_LOST sources: count
    other: int = 0                # events of other kinds
    seq_gaps: int = 0             # seqs skipped without a lost record naming them
    seq_backwards: int = 0        # seqs seen again or out of order
    batches: int = 0
    first_t: int | None = None    # monotonic ns at the first batch carrying a connection event
    first_conn: int = 0           # connection messages in that batch
    first_weight: int = 0
    last_t: int | None = None     # monotonic ns at the last batch carrying one


class Subscriber:
    """One GetEvents stream for the whole run, in its own thread; checks numbering as it goes."""

    def __init__(self, address: str, max_batch: int = 0) -> None:
        from hostagent.api.client import AgentClient
        from hostagent.v1 import events_pb2 as pb

        self._pb = pb
        self.client = AgentClient(address)
        self.since = self.client.status(timeout=STATUS_TIMEOUT).last_seq
        self._expected = self.since + 1
        self._lock = threading.Lock()
        self._tally = Tally()
        self.error: str | None = None
        self.events = 0
        self._call = self.client.events(since=self.since, max_batch=max_batch)
        self._thread = threading.Thread(target=self._run, name="subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import grpc

        pb = self._pb
        conn_kind, lost_kind = pb.KIND_CONNECTION, pb.KIND_LOST
        try:
            for batch in self._call:
                t = time.monotonic_ns()
                conn = weight = other = gaps = back = kernel = replay = 0
                lost_other: Counter = Counter()
                expected = self._expected
                for e in batch.events:
                    seq = e.seq
                    if seq == 0:   # a range this subscriber fell behind by
                        lost = e.lost
                        if lost.first_seq != expected:
                            gaps += abs(lost.first_seq - expected)
                        replay += lost.count
                        expected = lost.last_seq + 1
                        continue
                    if seq != expected:
                        if seq > expected:
                            gaps += seq - expected
                        else:
                            back += 1
                    if seq >= expected:
                        expected = seq + 1
                    kind = e.kind
                    if kind == conn_kind:
                        conn += 1
                        weight += e.count or 1
                    elif kind == lost_kind:
                        if e.lost.source == "kernel_ringbuf":
                            kernel += e.lost.count
                        else:
                            lost_other[e.lost.source] += e.lost.count
                    else:
                        other += 1
                self._expected = expected
                with self._lock:
                    tl = self._tally
                    self.events += len(batch.events)
                    tl.batches += 1
                    tl.conn += conn
                    tl.weight += weight
                    tl.other += other
                    tl.seq_gaps += gaps
                    tl.seq_backwards += back
                    tl.kernel_lost += kernel
                    tl.replay_lost += replay
                    for k, v in lost_other.items():
                        tl.other_lost[k] = tl.other_lost.get(k, 0) + v
                    if conn:
                        if tl.first_t is None:
                            tl.first_t, tl.first_conn, tl.first_weight = t, conn, weight
                        tl.last_t = t
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{err.code().name}: {err.details()}"
        except Exception as err:  # noqa: BLE001 - reported by the main thread, never lost
            self.error = repr(err)

    def begin(self) -> None:
        with self._lock:
            self._tally = Tally()

    def peek(self) -> Tally:
        with self._lock:
            return dataclasses.replace(self._tally, other_lost=dict(self._tally.other_lost))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(SUBSCRIBER_JOIN)
        self.client.close()


# -- an agent under test ---------------------------------------------------------------------------

@dataclass
class AgentUnderTest:
    name: str
    files: AgentFiles
    proc: AgentProcess
    flood_cgroup: str
    address: str = ""
    metrics_url: str = ""
    subscriber: Subscriber | None = None


def _agent_config(files: AgentFiles, events: dict) -> str:
    cfg = {"cgroupRoot": files.cgroup_root, "bpffsDir": files.bpffs_dir,
           "stateDir": str(files.state_dir), "policyDir": str(files.policy_dir),
           "metrics": {"listen": "127.0.0.1:0"}, "eventLog": "",
           "grpc": {"listen": "127.0.0.1:0"}, "defaultAction": "allow",
           "kubernetes": {"enabled": False},
           # a resolver of its own on a free port, nothing upstream: no two agents of this
           # machine (tests, other benchmarks) may share 127.0.0.53:53
           "dns": {"listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:9"]},
           "events": events}
    return "# written by bench/events.py for one benchmark run\n" + json.dumps(cfg, indent=1)


def _policy(name: str, egress: str) -> str:
    return (f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n"
            f"spec:\n  selector:\n    cgroupPath: \"/flood\"\n  mode: enforce\n"
            f"  egress: {egress}\n")


def _start_agent(stack: Cleanup, name: str, run_root: str, tmp: Path, run_name: str,
                 netns: str) -> AgentUnderTest:
    spec = AGENTS[name]
    root = make_cgroup(stack, os.path.join(run_root, f"agent-{name}"))
    flood = make_cgroup(stack, os.path.join(root, "flood"))
    files = AgentFiles(config=tmp / f"{name}.yaml", policy_dir=tmp / f"{name}-policies",
                       state_dir=tmp / f"{name}-state", bpffs_dir=f"/sys/fs/bpf/{run_name}-{name}",
                       cgroup_root=root, log=tmp / f"{name}-agent.log")
    files.policy_dir.mkdir()
    (files.policy_dir / "flood.yaml").write_text(_policy(f"flood-{name}", spec["egress"]))
    files.config.write_text(_agent_config(files, spec["events"]))
    agent = start_agent(stack, files)
    stack.defer(f"keeping {name}'s agent log", keep_log, files.log,
                f"events-{name}-agent-last.log")
    agent.wait_for(r"enforcing \(generation (\d+)\)", 0, AGENT_START_TIMEOUT)
    _, m = agent.wait_for(r"metrics on (http://\S+)/metrics", 0, STATUS_TIMEOUT)
    out = AgentUnderTest(name, files, agent, flood, metrics_url=m.group(1))
    out.address = wait_until(
        lambda: ((read_status(files.status).get("events") or {}).get("grpc") or {}).get("listen"),
        STATUS_TIMEOUT, f"{name}'s gRPC address in status.json")
    log.info("agent %s: pid %d, gRPC %s, %s", name, agent.pid, out.address, spec["what"])
    return out




_METRIC_LINE = re.compile(r"^(hostagent_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$")


def _scrape(url: str) -> dict[str, float]:
    """Metric name (labels summed over) -> value, for the few this benchmark reads."""
    with urllib.request.urlopen(url + "/metrics", timeout=STATUS_TIMEOUT) as r:
        text = r.read().decode()
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m and m.group(1) in ("hostagent_ringbuf_dropped_events_total", "hostagent_events_total"):
            out[m.group(1)] += float(m.group(3))
    return dict(out)


def _threads(pid: int) -> dict[int, tuple[str, float, float]]:
    """tid -> (comm, CPU seconds, run-queue wait seconds) of every thread of pid, from
    /proc/<pid>/task/<tid>/schedstat (ns: time on a CPU, time runnable but waiting for one)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue   # exited meanwhile
        out[int(tid)] = (comm, int(run_ns) / 1e9, int(wait_ns) / 1e9)
    return out


def _thread_deltas(pid: int, before: dict, after: dict) -> list[dict]:
    rows = []
    for tid, (comm, cpu, wait) in after.items():
        _, cpu0, wait0 = before.get(tid, (comm, 0.0, 0.0))
        if cpu - cpu0 > 0.005:
            rows.append({"tid": tid, "comm": comm, "main": tid == pid, "cpu_s": cpu - cpu0,
                         "runq_wait_s": wait - wait0})
    return sorted(rows, key=lambda r: -r["cpu_s"])


# -- the collector ---------------------------------------------------------------------------------

class CollectorUnderTest:
    """`python -m hostagent.collector run` against one agent, storing into a SQLite file; this
    process reads the store (read-only, WAL: never in the collector's way) to follow it."""

    def __init__(self, stack: Cleanup, agent: AgentUnderTest, tmp: Path) -> None:
        self.db = tmp / "collector.db"
        self.log = tmp / "collector.log"
        self._logf = open(self.log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostagent.collector", "run", "--agent", agent.address,
             "--db", f"sqlite://{self.db}", "--log-level", "info"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        stack.defer("stopping the collector", self.stop)
        stack.defer("keeping the collector's log", keep_log, self.log,
                    "events-collector-last.log")
        self.pid = self.proc.pid
        self._conn = None
        self.agent_id = wait_until(self._agent_row, COLLECTOR_START_TIMEOUT,
                              "the collector's first cursor in its store")

    def _agent_row(self) -> int | None:
        if self.proc.poll() is not None:
            raise BenchError(f"the collector exited ({self.proc.returncode}):\n"
                             f"{self.log.read_text()[-3000:]}")
        if not self.db.exists():
            return None
        try:
            row = self._query("SELECT id FROM agents ORDER BY id DESC LIMIT 1")
        except sqlite3.Error:
            return None   # the schema is not there yet
        return row[0] if row else None

    def _query(self, sql: str, params: tuple = ()) -> tuple | None:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30,
                                         isolation_level=None, check_same_thread=False)
        return self._conn.execute(sql, params).fetchone()

    def cursor(self) -> int:
        return self._query("SELECT last_seq FROM agents WHERE id = ?", (self.agent_id,))[0]

    def stored_since(self, seq: int) -> tuple[int, int, int]:
        """(connection events, kernel_ringbuf lost count, other lost count) stored after seq."""
        conn = self._query("SELECT count(*) FROM events WHERE agent_id = ? AND seq > ? AND "
                           "kind = 'connection'", (self.agent_id, seq))[0]
        kernel, other = self._query(
            "SELECT coalesce(sum(CASE WHEN source = 'kernel_ringbuf' THEN count END), 0), "
            "coalesce(sum(CASE WHEN source != 'kernel_ringbuf' THEN count END), 0) "
            "FROM lost WHERE agent_id = ? AND seq > ?", (self.agent_id, seq))
        return conn, kernel, other

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(COLLECTOR_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("the collector ignored SIGTERM for %.0f s: killing it",
                          COLLECTOR_STOP_TIMEOUT)
                self.proc.kill()
                self.proc.wait(COLLECTOR_STOP_TIMEOUT)
        self._logf.close()


def sample_collector(v: Variant, a: AgentUnderTest, c: CollectorUnderTest, place: Place,
                     count: int) -> dict:
    """One flood into an agent whose one subscriber is the collector: events/s into storage
    (the store's cursor, followed every COLLECTOR_POLL seconds), loss, both processes' CPU."""
    import psutil

    from hostagent.api.client import AgentClient

    with AgentClient(a.address) as client:
        s0 = client.status(timeout=STATUS_TIMEOUT).last_seq
    wait_until(lambda: c.cursor() >= s0, SETTLE_MAX, "the collector to store what the agent has")
    m0 = _scrape(a.metrics_url)
    st0 = fresh_status(a.files.status, time.time(), STATUS_FRESH)
    agent, coll = psutil.Process(a.proc.pid), psutil.Process(c.pid)
    a0, c0 = agent.cpu_times(), coll.cpu_times()
    timeline: list[tuple[int, int]] = []
    stop = threading.Event()

    def follow():
        last = s0
        while not stop.is_set():
            cur = c.cursor()
            if cur != last:
                timeline.append((time.monotonic_ns(), cur))
                last = cur
            stop.wait(COLLECTOR_POLL)

    poller = threading.Thread(target=follow, name="store-cursor", daemon=True)
    poller.start()
    try:
        gen = _flood(place, v, count)
        generated = gen[v.expect]
        deadline = time.monotonic() + SETTLE_MAX
        last_progress, last = time.monotonic(), None
        while True:
            stored, kernel, other = c.stored_since(s0)
            if stored + kernel + other >= generated:
                break
            now = time.monotonic()
            if (stored, kernel, other) != last:
                last, last_progress = (stored, kernel, other), now
            if now - last_progress > SETTLE_IDLE or now > deadline:
                log.warning("collector: %d of %d connects stored or reported lost after %.0f s "
                            "without progress", stored + kernel + other, generated,
                            now - last_progress)
                break
            time.sleep(COLLECTOR_CHECK)
    finally:
        stop.set()
        poller.join(SUBSCRIBER_JOIN)
    done_wall = time.time()
    a1, c1 = agent.cpu_times(), coll.cpu_times()
    m1 = _scrape(a.metrics_url)
    st1 = fresh_status(a.files.status, done_wall, STATUS_FRESH)
    dropped = int(m1.get("hostagent_ringbuf_dropped_events_total", 0)
                  - m0.get("hostagent_ringbuf_dropped_events_total", 0))
    read = (st1["events_received"] - st0["events_received"]
            if "events_received" in st0 and "events_received" in st1 else generated - dropped)
    moves = [(t, cur) for t, cur in timeline if cur > s0]
    span = (moves[-1][0] - moves[0][0]) / 1e9 if len(moves) > 1 else 0.0
    rate = (moves[-1][1] - moves[0][1]) / span if span > 0 else 0.0
    agent_cpu = (a1.user + a1.system) - (a0.user + a0.system)
    coll_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return {
        "generated": generated, "gen_rate": gen["rate"], "gen_elapsed_s": gen["elapsed_ns"] / 1e9,
        "delivered": stored, "represented": stored, "rate": rate, "span_s": span,
        "behind_s": (moves[-1][0] - gen["end_ns"]) / 1e9 if moves else None,
        "cursor_moves": len(moves), "kernel_dropped": dropped, "lost_reported_kernel": kernel,
        "lost_replay": other, "lost_other": {}, "unaccounted": generated - stored - kernel - other,
        "unreported_kernel_drops": dropped - kernel, "seq_gaps": 0, "seq_backwards": 0,
        "kernel_read": read, "agent_cpu_s": agent_cpu,
        "cpu_per_10k": agent_cpu / read * 1e4 if read else None,
        "collector_cpu_s": coll_cpu,
        "collector_cpu_per_10k": coll_cpu / stored * 1e4 if stored else None,
        "threads": [],
    }


# -- one sample ------------------------------------------------------------------------------------

def _flood(place: Place, v: Variant, count: int) -> dict:
    argv = place.argv("flood", DENIED, str(count), str(v.rate), v.proto, v.sockets)
    timeout = count / FLOOD_MIN_RATE + FLOOD_SLACK
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"connect_loop flood exited {proc.returncode}: {proc.stderr.strip()}")
    got = json.loads(proc.stdout)
    if got[v.expect] != count:
        raise BenchError(f"{v.name}: {count} connects gave {got['eperm']} EPERM, "
                         f"{got['allowed']} allowed, {got['other']} other (errno "
                         f"{got['last_errno']}); every one must be {v.expect}")
    got["rate"] = count / (got["elapsed_ns"] / 1e9)
    return got


def sample_raw(v: Variant, reader: RawReader, place: Place, count: int) -> dict:
    live = v.kind == "raw"
    reader.command("live" if live else "backlog")
    gen = _flood(place, v, count)
    got = reader.command("stop" if live else "drain")
    out = {"generated": gen[v.expect], "gen_rate": gen["rate"], "gen_elapsed_s":
           gen["elapsed_ns"] / 1e9, "read": got["read"], "rate": got["rate"],
           "dropped": got["dropped"], "submitted": got["submitted"],
           "unaccounted": gen[v.expect] - got["read"] - got["dropped"],
           "reader_cpu_s": got["cpu_s"],
           "cpu_per_10k": got["cpu_s"] / got["read"] * 1e4 if got["read"] else None}
    if not live:
        out["drain_s"] = got["drain_s"]
    elif got["first_t"]:
        out["behind_s"] = (got["last_t"] - gen["end_ns"]) / 1e9
    return out


def sample_agent(v: Variant, a: AgentUnderTest, place: Place, count: int,
                 during=None) -> dict:
    """One flood into an agent: what the subscriber got, what the kernel dropped, CPU spent.

    during(): started right before the flood and stopped (called again) once the subscriber
    has everything: the profiler's hook."""
    import psutil

    sub = a.subscriber
    if sub is None or not sub.alive():
        raise BenchError(f"{a.name}'s subscriber ended: {sub and sub.error}")
    proc = psutil.Process(a.proc.pid)
    st0 = fresh_status(a.files.status, time.time(), STATUS_FRESH)
    m0 = _scrape(a.metrics_url)
    th0 = _threads(a.proc.pid)
    cpu0 = proc.cpu_times()
    sub_cpu0 = time.process_time()
    sub.begin()
    stop = during() if during else None
    try:
        gen = _flood(place, v, count)
        generated = gen[v.expect]
        tl = _settle(sub, generated)
    finally:
        if stop:
            stop()
    done_wall = time.time()
    cpu1 = proc.cpu_times()
    th1 = _threads(a.proc.pid)
    sub_cpu = time.process_time() - sub_cpu0
    m1 = _scrape(a.metrics_url)
    st1 = fresh_status(a.files.status, done_wall, STATUS_FRESH)
    agent_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    dropped = (m1.get("hostagent_ringbuf_dropped_events_total", 0)
               - m0.get("hostagent_ringbuf_dropped_events_total", 0))
    read = None
    if "events_received" in st0 and "events_received" in st1:
        read = st1["events_received"] - st0["events_received"]
    span = ((tl.last_t or 0) - (tl.first_t or 0)) / 1e9
    accounted = tl.weight + tl.kernel_lost + tl.replay_lost
    kernel_read = read if read is not None else generated - int(dropped)
    return {
        "generated": generated, "gen_rate": gen["rate"], "gen_elapsed_s": gen["elapsed_ns"] / 1e9,
        "delivered": tl.conn, "represented": tl.weight,
        "rate": (tl.conn - tl.first_conn) / span if span > 0 else 0.0,
        "represented_rate": (tl.weight - tl.first_weight) / span if span > 0 else 0.0,
        "span_s": span,
        "behind_s": (tl.last_t - gen["end_ns"]) / 1e9 if tl.last_t else None,
        # from the flood's first connect to the last event delivered: the agent's busy time
        "busy_s": (tl.last_t - gen["start_ns"]) / 1e9 if tl.last_t else None,
        "kernel_dropped": int(dropped), "lost_reported_kernel": tl.kernel_lost,
        "lost_replay": tl.replay_lost, "lost_other": tl.other_lost,
        "unaccounted": generated - accounted,
        "unreported_kernel_drops": int(dropped) - tl.kernel_lost,
        "seq_gaps": tl.seq_gaps, "seq_backwards": tl.seq_backwards,
        "other_events": tl.other, "batches": tl.batches,
        "kernel_read": kernel_read, "kernel_read_source": "status" if read is not None
        else "generated - dropped",
        "agent_cpu_s": agent_cpu,
        "cpu_per_10k": agent_cpu / kernel_read * 1e4 if kernel_read else None,
        "cpu_per_10k_delivered": agent_cpu / tl.conn * 1e4 if tl.conn else None,
        "threads": _thread_deltas(a.proc.pid, th0, th1)[:6],
        "subscriber_cpu_s": sub_cpu,
    }


def _settle(sub: Subscriber, generated: int) -> Tally:
    """Until every connect of the flood is delivered or reported lost, or nothing moves for
    SETTLE_IDLE seconds (then the rest is unaccounted), at most SETTLE_MAX."""
    deadline = time.monotonic() + SETTLE_MAX
    last_progress, last = time.monotonic(), None
    while True:
        tl = sub.peek()
        if tl.weight + tl.kernel_lost + tl.replay_lost >= generated:
            return tl
        key = (tl.weight, tl.kernel_lost, tl.replay_lost, tl.other)
        now = time.monotonic()
        if key != last:
            last, last_progress = key, now
        if sub is None or not sub.alive():
            raise BenchError(f"the subscriber ended: {sub.error}")
        if now - last_progress > SETTLE_IDLE or now > deadline:
            log.warning("flood of %d: %d delivered, %d reported lost; nothing more after "
                        "%.0f s", generated, tl.weight, tl.kernel_lost + tl.replay_lost,
                        now - last_progress)
            return tl
        time.sleep(0.02)


# -- rounds ----------------------------------------------------------------------------------------

def _count(s: Settings, v: Variant) -> int:
    if v.rate:
        return int(v.rate * s.paced_seconds)
    if v.name == "agent-agg-tcp":
        return s.tcp_count
    return s.count


def _rounds(s: Settings, variants: list[Variant], places: dict, readers: dict, agents: dict,
            collector: "CollectorUnderTest | None", seed: int) -> list[dict]:
    samples = []
    for r, order in stats.interleaved(variants, s.rounds, s.budget_s, MIN_ROUNDS, seed):
        for pos, v in enumerate(order):
            n = _count(s, v)
            load = os.getloadavg()[0]
            if v.kind == "agent":
                got = sample_agent(v, agents[v.agent], places[v.name], n)
            elif v.kind == "collector":
                got = sample_collector(v, agents[v.agent], collector, places[v.name], n)
            else:
                got = sample_raw(v, readers[v.name], places[v.name], n)
            samples.append({"round": r, "position": pos, "variant": v.name, "count": n,
                            "loadavg": load, **got})
            log.info("round %d/%d %-15s %s", r + 1, s.rounds, v.name, _brief(got))
    return samples


def _brief(x: dict) -> str:
    parts = [f"gen {x['gen_rate'] / 1000:.0f}k/s", f"read {x['rate'] / 1000:.1f}k/s"]
    if "delivered" in x:
        parts[1] = f"delivered {x['rate'] / 1000:.1f}k/s"
        if x["represented"] != x["delivered"]:
            parts.append(f"({x['delivered']:,} messages for {x['represented']:,})")
        parts.append(f"kernel drops {x['kernel_dropped']:,} (reported {x['lost_reported_kernel']:,})")
        parts.append(f"cpu {x['cpu_per_10k']:.3f} s/10k" if x["cpu_per_10k"] else "")
        if x.get("collector_cpu_per_10k"):
            parts.append(f"collector cpu {x['collector_cpu_per_10k']:.3f} s/10k")
    else:
        parts.append(f"drops {x['dropped']:,}")
        if x["cpu_per_10k"]:
            parts.append(f"cpu {x['cpu_per_10k']:.3f} s/10k")
    parts.append(f"unaccounted {x['unaccounted']:,}")
    return ", ".join(p for p in parts if p)


# -- profile ---------------------------------------------------------------------------------------

def _py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


# the flood each agent is profiled under: the target rate, for long enough to sample well
PROFILE_FLOODS = {"deny": ("tcp", "eperm"), "allow": ("udp", "allowed"), "agg": ("udp", "allowed")}


def profile(s: Settings, agents: dict, netns: str, cpu: int | None, tmp: Path) -> list[dict]:
    """One more flood per agent, paced at TARGET_RATE for s.profile_seconds, under `py-spy
    record`: where each of the agent's threads spends its time, per event."""
    py_spy = _py_spy()
    if py_spy is None:
        log.warning("--profile: py-spy not found (.venv/bin/pip install py-spy): skipped")
        return []
    out = []
    for name, a in agents.items():
        if name not in PROFILE_FLOODS or a.subscriber is None:
            continue
        proto, expect = PROFILE_FLOODS[name]
        v = Variant(f"profile-{name}", "agent", name, proto, "reuse", expect, TARGET_RATE,
                    f"{name}'s agent, {proto} connects paced at {TARGET_RATE:,}/s, under py-spy")
        raw = tmp / f"profile-{name}.txt"
        spy: dict = {}

        def during(raw=raw, a=a, spy=spy):
            spy["proc"] = subprocess.Popen(
                [py_spy, "record", "--pid", str(a.proc.pid), "--rate", str(PROFILE_RATE),
                 "--format", "raw", "--threads", "--nonblocking", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)   # py-spy attaches before the flood starts

            def stop():
                p = spy["proc"]
                p.send_signal(signal.SIGINT)
                try:
                    _, spy["stderr"] = p.communicate(timeout=PROFILE_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            return stop

        got = sample_agent(v, a, Place(a.flood_cgroup, netns, cpu),
                           int(TARGET_RATE * s.profile_seconds), during=during)
        if not raw.exists():
            log.warning("py-spy wrote nothing for %s: %s", v.name, spy.get("stderr", "")[-500:])
            continue
        keep = RESULTS_DIR / f"events-profile-{name}-last.txt"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw, keep)
        stacks = _parse_raw_profile(raw.read_text())
        out.append({"variant": v.name, "agent": name, "what": v.what, "sample": got,
                    "stacks": stacks, "raw_file": str(keep.relative_to(REPO))})
        log.info("profiled %s: %s; %d samples", v.name, _brief(got), sum(x[3] for x in stacks))
    return out


_THREAD_FRAME = re.compile(r"^thread \((0x[0-9a-fA-F]+|\d+)\): (.*)$")


def _parse_raw_profile(text: str) -> list[tuple[str, str, list[str], int]]:
    """py-spy's raw (collapsed) format -> [(thread id, thread name, frames root first, n)]."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.strip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        tid, name = "", "?"
        m = _THREAD_FRAME.match(frames[0])
        if m:
            tid, name = m.group(1), m.group(2)
            frames = frames[1:]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames:
            out.append((tid, name, frames, int(n)))
    return out


# -- evaluation ------------------------------------------------------------------------------------

def _rounds_of(results: dict, metric: str) -> list[dict[str, float]]:
    names = [v["name"] for v in results["variants"]]
    by: dict[int, dict[str, float]] = defaultdict(dict)
    for x in results["samples"]:
        if x.get(metric) is not None:
            by[x["round"]][x["variant"]] = x[metric]
    return [r for _, r in sorted(by.items()) if all(n in r for n in names)]


def _ratio_to(variant: str, base: str):
    def stat(rounds):
        return statistics.median(r[variant] / r[base] for r in rounds if r[base] > 0)
    return stat


def evaluate(results: dict) -> dict:
    variants = [v["name"] for v in results["variants"]]
    by: dict[str, list[dict]] = defaultdict(list)
    for x in results["samples"]:
        by[x["variant"]].append(x)
    rate_rounds = _rounds_of(results, "rate")
    per = {}
    for name in variants:
        xs = by[name]
        if not xs:
            continue
        e = {"n": len(xs)}
        for key in ("rate", "gen_rate", "represented_rate", "cpu_per_10k",
                    "cpu_per_10k_delivered", "subscriber_cpu_s", "collector_cpu_per_10k",
                    "behind_s"):
            vals = [x[key] for x in xs if x.get(key) is not None]
            if vals:
                e[key] = vars(stats.summarize(vals))
        for key in ("generated", "delivered", "represented", "read", "dropped", "kernel_dropped",
                    "lost_reported_kernel", "lost_replay", "unaccounted", "seq_gaps",
                    "seq_backwards", "unreported_kernel_drops"):
            if any(key in x for x in xs):
                e[key] = sum(x.get(key) or 0 for x in xs)
        split = [_main_split(x) for x in xs if x.get("threads") and x.get("busy_s")]
        split = [x for x in split if x]
        if split:
            e["main_thread"] = {k: statistics.median(x[k] for x in split) for k in split[0]}
        dropped = e.get("kernel_dropped", e.get("dropped", 0))
        e["drop_fraction"] = dropped / e["generated"] if e.get("generated") else 0.0
        if name != "raw" and rate_rounds:
            e["over_raw"] = vars(stats.bootstrap(rate_rounds, _ratio_to(name, "raw")))
        per[name] = e
    return {"rounds": len(rate_rounds), "variants": per, "targets": _targets(per),
            "profile": [_profile_summary(p) for p in results.get("profile", [])]}


def _main_split(x: dict) -> dict | None:
    """Where the agent's main thread's time went from the flood's first connect to the last
    event delivered: on a CPU, runnable but waiting for one, neither (asleep in its 10 ms tick,
    waiting for the GIL or in a blocking call); and CPU per event, its and the other threads'."""
    main = next((t for t in x["threads"] if t["main"]), None)
    if main is None or not x.get("kernel_read"):
        return None
    busy, n = x["busy_s"], x["kernel_read"]
    others = sum(t["cpu_s"] for t in x["threads"] if not t["main"])
    return {"busy_s": busy, "on_cpu": min(1.0, main["cpu_s"] / busy),
            "runq_wait": min(1.0, main.get("runq_wait_s", 0.0) / busy),
            "main_us_per_event": main["cpu_s"] / n * 1e6,
            "others_us_per_event": others / n * 1e6}


def _targets(per: dict) -> list[dict]:
    rows = []
    full = per.get("agent-deny")
    if full:
        rate = full["rate"]["median"]
        clean = full["unaccounted"] == 0 and full["seq_gaps"] == 0
        rows.append({
            "target": f"≥ {TARGET_RATE:,} connection events/s through the agent to one "
                      "subscriber, zero unaccounted loss (full-speed flood)",
            "measured": f"{rate:,.0f} events/s median (min {full['rate']['minimum']:,.0f}); "
                        f"kernel ring buffer dropped {100 * full['drop_fraction']:.1f}% of the "
                        f"flood, all reported: {'yes' if full['unreported_kernel_drops'] == 0 else 'NO'}"
                        f"; unaccounted {full['unaccounted']:,}, seq gaps {full['seq_gaps']:,}",
            "verdict": ("met" if rate >= TARGET_RATE and clean else "**NOT met**")
            + ("" if clean else " (unaccounted loss)")})
    paced = per.get("agent-deny-100k")
    if paced:
        rate = paced["rate"]["median"]
        lossless = (paced["unaccounted"] == 0 and paced["seq_gaps"] == 0
                    and paced["kernel_dropped"] == 0)
        rows.append({
            "target": f"the same at an offered {TARGET_RATE:,}/s: every event delivered",
            "measured": f"generator {paced['gen_rate']['median']:,.0f}/s; delivered "
                        f"{rate:,.0f}/s median; kernel drops {paced['kernel_dropped']:,} "
                        f"({100 * paced['drop_fraction']:.1f}%), unaccounted "
                        f"{paced['unaccounted']:,}",
            "verdict": "met" if lossless and rate >= 0.95 * TARGET_RATE else "**NOT met**"})
    return rows


def _func_name(frame: str) -> str:
    """'encode (hostagent/events/encode.py:123)' -> 'encode (hostagent/events/encode.py)'."""
    return re.sub(r":\d+\)$", ")", frame)


def _profile_summary(p: dict) -> dict:
    """Per thread: CPU per event (µs, from the thread's own CPU time) and where it goes (the
    shares of py-spy's samples of that thread, below the frames every one of them shares)."""
    x = p["sample"]
    events = x["kernel_read"] or 0
    by_thread: dict[tuple, list] = defaultdict(list)
    for tid, name, frames, n in p["stacks"]:
        by_thread[(tid, name)].append((frames, n))
    cpu_by_tid = {str(t["tid"]): t["cpu_s"] for t in x["threads"]}
    threads = []
    for (tid, name), rows in by_thread.items():
        total = sum(n for _, n in rows)
        common = _common_prefix(rows)
        cpu = cpu_by_tid.get(str(int(tid, 16)) if tid.startswith("0x") else tid)
        us = cpu / events * 1e6 if cpu and events else None
        incl: Counter = Counter()
        self_: Counter = Counter()
        lines: Counter = Counter()
        for frames, n in rows:
            seen = set()
            for f in frames[common:]:
                fn = _func_name(f)
                if fn not in seen:
                    incl[fn] += n
                    seen.add(fn)
            self_[_func_name(frames[-1]) if len(frames) > common else "(the entry frames)"] += n
            lines[frames[-1]] += n
        threads.append({
            "tid": tid, "name": name, "samples": total, "cpu_s": cpu, "us_per_event": us,
            "entry": (_func_name(max(rows, key=lambda r: r[1])[0][common - 1]) if common
                      else None),
            "inclusive": [(f, n / total, n / total * us if us else None)
                          for f, n in incl.most_common(30)],
            "self": [(f, n / total, n / total * us if us else None)
                     for f, n in self_.most_common(25)],
            "lines": [(f, n / total, n / total * us if us else None)
                      for f, n in lines.most_common(25)]})
    threads.sort(key=lambda t: -t["samples"])
    return {"variant": p["variant"], "what": p.get("what", ""), "events": events,
            "generated": x["generated"], "delivered": x["delivered"], "rate": x["rate"],
            "kernel_dropped": x["kernel_dropped"], "agent_cpu_s": x["agent_cpu_s"],
            "cpu_threads": x["threads"], "threads": threads, "raw_file": p.get("raw_file")}


def _common_prefix(rows: list[tuple[list[str], int]]) -> int:
    """How many leading frames (the thread's entry: runpy, Thread.run, ...) nearly every sample
    shares: PROFILE_ENTRY_SHARE of the thread's samples, so that a stray sample (start-up,
    shutdown) does not hide the entry. Never all of the heaviest stack."""
    total = sum(n for _, n in rows)
    heaviest = max(rows, key=lambda r: r[1])[0]
    for i in range(len(heaviest) - 1):
        share = sum(n for f, n in rows if f[:i + 1] == heaviest[:i + 1]) / total
        if share < PROFILE_ENTRY_SHARE:
            return i
    return len(heaviest) - 1


# -- markdown --------------------------------------------------------------------------------------

def _k(x: float | None) -> str:
    return "—" if x is None else f"{x / 1000:,.1f}k"


def _ci(e: dict, fmt) -> str:
    return f"{fmt(e['estimate'])} ({fmt(e['low'])} … {fmt(e['high'])})"


def render(results: dict, raw_path: Path) -> str:
    ev = results["evaluation"]
    h = results["host"]
    s = results["settings"]
    per = ev["variants"]
    out = [BEGIN, "", "<!-- generated by `python -m bench.events`; edits inside the markers are "
           "overwritten -->", "", f"## Latest run: {h['date_utc']}", "",
           f"- Command: `{results['command']}` ({results['duration_s']:.0f} s); raw samples in "
           f"`{raw_path}` (not committed)",
           f"- Kernel {h['kernel']}, {h['cpus']} × {h['cpu']}; load average "
           f"{h['loadavg_start'][0]:.2f} at the start, {results.get('loadavg_end', [0])[0]:.2f} "
           f"at the end; pytest processes running: {results.get('pytest_running_at_start', '?')} "
           f"at the start, {results.get('pytest_running_at_end', '?')} at the end (a shared "
           "VM: other engineers' test suites run alongside)",
           f"- hostagent {h['hostagent']}, Python {h['python']}; generator "
           f"{'pinned to CPU ' + str(results['cpu']) if results.get('cpu') is not None else 'not pinned'}",
           f"- {ev['rounds']} interleaved rounds × {len(results['variants'])} variants; "
           f"full-speed floods of {s['count']:,} connects, the paced one "
           f"{int(TARGET_RATE * s['paced_seconds']):,} at {TARGET_RATE:,}/s, agent-agg-tcp "
           f"{s['tcp_count']:,}", "",
           "### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for row in ev["targets"]:
        out.append(f"| {row['target']} | {row['measured']} | {row['verdict']} |")
    out += ["", "### Events per second and CPU", "",
            "Medians over rounds (min – max). *read / delivered*: events per second at the "
            "raw reader or at the agent's subscriber, from the first to the last event of "
            "the flood (a rate is only shown where the flood was delivered as more than "
            f"{MIN_RATE_MESSAGES:,} messages: an aggregated flood is a handful of summaries). "
            "*× raw*: the median over rounds of that rate over the same round's raw rate "
            "(95% bootstrap CI). *drops*: the kernel ring buffer's failed reservations, "
            "share of the connects. *unaccounted*: connects neither delivered nor reported "
            "lost, all rounds. *CPU*: the reader's (raw) or the agent's (every thread) user + "
            "system seconds per 10,000 events it read from the kernel; *subscriber*: this "
            "process's (the gRPC client and the checks) per 10,000 messages it received.", "",
            "| variant | generator /s | read / delivered /s | × raw | messages : connects | "
            "drops | unaccounted | CPU s / 10k events | subscriber CPU s / 10k |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in results["variants"]:
        e = per.get(v["name"])
        if not e:
            continue
        r = e["rate"]
        shown = e.get("delivered", e.get("read", 0)) >= MIN_RATE_MESSAGES * e["n"]
        rate = (f"{_k(r['median'])} ({_k(r['minimum'])} – {_k(r['maximum'])})" if shown
                else "—")
        over = ("1" if v["name"] == "raw" else
                _ci(e["over_raw"], lambda x: f"{x:.2f}") if "over_raw" in e and shown else "—")
        ratio = (f"{e['delivered']:,} : {e['represented']:,}" if "delivered" in e else "—")
        c = e.get("cpu_per_10k")
        cpu = f"{c['median']:.3f} ({c['minimum']:.3f} – {c['maximum']:.3f})" if c else "—"
        sub = (f"{e['subscriber_cpu_s']['median'] / e['delivered'] * e['n'] * 1e4:.3f}"
               if "subscriber_cpu_s" in e and e.get("delivered") and shown else "—")
        if "collector_cpu_per_10k" in e:
            sub = f"{e['collector_cpu_per_10k']['median']:.3f} (the collector, per 10k stored)"
        out.append(f"| {v['name']} | {_k(e['gen_rate']['median'])} | {rate} | {over} | "
                   f"{ratio} | {100 * e['drop_fraction']:.1f}% | {e['unaccounted']:,} | {cpu} "
                   f"| {sub} |")
    out += ["", "| variant | what |", "|---|---|"]
    out += [f"| {v['name']} | {v['what']} |" for v in results["variants"]]
    out += ["", "### Loss accounting (all rounds)", "",
            "| variant | connects | delivered (messages) | kernel drops | reported as kernel_ringbuf "
            "| replay gaps | seq gaps | seq backwards | unaccounted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in results["variants"]:
        e = per.get(v["name"])
        if not e or "delivered" not in e:
            continue
        out.append(f"| {v['name']} | {e['generated']:,} | {e['delivered']:,} | "
                   f"{e['kernel_dropped']:,} | {e['lost_reported_kernel']:,} | "
                   f"{e['lost_replay']:,} | {e['seq_gaps']:,} | {e['seq_backwards']:,} | "
                   f"{e['unaccounted']:,} |")
    rows = [(v["name"], per[v["name"]]["main_thread"]) for v in results["variants"]
            if "main_thread" in per.get(v["name"], {})]
    if rows:
        out += ["", "### The agent's main thread during a flood", "",
                "Medians over rounds, from the flood's first connect to the last event "
                "delivered (*busy*), from /proc/<pid>/task/<tid>/schedstat: the share of that "
                "time the main thread (which drains the ring buffer, encodes, numbers and "
                "spools every event) was on a CPU, was runnable but waiting for a CPU (the "
                "generator, the subscriber and other tenants had them), and neither (asleep "
                "in its 10 ms drain tick, waiting for the GIL, or in a blocking call); then CPU "
                "per event read from the kernel, the main thread's and all other threads' "
                "together (the gRPC stream thread, gRPC's poller, ...).", "",
                "| variant | busy s | on a CPU | waiting for a CPU | neither | main thread µs / "
                "event | other threads µs / event |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in rows:
            out.append(f"| {name} | {m['busy_s']:.2f} | {100 * m['on_cpu']:.0f}% | "
                       f"{100 * m['runq_wait']:.0f}% | "
                       f"{100 * max(0.0, 1 - m['on_cpu'] - m['runq_wait']):.0f}% | "
                       f"{m['main_us_per_event']:.2f} | {m['others_us_per_event']:.2f} |")
    for p in ev.get("profile", []):
        out += _render_profile(p)
    out += ["", END]
    return "\n".join(out) + "\n"


def _render_profile(p: dict) -> list[str]:
    ev = p["events"]
    out = ["", f"### Profile: {p['variant']} (py-spy, {PROFILE_RATE} Hz)", "",
           f"{p['what']}: {p['generated']:,} connects, {ev:,} events read from the kernel, "
           f"{p['delivered']:,} delivered at {_k(p['rate'])}/s, {p['kernel_dropped']:,} dropped "
           f"in the kernel. Agent CPU {p['agent_cpu_s']:.2f} s = "
           f"{p['agent_cpu_s'] / ev * 1e6 if ev else 0:.1f} µs per event read. Raw stacks: "
           f"`{p['raw_file']}`.", "",
           "| thread (OS thread id) | CPU s | waited for a CPU s | µs of CPU per event |",
           "|---|---:|---:|---:|"]
    names = {t["tid"]: t["name"] for t in p["threads"]}
    for t in p["cpu_threads"]:
        label = names.get(str(t["tid"])) or ("main" if t["main"] else t["comm"])
        wait = f"{t['runq_wait_s']:.2f}" if "runq_wait_s" in t else "—"
        out.append(f"| {label} ({t['tid']}) | {t['cpu_s']:.2f} | {wait} | "
                   f"{t['cpu_s'] / ev * 1e6 if ev else 0:.2f} |")
    for t in p["threads"]:
        if t["samples"] < 50:
            continue
        per = f", {t['us_per_event']:.2f} µs of CPU per event" if t["us_per_event"] else ""
        out += ["", f"Thread {t['name']} ({t['tid']}): {t['samples']:,} samples{per}; below "
                f"`{t['entry']}`. Inclusive (the function and what it calls):", "",
                "| function | share | µs per event |", "|---|---:|---:|"]
        for f, share, us in t["inclusive"][:20]:
            out.append(f"| `{f}` | {100 * share:.1f}% | {'—' if us is None else f'{us:.2f}'} |")
        out += ["", "Self (the innermost Python frame; time in C code called from it counts "
                "here):", "", "| function | share | µs per event |", "|---|---:|---:|"]
        for f, share, us in t["self"][:15]:
            out.append(f"| `{f}` | {100 * share:.1f}% | {'—' if us is None else f'{us:.2f}'} |")
        out += ["", "Hot lines (self, by source line):", "", "| line | share | µs per event |",
                "|---|---:|---:|"]
        for f, share, us in t.get("lines", [])[:15]:
            out.append(f"| `{f}` | {100 * share:.1f}% | {'—' if us is None else f'{us:.2f}'} |")
    return out


# -- the run ---------------------------------------------------------------------------------------

def measure(s: Settings, cpu: int | None, seed: int, variants: list[Variant], do_profile: bool,
            results: dict) -> None:
    run_name = f"{RUN_PREFIX}{os.getpid():x}{random.randrange(16 ** 4):04x}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{run_name}-"))
    with nothing_left(run_name, results):
        with Cleanup() as stack:
            stack.defer(f"rm -r {tmp}", subprocess.run,
                        ["rm", "-rf", "--one-file-system", str(tmp)], check=True)
            run_root = make_cgroup(stack, os.path.join(cgroup2_mount(), run_name))
            stack.defer(f"removing {run_root}", remove_cgroup_tree, run_root)
            netns = make_netns(stack, run_name)
            log.info("run %s: cgroups under %s, namespace %s", run_name, run_root, netns)

            places: dict[str, Place] = {}
            readers: dict[str, RawReader] = {}
            for v in variants:
                if v.kind in ("raw", "raw-backlog"):
                    cg = make_cgroup(stack, os.path.join(run_root, v.name))
                    pages = (AGENT_RINGBUF_PAGES if v.kind == "raw"
                             else ring_pages_for(s.count))
                    readers[v.name] = RawReader(stack, cg, pages)
                    places[v.name] = Place(cg, netns, cpu)
                    log.info("raw reader %s: pid %d, ring of %d pages (%d records)", v.name,
                             readers[v.name].pid, pages, readers[v.name].capacity)
            agents: dict[str, AgentUnderTest] = {}
            for name in dict.fromkeys(v.agent for v in variants if v.agent):
                agents[name] = _start_agent(stack, name, run_root, tmp, run_name, netns)
            for v in variants:
                if v.agent:
                    places[v.name] = Place(agents[v.agent].flood_cgroup, netns, cpu)
            _check_verdicts(variants, places)
            for name in dict.fromkeys(v.agent for v in variants if v.kind == "agent"):
                a = agents[name]
                a.subscriber = Subscriber(a.address)
                stack.defer(f"closing {a.name}'s subscriber", a.subscriber.close)
            collector = None
            if any(v.kind == "collector" for v in variants):
                collector = CollectorUnderTest(stack, agents["coll"], tmp)
                log.info("collector: pid %d, store %s", collector.pid, collector.db)
            results["agents"] = {n: {"what": AGENTS[n]["what"], "pid": a.proc.pid,
                                     "config": a.files.config.read_text()}
                                 for n, a in agents.items()}
            results["samples"] = _rounds(s, variants, places, readers, agents, collector,
                                         seed)
            if do_profile:
                results["profile"] = profile(s, agents, netns, cpu, tmp)
            for a in agents.values():
                if a.subscriber is not None and a.subscriber.error:
                    raise BenchError(f"{a.name}'s subscriber failed: {a.subscriber.error}")
                results["agents"][a.name]["log_tail"] = a.proc.tail(20)
        if stack.failures:
            raise BenchError("cleanup failed: " + "; ".join(stack.failures))
    results["loadavg_end"] = os.getloadavg()
    results["pytest_running_at_end"] = other_tests_running()


def _check_verdicts(variants: list[Variant], places: dict) -> None:
    """Each flood's cgroup is judged as its variant says, before anything is timed."""
    for v in variants:
        got = workload.probe(places[v.name], DENIED)
        if got != v.expect:
            raise BenchError(f"{v.name}: a connect to {DENIED} from {places[v.name].cgroup} gave "
                             f"{got}, want {v.expect}")
    log.info("verdicts check out: %s", ", ".join(f"{v.name} {v.expect}" for v in variants))


def other_tests_running() -> int:
    """pytest processes on the machine (other engineers' suites share the two CPUs)."""
    proc = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True,
                          timeout=STATUS_TIMEOUT, check=False)
    return len(proc.stdout.split())


def _code_fingerprint() -> dict[str, str]:
    out = {}
    for rel in HOT_PATH_FILES:
        p = REPO / rel
        if p.exists():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK.rounds} round, floods of {QUICK.count:,}; docs "
                   "untouched")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds, at most (default "
                   f"{FULL.rounds}, quick {QUICK.rounds}; also bounded by a time budget)")
    p.add_argument("--count", type=int, help=f"connects per full-speed flood (default "
                   f"{FULL.count:,})")
    p.add_argument("--cpu", type=int, help="pin the generator to this CPU")
    p.add_argument("--only", action="append", choices=[v.name for v in VARIANTS],
                   help="run only this variant (repeatable; raw is always kept as the "
                   "reference); implies no docs update")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, flood each agent once more (paced at the target "
                   "rate) under py-spy and report where its threads spend time per event")
    p.add_argument("--docs", type=Path, help=f"markdown to update (default: {DOCS} for a full "
                   "run, none otherwise)")
    p.add_argument("--no-docs", action="store_true", help="do not write any markdown")
    p.add_argument("--seed", type=int, default=1, help="seed of the order of variants")
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help=f"measure nothing: re-render a raw results file (to --docs, default "
                   f"{DOCS})")
    p.add_argument("--raw-reader", nargs=2, metavar=("CGROUP", "PAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_reader:
        return _raw_reader_main(args.raw_reader[0], int(args.raw_reader[1]))

    if (code := begin_run(args, evaluate, render, DOCS, BEGIN, END,
                          root_for="creates cgroups and loads BPF programs")) is not None:
        return code

    s = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("rounds", args.rounds), ("count", args.count)) if v}
    s = dataclasses.replace(s, **overrides)
    variants = [v for v in VARIANTS if not args.only or v.name in args.only or v.name == "raw"]
    full_run = not args.quick and not args.only and not overrides
    docs = None if args.no_docs else (args.docs or (DOCS if full_run else None))

    exit_on_sigterm()
    workload.build()
    started = time.monotonic()
    results = {
        "command": " ".join(["python -m bench.events",
                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "settings": dataclasses.asdict(s), "seed": args.seed, "cpu": args.cpu,
        "target_rate": TARGET_RATE, "host": host_facts(), "code": _code_fingerprint(),
        "variants": [dataclasses.asdict(v) for v in variants],
        "pytest_running_at_start": other_tests_running(),
    }
    try:
        measure(s, args.cpu, args.seed, variants, args.profile, results)
    except BenchError as err:
        log.error("%s", err)
        return 1
    results["duration_s"] = time.monotonic() - started
    results["evaluation"] = evaluate(results)
    publish(results, "events-", args.quick, render, docs, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
