"""Benchmark: what hostagent adds to connect(), next to nftables and to nothing, in one run.

    python -m bench.run            # full run (~5-10 min), rewrites docs/benchmarks.md
    python -m bench.run --quick    # smoke run (< 1 min, smaller rule sets), prints the tables
    python -m bench.run --control-plane   # only agent start and policy reloads (10/10k/100k
                                          # rules, ~1 min), prints that table

Every variant is a (cgroup, network namespace) pair in which bench/connect_loop.c times
socket() + connect() + accept() + close() cycles to its own 127.0.0.1 listener:

    baseline     cgroup under a root with nothing attached, namespace without nft rules
    control      the same again in another cgroup and namespace (A/A: shows the noise floor)
    agent-N      cgroup below the agent's cgroupRoot, bound to a policy of N CIDRs
    nft-N        cgroup judged by an nft output chain, `socket cgroupv2` + a set of N CIDRs
    floor        do-nothing programs (bench/floor.c) at the attach points the workload passes,
                 on a cgroup outside the agent's root: the kernel's dispatch cost alone

    python -m bench.run --floor    # only the floor, split by attach point (no agent, no nft;
                                   # ~2-4 min), prints its table

The three agent policies live side by side in one agent (one LPM trie, as in production), and
each nft table lives in its own namespace (an nft hook sees every packet of its namespace, so a
table in a shared one would tax the baseline too). Samples are interleaved: each round runs every
variant once, in a fresh random order. Results are differences from the baseline of the same
run, never absolute times. Then, outside the timed rounds: per-program kernel self-time
(kernel.bpf_stats_enabled), agent start to enforcing, and 100k-rule policy reloads.

Everything created (cgroups, bpffs pins, namespaces, nft tables, the agent) is removed on the
way out, failure and Ctrl-C included; see bench/env.py.
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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report, rules, stats, workload
from bench.env import (AgentFiles, BenchError, Cleanup, attached_programs, bpf_stats_enabled,
                       exit_on_sigterm, host_facts,
                       cgroup_level, load_nft_table, make_cgroup, make_netns, nft_cgroup_path,
                       prog_stats, run_cmd, start_agent, write_agent_config)
from bench.workload import Place, Watch
from hostagent.bpf import loader, syscall
from hostagent.cgroupfs import cgroup2_mount

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"

# Control-plane timeouts: generous multiples of what was seen, so a hang fails the run.
AGENT_START_TIMEOUT = 300.0  # s; 110k rules took ~20 s to parse and compile on a busy 2-CPU VM
RELOAD_TIMEOUT = 300.0       # s; same work as a start, minus the BPF compile
RELOAD_SETTLE = 2.0          # s: two of the agent's policy-directory polls (see _reloads)
WATCH_INTERVAL_US = 2000     # between probes while waiting for a change: ±2 ms resolution, and
                             # few enough denied connects to keep the agent's event drain short
MIN_ROUNDS = 5               # the time budget never cuts a run below this many rounds


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]   # rule counts, smallest first; the largest gets the reload tests
    rounds: int              # interleaved rounds (each runs every variant once)
    count: int               # timed connects per sample
    warmup: int              # untimed connects before them
    stats_rounds: int        # samples per agent variant with kernel.bpf_stats_enabled
    reloads: int             # reloads of the largest policy, per kind (replace, edit)
    budget_s: float          # stop starting rounds after this long (bounded run time)


# Short samples, many rounds: this machine's speed changes in spells of a few seconds (other
# tenants), so a round (every variant once) must fit inside one spell for its differences to
# cancel them; 5k cycles is ~0.2 s, a round ~2 s.
FULL = Settings(sizes=(10, 10_000, 100_000), rounds=150, count=5_000, warmup=500,
                stats_rounds=3, reloads=2, budget_s=300.0)
QUICK = Settings(sizes=(10, 1_000, 10_000), rounds=3, count=2_000, warmup=200,
                 stats_rounds=1, reloads=1, budget_s=20.0)

TARGETS = {
    "agent_added_ns_at_largest": 250.0,
    "agent_over_nft_ratio": 0.5,
    "reload_s": 1.0,
    "start_s": 3.0,
}


def label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str          # baseline | control | agent | nft
    rules: int
    place: Place
    denied_probe: str  # what a connect to rules.DENIED must give: proof the enforcer is on
    what: str


# -- the run -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10/1k/10k rules, 3 rounds of 2k connects; docs untouched")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds, at most (default "
                   f"{FULL.rounds}, quick {QUICK.rounds}; also bounded by a time budget)")
    p.add_argument("--count", type=int, help=f"timed connects per sample (default {FULL.count})")
    p.add_argument("--cpu", type=int, help="pin every workload to this CPU")
    p.add_argument("--docs", type=Path, help=f"markdown to update (default: {DOCS} for a full "
                   "run, none for --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not write any markdown")
    p.add_argument("--seed", type=int, default=1, help="seed of the rule sets and the order")
    p.add_argument("--control-plane", action="store_true",
                   help="only the agent's start, the policy reloads and the parse cost, with the "
                   "full run's rule counts (with --quick, the quick run's): no connect rounds, "
                   "no nft; prints its table, docs untouched")
    p.add_argument("--floor", action="store_true",
                   help="only the dispatch floor: do-nothing programs at each of the attach "
                   "points the workload passes, one at a time and all together, interleaved with "
                   "the baseline; no agent, no nft; prints its table, docs untouched")
    p.add_argument("--close-events", action="store_true",
                   help="only what events.connectionClose costs: agents with and without it, "
                   "10 CIDRs each, interleaved with the baseline; prints its table, docs "
                   "untouched")
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help="measure nothing: re-evaluate a raw results file and write its tables "
                   "(to --docs, default docs/benchmarks.md)")
    args = p.parse_args(argv)
    if (code := report.begin_run(args, report.evaluate, report.render, DOCS,
                                 root_for="loads BPF programs and nft tables")) is not None:
        return code

    settings = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("rounds", args.rounds), ("count", args.count)) if v}
    settings = dataclasses.replace(settings, **overrides)
    docs = None if args.no_docs else (args.docs or (None if args.quick else DOCS))

    exit_on_sigterm()
    workload.build()
    started = time.monotonic()
    results = {
        "command": " ".join(["python -m bench.run", *map(shlex.quote, sys.argv[1:] if argv is None
                                                         else argv)]),
        "settings": dataclasses.asdict(settings),
        "targets": TARGETS,
        "seed": args.seed,
        "host": host_facts(nft=run_cmd(["nft", "--version"]).stdout.strip()),
    }
    try:
        if args.floor:
            measure_floor(settings, args.cpu, args.seed, results)
        elif args.close_events:
            measure_close(settings, args.cpu, args.seed, results)
        else:
            measure(settings, args.cpu, args.seed, results, args.control_plane)
    except BenchError as err:
        log.error("%s", err)
        return 1
    results["duration_s"] = time.monotonic() - started
    if args.floor or args.close_events:
        results["evaluation"] = report.evaluate_floor(results)
        results["title"] = "Dispatch floor" if args.floor else "Close events"
        results["setup"] = ("no agent, no nft" if args.floor else
                            "two agents, 10 CIDRs each, events.connectionClose off and on")
        report.publish(results, "floor-" if args.floor else "close-", args.quick,
                       report.render_floor, None)
        return 0
    if args.control_plane:
        results["evaluation"] = report.evaluate_control_plane(results)
        report.publish(results, "control-", args.quick, report.render_control_plane, None)
        return 0
    results["evaluation"] = report.evaluate(results)

    report.publish(results, "", args.quick, report.render, docs)
    return 0


def measure(s: Settings, cpu: int | None, seed: int, results: dict,
            control_plane: bool = False) -> None:
    """Everything, or with control_plane only the agent variants' start and reloads."""
    run_id = f"{os.getpid():x}{random.randrange(16 ** 4):04x}"
    name = f"hostagent-bench-{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    largest = max(s.sizes)
    with Cleanup() as stack:
        stack.defer(f"rm -r {tmp}", _rmtree, tmp)
        mount = cgroup2_mount()
        root = make_cgroup(stack, os.path.join(mount, name))
        agent_root = make_cgroup(stack, os.path.join(root, "agent"))
        plain = make_cgroup(stack, os.path.join(root, "plain"))
        plain_ns = make_netns(stack, name)
        log.info("run %s: cgroups under %s, namespaces %s*", run_id, root, name)

        variants = [Variant("baseline", "baseline", 0,
                            Place(make_cgroup(stack, os.path.join(plain, "base")), plain_ns, cpu),
                            "allowed", "nothing attached, no nft rules")]
        if not control_plane:
            variants.append(Variant("control", "control", 0,
                                    Place(make_cgroup(stack, os.path.join(plain, "control")),
                                          make_netns(stack, f"{name}-ctl"), cpu),
                                    "allowed", "the baseline again, in its own cgroup and "
                                    "namespace: an A/A check, its \"added\" cost is the noise "
                                    "floor"))
        floor = None
        if not control_plane:
            floor = FloorPrograms()
            stack.callback(floor.close)
            cg = make_cgroup(stack, os.path.join(plain, "floor"))
            floor.attach(stack, cg, FLOOR_HOOKS)
            _ancestors_bare(cg, mount)
            variants.append(Variant("floor", "floor", 0, Place(cg, plain_ns, cpu), "allowed",
                                    "do-nothing programs (return 1) at the attach points this "
                                    "workload passes: connect4, sock_create, cgroup_skb egress; "
                                    "the kernel's dispatch alone (outside the agent's root)"))
        nft_load = {}
        for n in s.sizes:
            cg = make_cgroup(stack, os.path.join(agent_root, f"w{label(n)}"))
            variants.append(Variant(f"agent-{label(n)}", "agent", n, Place(cg, plain_ns, cpu),
                                    "eperm", f"hostagent policy of {n:,} CIDRs (enforce mode)"))
        for n in (() if control_plane else s.sizes):
            cg = make_cgroup(stack, os.path.join(plain, f"nft-{label(n)}"))
            ns = make_netns(stack, f"{name}-n{label(n)}")
            table = f"hostagent_bench_{run_id}"
            text = rules.nft_ruleset(table, cgroup_level(cg, mount), nft_cgroup_path(cg),
                                     rules.allowlist(n, seed=seed * 1000 + n))
            nft_load[label(n)] = load_nft_table(stack, ns, table, text, tmp / f"nft-{n}.nft")
            variants.append(Variant(f"nft-{label(n)}", "nft", n, Place(cg, ns, cpu), "timeout",
                                    f"nft inet output chain, `socket cgroupv2` + interval set "
                                    f"of {n:,} CIDRs"))
        results["nft_load_s"] = nft_load

        files = AgentFiles(config=tmp / "hostagent.yaml", policy_dir=tmp / "policies",
                           state_dir=tmp / "state", bpffs_dir=f"/sys/fs/bpf/{name}",
                           cgroup_root=agent_root, log=tmp / "agent.log")
        total_rules = sum(s.sizes)
        # room for every policy plus a second copy of the largest during its swap
        write_agent_config(files, max_rules=max(262144, total_rules + largest))
        current = {}
        for v in variants:
            if v.kind == "agent":
                cidrs = rules.allowlist(v.rules, seed=seed * 1000 + v.rules)
                os.replace(*_stage_policy(files, v, cidrs))
                current[v.name] = cidrs
        try:
            agent = _start(stack, files, variants, largest, results)
            results["variants"] = [{"name": v.name, "kind": v.kind, "rules": v.rules,
                                    "cgroup": v.place.cgroup, "netns": v.place.netns,
                                    "what": v.what} for v in variants]
            _check_verdicts(variants)
            if not control_plane:
                results["samples"] = _rounds(s, variants, seed)
                results["self_time"] = _self_time(s, files, variants, floor)
            big = next(v for v in variants if v.kind == "agent" and v.rules == largest)
            results["reloads"] = _reloads(s, files, agent, big, current[big.name], seed)
            results["policy_parse"] = _parse_cost(files, sum(s.sizes))
            results["agent_log_tail"] = agent.tail(40)
        finally:
            report.keep_log(files.log, "agent-last.log")
    if stack.failures:
        raise BenchError("cleanup failed: " + "; ".join(stack.failures))
    results["loadavg_end"] = os.getloadavg()


