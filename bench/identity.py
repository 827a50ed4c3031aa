"""Benchmark: new cgroup -> policy in force, identity lookup per event, memory per workload.

How soon a new cgroup is governed, what identifying a workload costs, and how the agent's memory
grows with the workloads it knows:

    python -m bench.identity            # full run (~2-4 min), rewrites the generated section of
                                        #   docs/benchmarks-identity.md
    python -m bench.identity --quick    # smoke run (< 1 min, small sizes), prints the tables
    python -m bench.identity --from-results bench/results/identity-<stamp>.json
                                        # re-render a past run's tables, measuring nothing

Three measurements, each against a baseline taken in the same run (docs/benchmarks-identity.md,
"Method", says why each is shaped as it is):

1. cgroup creation -> binding in the kernel. A real agent (inotify watch only: resyncInterval
   3600) governs "/agents/*" with a policy that allows nothing. Each round, in random order:
   ``agent``: mkdir /agents/wN, then poll the pinned bindings map by cgroup id until the entry
   is there; ``floor``: the same against a minimal watcher (inotify -> stat -> add_watch ->
   scandir -> one map update, also Python) on a directory outside the agent's root: what any
   user-space watcher pays before its own bookkeeping; ``agent+connect``: a waiting process
   joins the new cgroup at once and connects to a loopback address the policy denies: is its
   very first connect already denied?
2. IdentityResolver.identify() per call, in this process: cache hit, miss and rebuild, for
   realistic cgroup paths, with a PodWatcher synced from tests/kubeapi.py's FakeKubeAPI;
   baseline parse_cgroup_path() of the same paths. Plus the encoding of one event per workload
   (events.encode, its workload cache cold) and its JSON form.
3. The agent's RSS with 0 .. 10,000 pod containers present and bound (pods served by the fake
   API), and the kernel memory of its maps.

Raw results go to bench/results/identity-<UTC stamp>.json (gitignored). Everything created
(cgroups, bpffs pins, the agents, helper processes) is removed in ``finally`` blocks, and the
run ends with a check that nothing of it is left.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import dataclasses
import errno
import gc
import glob
import json
import logging
import math
import os
import random
import select
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import stats
from bench.env import (AgentFiles, AgentProcess, BenchError, Cleanup, exit_on_sigterm, host_facts,
                       nothing_left, read_status, remove_cgroup_tree, rmdir_cgroup, run_cmd,
                       start_agent, wait_until)
from bench.report import begin_run, keep_log, publish
from hostagent.bpf.syscall import BPF_MAP_LOOKUP_ELEM, MapElemAttr
from hostagent.bpf.syscall import raw as _bpf
from hostagent.bpf import abi, syscall
from hostagent.cgroupfs import cgroup2_mount
from hostagent.config import default_config
from hostagent.events.convert import from_proto
from hostagent.events.encode import BootClock, ConnectionEncoder
from hostagent.v1 import events_pb2 as pb
from hostagent.identity.layout import parse_cgroup_path
from hostagent.identity.resolver import IdentityResolver

log = logging.getLogger("bench.identity")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks-identity.md"
BEGIN = "<!-- identity-bench:begin -->"
END = "<!-- identity-bench:end -->"
RUN_PREFIX = "hostagent-idbench-"
BINDINGS_PIN = "hostagent_bindings_v1"

TARGET_BIND_P99_MS = 50.0

# Timeouts and pacing, each with its reason.
AGENT_START_TIMEOUT = 120.0  # s: BPF compile and load take 2-5 s on this busy 2-CPU VM
BIND_TIMEOUT = 5.0           # s: 100x the target; a binding later than this counts as never
UNBIND_TIMEOUT = 5.0         # s: likewise for the agent deleting the binding after rmdir
POLL_INTERVAL = 0.0002       # s between map lookups: ~0.25 ms resolution, the poller sleeps
                             # ~90% of the time so it does not starve the agent of a CPU
GAP = (0.002, 0.020)         # s, uniform before each creation: lands it at a random phase of the
                             # agent's loop (10 ms ring drain tick, 1 s status write and policy
                             # directory poll), so their cost is sampled, not dodged or hit always
WORKER_TIMEOUT = 5.0         # s for the connect worker to answer; it needs ~0.1 ms
KUBE_SYNC_TIMEOUT = 60.0     # s for the agent (status.json, written every 1 s) to list new pods
BOUND_TIMEOUT = 300.0        # s for 10,000 new cgroups to be bound (~1 ms each seen here)
RSS_SAMPLES = 5              # RSS readings per memory step, 0.4 s apart; the median is kept
RSS_SETTLE = 3.0             # s after the last binding: status writes, metrics, GC settle
PROBE_PORT_HOST = "127.0.0.2"

# Passes of calls that leave no state behind (no-op, parse, hit, event records) go over the
# paths this many times: a pass of 1,000 hits lasts ~0.5 ms, short enough for one interrupt or
# context switch to move its figure by 10%. Misses cannot repeat (the second call would hit);
# their passes last 5-40 ms anyway.
STATELESS_REPEAT = 10

CONTAINERS_PER_POD = 10
NODE_NAME = "bench-node"
NAMESPACE = "bench"


@dataclass(frozen=True)
class Settings:
    bind_rounds: int             # rounds of (agent, floor, agent+connect), shuffled per round
    bind_budget_s: float         # stop starting rounds after this long
    pods: int                    # pods the lookup benchmark's PodWatcher holds
    lookup_reps: int             # repetitions of each timed loop; the median is reported
    memory_steps: tuple[int, ...]  # container cgroups present at each RSS reading


FULL = Settings(bind_rounds=1000, bind_budget_s=900.0, pods=1000, lookup_reps=15,
                memory_steps=(0, 1000, 5000, 10000))
QUICK = Settings(bind_rounds=100, bind_budget_s=60.0, pods=100, lookup_reps=3,
                 memory_steps=(0, 200, 500))


# -- bpf(2): the map commands the bench needs ------------------------------------------------------
# hostagent.bpf.syscall wraps pins, links, object info and the attr of element commands; the
# bench adds what it alone needs: lookups in a tight poll loop that expect misses (syscall.raw:
# no exception per miss), and a map of its own for the floor watcher.

BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_TYPE_HASH = 1
BPF_ANY = 0


class _MapCreateAttr(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16),
                ("reserved", ct.c_uint8 * 36)]   # must be zero: later fields of union bpf_attr


class U64Map:
    """A BPF hash map keyed by a u64 (a cgroup id), by fd. Holds one preset attr and key buffer
    so that a lookup in the poll loop is a single ctypes call."""

    def __init__(self, fd: int, value_size: int) -> None:
        self.fd = fd
        self._key = ct.c_uint64()
        self._value = (ct.c_uint8 * value_size)()
        self._attr = MapElemAttr(map_fd=fd, key=ct.addressof(self._key),
                                 value=ct.addressof(self._value))

    @classmethod
    def create(cls, name: str, value_size: int, max_entries: int) -> U64Map:
        attr = _MapCreateAttr(map_type=BPF_MAP_TYPE_HASH, key_size=8, value_size=value_size,
                              max_entries=max_entries, map_name=name.encode()[:15])
        fd = _bpf(BPF_MAP_CREATE, attr)
        if fd < 0:
            raise BenchError(f"BPF_MAP_CREATE {name}: {os.strerror(-fd)}")
        return cls(fd, value_size)

    def lookup(self, key: int) -> bytes | None:
        self._key.value = key
        ret = _bpf(BPF_MAP_LOOKUP_ELEM, self._attr)
        if ret == -errno.ENOENT:
            return None
        if ret < 0:
            raise BenchError(f"map lookup: {os.strerror(-ret)}")
        return bytes(self._value)

    def contains(self, key: int) -> bool:
        self._key.value = key
        ret = _bpf(BPF_MAP_LOOKUP_ELEM, self._attr)
        if ret < 0 and ret != -errno.ENOENT:
            raise BenchError(f"map lookup: {os.strerror(-ret)}")
        return ret == 0

    def update(self, key: int) -> None:
        self._key.value = key
        ct.memset(self._value, 0, len(self._value))
        attr = MapElemAttr(map_fd=self.fd, key=ct.addressof(self._key),
                           value=ct.addressof(self._value), flags=BPF_ANY)
        ret = _bpf(BPF_MAP_UPDATE_ELEM, attr)
        if ret < 0:
            raise BenchError(f"map update: {os.strerror(-ret)}")

    def delete(self, key: int) -> None:
        self._key.value = key
        ret = _bpf(BPF_MAP_DELETE_ELEM, MapElemAttr(map_fd=self.fd,
                                                    key=ct.addressof(self._key)))
        if ret < 0 and ret != -errno.ENOENT:
            raise BenchError(f"map delete: {os.strerror(-ret)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def poll_until(present: Callable[[], bool], deadline_ns: int) -> tuple[int, int, int] | None:
    """Poll until present() holds: (CLOCK_MONOTONIC ns read after the lookup that found it,
    polls made, ns read before the last lookup that did not, or 0 if the first one found it),
    or None at the deadline. The change happened between the two. Each is read on the safe side
    of its lookup: the poller can be descheduled around a syscall, so a clock read after a miss
    would claim an absence later than the lookup saw it."""
    polls = 0
    last_miss = 0
    while True:
        polls += 1
        before = time.monotonic_ns()
        if present():
            return time.monotonic_ns(), polls, last_miss
        last_miss = before
        if time.monotonic_ns() > deadline_ns:
            return None
        time.sleep(POLL_INTERVAL)


# -- cgroups ---------------------------------------------------------------------------------------

# -- helper processes ------------------------------------------------------------------------------

class ConnectWorker:
    """A process waiting to join a new cgroup and connect at once (``--connect-worker``).

    Between commands it sits in a parking cgroup outside the agent's root. For each cgroup path
    it is sent, it writes itself into that cgroup's cgroup.procs, creates a TCP socket, connects
    to addr:port (bound, not listening: a connect that gets through is refused with an RST),
    moves back to the parking cgroup and answers "<result> <t_joining> <t_connect> <t_done>"
    (CLOCK_MONOTONIC ns before the cgroup.procs write, before connect(), after it).
    """

    def __init__(self, park: str, addr: str, port: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.identity", "--connect-worker", park, addr, str(port)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if self._readline() != "ready":
            raise BenchError("connect worker did not start")

    def _readline(self) -> str:
        ready, _, _ = select.select([self._proc.stdout], [], [], WORKER_TIMEOUT)
        if not ready:
            raise BenchError(f"connect worker silent for {WORKER_TIMEOUT:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise BenchError(f"connect worker exited ({self._proc.poll()})")
        return line.strip()

    def send(self, cgroup: str) -> None:
        self._proc.stdin.write(cgroup + "\n")
        self._proc.stdin.flush()

    def result(self) -> dict:
        verdict, joining, start, done = self._readline().split()
        return {"result": verdict, "t_joining_ns": int(joining), "t_connect_ns": int(start),
                "t_done_ns": int(done)}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(WORKER_TIMEOUT)


def _connect_worker(park: str, addr: str, port: int) -> int:
    Path(park, "cgroup.procs").write_text("0")
    print("ready", flush=True)
    for line in sys.stdin:          # one command per cgroup; ends when the bench closes stdin
        cgroup = line.strip()
        t_joining = time.monotonic_ns()
        Path(cgroup, "cgroup.procs").write_text("0")   # "0": the writing process itself
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t_connect = time.monotonic_ns()
        try:
            s.connect((addr, port))
            result = "allowed"
        except ConnectionRefusedError:
            result = "allowed"      # past every hook: the kernel's RST for a closed port
        except PermissionError:
            result = "eperm"        # refused by the agent's connect4 program
        except OSError as err:
            result = f"error:{err.errno}"
        t_done = time.monotonic_ns()
        s.close()
        Path(park, "cgroup.procs").write_text("0")
        print(result, t_joining, t_connect, t_done, flush=True)
    return 0


class FloorWatcher:
    """The least a user-space watcher does before a new cgroup is bound (``--floor-watcher``):
    inotify on one directory; per new directory one stat, one inotify_add_watch and one scandir
    (what the agent's CgroupWatcher does per new cgroup) and one BPF map update; per removed
    one, one map delete. Python, as the agent is, so the difference between the two is the
    agent's own bookkeeping (identity, binder, bcc table, metrics)."""

    def __init__(self, directory: str, bpf_map: U64Map) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.identity", "--floor-watcher", directory,
             str(bpf_map.fd)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, pass_fds=(bpf_map.fd,))
        ready, _, _ = select.select([self._proc.stdout], [], [], WORKER_TIMEOUT)
        if not ready or self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise BenchError("floor watcher did not start")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()    # its signal to exit
            try:
                self._proc.wait(WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(WORKER_TIMEOUT)


def _floor_watcher(directory: str, map_fd: int) -> int:
    from inotify_simple import INotify, flags

    mask = flags.CREATE | flags.DELETE | flags.ONLYDIR | flags.DONT_FOLLOW
    bpf_map = U64Map(map_fd, 16)
    ino = INotify()
    ino.add_watch(directory, mask)
    known: dict[str, tuple[int, int]] = {}     # name -> (cgroup id, watch descriptor)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([ino.fileno(), sys.stdin], [], [])
        if sys.stdin in ready:                  # the bench closed our stdin (or died): done
            return 0
        for ev in ino.read(timeout=0):
            if not ev.mask & flags.ISDIR:
                continue
            path = os.path.join(directory, ev.name)
            if ev.mask & flags.CREATE:
                try:
                    cgid = os.stat(path).st_ino
                    wd = ino.add_watch(path, mask)
                    with os.scandir(path) as it:
                        _ = [e.name for e in it if e.is_dir(follow_symlinks=False)]
                except FileNotFoundError:
                    continue
                bpf_map.update(cgid)
                known[ev.name] = (cgid, wd)
            elif ev.mask & flags.DELETE and ev.name in known:
                cgid, wd = known.pop(ev.name)
                try:
                    ino.rm_watch(wd)
                except OSError:
                    pass    # the kernel dropped the mark with the directory
                bpf_map.delete(cgid)


# -- agents ----------------------------------------------------------------------------------------

def _write_config(files: AgentFiles, event_log: Path, extra: str = "") -> None:
    files.policy_dir.mkdir(parents=True, exist_ok=True)
    files.config.write_text(
        "# written by bench/identity.py for one benchmark run\n"
        f"cgroupRoot: {files.cgroup_root}\n"
        f"bpffsDir: {files.bpffs_dir}\n"
        f"stateDir: {files.state_dir}\n"
        f"policyDir: {files.policy_dir}\n"
        'metrics: {listen: "127.0.0.1:0"}\n'
        f"eventLog: {event_log}\n"
        "defaultAction: allow\n"
        "resyncInterval: 3600\n"     # only the inotify watch can bind a new cgroup in time
        "metadata: {exempt: []}\n"
        + extra)


def _write_policy(files: AgentFiles, name: str, selector: str) -> None:
    path = files.policy_dir / f"{name}.yaml"
    path.write_text("apiVersion: hostagent.io/v1\nkind: EgressPolicy\n"
                    f"metadata: {{name: {name}}}\n"
                    f"spec:\n  selector:\n{selector}\n  mode: enforce\n  egress: []\n")


def _start(stack: Cleanup, files: AgentFiles) -> AgentProcess:
    agent = start_agent(stack, files)
    agent.wait_for(r"enforcing \(generation \d+\)", 0, AGENT_START_TIMEOUT)
    return agent


def _bindings(stack: Cleanup, files: AgentFiles) -> U64Map:
    fd = syscall.obj_get(os.path.join(files.bpffs_dir, BINDINGS_PIN))
    if fd is None:
        raise BenchError(f"no {BINDINGS_PIN} pinned in {files.bpffs_dir}")
    m = U64Map(fd, ct.sizeof(abi.Binding))
    stack.defer("closing the bindings map", m.close)
    return m


def _map_memlock(bpffs_dir: str) -> dict[str, dict]:
    """Every pinned map of the agent: bytes_memlock and max_entries, from bpftool."""
    out = {}
    for path in sorted(glob.glob(os.path.join(bpffs_dir, "hostagent_*_v*"))):
        proc = run_cmd(["bpftool", "--json", "map", "show", "pinned", path], check=False)
        if proc.returncode != 0:
            continue
        info = json.loads(proc.stdout)
        out[os.path.basename(path)] = {k: info.get(k) for k in
                                       ("type", "max_entries", "bytes_memlock", "flags")}
    return out


# -- 1. cgroup creation -> binding -----------------------------------------------------------------

def measure_binding(s: Settings, stack: Cleanup, run_root: str, tmp: Path, run_name: str,
                    seed: int) -> dict:
    agent_root = os.path.join(run_root, "bind")
    os.mkdir(agent_root)
    agents = os.path.join(agent_root, "agents")
    for d in (agents, os.path.join(agents, "probe"), os.path.join(agent_root, "open"),
              os.path.join(run_root, "floor"), os.path.join(run_root, "park")):
        os.mkdir(d)
    floor_dir = os.path.join(run_root, "floor")

    files = AgentFiles(config=tmp / "bind.yaml", policy_dir=tmp / "bind-policies",
                       state_dir=tmp / "bind-state", bpffs_dir=f"/sys/fs/bpf/{run_name}-bind",
                       cgroup_root=agent_root, log=tmp / "bind-agent.log")
    _write_config(files, tmp / "bind-events.jsonl", "kubernetes: {enabled: false}\n")
    _write_policy(files, "bench-agents", '    cgroupPath: "/agents/*"')

    # a closed port on a loopback address: a connect that gets through is refused (RST)
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stack.callback(closed.close)
    closed.bind((PROBE_PORT_HOST, 0))
    port = closed.getsockname()[1]

    t0 = time.monotonic()
    agent = _start(stack, files)
    log.info("agent %d enforcing after %.1f s; /agents/* allows nothing", agent.pid,
             time.monotonic() - t0)
    bindings = _bindings(stack, files)
    floor_map = U64Map.create("idbench_floor", 16, 4096)
    stack.defer("closing the floor map", floor_map.close)
    floor = FloorWatcher(floor_dir, floor_map)
    stack.defer("stopping the floor watcher", floor.close)
    worker = ConnectWorker(os.path.join(run_root, "park"), PROBE_PORT_HOST, port)
    stack.defer("stopping the connect worker", worker.close)

    # proof the policy is in force and that an unselected sibling is not governed
    checks = {}
    for name, path, want in (("selected /agents/probe", os.path.join(agents, "probe"), "eperm"),
                             ("unselected /open", os.path.join(agent_root, "open"), "allowed")):
        worker.send(path)
        checks[name] = worker.result()["result"]
        if checks[name] != want:
            raise BenchError(f"{name}: first connect gave {checks[name]}, want {want}")
    log.info("verdicts check out: %s", checks)

    rng = random.Random(seed)
    deadline = time.monotonic() + s.bind_budget_s
    samples: list[dict] = []
    polls = []
    started = time.monotonic()
    for r in range(s.bind_rounds):
        if r >= 5 and time.monotonic() > deadline:
            log.info("time budget of %.0f s spent: stopping after %d rounds", s.bind_budget_s, r)
            break
        order = ["agent", "floor", "agent+connect"]
        rng.shuffle(order)
        for pos, variant in enumerate(order):
            time.sleep(rng.uniform(*GAP))
            if variant == "floor":
                path, m = os.path.join(floor_dir, f"f{r}"), floor_map
            else:
                prefix = "w" if variant == "agent" else "c"
                path, m = os.path.join(agents, f"{prefix}{r}"), bindings
            row = _one_binding(path, m, worker if variant == "agent+connect" else None)
            row.update(round=r, position=pos, variant=variant)
            samples.append(row)
            if row.get("polls") and row["polls"] > 1:
                polls.append(row["poll_span_ns"] / (row["polls"] - 1))
        if (r + 1) % 100 == 0 or r == s.bind_rounds - 1:
            last = {x["variant"]: x["bind_ms"] for x in samples if x["round"] == r}
            log.info("round %d/%d: %s", r + 1, s.bind_rounds,
                     "  ".join(f"{k} {v:.2f} ms" if v is not None else f"{k} never"
                               for k, v in sorted(last.items())))
    status = json.loads((files.state_dir / "status.json").read_text())
    return {"samples": samples, "checks": checks, "duration_s": time.monotonic() - started,
            "poll_period_us": statistics.median(polls) / 1000 if polls else None,
            "agent_status": {k: status.get(k) for k in ("cgroups", "map_fill", "identity")},
            "agent_log_tail": agent.tail(20)}


def _one_binding(path: str, m: U64Map, worker: ConnectWorker | None) -> dict:
    """mkdir path, time until its id is a key of m; then rmdir it and time until it is gone."""
    t0 = time.monotonic_ns()
    os.mkdir(path)
    t1 = time.monotonic_ns()
    row: dict = {"mkdir_us": (t1 - t0) / 1e3}
    try:
        cgid = os.stat(path).st_ino
        if worker is not None:
            worker.send(path)       # it joins and connects while we poll; its answer waits
        t_poll = time.monotonic_ns()
        seen = poll_until(lambda: m.contains(cgid), t0 + int(BIND_TIMEOUT * 1e9))
        row["bind_ms"] = (seen[0] - t0) / 1e6 if seen else None
        row["polls"] = seen[1] if seen else None
        row["poll_span_ns"] = seen[0] - t_poll if seen else None
        # not in the map at this moment (ms after t0); None: already there at the first poll
        row["unbound_at_ms"] = (seen[2] - t0) / 1e6 if seen and seen[2] else None
        if worker is not None:
            got = worker.result()
            row["first_connect"] = got["result"]
            row["mkdir_to_join_us"] = (got["t_joining_ns"] - t0) / 1e3
            row["join_us"] = (got["t_connect_ns"] - got["t_joining_ns"]) / 1e3
            row["mkdir_to_connect_us"] = (got["t_connect_ns"] - t0) / 1e3
            row["connect_us"] = (got["t_done_ns"] - got["t_connect_ns"]) / 1e3
            row["mkdir_to_connect_done_us"] = (got["t_done_ns"] - t0) / 1e3
    finally:
        t2 = time.monotonic_ns()
        rmdir_cgroup(path)
    gone = poll_until(lambda: not m.contains(cgid), t2 + int(UNBIND_TIMEOUT * 1e9))
    row["unbind_ms"] = (gone[0] - t2) / 1e6 if gone else None
    return row


# -- 2. identity lookup per event -----------------------------------------------------------------

def _fake_kube_api():
    """tests/kubeapi.py's FakeKubeAPI: the repository root must be importable."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.kubeapi import FakeKubeAPI
    return FakeKubeAPI()


def _hex64(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def _pod_slice(uid: str) -> str:
    return ("/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{uid.replace('-', '_')}.slice")


def _timed_once(f: Callable, calls: Sequence[tuple]) -> float:
    """ns per call of f(*args) over calls, with the collector off while timing (as timeit)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for args in calls:
            f(*args)
        t1 = time.perf_counter_ns()
    finally:
        gc.enable()
    return (t1 - t0) / len(calls)


def measure_lookup(s: Settings, tmp: Path, seed: int) -> dict:
    # the official Kubernetes client is slow to import; only this part needs it
    from hostagent.identity.kube import PodWatcher, make_api_client

    rng = random.Random(seed)
    n = s.pods
    pods = []
    with _fake_kube_api() as api:
        api.add_namespace(NAMESPACE, {"team": "bench"})
        for i in range(n):
            uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            cids = [_hex64(rng), _hex64(rng)]
            api.add_pod(NAMESPACE, f"web-{i}", node=NODE_NAME, uid=uid,
                        labels={"app": f"web-{i % 20}", "tier": "frontend",
                                "pod-template-hash": f"{rng.getrandbits(40):010x}"},
                        service_account=f"sa-{i % 10}",
                        containers=[("app", f"containerd://{cids[0]}"),
                                    ("sidecar", f"containerd://{cids[1]}")])
            pods.append((uid, cids))
        client = make_api_client(api.kubeconfig(tmp / "lookup-kubeconfig"))
        watcher = PodWatcher(client, NODE_NAME)
        watcher.start()
        try:
            if not watcher.wait_synced(KUBE_SYNC_TIMEOUT) or len(watcher.pods()) != n:
                raise BenchError(f"PodWatcher did not sync {n} pods from the fake API")
            return _lookup_loops(s, rng, pods, watcher)
        finally:
            watcher.stop()


def _lookup_loops(s: Settings, rng: random.Random, pods: list[tuple[str, list[str]]],
                  watcher) -> dict:
    cfg = default_config()
    n = len(pods)
    kinds = {
        "kubepods container, pod known": [f"{_pod_slice(uid)}/cri-containerd-{cids[0]}.scope"
                                          for uid, cids in pods],
        "kubepods container, pod not known (pending)": [
            f"{_pod_slice(str(uuid.UUID(int=rng.getrandbits(128), version=4)))}"
            f"/cri-containerd-{_hex64(rng)}.scope" for _ in range(n)],
        "systemd service": [f"/system.slice/svc-{i}.service" for i in range(n)],
        "docker container (no Kubernetes)": [f"/system.slice/docker-{_hex64(rng)}.scope"
                                             for _ in range(n)],
        "user service (delegated)": [f"/user.slice/user-1000.slice/user@1000.service/app.slice/"
                                     f"app-{i}.service" for i in range(n)],
        "plain cgroup": [f"/agents/w{i}" for i in range(n)],
    }

    def resolver(max_entries: int = 65536):
        return IdentityResolver(node_name=NODE_NAME, trust_domain=cfg.trust_domain,
                                unit_template=cfg.unit_spiffe_template,
                                container_template=cfg.container_spiffe_template, pods=watcher,
                                max_entries=max_entries)

    def noop(_path, _cgid):
        return None

    # (kind, column) -> (calls, make): make() gives the callable to time over calls; a fresh
    # one per pass where the pass changes it (misses fill the cache)
    tasks: dict[tuple[str, str], tuple[list, Callable[[], Callable]]] = {}
    rows = []
    for kind, paths in kinds.items():
        first = [(p, 10_000 + i) for i, p in enumerate(paths)]
        fillers = [(f"/filler/x{i}", 30_000 + i) for i in range(n)]
        second = [(p, 20_000 + i) for i, p in enumerate(paths)]
        warm = _full(resolver(), first)
        rows.append({"kind": kind, "paths": n, "example": paths[0],
                     "workload": warm.identify(*first[0]).as_event()})
        repeated = first * STATELESS_REPEAT
        tasks[kind, "call_floor_ns"] = (repeated, lambda: noop)
        tasks[kind, "parse_ns"] = (repeated, lambda: lambda p, _c: parse_cgroup_path(p))
        tasks[kind, "hit_ns"] = (repeated, lambda w=warm: w.identify)
        tasks[kind, "miss_ns"] = (first, lambda: resolver().identify)
        # a full cache: every new path also evicts the least recently used one
        tasks[kind, "miss_full_cache_ns"] = (
            first, lambda f=fillers: _full(resolver(n), f).identify)
        # same path, new cgroup id (made again; or pods_changed): layout kept, rest rebuilt
        tasks[kind, "rebuild_ns"] = (second, lambda f=first: _full(resolver(), f).identify)

    # one event record end to end, as the daemon builds it (identity from a warm cache)
    paths = kinds["kubepods container, pod known"]
    warm = resolver()
    by_id = {50_000 + i: p for i, p in enumerate(paths)}
    for cgid, p in by_id.items():
        warm.identify(p, cgid)

    def identity_of(cgid):
        fields = warm.identify(by_id[cgid], cgid).as_event()
        fields.pop("cgroup_id", None)
        return fields

    clock = BootClock()
    daddr = bytes(10) + b"\xff\xff" + socket.inet_aton("10.1.2.3")
    events = []
    for cgid in by_id:
        e = abi.Event(time_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME), cgroup_id=cgid,
                      sock_cookie=cgid, pid=4242, tid=4242, uid=1000, gid=1000, policy_id=1,
                      ruleset_id=1, dport=443, rule=abi.RULE_NONE, family=socket.AF_INET,
                      protocol=socket.IPPROTO_TCP, verdict=abi.Verdict.DENY,
                      reason=abi.Reason.POLICY_DEFAULT, hook=abi.Hook.CONNECT4, generation=1,
                      comm=b"python3")
        e.daddr[:] = daddr
        events.append((e,))

    encoder = ConnectionEncoder("bench", "0", clock, lambda _pid: "bench",
                                lambda _rs, _r: None, lambda _rs, _r: None, identity_of)

    def record(e):
        # every event here is another workload's: each one builds its workload entry
        wire = encoder.encode(e, 1)
        encoder.reset()
        return wire

    def record_json(e):
        return json.dumps(from_proto(pb.Event.FromString(record(e))), separators=(",", ":"))

    ids = [(e.cgroup_id,) for (e,) in events] * STATELESS_REPEAT
    tasks["event", "identity_ns"] = (ids, lambda: identity_of)
    tasks["event", "encode_ns"] = (events * STATELESS_REPEAT, lambda: record)
    tasks["event", "encode_json_ns"] = (events * STATELESS_REPEAT, lambda: record_json)

    # interleaved, as bench.run does: every pass runs every task once, in a fresh order, so a
    # slow spell of the machine spreads over all columns instead of landing on one
    timings: dict[tuple[str, str], list[float]] = {key: [] for key in tasks}
    order = list(tasks)
    for _ in range(s.lookup_reps):
        rng.shuffle(order)
        for key in order:
            calls, make = tasks[key]
            timings[key].append(_timed_once(make(), calls))
    for row in rows:
        for (kind, column), xs in timings.items():
            if kind == row["kind"]:
                row[column] = xs
        log.info("identify, %s: hit %.0f ns, miss %.0f ns, parse alone %.0f ns", row["kind"],
                 statistics.median(row["hit_ns"]), statistics.median(row["miss_ns"]),
                 statistics.median(row["parse_ns"]))
    event = {column: xs for (kind, column), xs in timings.items() if kind == "event"}
    event["example"] = from_proto(pb.Event.FromString(record(events[0][0])))  # JSON-able form
    reps = s.lookup_reps
    return {"pods": n, "reps": reps, "stateless_repeat": STATELESS_REPEAT, "kinds": rows,
            "event": event,
            "watcher_stats": watcher.stats}


