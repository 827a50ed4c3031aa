"""Benchmark: hostagent's resolver next to dnsmasq and unbound, cached answers, in one run.

    python -m bench.dns            # full run (~4 min), rewrites the generated section of
                                   #   docs/benchmarks-dns.md
    python -m bench.dns --quick    # smoke run (~1 min), prints the tables
    python -m bench.dns --from-results bench/results/dns-<stamp>.json
                                   # re-render a past run's tables, measuring nothing

Three resolvers serve the same zone through the same upstream, each on its own loopback
address and port (never 53, which the agent's kernel programs send to its own resolver for a
governed process):

    dnsmasq    dnsmasq 2.90, --cache-size=10000                      127.0.0.2
    unbound    unbound 1.17, num-threads: 1, forward-zone             127.0.0.3
    hostagent  a real agent (`python -m hostagent run`), its resolver 127.0.0.1

The upstream is tests/dnszone.py's DnsZone (dnspython, authoritative for bench.test, on
127.0.0.1): it only answers the cache misses of the warm-up. dnsperf (Debian's 2.10) always runs
INSIDE the cgroup the agent governs (a policy allowing `*.bench.test` and 127.0.0.0/8), so every
query of every resolver pays the same kernel programs on the client side, and hostagent's
figure includes what the agent does per query: the kernel's attribution record (cgroup_skb
egress), the map lookup that reads it, the per-workload rate limit, name check, tunnel guard
and the per-workload decision on the cached answer (the allowance in fqdn_v1 is written on the
first answer, in the warm-up).

Measured, interleaved (each round runs every resolver once, in a fresh random order):
  1. cached throughput: `dnsperf -c 1 -q 100 -l S` (100 queries outstanding);
  2. latency at a fixed rate, half of dnsmasq's median qps from (1), and at a light 1,000 qps:
     `dnsperf -Q R -v`, which prints each answer's latency (1 µs resolution).
"Added" latency is hostagent's percentile minus dnsmasq's at the same rate in the same run.

Raw results go to bench/results/dns-<UTC stamp>.json (gitignored). Everything started or created
(servers, the agent and its pins, the cgroups, the temporary directory) is stopped or removed in
``finally`` blocks; bench/env.py's Cleanup keeps going when one step fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.env import (AgentFiles, BenchError, Cleanup, exit_on_sigterm, fresh_status, host_facts,
                       make_cgroup, run_cmd, start_agent)
from bench.report import begin_run, keep_log, publish
from hostagent.cgroupfs import cgroup2_mount

log = logging.getLogger("bench.dns")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks-dns.md"
BEGIN = "<!-- dns-bench:begin -->"
END = "<!-- dns-bench:end -->"
RUN_PREFIX = "hostagent-dnsbench-"

RESOLVERS = ("dnsmasq", "unbound", "hostagent")
BASELINE = "dnsmasq"
ADDRESSES = {"dnsmasq": "127.0.0.2", "unbound": "127.0.0.3", "hostagent": "127.0.0.1"}
ZONE = "bench.test"
ZONE_HOST = "127.0.0.1"

# The query file: NAMES names under SUBZONES zones (h<i>.s<j>.bench.test). The agent's tunnel
# guard refuses a workload's 201st distinct name under one zone within a minute (its default,
# dns.tunnel.maxUniqueSubdomains: 200), so the names are spread over zones of 50: the guard
# runs on every query, with its default settings, and never refuses.
NAMES = 400
SUBZONES = 8
TTL = 3600                  # s: nothing expires during a run
OUTSTANDING = 100           # dnsperf -q
LIGHT_QPS = 1000            # the second latency point: no queueing anywhere

TARGET_QPS_RATIO = 0.5      # hostagent's cached qps >= half of dnsmasq's, same run
TARGET_P99_ADDED_MS = 1.0   # p99 added latency at half of dnsmasq's qps

# Timeouts and pacing, each with its reason.
AGENT_START_TIMEOUT = 120.0  # s: BPF compile and load take 2-5 s on this busy 2-CPU VM
SERVER_START_TIMEOUT = 10.0  # s for dnsmasq/unbound to answer; they need ~0.1 s
SERVER_STOP_TIMEOUT = 5.0    # s after SIGTERM before SIGKILL
DNSPERF_SLACK = 30.0         # s beyond -l before a dnsperf run counts as hung (it is killed)
WARMUP_PASSES = 3            # at most; a pass is one run through the query file (-n 1)
STATUS_WAIT = 5.0            # s for the agent's status.json (written every 1 s) to catch up
PAUSE = 0.5                  # s between dnsperf runs: the previous one's sockets close first


@dataclass(frozen=True)
class Settings:
    rounds: int           # interleaved throughput rounds
    seconds: float        # dnsperf -l of a throughput run
    lat_rounds: int       # interleaved latency rounds per rate
    lat_seconds: float    # dnsperf -l of a latency run


FULL = Settings(rounds=3, seconds=10.0, lat_rounds=3, lat_seconds=5.0)
QUICK = Settings(rounds=1, seconds=3.0, lat_rounds=1, lat_seconds=2.0)


# -- tools ---------------------------------------------------------------------------------------

# binary -> the Debian package that ships it. dnsmasq-base is dnsmasq's binary without the
# `dnsmasq` package's service, which would start a resolver on port 53 at install.
TOOLS = {"dnsperf": "dnsperf", "dnsmasq": "dnsmasq-base", "unbound": "unbound"}


def ensure_tools() -> None:
    """apt-get install what is missing (idempotent; like scripts/setup.sh does for nft)."""
    missing = [pkg for binary, pkg in TOOLS.items()
               if shutil.which(binary) is None and not os.path.exists(f"/usr/sbin/{binary}")]
    if not missing:
        return
    log.info("installing %s", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600,
                              check=False)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: "
                             f"{proc.stderr.strip()[-2000:]}")


def _binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        raise BenchError(f"{name} not found")
    return path


def tool_versions() -> dict:
    def first(argv: list[str], pattern: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        m = re.search(pattern, proc.stdout + proc.stderr)
        return m.group(1) if m else "unknown"

    def deb(pkg: str) -> str:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                              text=True, timeout=30, check=False)
        return proc.stdout.strip() or "not a Debian package"

    return {
        "dnsmasq": first([_binary("dnsmasq"), "--version"], r"Dnsmasq version (\S+)"),
        "dnsmasq_deb": deb("dnsmasq-base"),
        "unbound": first([_binary("unbound"), "-V"], r"Version (\S+)"),
        "unbound_deb": deb("unbound"),
        "dnsperf": first([_binary("dnsperf"), "-h"], r"Version (\S+)"),
        "dnsperf_deb": deb("dnsperf"),
    }


def other_tests_running() -> list[str]:
    """Command lines of pytest processes on the machine (someone else's tests share the CPUs)."""
    proc = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True, timeout=10,
                          check=False)
    return [line for line in proc.stdout.splitlines() if line.strip()]