def _rmtree(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _stage_policy(files: AgentFiles, v: Variant, cidrs: list[str]) -> tuple[Path, Path]:
    """Write v's policy beside its final name; (staged, final). Renaming one onto the other is
    atomic for the agent's directory poll, which ignores dotfiles."""
    final = files.policy_dir / f"bench-{v.name}.yaml"
    staged = final.with_name("." + final.name + ".tmp")
    rel = "/" + os.path.relpath(v.place.cgroup, files.cgroup_root)
    staged.write_text(rules.policy_yaml(f"bench-{v.name}", rel, cidrs))
    return staged, final


# -- start ---------------------------------------------------------------------------------------

def _start(stack: Cleanup, files: AgentFiles, variants: list[Variant], largest: int,
           results: dict):
    """Start the agent and time start -> enforcing three ways: until a probe loop in the
    largest policy's cgroup is refused, until the "enforcing" log line, and the agent's own
    figure (which starts its clock after reading the policies)."""
    big = next(v for v in variants if v.kind == "agent" and v.rules == largest)
    watch = Watch(big.place, rules.DENIED, "eperm", timeout_s=AGENT_START_TIMEOUT,
                  interval_us=WATCH_INTERVAL_US)
    try:
        t0 = time.monotonic_ns()
        agent = start_agent(stack, files)
        log.info("agent pid %d starting with %d rules in %d policies", agent.pid,
                 sum(v.rules for v in variants if v.kind == "agent"),
                 sum(v.kind == "agent" for v in variants))
        i, m = agent.wait_for(r"enforcing \(generation (\d+)\) in ([0-9.]+)s", 0,
                              AGENT_START_TIMEOUT)
        seen = watch.result()
    finally:
        watch.close()
    compiled = _first(agent, r"programs compiled and loaded in ([0-9.]+)s")
    split = _policy_split(agent, 0, i)
    results["start"] = {
        "rules": sum(v.rules for v in variants if v.kind == "agent"),
        "probe_refused_s": (seen[0] - t0) / 1e9 if seen else None,
        "log_enforcing_s": (agent.lines[i].t_ns - t0) / 1e9,
        "agent_reported_s": float(m.group(2)),
        "bpf_compile_s": float(compiled) if compiled else None,
        **split,
    }
    log.info("enforcing after %.2f s (refused by probe after %s s)",
             results["start"]["log_enforcing_s"],
             f"{results['start']['probe_refused_s']:.2f}" if seen else "never")
    results["attached"] = attached_programs(files.config)
    return agent


_SPLIT = re.compile(r"policies read in ([0-9.]+)s \((\d+) files parsed.*compiled in "
                    r"([0-9.]+)s \((\d+) of (\d+) policies\)")


def _policy_split(agent, first: int, last: int) -> dict:
    """The agent's own account of a load (its log line from _load_policies) between two of
    its log lines: how long reading and compiling the policies took, and how much was redone."""
    for line in reversed(agent.lines[first:last + 1]):
        m = _SPLIT.search(line.text)
        if m:
            return {"agent_load_s": float(m.group(1)), "files_parsed": int(m.group(2)),
                    "agent_compile_s": float(m.group(3)), "policies_compiled": int(m.group(4)),
                    "policies": int(m.group(5))}
    return {}


def _first(agent, pattern: str) -> str | None:
    rx = re.compile(pattern)
    for line in agent.lines:
        m = rx.search(line.text)
        if m:
            return m.group(1)
    return None


def _check_verdicts(variants: list[Variant]) -> None:
    """Every enforcer must be on, and must let the measured connects through."""
    for v in variants:
        allowed = workload.probe(v.place, rules.ALLOWED)
        denied = workload.probe(v.place, rules.DENIED)
        if allowed != "allowed" or denied != v.denied_probe:
            raise BenchError(f"{v.name}: {rules.ALLOWED} gave {allowed} (want allowed), "
                             f"{rules.DENIED} gave {denied} (want {v.denied_probe})")
    log.info("verdicts check out: the baseline allows %s, agent-* refuse it (EPERM), nft-* "
             "drop it", rules.DENIED)


# -- timed rounds --------------------------------------------------------------------------------

def _rounds(s: Settings, variants: list[Variant], seed: int) -> list[dict]:
    samples = []
    for r, order in stats.interleaved(variants, s.rounds, s.budget_s, MIN_ROUNDS, seed):
        for pos, v in enumerate(order):
            got = workload.sample(v.place, s.count, s.warmup)
            samples.append({"round": r, "position": pos, "variant": v.name, **got})
        if r % 10 and r != s.rounds - 1:
            continue
        by = {x["variant"]: x["ns_per_cycle"] for x in samples if x["round"] == r}
        log.info("round %d/%d: %s", r + 1, s.rounds,
                 "  ".join(f"{v.name} {by[v.name] / 1000:.2f}" for v in variants) + "  (µs)")
    return samples


# -- kernel self-time ----------------------------------------------------------------------------

def _self_time(s: Settings, files: AgentFiles | None, variants: list[Variant],
               floor: "FloorPrograms | None" = None) -> list[dict]:
    """Per-program run counts and run time per connect cycle, from bpf stats deltas around one
    sample at a time (only the bench's workloads live below the agent's cgroupRoot, and only
    the floor variants run the floor programs, each counted under the agent program it stands
    in for)."""
    agent_progs = attached_programs(files.config) if files is not None else {}
    measured = [v for v in variants if v.kind in ("agent", "floor")]
    rng = random.Random(2)
    out = []
    with bpf_stats_enabled():
        for r in range(s.stats_rounds):
            order = list(measured)
            rng.shuffle(order)
            for v in order:
                progs = agent_progs if v.kind == "agent" else floor.ids
                before = prog_stats(progs)
                got = workload.sample(v.place, s.count, s.warmup)
                after = prog_stats(progs)
                cycles = s.count + s.warmup
                per_prog = {}
                for prog in progs:
                    runs = after[prog][0] - before[prog][0]
                    ns = after[prog][1] - before[prog][1]
                    per_prog[prog] = {"runs_per_cycle": runs / cycles,
                                      "ns_per_run": ns / runs if runs else 0.0,
                                      "ns_per_cycle": ns / cycles}
                out.append({"round": r, "variant": v.name, "ns_per_cycle_with_stats":
                            got["ns_per_cycle"], "programs": per_prog,
                            "self_ns_per_cycle": sum(p["ns_per_cycle"]
                                                     for p in per_prog.values())})
    log.info("kernel self-time: %s", ", ".join(
        f"{x['variant']} {x['self_ns_per_cycle']:.0f} ns" for x in out))
    return out


# -- the dispatch floor --------------------------------------------------------------------------

FLOOR_SOURCE = REPO / "bench" / "floor.c"


@dataclass(frozen=True)
class FloorHook:
    function: str      # in bench/floor.c
    prog_type: int
    attach_type: int
    stands_for: str    # the agent program that runs at the same attach point


FLOOR_HOOKS = (
    FloorHook("floor_connect4", loader.PROG_CGROUP_SOCK_ADDR, loader.ATTACH_INET4_CONNECT,
              "sock4_connect"),
    FloorHook("floor_sock_create", loader.PROG_CGROUP_SOCK, loader.ATTACH_INET_SOCK_CREATE,
              "sock_create"),
    FloorHook("floor_egress", loader.PROG_CGROUP_SKB, loader.ATTACH_INET_EGRESS, "skb_egress"),
)


class FloorPrograms:
    """bench/floor.c, compiled and loaded once; attached through bpf links that are never
    pinned, so closing them (or the bench dying) detaches the programs."""

    def __init__(self) -> None:
        from bcc import BPF  # Debian's python3-bpfcc, as for the agent

        loader.check_kernel_headers()
        self._bpf = BPF(src_file=str(FLOOR_SOURCE))
        self.ids: dict[str, int] = {}   # agent program stood in for -> prog id
        self._fds: dict[str, int] = {}
        for hook in FLOOR_HOOKS:
            fn = self._bpf.load_func(hook.function, hook.prog_type, None, hook.attach_type)
            self._fds[hook.function] = fn.fd
            self.ids[hook.stands_for] = syscall.prog_info(fn.fd).id

    def attach(self, stack: Cleanup, cgroup: str, hooks: tuple[FloorHook, ...]) -> None:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in hooks:
                link = syscall.link_create(self._fds[hook.function], cg_fd, hook.attach_type)
                stack.defer(f"detach {hook.function} from {cgroup}", os.close, link)
        finally:
            os.close(cg_fd)

    def close(self) -> None:
        self._bpf.cleanup()


def _ancestors_bare(cgroup: str, mount: str) -> None:
    """Refuse to measure a floor under a cgroup that runs programs of its own: they would run
    for the baseline too, and a program added to a non-empty list costs less than the first
    one. (A program attached anywhere else on the machine only turns on the static key of its
    attach point, which the baseline then pays as well: that part is no one's to remove.)"""
    path = os.path.dirname(cgroup)
    while True:
        out = run_cmd(["bpftool", "--json", "cgroup", "show", path]).stdout.strip()
        if out and json.loads(out):
            raise BenchError(f"{path} has BPF programs attached ({out[:200]}): the floor would "
                             "not be measured against a bare baseline")
        if os.path.samefile(path, mount):
            return
        path = os.path.dirname(path)


def _references(stack: Cleanup, root: str, ns: str, cpu: int | None) -> list[Variant]:
    """The baseline and its A/A control, in cgroups below root and namespace ns."""
    return [Variant("baseline", "baseline", 0,
                    Place(make_cgroup(stack, os.path.join(root, "base")), ns, cpu),
                    "allowed", "nothing attached"),
            Variant("control", "control", 0,
                    Place(make_cgroup(stack, os.path.join(root, "control")), ns, cpu),
                    "allowed", "nothing attached (A/A: the noise floor)")]


def measure_floor(s: Settings, cpu: int | None, seed: int, results: dict) -> None:
    """The dispatch floor, split by attach point: baseline, control, one variant per attach
    point with a do-nothing program there, and one with all of them (the `floor` of a full
    run). No agent runs, no nft table is loaded."""
    run_id = f"{os.getpid():x}{random.randrange(16 ** 4):04x}"
    name = f"hostagent-bench-{run_id}"
    with Cleanup() as stack:
        mount = cgroup2_mount()
        root = make_cgroup(stack, os.path.join(mount, name))
        ns = make_netns(stack, name)
        floor = FloorPrograms()
        stack.callback(floor.close)
        variants = _references(stack, root, ns, cpu)
        for hook in FLOOR_HOOKS:
            cg = make_cgroup(stack, os.path.join(root, hook.function))
            floor.attach(stack, cg, (hook,))
            variants.append(Variant(hook.function, "floor", 0, Place(cg, ns, cpu), "allowed",
                                    f"a do-nothing program where {hook.stands_for} runs"))
        cg = make_cgroup(stack, os.path.join(root, "floor"))
        floor.attach(stack, cg, FLOOR_HOOKS)
        variants.append(Variant("floor", "floor", 0, Place(cg, ns, cpu), "allowed",
                                "all three: the floor of the agent's hook set"))
        _ancestors_bare(root, mount)
        results["variants"] = [{"name": v.name, "kind": v.kind, "rules": 0, "what": v.what}
                               for v in variants]
        _check_verdicts(variants)
        results["samples"] = _rounds(s, variants, seed)
        results["self_time"] = _self_time(s, None, variants, floor)
    if stack.failures:
        raise BenchError("cleanup failed: " + "; ".join(stack.failures))
    results["loadavg_end"] = os.getloadavg()


def measure_close(s: Settings, cpu: int | None, seed: int, results: dict) -> None:
    """What events.connectionClose costs a connection: two agents side by side, each at a
    cgroup of its own with the same 10-CIDR policy, one with close events and one without,
    interleaved with the baseline. The workload's connections are allowed (its destination is
    in the policy), so each one opens and closes a connection the agent records."""
    run_id = f"{os.getpid():x}{random.randrange(16 ** 4):04x}"
    name = f"hostagent-bench-{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with Cleanup() as stack:
        stack.defer(f"rm -r {tmp}", _rmtree, tmp)
        mount = cgroup2_mount()
        root = make_cgroup(stack, os.path.join(mount, name))
        ns = make_netns(stack, name)
        variants = _references(stack, root, ns, cpu)
        cidrs = rules.allowlist(10, seed=seed * 1000 + 10)
        for close in (False, True):
            tag = "close" if close else "plain"
            agent_root = make_cgroup(stack, os.path.join(root, f"agent-{tag}"))
            files = AgentFiles(config=tmp / f"{tag}.yaml", policy_dir=tmp / f"policies-{tag}",
                               state_dir=tmp / f"state-{tag}", bpffs_dir=f"/sys/fs/bpf/{name}-{tag}",
                               cgroup_root=agent_root, log=tmp / f"agent-{tag}.log")
            write_agent_config(files, max_rules=262144)
            with files.config.open("a") as f:   # two agents: no shared listen addresses
                f.write(f"events: {{connectionClose: {'true' if close else 'false'}}}\n"
                        'grpc: {listen: ""}\ndns: {enabled: false}\n')
            v = Variant("agent-10-close" if close else "agent-10", "agent", 10,
                        Place(make_cgroup(stack, os.path.join(agent_root, "w")), ns, cpu),
                        "eperm", "hostagent, 10 CIDRs" + (", events.connectionClose: true"
                                                            if close else ""))
            os.replace(*_stage_policy(files, v, cidrs))
            variants.append(v)
            agent = start_agent(stack, files)
            agent.wait_for(r"enforcing \(generation \d+\)", 0, AGENT_START_TIMEOUT)
            stack.callback(report.keep_log, files.log, f"close-{tag}-agent-last.log")
        results["variants"] = [{"name": v.name, "kind": v.kind, "rules": v.rules, "what": v.what}
                               for v in variants]
        _check_verdicts(variants)
        results["samples"] = _rounds(s, variants, seed)
    if stack.failures:
        raise BenchError("cleanup failed: " + "; ".join(stack.failures))
    results["loadavg_end"] = os.getloadavg()


# -- reloads -------------------------------------------------------------------------------------

def _reloads(s: Settings, files: AgentFiles, agent, big: Variant, cidrs: list[str],
             seed: int) -> list[dict]:
    """Change the largest policy and time until a connect to an address only the new policy
    allows gets through (and until the agent logs the new generation). Two kinds of change:
    replace (all new CIDRs) and edit (one CIDR swapped for another)."""
    out = []
    for k in range(2 * s.reloads):
        # The agent polls the policy directory every second, and right after a reload (and the
        # drain of the probe's deny events) that poll is overdue: a rename made then is picked up
        # by the poll before the SIGHUP, and the SIGHUP reloads once more. Let it settle first.
        time.sleep(RELOAD_SETTLE)
        kind = "replace" if k % 2 == 0 else "edit"
        mark = rules.marker(k)
        if kind == "replace":
            new = rules.allowlist(big.rules, seed=seed * 1000 + 7 + k, extra=(mark,))
        else:
            new = cidrs[:-1] + [f"{mark}/32"]
        staged, final = _stage_policy(files, big, new)
        watch = Watch(big.place, mark, "allowed", timeout_s=RELOAD_TIMEOUT,
                      interval_us=WATCH_INTERVAL_US)
        try:
            idx = len(agent.lines)
            t0 = time.monotonic_ns()
            os.replace(staged, final)
            agent.reload()
            i, m = agent.wait_for(r"policy generation (\d+) in force|policy rejected", idx,
                                  RELOAD_TIMEOUT)
            if m.group(1) is None:
                raise BenchError(f"the agent rejected the reloaded policy:\n{agent.tail()}")
            seen = watch.result()
        finally:
            watch.close()
        polled = any("policy directory changed" in x.text for x in agent.lines[idx:i + 1])
        out.append({"kind": kind, "rules": big.rules, "generation": int(m.group(1)),
                    "trigger": "directory poll" if polled else "SIGHUP",
                    "probe_allowed_s": (seen[0] - t0) / 1e9 if seen else None,
                    "log_in_force_s": (agent.lines[i].t_ns - t0) / 1e9,
                    **_policy_split(agent, idx, i)})
        log.info("reload %d (%s %d rules): in force after %.2f s (log), %s s (probe)", k + 1,
                 kind, big.rules, out[-1]["log_in_force_s"],
                 f"{out[-1]['probe_allowed_s']:.2f}" if seen else "never")
        cidrs = new
        # Had the poll seen the rename before the SIGHUP arrived anyway, the SIGHUP finds the
        # directory unchanged (or, landing mid-load, loads it again): wait until it has been
        # handled, so that it cannot overlap the next measurement.
        if polled:
            agent.wait_for(r"policy generation (\d+) in force|policy rejected|"
                           r"SIGHUP: policy directory unchanged", i + 1, RELOAD_TIMEOUT)
    return out


PARSE_REPEATS = 3   # the parse cost is timed this many times (fresh each time), median shown


def _parse_cost(files: AgentFiles, n_rules: int) -> dict:
    """Where start time goes: the agent's policy loading and compiling, timed in this process
    on the same directory (no kernel involved), from scratch each time as at an agent's start.
    A reload re-reads only what changed: see the agent's own split in the reload rows."""
    from hostagent.config import load_config
    from hostagent.policy.compile import compile_policies
    from hostagent.policy.load import load_policy_dir

    cfg = load_config(str(files.config))
    load_s, compile_s = [], []
    for _ in range(PARSE_REPEATS):
        t0 = time.perf_counter()
        policies = load_policy_dir(files.policy_dir)
        t1 = time.perf_counter()
        compile_policies(policies, cfg.metadata.blocked_networks())
        t2 = time.perf_counter()
        load_s.append(t1 - t0)
        compile_s.append(t2 - t1)
    log.info("policy directory of %d rules: loaded in %s s, compiled in %s s", n_rules,
             ", ".join(f"{x:.2f}" for x in load_s), ", ".join(f"{x:.2f}" for x in compile_s))
    return {"rules": n_rules, "load_s": statistics.median(load_s),
            "compile_s": statistics.median(compile_s), "load_all_s": load_s,
            "compile_all_s": compile_s, "loadavg": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
