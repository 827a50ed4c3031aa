"""What a benchmark run creates on the host, each as a context manager that removes it again.

Everything is named after the run (hostagent-bench-<id>) so that two runs, or a run and the
project's tests, never share a cgroup, a pin directory, a network namespace or an nft table. The
cleanup half of each manager runs in ``finally`` and keeps going when one step fails: a benchmark
that dies half-way must not leave a program attached or an nft table hooked in.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hostagent.cgroupfs import cgroup2_mount

log = logging.getLogger(__name__)

# Timeouts, each with its reason.
CMD_TIMEOUT = 120.0      # s: `nft -f` of a 100k-element set takes ~2 s; ip/bpftool far less
AGENT_STOP_TIMEOUT = 15.0  # s: SIGTERM -> exit is a final ring drain and a status write
RMDIR_RETRIES = 50       # x 20 ms: a cgroup stays busy until its last workload has been reaped

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class BenchError(Exception):
    """The benchmark could not set up or measure what it needs."""


def run_cmd(argv: list[str], *, timeout: float = CMD_TIMEOUT, check: bool = True,
            input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run a helper command; failures carry its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          input=input_text, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''} exited "
                         f"{proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Cleanup(contextlib.ExitStack):
    """An ExitStack whose callbacks log their failure and let the next one run."""

    def defer(self, what: str, fn, *args, **kwargs) -> None:
        def guarded():
            try:
                fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - cleanup must reach every step
                log.error("cleanup: %s failed: %s", what, err)
                self.failures.append(f"{what}: {err}")
        self.callback(guarded)

    def __enter__(self):
        self.failures: list[str] = []
        return super().__enter__()


# -- cgroups -------------------------------------------------------------------------------------

def make_cgroup(stack: Cleanup, path: str) -> str:
    """Create a cgroup v2 directory; removed (after its processes are gone) on exit."""
    os.mkdir(path)
    stack.defer(f"rmdir {path}", rmdir_cgroup, path)
    return path


def remove_cgroup_tree(root: str) -> None:
    """Every cgroup below root (deepest first), then root; processes found in one are moved to
    the cgroup2 root first, so the removal cannot be blocked by a stray helper."""
    if not os.path.isdir(root):
        return
    mount = cgroup2_mount()
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except FileNotFoundError:
            continue
        for pid in pids:
            try:
                Path(mount, "cgroup.procs").write_text(pid)
            except OSError as err:
                if err.errno != errno.ESRCH:
                    log.warning("could not move pid %s out of %s: %s", pid, dirpath, err)
        rmdir_cgroup(dirpath)


def leftovers(run_name: str) -> list[str]:
    """What of a run still exists: cgroups, bpffs pins, network namespaces, temp dirs, and
    processes (agents and helpers all carry the run's name in their command line)."""
    found = sorted(glob.glob(os.path.join(cgroup2_mount(), run_name + "*"))
                   + glob.glob(f"/sys/fs/bpf/{run_name}*")
                   + glob.glob(f"/run/netns/{run_name}*")
                   + glob.glob(os.path.join(tempfile.gettempdir(), run_name + "*")))
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(cmdline.split("/")[2])
        try:
            argv = Path(cmdline).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue    # exited meanwhile
        if run_name in argv and pid != os.getpid():
            found.append(f"process {pid}: {argv.strip()}")
    return found


@contextlib.contextmanager
def nothing_left(run_name: str, results: dict) -> Iterator[None]:
    """Around a whole run: record in results["leftovers"] what of it still exists afterwards
    (failed runs included), and fail a run that succeeded but left something."""
    try:
        yield
    finally:
        results["leftovers"] = leftovers(run_name)
        if results["leftovers"]:
            log.error("left behind: %s", results["leftovers"])
    if results["leftovers"]:
        raise BenchError(f"left behind: {results['leftovers']}")


def read_status(path: Path) -> dict:
    """An agent's status.json, {} while there is none (or it is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """predicate()'s first true value, polled every interval; BenchError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def fresh_status(path: Path, after_wall: float, timeout: float) -> dict:
    """The agent's status.json once one written after after_wall (time.time()) is there (the
    agent rewrites it every second)."""
    return wait_until(lambda: (s := read_status(path)) and s.get("time", 0) > after_wall and s,
                      timeout, f"a status.json newer than {after_wall:.1f}")


def rmdir_cgroup(path: str) -> None:
    """rmdir a cgroup, waiting out EBUSY while its last processes are reaped; gone is fine."""
    for _ in range(RMDIR_RETRIES):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    procs = Path(path, "cgroup.procs").read_text().split()
    raise BenchError(f"{path} still busy (processes: {' '.join(procs) or 'none'})")


def cgroup_level(path: str, mount: str) -> int:
    """Depth of a cgroup below the cgroup2 root (the root is level 0)."""
    rel = os.path.relpath(path, mount)
    return 0 if rel == "." else len(rel.split("/"))


def nft_cgroup_path(path: str) -> str:
    """The path nft wants: nft 1.0.6 resolves `socket cgroupv2` paths under /sys/fs/cgroup."""
    rel = os.path.relpath(path, "/sys/fs/cgroup")
    if rel.startswith(".."):
        raise BenchError(f"{path} is not below /sys/fs/cgroup, where nft looks cgroups up")
    return rel


# -- network namespaces and nftables -------------------------------------------------------------

def make_netns(stack: Cleanup, name: str) -> str:
    """A network namespace with only lo, up. Returns its path for setns()."""
    run_cmd(["ip", "netns", "add", name])
    stack.defer(f"ip netns del {name}", run_cmd, ["ip", "netns", "del", name])
    run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])
    return f"/run/netns/{name}"