# -- the zone and the query file -----------------------------------------------------------------

def names() -> list[str]:
    per = NAMES // SUBZONES
    return [f"h{i}.s{i // per}.{ZONE}" for i in range(NAMES)]


def start_zone(stack: Cleanup):
    sys.path.insert(0, str(REPO))  # tests/ is not installed; DnsZone lives there
    from tests.dnszone import DnsZone

    zone = DnsZone(ZONE, host=ZONE_HOST)
    for i, name in enumerate(names()):
        zone.add(name, "A", f"198.51.100.{i % 250 + 1}", ttl=TTL)   # TEST-NET-2: never routed
    stack.defer("stopping the zone", zone.stop)
    zone.start()
    return zone


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on host (the server binds it a moment later)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            if port != 53:
                return port
        finally:
            udp.close()
            tcp.close()
    raise BenchError(f"no port free for UDP and TCP on {host}")


# -- servers -------------------------------------------------------------------------------------

class Server:
    """A resolver process (dnsmasq or unbound) in the bench's own (ungoverned) cgroup."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "w", encoding="utf-8") as out:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("%s ignored SIGTERM: killing it", self.name)
            self._proc.kill()
            self._proc.wait(SERVER_STOP_TIMEOUT)

    def tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return ""


def start_dnsmasq(stack: Cleanup, tmp: Path, port: int, zone_port: int) -> Server:
    argv = [_binary("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", f"--server={ZONE_HOST}#{zone_port}",
            f"--listen-address={ADDRESSES['dnsmasq']}", "--bind-interfaces", f"--port={port}",
            "--cache-size=10000", "--pid-file=", "--user=root", "--group=root",
            f"--log-facility={tmp / 'dnsmasq.log'}"]
    server = Server("dnsmasq", argv, tmp / "dnsmasq.out")
    stack.defer("stopping dnsmasq", server.stop)
    server.start()
    return server


def start_unbound(stack: Cleanup, tmp: Path, port: int, zone_port: int) -> Server:
    conf = tmp / "unbound.conf"
    conf.write_text(f"""# written by bench/dns.py for one run
server:
  interface: {ADDRESSES['unbound']}@{port}
  port: {port}
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{tmp}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  do-ip6: no
  module-config: "iterator"
  qname-minimisation: no
  # bench.test is under test., which unbound answers locally (RFC 6761) unless told otherwise
  local-zone: "test." nodefault
  domain-insecure: "test."
  msg-cache-size: 32m
  rrset-cache-size: 64m
remote-control:
  control-enable: no
forward-zone:
  name: "{ZONE}."
  forward-addr: {ZONE_HOST}@{zone_port}