def _full(r, calls):
    for p, c in calls:
        r.identify(p, c)
    return r


# -- 3. memory per 1,000 workloads -----------------------------------------------------------------

def measure_memory(s: Settings, stack: Cleanup, run_root: str, tmp: Path, run_name: str,
                   seed: int) -> dict:
    import psutil

    agent_root = os.path.join(run_root, "mem")
    qos = os.path.join(agent_root, "kubepods.slice", "kubepods-burstable.slice")
    os.makedirs(qos)
    api = _fake_kube_api()
    stack.defer("stopping the fake Kubernetes API", api.close)
    api.add_namespace(NAMESPACE, {"team": "bench"})
    kubeconfig = api.kubeconfig(tmp / "mem-kubeconfig")

    files = AgentFiles(config=tmp / "mem.yaml", policy_dir=tmp / "mem-policies",
                       state_dir=tmp / "mem-state", bpffs_dir=f"/sys/fs/bpf/{run_name}-mem",
                       cgroup_root=agent_root, log=tmp / "memory-agent.log")
    _write_config(files, tmp / "mem-events.jsonl",
                  f"kubernetes: {{enabled: true, kubeconfig: {kubeconfig}, "
                  f"nodeName: {NODE_NAME}}}\n")
    _write_policy(files, "bench-pods", f"    kubernetes: {{namespace: {NAMESPACE}}}")
    agent = _start(stack, files)
    node = _Node(api, _bindings(stack, files), qos, files.state_dir / "status.json",
                 random.Random(seed + 3))
    proc = psutil.Process(agent.pid)

    def reading(**extra) -> dict:
        time.sleep(RSS_SETTLE)
        row = {"workloads": len(node.containers), "pods": len(node.pods), **extra,
               **_memory(proc), "maps": _map_memlock(files.bpffs_dir)}
        log.info("%d workloads in %d pods: RSS %.1f MiB (anonymous %.1f MiB)",
                 row["workloads"], row["pods"], row["rss_bytes"] / 2**20,
                 row["rss_anon_bytes"] / 2**20)
        return row

    steps = []
    for target in s.memory_steps:
        steps.append(reading(bound_s=node.grow(target)))
    # all gone again: does the agent give the memory back? And a second node's worth of new
    # workloads: is what it kept reused (flat) or is it growing (a leak)?
    after = reading(freed_s=node.remove_all())
    regrown = reading(bound_s=node.grow(max(s.memory_steps)))
    return {"containers_per_pod": CONTAINERS_PER_POD, "steps": steps, "after_removal": after,
            "regrown": regrown, "agent_log_tail": agent.tail(20)}