def _nft(netns_path: str, *args: str, input_text: str | None = None):
    # nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup2 mount that
    # nft needs to resolve `socket cgroupv2` paths.
    return run_cmd(["nsenter", f"--net={netns_path}", "nft", *args], input_text=input_text)


def load_nft_table(stack: Cleanup, netns_path: str, table: str, text: str, path: Path) -> float:
    """nft -f a generated ruleset inside a namespace; the table is deleted on exit. Returns the
    load time in seconds."""
    path.write_text(text)
    t0 = time.monotonic()
    stack.defer(f"nft delete table inet {table}", _delete_nft_table, netns_path, table)
    _nft(netns_path, "-f", str(path))
    return time.monotonic() - t0


def _delete_nft_table(netns_path: str, table: str) -> None:
    if not os.path.exists(netns_path):
        return  # the namespace, and with it the table, is already gone
    listed = _nft(netns_path, "-j", "list", "tables").stdout
    names = [t["table"]["name"] for t in json.loads(listed)["nftables"] if "table" in t]
    if table in names:
        _nft(netns_path, "delete", "table", "inet", table)


# -- kernel.bpf_stats_enabled --------------------------------------------------------------------

@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """Per-program run_cnt / run_time_ns while inside; the previous value is restored after.

    The stats cost two clock reads per program run, so connect timings are never taken inside.
    """
    before = Path(BPF_STATS_SYSCTL).read_text().strip()
    Path(BPF_STATS_SYSCTL).write_text("1\n")
    try:
        yield
    finally:
        Path(BPF_STATS_SYSCTL).write_text(before + "\n")


def prog_stats(prog_ids: dict[str, int]) -> dict[str, tuple[int, int]]:
    """program name -> (run_cnt, run_time_ns), read with bpftool."""
    out = {}
    for name, pid in prog_ids.items():
        info = json.loads(run_cmd(["bpftool", "--json", "prog", "show", "id", str(pid)]).stdout)
        out[name] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


# -- the agent -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentFiles:
    config: Path
    policy_dir: Path
    state_dir: Path
    bpffs_dir: str
    cgroup_root: str
    log: Path

    @property
    def status(self) -> Path:
        """The agent's status.json (rewritten every second)."""
        return self.state_dir / "status.json"


def write_agent_config(files: AgentFiles, max_rules: int) -> None:
    files.policy_dir.mkdir(parents=True, exist_ok=True)
    files.config.write_text(
        "# written by bench/run.py for one benchmark run\n"
        f"cgroupRoot: {files.cgroup_root}\n"
        f"bpffsDir: {files.bpffs_dir}\n"
        f"stateDir: {files.state_dir}\n"
        f"policyDir: {files.policy_dir}\n"
        'metrics: {listen: "127.0.0.1:0"}\n'
        'eventLog: ""\n'
        "defaultAction: allow\n"
        f"limits: {{maxRules: {max_rules}, maxCgroups: 65536}}\n")