""")
    run_cmd([_binary("unbound-checkconf"), str(conf)])
    server = Server("unbound", [_binary("unbound"), "-d", "-c", str(conf)], tmp / "unbound.out")
    stack.defer("stopping unbound", server.stop)
    server.start()
    return server


def wait_answering(server: Server | None, addr: str, port: int, what: str,
                   timeout: float = SERVER_START_TIMEOUT) -> None:
    """Until addr:port answers a query for the zone's first name (from this process: the bench
    is not governed, so this is not the governed path; it only proves the server is up)."""
    import dns.message
    import dns.query

    q = dns.message.make_query(names()[0], "A")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server is not None and not server.running():
            raise BenchError(f"{what} exited at start:\n{server.tail()}")
        try:
            dns.query.udp(q, addr, port=port, timeout=0.5)
            return
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
            time.sleep(0.1)
    raise BenchError(f"{what} on {addr}:{port} did not answer within {timeout:.0f} s: {last}"
                     + (f"\n{server.tail()}" if server else ""))


# -- the agent -----------------------------------------------------------------------------------

def write_agent_files(files: AgentFiles, event_log: Path, zone_port: int,
                      emit_allowed: bool = False) -> None:
    files.policy_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "cgroupRoot": files.cgroup_root,
        "bpffsDir": files.bpffs_dir,
        "stateDir": str(files.state_dir),
        "policyDir": str(files.policy_dir),
        "eventLog": str(event_log),
        "metrics": {"listen": "127.0.0.1:0"},
        "defaultAction": "allow",
        "kubernetes": {"enabled": False},
        # Port 0: the agent binds a free one and tells its kernel programs which; the bench
        # reads it from the log. No allow events unless --emit-allowed (the agent's default
        # writes one per answered query).
        "dns": {"listen": f"{ADDRESSES['hostagent']}:0",
                "upstreams": [f"{ZONE_HOST}:{zone_port}"],
                "emitAllowed": emit_allowed,
                "rateLimit": {"qps": 1000000, "burst": 1000000},
                "rebindProtect": ["10.0.0.0/8"]},
    }
    files.config.write_text("# written by bench/dns.py for one run\n" + json.dumps(cfg, indent=1))
    (files.policy_dir / "bench.yaml").write_text(
        "apiVersion: hostagent.io/v1\n"
        "kind: EgressPolicy\n"
        "metadata: {name: dns-bench}\n"
        "spec:\n"
        '  selector: {cgroupPath: "/bench"}\n'
        "  mode: enforce\n"
        "  egress:\n"
        "    - name: bench\n"
        "      to:\n"
        f'        - fqdnPattern: "*.{ZONE}"\n'
        "        - cidr: 127.0.0.0/8\n")


def resolver_counters(status: dict) -> dict:
    r = status.get("dns", {}).get("resolver", {})
    keys = ("queries", "cache_hits", "hot_hits", "cache_misses", "unattributed", "rate_limited",
            "denied", "tunnel_refused", "internal_errors", "allowance_failures",
            "upstream_failures", "overloaded", "dropped")
    out = {k: r.get(k, 0) for k in keys}
    out["allowances_open"] = status.get("dns", {}).get("allowances", {}).get("open", 0)
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far, all its threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# -- dnsperf -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    addr: str
    port: int


def dnsperf(procs: str, target: Target, query_file: Path, extra: list[str], seconds: float,
            out_path: Path | None = None) -> str:
    """dnsperf inside the governed cgroup: a shell writes its own pid to cgroup.procs, then
    execs dnsperf (same pid), so the kernel attributes every query to that cgroup. Returns
    stdout (or writes it to out_path and returns "")."""
    argv = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", procs,
            _binary("dnsperf"), "-s", target.addr, "-p", str(target.port), "-d", str(query_file),
            "-c", "1", "-T", "1", *extra]
    timeout = seconds + DNSPERF_SLACK
    if out_path is None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        out, err = proc.stdout, proc.stderr
    else:
        with open(out_path, "w", encoding="utf-8") as out_file:
            proc = subprocess.run(argv, stdout=out_file, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout, check=False)
        out, err = "", proc.stderr
    if proc.returncode != 0:
        raise BenchError(f"dnsperf against {target.name} exited {proc.returncode}: "
                         f"{err.strip()[-1000:]}")
    return out


_STATS = {
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "run_s": r"Run time \(s\):\s+([0-9.]+)",
    "qps": r"Queries per second:\s+([0-9.]+)",
}


def parse_stats(text: str, what: str) -> dict:
    out = {}
    for key, pattern in _STATS.items():
        m = re.search(pattern, text)
        if m is None:
            raise BenchError(f"{what}: no '{pattern}' in dnsperf's output:\n{text[-1500:]}")
        out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    m = re.search(r"Response codes:\s+(.*)", text)
    codes = {}
    for code, n in re.findall(r"([A-Z]+) (\d+) \(", m.group(1) if m else ""):
        codes[code] = int(n)
    out["rcodes"] = codes
    return out


def check_answers(stats: dict, what: str, want: str = "NOERROR") -> None:
    """Every completed query got ``want``: a resolver answering REFUSED or SERVFAIL fast is not
    what is being measured."""
    other = {k: v for k, v in stats["rcodes"].items() if k != want}
    if other or stats["rcodes"].get(want, 0) != stats["completed"] or stats["completed"] == 0:
        raise BenchError(f"{what}: answers {stats['rcodes']} of {stats['completed']} completed, "
                         f"wanted all {want}")


def parse_latencies(path: Path) -> tuple[list[float], int, dict]:
    """Per-answer latencies in µs from `dnsperf -v` output, the timeouts, and the totals."""
    lat: list[float] = []
    timeouts = 0
    tail: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("> "):
                parts = line.split()
                if parts[1] == "T":
                    timeouts += 1
                elif parts[1] == "NOERROR":
                    lat.append(float(parts[-1]) * 1e6)
                else:
                    raise BenchError(f"{path.name}: answer {parts[1]} in a latency run")
            else:
                tail.append(line)
    return lat, timeouts, parse_stats("".join(tail), path.name)


def percentile(sorted_xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, int(-(-p / 100 * len(sorted_xs) // 1)) - 1))
    return sorted_xs[k]


PCTS = (50, 90, 99, 99.9)


def lat_summary(xs: list[float]) -> dict:
    s = sorted(xs)
    out = {f"p{p:g}": percentile(s, p) for p in PCTS}
    out.update(n=len(s), max=s[-1] if s else float("nan"))
    return out


# -- the run -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 3 s, latency 2 s; docs untouched unless --docs")
    p.add_argument("--rounds", type=int, help=f"throughput rounds (default {FULL.rounds})")
    p.add_argument("--seconds", type=float, help=f"dnsperf -l per throughput run (default "
                   f"{FULL.seconds:g})")
    p.add_argument("--docs", type=Path, help=f"markdown to update (default: {DOCS} for a full "
                   "run, none for --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not write any markdown")
    p.add_argument("--seed", type=int, default=1, help="seed of the order within rounds")
    p.add_argument("--emit-allowed", action="store_true",
                   help="run the agent with dns.emitAllowed: true (an event per answered "
                   "query, the packaged default) instead of false")
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help="measure nothing: re-render a raw results file into --docs (default "
                   "docs/benchmarks-dns.md)")
    args = p.parse_args(argv)
    if (code := begin_run(args, evaluate, render, DOCS, BEGIN, END,
                          root_for="starts the agent (BPF programs, cgroups)")) is not None:
        return code

    settings = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("rounds", args.rounds), ("seconds", args.seconds)) if v}
    settings = dataclasses.replace(settings, **overrides)
    docs = None if args.no_docs else (args.docs or (None if args.quick else DOCS))

    exit_on_sigterm()
    started = time.monotonic()
    try:
        ensure_tools()
        others = other_tests_running()
        if others:
            log.warning("pytest is running alongside (%d processes): figures will be noisier",
                        len(others))
        results = {
            "command": " ".join(["python -m bench.dns", *map(shlex.quote, sys.argv[1:]
                                                             if argv is None else argv)]),
            "quick": args.quick,
            "settings": dataclasses.asdict(settings),
            "targets": {"qps_ratio": TARGET_QPS_RATIO, "p99_added_ms": TARGET_P99_ADDED_MS},
            "host": host_facts(**tool_versions()),
            "pytest_running_at_start": len(others),
            "emit_allowed": args.emit_allowed,
            "names": NAMES, "subzones": SUBZONES, "outstanding": OUTSTANDING,
        }
        measure(settings, args.seed, results)
    except BenchError as err:
        log.error("%s", err)
        return 1
    results["duration_s"] = time.monotonic() - started
    results["loadavg_end"] = os.getloadavg()
    results["pytest_running_at_end"] = len(other_tests_running())
    results["evaluation"] = evaluate(results)

    publish(results, "dns-", args.quick, render, docs, BEGIN, END)
    return 0


def _rmtree(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=60)


def _remove_bpffs_dir(path: str) -> None:
    """Normally gone after `hostagent uninstall`; an empty one (agent never started) goes here.
    Pins left inside are reported, not removed: uninstall is what detaches them."""
    if os.path.isdir(path):
        left = os.listdir(path)
        if left:
            raise BenchError(f"{path} still holds {left} after uninstall")
        os.rmdir(path)


def measure(s: Settings, seed: int, results: dict) -> None:
    run_id = f"{os.getpid():x}{random.randrange(16 ** 4):04x}"
    name = f"{RUN_PREFIX}{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with Cleanup() as stack:
        stack.defer(f"rm -r {tmp}", _rmtree, tmp)
        # runs after every process is stopped, so the logs are complete
        stack.defer("keeping the logs", _keep_logs, tmp)
        mount = cgroup2_mount()
        root = make_cgroup(stack, os.path.join(mount, name))
        governed = make_cgroup(stack, os.path.join(root, "bench"))
        procs = os.path.join(governed, "cgroup.procs")
        bpffs = f"/sys/fs/bpf/{name}"
        stack.defer(f"rmdir {bpffs}", _remove_bpffs_dir, bpffs)
        log.info("run %s: agent root %s, dnsperf in %s", run_id, root, governed)

        zone = start_zone(stack)
        zone_port = zone.address[1]
        query_file = tmp / "queries.txt"
        query_file.write_text("".join(f"{n} A\n" for n in names()))
        refused_file = tmp / "refused.txt"
        refused_file.write_text("h0.not-listed.test A\n")

        ports = {"dnsmasq": free_port(ADDRESSES["dnsmasq"]),
                 "unbound": free_port(ADDRESSES["unbound"])}
        dnsmasq = start_dnsmasq(stack, tmp, ports["dnsmasq"], zone_port)
        unbound = start_unbound(stack, tmp, ports["unbound"], zone_port)

        files = AgentFiles(config=tmp / "hostagent.yaml", policy_dir=tmp / "policies",
                           state_dir=tmp / "state", bpffs_dir=bpffs, cgroup_root=root,
                           log=tmp / "agent.log")
        write_agent_files(files, tmp / "events.jsonl", zone_port,
                          results.get("emit_allowed", False))
        agent = start_agent(stack, files)
        log.info("agent pid %d starting", agent.pid)
        agent.wait_for(r"enforcing \(generation \d+\)", 0, AGENT_START_TIMEOUT)
        _, m = agent.wait_for(r"DNS resolver on ([0-9.]+):(\d+)", 0, AGENT_START_TIMEOUT)
        ports["hostagent"] = int(m.group(2))
        wait_answering(dnsmasq, ADDRESSES["dnsmasq"], ports["dnsmasq"], "dnsmasq")
        wait_answering(unbound, ADDRESSES["unbound"], ports["unbound"], "unbound")
        targets = {n: Target(n, ADDRESSES[n], ports[n]) for n in RESOLVERS}
        results["ports"] = ports
        results["zone_port"] = zone_port

        _check_governed(procs, targets["hostagent"], refused_file)
        _warm_up(procs, targets, query_file)
        results["allowances_after_warmup"] = resolver_counters(
            fresh_status(files.status, time.time(), STATUS_WAIT))["allowances_open"]

        upstream_before = zone.count()
        counters_before = resolver_counters(fresh_status(files.status, time.time(), STATUS_WAIT))
        pids = {"dnsmasq": dnsmasq.pid, "unbound": unbound.pid, "hostagent": agent.pid}
        results["throughput"] = _throughput(s, procs, targets, query_file, seed, pids)
        base = statistics.median(r["qps"] for r in results["throughput"]
                                 if r["resolver"] == BASELINE)
        rates = {"half": max(1, round(base / 2)), "light": LIGHT_QPS}
        results["rates"] = rates
        results["latency"] = _latency(s, procs, targets, query_file, rates, seed, tmp)
        counters_after = resolver_counters(fresh_status(files.status, time.time(), STATUS_WAIT))
        results["upstream_queries_timed"] = zone.count() - upstream_before
        results["agent_counters"] = {k: counters_after[k] - counters_before.get(k, 0)
                                     if k != "allowances_open" else counters_after[k]
                                     for k in counters_after}
        results["agent_log_tail"] = agent.tail(20)
        if not agent.running():
            raise BenchError(f"the agent exited during the run:\n{agent.tail()}")
    if stack.failures:
        raise BenchError("cleanup failed: " + "; ".join(stack.failures))


def _keep_logs(tmp: Path) -> None:
    for name in ("agent.log", "dnsmasq.out", "unbound.out"):
        keep_log(tmp / name, f"dns-{name.split('.')[0]}-last.log")


def _check_governed(procs: str, target: Target, refused_file: Path) -> None:
    """The policy governs dnsperf's cgroup: a name it does not list is REFUSED (the node
    default, allow, would have forwarded it), so the queries below are attributed and judged."""
    stats = parse_stats(dnsperf(procs, target, refused_file, ["-n", "1", "-t", "2"], 10),
                        "policy check")
    check_answers(stats, "hostagent, a name the policy does not list", want="REFUSED")
    log.info("governed: hostagent refuses a name the policy does not list to dnsperf's cgroup")


def _warm_up(procs: str, targets: dict[str, Target], query_file: Path) -> None:
    """Run through the names until a whole pass is answered NOERROR: every answer cached (and,
    for hostagent, every allowance opened for dnsperf's cgroup)."""
    for name, target in targets.items():
        for attempt in range(1, WARMUP_PASSES + 1):
            stats = parse_stats(dnsperf(procs, target, query_file, ["-n", "1", "-t", "5"], 60),
                                f"warm-up of {name}")
            try:
                check_answers(stats, f"warm-up of {name}")
                break
            except BenchError:
                if attempt == WARMUP_PASSES:
                    raise
                log.info("warm-up of %s, pass %d: %s; again", name, attempt, stats["rcodes"])
        log.info("warm: %s answered all %d names NOERROR", name, NAMES)


def _throughput(s: Settings, procs: str, targets: dict[str, Target], query_file: Path,
                seed: int, pids: dict[str, int]) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for r in range(s.rounds):
        order = list(RESOLVERS)
        rng.shuffle(order)
        for pos, name in enumerate(order):
            time.sleep(PAUSE)
            cpu0 = cpu_seconds(pids[name])
            text = dnsperf(procs, targets[name], query_file,
                           ["-q", str(OUTSTANDING), "-l", f"{s.seconds:g}"], s.seconds)
            cpu1 = cpu_seconds(pids[name])
            stats = parse_stats(text, f"throughput of {name}")
            check_answers(stats, f"throughput of {name}")
            out.append({"round": r, "position": pos, "resolver": name, **stats,
                        "server_user_s": cpu1[0] - cpu0[0], "server_sys_s": cpu1[1] - cpu0[1],
                        "loadavg": os.getloadavg()[0]})
        got = {x["resolver"]: x["qps"] for x in out if x["round"] == r}
        log.info("throughput round %d/%d: %s", r + 1, s.rounds,
                 "  ".join(f"{n} {got[n]:,.0f}" for n in RESOLVERS) + "  (qps)")
    return out


def _latency(s: Settings, procs: str, targets: dict[str, Target], query_file: Path,
             rates: dict[str, int], seed: int, tmp: Path) -> dict:
    rng = random.Random(seed + 1)
    out: dict = {}
    for label, rate in rates.items():
        pooled: dict[str, list[float]] = {n: [] for n in RESOLVERS}
        runs = []
        for r in range(s.lat_rounds):
            order = list(RESOLVERS)
            rng.shuffle(order)
            for pos, name in enumerate(order):
                time.sleep(PAUSE)
                path = tmp / f"lat-{label}-{r}-{name}.txt"
                dnsperf(procs, targets[name], query_file,
                        ["-q", str(OUTSTANDING), "-Q", str(rate), "-l", f"{s.lat_seconds:g}",
                         "-v"], s.lat_seconds, out_path=path)
                lat, timeouts, stats = parse_latencies(path)
                path.unlink()
                pooled[name].extend(lat)
                runs.append({"round": r, "position": pos, "resolver": name,
                             "timeouts": timeouts, "qps": stats["qps"], "lost": stats["lost"],
                             "completed": stats["completed"], **lat_summary(lat)})
            got = {x["resolver"]: x for x in runs if x["round"] == r}
            log.info("latency at %d qps, round %d/%d: %s", rate, r + 1, s.lat_rounds,
                     "  ".join(f"{n} p50 {got[n]['p50']:.0f} p99 {got[n]['p99']:.0f}"
                               for n in RESOLVERS) + "  (µs)")
        out[label] = {"rate": rate, "runs": runs,
                      "pooled": {n: lat_summary(xs) for n, xs in pooled.items()}}
    return out


# -- evaluation ----------------------------------------------------------------------------------

def evaluate(results: dict) -> dict:
    tp = results["throughput"]
    rounds = sorted({x["round"] for x in tp})
    by_round = {r: {x["resolver"]: x["qps"] for x in tp if x["round"] == r} for r in rounds}
    med = {n: statistics.median(by_round[r][n] for r in rounds) for n in RESOLVERS}
    ratios = {}
    for n in RESOLVERS:
        per_round = [by_round[r][n] / by_round[r][BASELINE] for r in rounds]
        ratios[n] = {"paired": statistics.median(per_round), "per_round": per_round,
                     "median_over_median": med[n] / med[BASELINE]}
    cpu = {}
    for n in RESOLVERS:
        xs = [x for x in tp if x["resolver"] == n and "server_user_s" in x]
        if xs:
            def per_query(x, key):
                return x[key] / x["completed"] * 1e6
            cpu[n] = {
                "us_per_query": statistics.median(
                    per_query(x, "server_user_s") + per_query(x, "server_sys_s") for x in xs),
                "user_us_per_query": statistics.median(per_query(x, "server_user_s")
                                                       for x in xs),
                "sys_us_per_query": statistics.median(per_query(x, "server_sys_s")
                                                      for x in xs),
                "cores": statistics.median((x["server_user_s"] + x["server_sys_s"]) / x["run_s"]
                                           for x in xs)}
    lat = {}
    for label, block in results["latency"].items():
        pooled = block["pooled"]
        lrounds = sorted({x["round"] for x in block["runs"]})
        runs = {(x["round"], x["resolver"]): x for x in block["runs"]}
        added = {}
        for n in RESOLVERS:
            added[n] = {}
            for p in ("p50", "p99"):
                paired = statistics.median(runs[(r, n)][p] - runs[(r, BASELINE)][p]
                                           for r in lrounds)
                added[n][p] = {"pooled": pooled[n][p] - pooled[BASELINE][p], "paired": paired}
        lat[label] = {"added_us": added}
    ratio = ratios["hostagent"]
    ratio_ok = [ratio["paired"] >= TARGET_QPS_RATIO,
                ratio["median_over_median"] >= TARGET_QPS_RATIO]
    p99 = lat["half"]["added_us"]["hostagent"]["p99"]
    limit_us = TARGET_P99_ADDED_MS * 1000
    p99_ok = [p99["pooled"] <= limit_us, p99["paired"] <= limit_us]
    cpu_ratio = (cpu[BASELINE]["us_per_query"] / cpu["hostagent"]["us_per_query"]
                 if "hostagent" in cpu and BASELINE in cpu else None)
    return {"qps_median": med, "qps_ratio": ratios, "latency": lat, "cpu": cpu,
            "cpu_ratio": cpu_ratio,
            "targets": {"qps_ratio": _verdict(ratio_ok), "p99_added": _verdict(p99_ok)}}


def _verdict(oks: list[bool]) -> str:
    if all(oks):
        return "met"
    if not any(oks):
        return "NOT met"
    return "unclear (the two estimates disagree)"


# -- markdown ------------------------------------------------------------------------------------

def _us(x: float) -> str:
    return f"{x:,.0f}"


def _signed_us(x: float) -> str:
    return f"{x:+,.0f}"


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _bold(verdict: str) -> str:
    return f"**{verdict}**"


def render(results: dict, raw_path) -> str:
    ev = results["evaluation"]
    h = results["host"]
    s = results["settings"]
    rates = results["rates"]
    ratio = ev["qps_ratio"]["hostagent"]
    p99 = ev["latency"]["half"]["added_us"]["hostagent"]["p99"]
    quick = results.get("quick")
    others = (results.get("pytest_running_at_start", 0), results.get("pytest_running_at_end", 0))
    lines = [
        BEGIN,
        "",
        "<!-- generated by `python -m bench.dns`; edits inside the markers are overwritten -->",
        "",
        f"## Latest run: {h['date_utc']}{' (--quick)' if quick else ''}",
        "",
        f"- Command: `{results['command']}` ({results['duration_s']:.0f} s); raw results in "
        f"`{raw_path}` (not committed)",
        f"- Kernel {h['kernel']}, {h['cpus']} × {h['cpu']}; load average "
        f"{h['loadavg_start'][0]:.2f} at the start, {results['loadavg_end'][0]:.2f} at the end"
        + ("; **another test suite (pytest) was running alongside** "
           f"({others[0]} pytest processes at the start, {others[1]} at the end)"
           if any(others) else "; no pytest running at the start or the end"),
        f"- dnsmasq {h['dnsmasq']} (Debian {h['dnsmasq_deb']}), unbound {h['unbound']} "
        f"(Debian {h['unbound_deb']}), dnsperf {h['dnsperf']} (Debian {h['dnsperf_deb']}), "
        f"hostagent {h['hostagent']}, Python {h['python']}",
        f"- hostagent with `dns.emitAllowed: "
        f"{'true` (an event per answered query)' if results.get('emit_allowed') else 'false`'}",
        f"- {NAMES} names (type A) under {SUBZONES} zones of `{ZONE}`, all cached before the "
        f"timed runs; upstream queries during the timed runs: "
        f"{results['upstream_queries_timed']:,}",
        f"- Throughput: {_n(len(ev['qps_ratio']['hostagent']['per_round']), 'interleaved round')}"
        f" × {s['seconds']:g} s per resolver, `dnsperf -c 1 -T 1 -q {OUTSTANDING}`; latency: "
        f"{_n(s['lat_rounds'], 'interleaved round')} × {s['lat_seconds']:g} s per resolver and "
        "rate, "
        f"`dnsperf -Q <rate> -v`",
        "",
        "### Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| cached throughput ≥ {TARGET_QPS_RATIO:g} × dnsmasq's, same run | "
        f"hostagent / dnsmasq = {ratio['paired']:.2f} (median of per-round ratios), "
        f"{ratio['median_over_median']:.2f} (median ÷ median) | "
        f"{_bold(ev['targets']['qps_ratio'])} |",
        f"| p99 added latency ≤ {TARGET_P99_ADDED_MS:g} ms at half of dnsmasq's qps "
        f"({rates['half']:,} qps) | hostagent p99 − dnsmasq p99 = {p99['pooled'] / 1000:+.3f} ms "
        f"(all rounds pooled), {p99['paired'] / 1000:+.3f} ms (median of per-round differences) | "
        f"{_bold(ev['targets']['p99_added'])} |",
    ]
    if ev.get("cpu_ratio"):
        c = ev["cpu"]
        lines.append(
            f"| (not a target) CPU per cached answer, dnsmasq ÷ hostagent | "
            f"{c[BASELINE]['us_per_query']:.1f} µs ÷ {c['hostagent']['us_per_query']:.1f} µs = "
            f"{ev['cpu_ratio']:.2f}, what the throughput ratio would approach if the client were "
            f"not the limit (an estimate; dnsmasq used {c[BASELINE]['cores']:.2f} of a CPU, "
            "hostagent "
            f"{c['hostagent']['cores']:.2f}) | — |")
    lines += [
        "",
        "### Cached throughput (queries per second, 100 outstanding)",
        "",
    ]
    rounds = sorted({x["round"] for x in results["throughput"]})
    head = "| resolver | " + " | ".join(f"round {r + 1}" for r in rounds) + \
        " | median | ÷ dnsmasq (per-round ratios, median) | ÷ dnsmasq (median ÷ median) |" \
        " lost |" \
        " server CPU per answer: user + system | server CPU busy |"
    lines += [head, "|---|" + "---:|" * (len(rounds) + 6)]
    for n in RESOLVERS:
        xs = {x["round"]: x for x in results["throughput"] if x["resolver"] == n}
        lost = sum(xs[r]["lost"] for r in rounds)
        sent = sum(xs[r]["sent"] for r in rounds)
        r = ev["qps_ratio"][n]
        lines.append(f"| {n} | " + " | ".join(f"{xs[k]['qps']:,.0f}" for k in rounds)
                     + f" | {ev['qps_median'][n]:,.0f} | {r['paired']:.2f} | "
                     f"{r['median_over_median']:.2f} | {lost:,} of {sent:,} | "
                     + (f"{ev['cpu'][n]['us_per_query']:.1f} µs: "
                        f"{ev['cpu'][n]['user_us_per_query']:.1f} + "
                        f"{ev['cpu'][n]['sys_us_per_query']:.1f} | "
                        f"{ev['cpu'][n]['cores']:.2f} cores |" if n in ev.get("cpu", {})
                        else "— | — |"))
    lines += ["", "Server CPU: the server process's user + system time (all its threads; for "
              "hostagent the whole agent) over the run, from /proc/<pid>/stat, per answered "
              "query and as a share of one CPU (median over rounds); its clock-tick resolution "
              "(10 ms) "
              "is far below a run's seconds. On loopback, the system part includes delivering "
              "each answer into dnsperf's socket, done inside the server's sendmsg."]

    for label, title in (("half", "half of dnsmasq's median qps"), ("light", "a light load")):
        block = results["latency"][label]
        added = ev["latency"][label]["added_us"]
        lines += ["", f"### Latency at {block['rate']:,} qps ({title}), µs", "",
                  "All rounds pooled; \"added\" is the resolver's percentile minus dnsmasq's, "
                  "pooled (and the median of the per-round differences).", "",
                  "| resolver | achieved qps | answers | p50 | p90 | p99 | p99.9 | max | "
                  "added p50 | added p99 | timeouts |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in RESOLVERS:
            runs = [x for x in block["runs"] if x["resolver"] == n]
            qps = statistics.median(x["qps"] for x in runs)
            t = sum(x["timeouts"] for x in runs)
            pl = block["pooled"][n]
            a = added[n]
            add50 = "—" if n == BASELINE else \
                f"{_signed_us(a['p50']['pooled'])} ({_signed_us(a['p50']['paired'])})"
            add99 = "—" if n == BASELINE else \
                f"{_signed_us(a['p99']['pooled'])} ({_signed_us(a['p99']['paired'])})"
            lines.append(f"| {n} | {qps:,.0f} | {pl['n']:,} | {_us(pl['p50'])} | "
                         f"{_us(pl['p90'])} | {_us(pl['p99'])} | {_us(pl['p99.9'])} | "
                         f"{_us(pl['max'])} | {add50} | {add99} | {t:,} |")

    c = results["agent_counters"]
    lines += ["", "### Cross-checks", "",
              f"- hostagent's resolver over the timed runs (its status counters): "
              f"{c['queries']:,} queries, {c['cache_hits']:,} cache hits"
              + (f" ({c['hot_hits']:,} of them repeats answered hot)" if "hot_hits" in c
                 else "") + ", "
              f"{c['cache_misses']:,} misses; unattributed {c['unattributed']:,}, rate-limited "
              f"{c['rate_limited']:,}, denied {c['denied']:,}, tunnel-refused "
              f"{c['tunnel_refused']:,}, internal errors {c['internal_errors']:,}, allowance "
              f"failures {c['allowance_failures']:,}",
              f"- Kernel allowances open for dnsperf's cgroup after the warm-up: "
              f"{results['allowances_after_warmup']:,} (one per answer address; the "
              f"{NAMES} names share 250 addresses)",
              "- Before the warm-up, a name the policy does not list was answered REFUSED to "
              "dnsperf's cgroup (the node default is allow): the queries are attributed to it "
              "and judged by its policy",
              "", END, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