class _Node:
    """Pods in the fake API and their cgroups under the memory agent's root, grown in batches
    the way a node gets them: the pod object first, its cgroups after."""

    def __init__(self, api, bindings: U64Map, qos: str, status_path: Path,
                 rng: random.Random) -> None:
        self.api, self.bindings, self.qos, self.status_path, self.rng = (
            api, bindings, qos, status_path, rng)
        self.containers: list[tuple[str, int]] = []     # (path, cgroup id)
        self.pods: list[tuple[str, str]] = []           # (uid, pod cgroup path)
        self._serial = 0

    def grow(self, target: int) -> float:
        """Add pods until target containers exist and are bound; seconds it took."""
        new = target - len(self.containers)
        if new < 0 or new % CONTAINERS_PER_POD:
            raise BenchError(f"{target}: cannot grow from {len(self.containers)} in whole pods "
                             f"of {CONTAINERS_PER_POD}")
        t0 = time.monotonic()
        batch = []
        for _ in range(new // CONTAINERS_PER_POD):
            uid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            cids = [_hex64(self.rng) for _ in range(CONTAINERS_PER_POD)]
            self.api.add_pod(NAMESPACE, f"pod-{self._serial}", node=NODE_NAME, uid=uid,
                             labels={"app": f"app-{self._serial % 50}", "tier": "backend"},
                             containers=[(f"c{j}", f"containerd://{c}")
                                         for j, c in enumerate(cids)])
            self._serial += 1
            batch.append((uid, cids))
        # kubelet creates a pod's cgroups after the API has the pod; so does the bench, so that
        # no cgroup is bound as pending first and rebound when its pod arrives
        want = len(self.pods) + len(batch)
        wait_until(lambda: read_status(self.status_path).get("identity", {}).get("pods") == want,
              KUBE_SYNC_TIMEOUT, f"the agent to list {want} pods")
        first = len(self.containers)
        for uid, cids in batch:
            pod_dir = os.path.join(self.qos,
                                   f"kubepods-burstable-pod{uid.replace('-', '_')}.slice")
            os.mkdir(pod_dir)
            self.pods.append((uid, pod_dir))
            for c in cids:
                path = os.path.join(pod_dir, f"cri-containerd-{c}.scope")
                os.mkdir(path)
                self.containers.append((path, os.stat(path).st_ino))
        _wait_bound(self.bindings, [cgid for _, cgid in self.containers[first:]])
        return time.monotonic() - t0

    def remove_all(self) -> float:
        """Remove every cgroup and pod; seconds until the agent deleted their bindings."""
        t0 = time.monotonic()
        for path, _ in reversed(self.containers):
            rmdir_cgroup(path)
        for uid, pod_dir in self.pods:
            rmdir_cgroup(pod_dir)
            self.api.delete_pod(uid)
        ids = [cgid for _, cgid in self.containers]
        wait_until(lambda: not any(self.bindings.contains(c) for c in ids), BOUND_TIMEOUT,
              "the removed cgroups' bindings to be deleted")
        self.containers, self.pods = [], []
        return time.monotonic() - t0


def _wait_bound(bindings: U64Map, ids: list[int]) -> None:
    """Until every id has a binding to a ruleset (not pending, not unbound)."""
    todo = set(ids)
    deadline = time.monotonic() + BOUND_TIMEOUT
    while todo:
        for cgid in list(todo):
            raw = bindings.lookup(cgid)
            if raw is None:
                continue
            b = abi.Binding.from_buffer_copy(raw)
            if b.ruleset_id and not b.flags & (abi.BINDING_PENDING | abi.BINDING_CONFLICT):
                todo.discard(cgid)
        if not todo:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(todo)} of {len(ids)} cgroups not bound after "
                             f"{BOUND_TIMEOUT:.0f} s")
        time.sleep(0.1)


