"""Real-kernel test harness: a test's own cgroup subtree, bpffs directory, network namespaces,
workload processes and a real agent process governing only that subtree.

The agent is configured with cgroupRoot = the test's cgroup, so its programs attach there and
judge nothing outside it: the test runner and the rest of the machine are never governed.
Everything is removed in close(), which the fixtures call even when a test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hostagent.cgroupfs import cgroup2_mount

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("workload_child.py")
_seq = itertools.count()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Workload:
    """A process in a cgroup (and optionally a netns) that performs socket operations."""

    def __init__(self, cgroup: str | None, netns: str | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CHILD), cgroup or "-", netns or "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.proc.stdout.readline())
        self.pid = ready["ready"]

    def do(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"workload died during {op}")
        return json.loads(line)

    def verdict(self, op: str, **kw) -> str:
        """'ok' or the errno name the process saw."""
        reply = self.do(op, **kw)
        return "ok" if reply["ok"] else reply["errno"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Netns:
    """A network namespace with addresses on its loopback: stand-ins for remote hosts."""

    def __init__(self, addresses: list[str]) -> None:
        self.name = f"hatest{os.getpid()}n{next(_seq)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self._ip("link", "set", "lo", "up")
        for addr in addresses:
            plen = 128 if ":" in addr else 32
            self._ip("addr", "add", f"{addr}/{plen}", "dev", "lo", *(["nodad"] if ":" in addr
                                                                     else []))

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class AgentProcess:
    def __init__(self, node: "TestNode", extra_args: list[str], netns: "Netns | None" = None
                 ) -> None:
        self.node = node
        self.log_path = node.tmp / f"agent-{next(_seq)}.log"
        self._log = open(self.log_path, "w")
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding cgroupfs and bpffs
        prefix = (["nsenter", f"--net=/run/netns/{netns.name}"] if netns is not None else [])
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "hostagent", "run", "--config",
             str(node.config_path), *extra_args], cwd=REPO, stdout=self._log,
            stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 30, after: int = 0) -> None:
        def seen():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.log()}")
            return text in self.log()[after:]
        try:
            wait_for(seen, timeout, f"agent log line {text!r}")
        except AssertionError as err:
            raise AssertionError(f"{err}; agent log ends:\n{self.log()[-3000:]}") from None

    def wait_generation(self, generation: int, timeout: float = 15) -> None:
        self.wait_log(f"policy generation {generation} in force", timeout)

    def metrics_url(self) -> str:
        for line in self.log().splitlines():
            if "metrics on " in line:
                return line.split("metrics on ", 1)[1].rsplit("/metrics", 1)[0]
        raise AssertionError("agent logged no metrics address")

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url() + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=20)
        self._log.close()
        return rc


class TestNode:
    """One test's private slice of the machine."""

    def __init__(self) -> None:
        tag = f"hostagent-test-{os.getpid()}-{next(_seq)}"
        self.mount = cgroup2_mount()
        self.cgroot = Path(self.mount) / tag
        self.cgroot.mkdir()
        self.bpffs = f"/sys/fs/bpf/{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix=tag))
        self.policy_dir = self.tmp / "policies"
        self.policy_dir.mkdir()
        self.event_log = self.tmp / "events.jsonl"
        self.config_path = self.tmp / "node.yaml"
        self.agents: list[AgentProcess] = []
        self.workloads: list[Workload] = []
        self.netns: list[Netns] = []
        self.write_config()

    # -- configuration ----------------------------------------------------------------------------

    def write_config(self, **extra) -> None:
        cfg = {"cgroupRoot": str(self.cgroot), "bpffsDir": self.bpffs,
               "stateDir": str(self.tmp / "state"), "policyDir": str(self.policy_dir),
               "metrics": {"listen": "127.0.0.1:0"}, "eventLog": str(self.event_log),
               "grpc": {"listen": "127.0.0.1:0"},
               "resyncInterval": 0.5, "metadata": {"exempt": []},
               # a resolver of its own per test; nothing upstream unless a test starts a zone
               "dns": {"listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:9"],
                       "upstreamTimeout": 0.5, "interface": None}}
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.config_path.write_text(json.dumps(cfg))  # JSON is YAML

    def write_policy(self, name: str, text: str) -> Path:
        path = self.policy_dir / f"{name}.yaml"
        tmp = self.policy_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)  # one atomic change for the agent's watcher
        return path

    def cgroup(self, rel: str) -> str:
        path = self.cgroot / rel.strip("/")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    # -- processes --------------------------------------------------------------------------------

    def start_agent(self, *extra_args: str, wait: bool = True, netns: Netns | None = None
                    ) -> AgentProcess:
        """The agent, in the test's network namespace `netns` if given (its cgroup programs
        still govern the test's cgroups, whatever namespace their processes are in)."""
        agent = AgentProcess(self, list(extra_args), netns)
        self.agents.append(agent)
        if wait:
            agent.wait_log("enforcing (generation")
        return agent

    def workload(self, cgroup_rel: str | None, netns: Netns | None = None) -> Workload:
        w = Workload(self.cgroup(cgroup_rel) if cgroup_rel is not None else None,
                     netns.name if netns else None)
        self.workloads.append(w)
        return w

    def namespace(self, addresses: list[str]) -> Netns:
        ns = Netns(addresses)
        self.netns.append(ns)
        return ns

    def hostagent(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hostagent", *args, "--config",
                               str(self.config_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    # -- evidence ---------------------------------------------------------------------------------

    def status(self) -> dict:
        """The running agent's status.json ({} until it has written one)."""
        try:
            return json.loads((self.tmp / "state" / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def grpc_address(self, timeout: float = 15) -> str:
        """Where the running agent's gRPC API listens (grpc.listen port 0 picks one)."""
        return wait_for(lambda: ((self.status().get("events") or {}).get("grpc") or {})
                        .get("listen"), timeout, "the agent's gRPC address in status.json")

    def events(self) -> list[dict]:
        if not self.event_log.exists():
            return []
        text = self.event_log.read_text()
        # a line still being appended has no newline yet: read it on the next poll
        complete = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line]

    def wait_event(self, timeout: float = 5, **match) -> dict:
        """The first event whose fields match (nested keys as workload__pid=...)."""
        def find():
            for e in self.events():
                if all(_get(e, k) == v for k, v in match.items()):
                    return e
            return None
        return wait_for(find, timeout, f"event {match}")

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        for w in self.workloads:
            w.close()
        for a in self.agents:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait(timeout=10)
        self.hostagent("uninstall")
        for ns in self.netns:
            ns.close()
        # deepest cgroups first; any process left behind is moved out so rmdir can succeed
        for path in sorted(self.cgroot.rglob("*"), key=lambda p: -len(p.parts)) + [self.cgroot]:
            if path.is_dir() and (path / "cgroup.procs").exists():
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        (Path(self.mount) / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass  # exited meanwhile
                try:
                    path.rmdir()
                except OSError:
                    pass  # reported by the leak check below
        shutil.rmtree(self.tmp, ignore_errors=True)


def _get(event: dict, dotted: str):
    value = event
    for part in dotted.split("__"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def policy(name: str, cgroup_path: str, egress: str = "", mode: str = "enforce",
           extra_spec: str = "") -> str:
    """A policy document; egress is YAML list items indented by 4 spaces."""
    return (f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n"
            f"spec:\n  selector:\n    cgroupPath: \"{cgroup_path}\"\n  mode: {mode}\n"
            f"{extra_spec}  egress:\n{egress or '    []'}\n")