@dataclass(frozen=True)
class LogLine:
    t_ns: int     # time.monotonic_ns() when the bench read it
    text: str


class AgentProcess:
    """`python -m hostagent run` as a child, with its log lines timestamped as they arrive."""

    def __init__(self, files: AgentFiles) -> None:
        self.files = files
        self.lines: list[LogLine] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.started_ns = 0

    def start(self) -> None:
        self.started_ns = time.monotonic_ns()
        # Own session: a Ctrl-C of the benchmark reaches the agent only through stop().
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hostagent", "run", "--config", str(self.files.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="agent-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.files.log, "a", encoding="utf-8") as out:
            for text in self._proc.stderr:
                t = time.monotonic_ns()
                out.write(text)
                out.flush()
                with self._cond:
                    self.lines.append(LogLine(t, text.rstrip("\n")))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_for(self, pattern: str, after: int, timeout: float) -> tuple[int, re.Match]:
        """The first log line at index >= after that matches; (index, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i].text)
                    if m:
                        return i, m
                    i += 1
                if not self.running() and i >= len(self.lines):
                    raise BenchError(f"the agent exited ({self._proc.returncode}) while the "
                                     f"bench waited for /{pattern}/:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no /{pattern}/ in the agent's log within {timeout:.0f} s:"
                                     f"\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 15) -> str:
        with self._cond:
            return "\n".join("  " + line.text for line in self.lines[-n:])

    def reload(self) -> None:
        os.kill(self._proc.pid, signal.SIGHUP)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(AGENT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("agent %d ignored SIGTERM for %.0f s: killing it", self._proc.pid,
                          AGENT_STOP_TIMEOUT)
                self._proc.kill()
                self._proc.wait(AGENT_STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(AGENT_STOP_TIMEOUT)
        return self._proc.returncode


def hostagent_cli(config: Path, *args: str, timeout: float = CMD_TIMEOUT):
    return run_cmd([sys.executable, "-m", "hostagent", *args, "--config", str(config)],
                   timeout=timeout)


def start_agent(stack: Cleanup, files: AgentFiles) -> AgentProcess:
    """Start the agent; on exit stop it, then `hostagent uninstall` (always) and check that
    nothing is left attached or pinned."""
    agent = AgentProcess(files)
    stack.defer("hostagent uninstall", _uninstall, files)
    stack.defer("stopping the agent", _stop, agent)
    agent.start()
    return agent


def _stop(agent: AgentProcess) -> None:
    code = agent.stop()
    if code not in (0, None):
        log.warning("the agent exited with %s; its log: %s", code, agent.files.log)


def _uninstall(files: AgentFiles) -> None:
    hostagent_cli(files.config, "uninstall")
    status = json.loads(hostagent_cli(files.config, "status", "--json").stdout)
    left = [p["program"] for p in status.get("programs", []) if p.get("attached")]
    if left:
        raise BenchError(f"still attached after uninstall: {', '.join(left)}")
    if os.path.exists(files.bpffs_dir):
        raise BenchError(f"{files.bpffs_dir} still exists after uninstall: "
                         f"{os.listdir(files.bpffs_dir)}")


def attached_programs(config: Path) -> dict[str, int]:
    """program name -> prog id, from `hostagent status --json`."""
    status = json.loads(hostagent_cli(config, "status", "--json").stdout)
    progs = {p["program"]: p["prog_id"] for p in status.get("programs", []) if p.get("attached")}
    missing = [p["program"] for p in status.get("programs", [])
               if not p.get("attached") and not p.get("optional")]
    if missing:
        raise BenchError(f"the agent reports enforcing but {', '.join(missing)} is not attached")
    return progs


def host_facts(**extra) -> dict:
    """What a results file records about the machine, plus the caller's own facts."""
    from hostagent import __version__ as hostagent_version

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "hostagent": hostagent_version,
        **extra,
        "loadavg_start": os.getloadavg(),
    }


def exit_on_sigterm() -> None:
    """SIGTERM unwinds through the finally blocks (the cleanup) like Ctrl-C does."""
    def _raise_exit(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise_exit)