def _memory(proc) -> dict:
    """RSS (median of RSS_SAMPLES readings), and its anonymous part from /proc/<pid>/status:
    RSS and USS also move when other processes map or unmap the same shared libraries (LLVM,
    via bcc: other agents on this machine), anonymous memory only with the agent's own heap."""
    rss, anon = [], []
    for i in range(RSS_SAMPLES):
        if i:
            time.sleep(0.4)
        rss.append(proc.memory_info().rss)
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line)
        anon.append(int(fields["RssAnon"].split()[0]) * 1024)
    return {"rss_bytes": statistics.median(rss), "rss_samples": rss,
            "rss_anon_bytes": statistics.median(anon), "rss_anon_samples": anon}


# -- evaluation and report -------------------------------------------------------------------------

def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); inf sorts last."""
    ys = sorted(xs)
    k = (len(ys) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    if ys[hi] == math.inf:
        return math.inf if k > lo or ys[lo] == math.inf else ys[lo]
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)


def _bootstrap_pct(xs: Sequence[float], q: float, seed: int = 1) -> stats.Interval:
    est = percentile(xs, q)
    rng = random.Random(seed)
    draws = sorted(percentile(rng.choices(xs, k=len(xs)), q)
                   for _ in range(stats.BOOTSTRAP_RESAMPLES))
    tail = (1 - stats.CONFIDENCE) / 2
    return stats.Interval(est, draws[int(tail * (len(draws) - 1))],
                          draws[int((1 - tail) * (len(draws) - 1))])


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _dist(xs: list[float]) -> dict:
    vals = [math.inf if x is None else x for x in xs]
    return {"n": len(vals), "never": sum(v == math.inf for v in vals),
            "p50": percentile(vals, 0.5), "p90": percentile(vals, 0.9),
            "p99": percentile(vals, 0.99), "max": max(vals), "min": min(vals)}


def evaluate(results: dict) -> dict:
    out: dict = {}
    b = results.get("binding")
    if b:
        by: dict[str, list[dict]] = {}
        for row in b["samples"]:
            by.setdefault(row["variant"], []).append(row)
        out["bind"] = {v: _dist([r["bind_ms"] for r in rows]) for v, rows in by.items()}
        out["unbind"] = {v: _dist([r["unbind_ms"] for r in rows]) for v, rows in by.items()}
        agent = [math.inf if r["bind_ms"] is None else r["bind_ms"] for r in by["agent"]]
        ci = _bootstrap_pct(agent, 0.99)
        out["target"] = {"p99": vars(ci), "limit_ms": TARGET_BIND_P99_MS,
                         "verdict": "met" if ci.high <= TARGET_BIND_P99_MS else
                         "NOT met" if ci.low > TARGET_BIND_P99_MS else "undecided"}
        out["bind_p99_ci"] = {v: vars(_bootstrap_pct(
            [math.inf if r["bind_ms"] is None else r["bind_ms"] for r in rows], 0.99))
            for v, rows in by.items()}
        out["within_ms"] = {v: {str(t): sum(1 for r in rows if r["bind_ms"] is not None
                                             and r["bind_ms"] <= t) / len(rows)
                                for t in (1, 2, 5, 10, 50)} for v, rows in by.items()}
        rounds = _paired(b["samples"], ("agent", "floor"))
        out["agent_minus_floor"] = {
            "rounds": len(rounds),
            "paired": vars(stats.bootstrap(rounds, stats.paired_added("agent", "floor"))),
            "unpaired": vars(stats.bootstrap(rounds, stats.added("agent", "floor")))}
        conn = by.get("agent+connect", [])
        denied = sum(r["first_connect"] == "eperm" for r in conn)
        out["first_connect"] = {
            "n": len(conn), "denied": denied,
            "allowed": sum(r["first_connect"] == "allowed" for r in conn),
            "other": sorted({r["first_connect"] for r in conn} - {"eperm", "allowed"}),
            "fraction_denied": denied / len(conn) if conn else None,
            "ci": _wilson(denied, len(conn)),
            "mkdir_to_connect_us": _dist([r["mkdir_to_connect_us"] for r in conn]),
            "join_us": _dist([r["join_us"] for r in conn]),
            "by_gap": _by_gap(conn),
            "agreement": _agreement(conn)} if conn else None
    lk = results.get("lookup")
    if lk:
        rows = []
        for k in lk["kinds"]:
            med = {key: statistics.median(k[key]) for key in
                   ("call_floor_ns", "parse_ns", "hit_ns", "miss_ns", "miss_full_cache_ns",
                    "rebuild_ns")}
            rows.append({"kind": k["kind"], **med,
                         "hit_over_parse": med["hit_ns"] / med["parse_ns"],
                         "miss_over_parse": med["miss_ns"] / med["parse_ns"],
                         "miss_minus_parse": med["miss_ns"] - med["parse_ns"]})
        out["lookup"] = rows
        out["event"] = {k: statistics.median(v) for k, v in lk["event"].items()
                        if k.endswith("_ns")}
    mem = results.get("memory")
    if mem:
        xs = [st["workloads"] for st in mem["steps"]]
        ys = [st["rss_bytes"] for st in mem["steps"]]
        slope = _slope(xs, ys)
        anon = _slope(xs, [st["rss_anon_bytes"] for st in mem["steps"]])
        out["memory"] = {"kib_per_1000": slope * 1000 / 1024 if slope is not None else None,
                         "anon_kib_per_1000": anon * 1000 / 1024 if anon is not None else None}
    return out


# mkdir -> connect() gaps the first-connect results are split by (µs)
GAP_BUCKETS = ((0, 500), (500, 1000), (1000, 2000), (2000, 5000), (5000, math.inf))


def _by_gap(rows: list[dict]) -> list[dict]:
    out = []
    for lo, hi in GAP_BUCKETS:
        xs = [r for r in rows if lo <= r["mkdir_to_connect_us"] < hi]
        k = sum(r["first_connect"] == "eperm" for r in xs)
        out.append({"lo_us": lo, "hi_us": None if hi == math.inf else hi, "n": len(xs),
                    "denied": k, "ci": _wilson(k, len(xs))})
    return out


def _agreement(rows: list[dict]) -> dict:
    """Do the verdicts agree with the map poll? The binding appeared after the last poll that
    missed it and before the one that found it. A connect that started after the binding was
    found must be denied; one that returned before the last miss must be allowed (/agents is
    unselected); one in between is within the poll's resolution."""
    out = {"bound_before": 0, "bound_before_denied": 0, "unbound_before": 0,
           "unbound_before_allowed": 0, "within_resolution": 0}
    for r in rows:
        start, done = r["mkdir_to_connect_us"] / 1e3, r["mkdir_to_connect_done_us"] / 1e3
        if r["bind_ms"] is not None and start >= r["bind_ms"]:
            out["bound_before"] += 1
            out["bound_before_denied"] += r["first_connect"] == "eperm"
        elif r["bind_ms"] is None or (r["unbound_at_ms"] is not None
                                      and done < r["unbound_at_ms"]):
            out["unbound_before"] += 1
            out["unbound_before_allowed"] += r["first_connect"] == "allowed"
        else:
            out["within_resolution"] += 1
    return out


