"""The measuring workload (bench/connect_loop.c): build it, run a sample, probe a verdict."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchError

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "connect_loop.c"
BINARY = BENCH_DIR / "bin" / "connect_loop"

# A 20k-connect sample takes 0.2-1 s here; a minute means the machine or the variant is broken.
SAMPLE_TIMEOUT = 60.0
PROBE_TIMEOUT_MS = 300   # a loopback handshake takes microseconds; a dropped SYN waits it out


def build() -> Path:
    """Compile connect_loop into bench/bin (gitignored) when the source is newer."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    BINARY.parent.mkdir(exist_ok=True)
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(BINARY),
                           str(SOURCE)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"gcc failed on {SOURCE}:\n{proc.stderr}")
    return BINARY


@dataclass(frozen=True)
class Place:
    """Where a workload runs: a cgroup and a network namespace (both absolute paths)."""

    cgroup: str
    netns: str
    cpu: int | None = None

    def argv(self, *args: str) -> list[str]:
        out = [str(BINARY), "--cgroup", self.cgroup, "--netns", self.netns]
        if self.cpu is not None:
            out += ["--cpu", str(self.cpu)]
        return out + list(args)


def sample(place: Place, count: int, warmup: int) -> dict:
    """One timed loop: {"count", "ns_per_cycle", "ns_connect_call", "elapsed_ns"}."""
    proc = subprocess.run(place.argv("loop", str(count), str(warmup)), capture_output=True,
                          text=True, timeout=SAMPLE_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise BenchError(f"connect_loop in {place.cgroup} exited {proc.returncode}: "
                         f"{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def probe(place: Place, addr: str) -> str:
    """allowed | eperm | timeout | refused | error:<errno> for one connect to addr."""
    proc = subprocess.run(place.argv("probe", addr, str(PROBE_TIMEOUT_MS)), capture_output=True,
                          text=True, timeout=SAMPLE_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise BenchError(f"connect_loop probe exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class Watch:
    """A probe loop started before a change, reporting when it first sees the wanted verdict.

    The C side prints CLOCK_MONOTONIC nanoseconds, the clock time.monotonic_ns() reads, so
    "seen" can be compared with the moment the bench triggered the change.
    """

    def __init__(self, place: Place, addr: str, want: str, timeout_s: float,
                 interval_us: int = 1000) -> None:
        self.timeout_s = timeout_s
        self._proc = subprocess.Popen(
            place.argv("watch", addr, want, str(int(timeout_s * 1000)), str(interval_us)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self._proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self.close()
            raise BenchError(f"connect_loop watch did not start: {self._proc.stderr.read()}")

    def result(self) -> tuple[int, int] | None:
        """(CLOCK_MONOTONIC ns when seen, probes made), or None if it timed out."""
        try:
            out, err = self._proc.communicate(timeout=self.timeout_s + 10)
        except subprocess.TimeoutExpired:
            self.close()
            raise BenchError("connect_loop watch overran its own timeout") from None
        words = out.split()
        if words and words[0] == "seen":
            return int(words[1]), int(words[2])
        if words and words[0] == "timeout":
            return None
        raise BenchError(f"connect_loop watch failed ({self._proc.returncode}): {err.strip()}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