def _paired(samples: list[dict], names: tuple[str, ...]) -> list[dict[str, float]]:
    by: dict[int, dict[str, float]] = {}
    for row in samples:
        if row["variant"] in names:
            v = row["bind_ms"]
            by.setdefault(row["round"], {})[row["variant"]] = math.inf if v is None else v
    return [r for _, r in sorted(by.items()) if all(n in r for n in names)
            and all(x != math.inf for x in r.values())]


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (units of y per unit of x)."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def _ms(x: float) -> str:
    return "never" if x == math.inf else f"{x:.2f}"


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def render(results: dict, raw: Path | str) -> str:
    ev = results["evaluation"]
    h = results["host"]
    out = [BEGIN, "", "<!-- generated by `python -m bench.identity`; edits inside the markers "
           "are overwritten -->", "",
           f"## Latest run: {h['date_utc']}", "",
           f"- Command: `{results['command']}` ({results['duration_s']:.0f} s); raw results in "
           f"`{raw}` (not committed)",
           f"- Kernel {h['kernel']}, {h['cpus']} × {h['cpu']}; load average "
           f"{h['loadavg_start'][0]:.2f} at the start, {results['loadavg_end'][0]:.2f} at the end "
           "(a shared VM: other work may run alongside)",
           f"- hostagent {h['hostagent']}, Python {h['python']}", ""]
    if "bind" in ev:
        b = results["binding"]
        t = ev["target"]
        p99 = t["p99"]
        out += ["### Target", "",
                "| target | measured | verdict |", "|---|---|---|",
                f"| cgroup creation → policy in force, p99 ≤ {t['limit_ms']:.0f} ms | "
                f"p99 {_ms(p99['estimate'])} ms (95% CI {_ms(p99['low'])} … {_ms(p99['high'])} "
                f"ms), {ev['bind']['agent']['n']:,} new cgroups | **{t['verdict']}** |", "",
                "### Cgroup creation → binding in the kernel (ms)", "",
                f"{ev['bind']['agent']['n']:,} rounds; each ran the three variants once in "
                f"random order. Time from just before `mkdir` until a lookup of the cgroup's id "
                f"in the map succeeds; the map is polled every "
                f"{b['poll_period_us'] or 0:.0f} µs (measured), the resolution of every figure "
                "here.", "",
                "| variant | p50 | p90 | p99 (95% CI) | max | never (> "
                f"{BIND_TIMEOUT:.0f} s) |",
                "|---|---:|---:|---:|---:|---:|"]
        what = {"agent": "agent: new /agents/wN, pinned hostagent_bindings_v1",
                "floor": "floor: minimal Python inotify watcher → its own map",
                "agent+connect": "agent, a process joins wN at once and connects"}
        for v in ("agent", "floor", "agent+connect"):
            d, ci = ev["bind"][v], ev["bind_p99_ci"][v]
            out.append(f"| {what[v]} | {_ms(d['p50'])} | {_ms(d['p90'])} | {_ms(d['p99'])} "
                       f"({_ms(ci['low'])} … {_ms(ci['high'])}) | {_ms(d['max'])} | "
                       f"{d['never']} |")
        amf = ev["agent_minus_floor"]
        out += ["", f"Agent − floor (the agent's own work on top of any inotify watcher), over "
                f"{amf['rounds']:,} rounds: **{amf['paired']['estimate']:+.2f} ms** paired "
                f"(95% CI {amf['paired']['low']:+.2f} … {amf['paired']['high']:+.2f}), "
                f"{amf['unpaired']['estimate']:+.2f} ms median − median "
                f"(CI {amf['unpaired']['low']:+.2f} … {amf['unpaired']['high']:+.2f}).", "",
                "Share of new cgroups bound within:", "",
                "| variant | 1 ms | 2 ms | 5 ms | 10 ms | 50 ms |",
                "|---|---:|---:|---:|---:|---:|"]
        for v in ("agent", "floor", "agent+connect"):
            w = ev["within_ms"][v]
            out.append(f"| {v} | " + " | ".join(f"{100 * w[str(t)]:.1f}%"
                                                 for t in (1, 2, 5, 10, 50)) + " |")
        fc = ev["first_connect"]
        gap, join, agree = fc["mkdir_to_connect_us"], fc["join_us"], fc["agreement"]
        out += ["", "### A process's first connect in a brand-new cgroup", "",
                "A waiting process joined each new /agents/cN right after `mkdir` (its own "
                "write to cN/cgroup.procs) and at once connected to an address the policy "
                "denies. /agents itself is not selected, so a connect made before cN's binding "
                "exists is judged by /agents' binding (no policy: the node default, allow). "
                f"From before `mkdir` to the connect call: median {gap['p50']:,.0f} µs, p90 "
                f"{gap['p90']:,.0f} µs, max {gap['max']:,.0f} µs; the cgroup.procs write alone "
                f"took median {join['p50']:,.0f} µs, p90 {join['p90']:,.0f} µs, max "
                f"{join['max']:,.0f} µs.", "",
                "| first connects | denied (governed) | allowed (not yet governed) | other |",
                "|---:|---:|---:|---|",
                f"| {fc['n']:,} | {fc['denied']:,} = {100 * fc['fraction_denied']:.1f}% "
                f"(95% CI {100 * fc['ci'][0]:.1f} … {100 * fc['ci'][1]:.1f}%) | "
                f"{fc['allowed']:,} | {', '.join(fc['other']) or '—'} |", "",
                "By the time from `mkdir` to the connect call:", "",
                "| mkdir → connect | first connects | denied (95% CI) |", "|---|---:|---:|"]
        for g in fc["by_gap"]:
            span = (f"{g['lo_us'] / 1000:g} – {g['hi_us'] / 1000:g} ms" if g["hi_us"]
                    else f"≥ {g['lo_us'] / 1000:g} ms")
            share = (f"{100 * g['denied'] / g['n']:.1f}% ({100 * g['ci'][0]:.1f} … "
                     f"{100 * g['ci'][1]:.1f}%)" if g["n"] else "—")
            out.append(f"| {span} | {g['n']:,} | {share} |")
        out += ["", f"Cross-check with the map poll of the same cgroup: of the connects made "
                f"after the binding was seen in the map, {agree['bound_before_denied']:,} of "
                f"{agree['bound_before']:,} were denied; of those made before it could have been "
                f"there, {agree['unbound_before_allowed']:,} of {agree['unbound_before']:,} "
                f"were allowed; {agree['within_resolution']:,} fell within the poll's "
                "resolution.", "",
                "### Cgroup removal → binding deleted (ms)", "",
                "| variant | p50 | p90 | p99 | max | never |", "|---|---:|---:|---:|---:|---:|"]
        for v in ("agent", "floor", "agent+connect"):
            d = ev["unbind"][v]
            out.append(f"| {v} | {_ms(d['p50'])} | {_ms(d['p90'])} | {_ms(d['p99'])} | "
                       f"{_ms(d['max'])} | {d['never']} |")
        out.append("")
    if "lookup" in ev:
        lk = results["lookup"]
        out += ["### Identity lookup per event, in user space (ns per call)", "",
                f"IdentityResolver.identify() in the bench's process, with a PodWatcher synced "
                f"from the fake API server holding {lk['pods']:,} pods (2 containers each); "
                f"{lk['pods']:,} distinct paths per kind, the median of {lk['reps']} timed "
                f"passes over them (the call, parse and hit columns and the event rows go over "
                f"them {lk.get('stateless_repeat', 1)} times per pass), interleaved, gc off "
                "while timing. Baseline: "
                "parse_cgroup_path() of the "
                "same paths, the part of a miss that only depends on the path. \"call\" is "
                "the loop and a call of a no-op function: the floor under every column.", "",
                "| path kind | call | parse (baseline) | hit | miss | miss, cache full | "
                "rebuild (new id) | hit / parse | miss / parse |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ev["lookup"]:
            out.append(f"| {r['kind']} | {r['call_floor_ns']:,.0f} | {r['parse_ns']:,.0f} | "
                       f"{r['hit_ns']:,.0f} | {r['miss_ns']:,.0f} | "
                       f"{r['miss_full_cache_ns']:,.0f} | {r['rebuild_ns']:,.0f} | "
                       f"{r['hit_over_parse']:.2f} | {r['miss_over_parse']:.2f} |")
        e = ev["event"]
        out += ["", "Paths used (first of each kind):", ""]
        out += [f"- {k['kind']}: `{k['example']}`" for k in lk["kinds"]]
        out += ["", "One deny event, as the daemon turns it into a record (identity from a warm "
                "cache, no /proc lookup):", "",
                "| step | ns per event |", "|---|---:|",
                f"| identity fields (path → identify hit → as_event) | {e['identity_ns']:,.0f} |"]
        if "encode_ns" in e:
            out += [f"| events.encode (a workload's first event), including the above | "
                    f"{e['encode_ns']:,.0f} |",
                    f"| + its JSON form (what the event log writes) | "
                    f"{e['encode_json_ns']:,.0f} |", ""]
        else:   # results from before events.encode replaced events.record.to_dict
            out += [f"| events.record.to_dict, including the above | {e['to_dict_ns']:,.0f} |",
                    f"| to_dict + json.dumps (what the event log writes) | "
                    f"{e['to_dict_json_ns']:,.0f} |", ""]
    if "memory" in ev:
        mem = results["memory"]
        m = ev["memory"]
        out += ["### Agent memory with N workloads", "",
                f"Pod containers (`cri-containerd-<id>.scope`, {mem['containers_per_pod']} per "
                "pod) under kubepods.slice/kubepods-burstable.slice, their pods served by the "
                "fake API, bound by a policy selecting the pods' namespace. RSS: median of "
                f"{RSS_SAMPLES} readings once every new cgroup was bound; anonymous: the "
                "RssAnon part of it (the agent's own heap, not shared library pages). The 0 row "
                "is the same agent before the first workload: the baseline.", "",
                "| workloads | pods | RSS MiB | over baseline | anonymous MiB | over baseline | "
                "bindings map memlock | all maps memlock | time to bind them |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base, base_anon = mem["steps"][0]["rss_bytes"], mem["steps"][0]["rss_anon_bytes"]
        rows = [(f"{st['workloads']:,}", st) for st in mem["steps"]]
        rows.append(("0: all removed again", mem["after_removal"]))
        if "regrown" in mem:
            rows.append((f"{mem['regrown']['workloads']:,} new ones after that",
                         mem["regrown"]))
        for label, st in rows:
            maps = st["maps"]
            bm = maps.get(BINDINGS_PIN, {}).get("bytes_memlock")
            total = sum(x.get("bytes_memlock") or 0 for x in maps.values())
            took = (f"{st['bound_s']:.1f} s" if "bound_s" in st
                    else f"{st['freed_s']:.1f} s to free")
            out.append(f"| {label} | {st['pods']:,} | {_mib(st['rss_bytes'])} | "
                       f"{(st['rss_bytes'] - base) / 2**20:+.1f} | "
                       f"{_mib(st['rss_anon_bytes'])} | "
                       f"{(st['rss_anon_bytes'] - base_anon) / 2**20:+.1f} | "
                       f"{_mib(bm) + ' MiB' if bm is not None else 'n/a'} | "
                       f"{_mib(total)} MiB | {took} |")
        bmap = mem["steps"][0]["maps"].get(BINDINGS_PIN, {})
        out += ["", f"Slope (least squares over the growing steps): **{m['kib_per_1000']:,.0f} "
                f"KiB of RSS per 1,000 workloads**, {m['anon_kib_per_1000']:,.0f} KiB of it "
                f"anonymous. The bindings map is a {bmap.get('type', '?')} map of "
                f"{bmap.get('max_entries') or 0:,} entries"
                f"{' (flags ' + str(bmap.get('flags')) + ')' if bmap.get('flags') else ''}; its "
                "memlock is what the kernel charges for it (bpftool's bytes_memlock).", ""]
    out.append(END)
    return "\n".join(out) + "\n"


def measure(s: Settings, seed: int, parts: set[str], results: dict) -> None:
    run_name = f"{RUN_PREFIX}{os.getpid():x}{random.randrange(16 ** 4):04x}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{run_name}-"))
    with nothing_left(run_name, results):
        with Cleanup() as stack:
            stack.defer(f"rm -r {tmp}", subprocess.run,
                        ["rm", "-rf", "--one-file-system", str(tmp)], check=True)
            run_root = os.path.join(cgroup2_mount(), run_name)
            os.mkdir(run_root)
            stack.defer(f"removing {run_root}", remove_cgroup_tree, run_root)
            log.info("run %s: cgroups under %s", run_name, run_root)
            if "lookup" in parts:
                results["lookup"] = measure_lookup(s, tmp, seed)
            for part, key, fn in (("bind", "binding", measure_binding),
                                  ("memory", "memory", measure_memory)):
                if part not in parts:
                    continue
                try:
                    with Cleanup() as inner:
                        results[key] = fn(s, inner, run_root, tmp, run_name, seed)
                finally:
                    # the agent's log outlives the temp directory, failed runs included
                    keep_log(tmp / f"{part}-agent.log", f"identity-{part}-agent-last.log")
                if inner.failures:
                    raise BenchError("cleanup failed: " + "; ".join(inner.failures))
        if stack.failures:
            raise BenchError("cleanup failed: " + "; ".join(stack.failures))
    results["loadavg_end"] = os.getloadavg()




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.identity",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK.bind_rounds} rounds, {QUICK.pods} pods, memory at "
                   f"{', '.join(map(str, QUICK.memory_steps))} workloads; docs untouched")
    p.add_argument("--rounds", type=int, help="rounds of the binding measurement")
    p.add_argument("--only", choices=("bind", "lookup", "memory"), action="append",
                   help="run only this part (repeatable); implies no docs update")
    p.add_argument("--docs", type=Path, help=f"markdown to update (default: {DOCS} for a full "
                   "run of every part, none otherwise)")
    p.add_argument("--no-docs", action="store_true", help="do not write any markdown")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help="measure nothing: re-render a raw results file (to --docs, default "
                   f"{DOCS})")
    # helper processes of the bench itself
    p.add_argument("--connect-worker", nargs=3, metavar=("PARK", "ADDR", "PORT"),
                   help=argparse.SUPPRESS)
    p.add_argument("--floor-watcher", nargs=2, metavar=("DIR", "MAP_FD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connect_worker:
        park, addr, port = args.connect_worker
        return _connect_worker(park, addr, int(port))
    if args.floor_watcher:
        return _floor_watcher(args.floor_watcher[0], int(args.floor_watcher[1]))

    if (code := begin_run(args, evaluate, render, DOCS, BEGIN, END,
                          root_for="creates cgroups and loads BPF programs")) is not None:
        return code

    s = QUICK if args.quick else FULL
    if args.rounds:
        s = dataclasses.replace(s, bind_rounds=args.rounds)
    parts = set(args.only or ("bind", "lookup", "memory"))
    full_run = not args.quick and not args.only
    docs = None if args.no_docs else (args.docs or (DOCS if full_run else None))

    exit_on_sigterm()
    started = time.monotonic()
    results = {
        "command": " ".join(["python -m bench.identity",
                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "settings": dataclasses.asdict(s), "seed": args.seed, "host": host_facts(),
        "target_bind_p99_ms": TARGET_BIND_P99_MS,
    }
    try:
        measure(s, args.seed, parts, results)
    except BenchError as err:
        log.error("%s", err)
        return 1
    results["duration_s"] = time.monotonic() - started
    results["evaluation"] = evaluate(results)

    publish(results, "identity-", args.quick, render, docs, BEGIN, END, _json_default)
    return 0


def _json_default(o):
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
