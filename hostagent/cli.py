"""hostagent's command line: run, policy check, status, uninstall, events, collector."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from hostagent import __version__
from hostagent.config import load_config
from hostagent.errors import HostAgentError

DEFAULT_CONFIG = "/etc/hostagent/hostagent.yaml"

FLAGS = {"policyDir": "--policy-dir", "metrics.listen": "--metrics-listen",
         "eventLog": "--event-log", "grpc.listen": "--grpc-listen"}


def _config(args, **overrides):
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, {k: v for k, v in overrides.items() if v is not None},
                       flag_names=FLAGS)


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def cmd_run(args) -> int:
    from hostagent.daemon import Agent

    # paths on the command line are relative to where the user stands, as with any tool
    cfg = _config(args, **{"policyDir": _abs(args.policy_dir),
                           "metrics.listen": args.metrics_listen,
                           "grpc.listen": args.grpc_listen,
                           "eventLog": args.event_log if args.event_log in (None, "", "-")
                           else _abs(args.event_log)})
    logging.getLogger().setLevel(cfg.log_level.upper())
    return Agent(cfg).run()


def cmd_policy_check(args) -> int:
    from hostagent.policy.compile import compile_policies
    from hostagent.policy.load import load_policy_dir

    cfg = _config(args)
    try:
        # the node's own limit, so that check accepts exactly what the agent would load
        policies = load_policy_dir(args.dir, fqdn_min_labels=cfg.dns.fqdn_pattern_min_labels)
        compile_policies(policies, cfg.metadata.blocked_networks())
    except HostAgentError as err:
        print(err, file=sys.stderr)
        return 1
    n = sum(len(p.egress) for p in policies)
    print(f"{args.dir}: {len(policies)} policies, {n} rules: OK")
    return 0


def cmd_status(args) -> int:
    from hostagent.bpf import loader

    cfg = _config(args)
    status: dict = {}
    path = os.path.join(cfg.state_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        status = {"note": f"no {path}: the agent has not run with this config"}
    pid = status.get("pid")
    status["agent_running"] = bool(pid) and _alive(pid) and status.get("phase") == "running"
    status["programs"] = loader.attached(cfg.bpffs_dir)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    attached = [p["program"] for p in status["programs"] if p["attached"]]
    required = [p.name for p in loader.PROGRAMS if not p.optional]
    print(f"agent:       {'running, pid ' + str(pid) if status['agent_running'] else 'not running'}")
    print(f"programs:    {len(set(attached) & set(required))}/{len(required)} attached "
          f"({', '.join(attached) or 'none'}; optional: "
          f"{', '.join(p.name for p in loader.PROGRAMS if p.optional)})")
    print(f"generation:  {status.get('generation', 0)}")
    print(f"policies:    {', '.join(status.get('policies', [])) or 'none'}")
    last = status.get("last_reload") or {}
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0)))
        print(f"last reload: {'ok' if last.get('ok') else 'REJECTED'} at {when}")
        if not last.get("ok"):
            print("  " + str(last.get("error", "")).replace("\n", "\n  "))
    ident = status.get("identity") or {}
    if ident:
        kube = ident.get("kubernetes", "disabled")
        if kube == "disabled":
            print(f"identity:    cgroup-derived only ({ident.get('note') or 'no Kubernetes API'})")
        else:
            print(f"identity:    Kubernetes pods of node {ident.get('node')}: {kube}, "
                  f"{ident.get('pods', 0)} pods" +
                  (f" (last error: {ident['last_error']})" if ident.get("last_error") else ""))
        for path, names in (ident.get("conflicts") or {}).items():
            print(f"  CONFLICT {path}: denied, selected with equal precedence by "
                  f"{', '.join(names)}")
    dns = status.get("dns") or {}
    if dns.get("enabled"):
        r, a = dns.get("resolver") or {}, dns.get("allowances") or {}
        print(f"dns:         resolver on {dns.get('listen')}, {a.get('open', 0)} addresses "
              f"opened by answers" + "".join(f", {k} {v}" for k, v in r.items()
                                              if k in ("queries", "refused", "servfail")))
    elif dns:
        print("dns:         resolver off (dns.enabled: false); fqdn rules open nothing")
    for name, (used, cap) in (status.get("map_fill") or {}).items():
        print(f"map {name + ':':10s} {used}/{cap}")
    for p in status["programs"]:
        if p.get("run_cnt") is not None:
            print(f"{p['program']:14s} runs {p['run_cnt']}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cmd_uninstall(args) -> int:
    from hostagent.bpf import loader

    cfg = _config(args)
    from hostagent.dns.interface import remove_listen_address

    done = loader.uninstall(cfg.bpffs_dir)
    done += remove_listen_address(cfg.dns.listen[0], cfg.dns.interface)
    for line in done:
        print(line)
    print(f"{cfg.bpffs_dir}: nothing of hostagent is attached or pinned")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostagent", description=__doc__)
    p.add_argument("--version", action="version", version=f"hostagent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", metavar="FILE",
                        help=f"node config (default: {DEFAULT_CONFIG} if present, else "
                             "built-in defaults)")
        return sp

    run = with_config(sub.add_parser("run", help="run the agent in the foreground"))
    run.add_argument("--policy-dir", metavar="DIR")
    run.add_argument("--metrics-listen", metavar="HOST:PORT")
    run.add_argument("--event-log", metavar="FILE|-")
    run.add_argument("--grpc-listen", metavar="HOST:PORT|unix:///PATH",
                     help="the gRPC event API (grpc.listen); \"\" turns it off")
    run.set_defaults(func=cmd_run)

    policy = sub.add_parser("policy", help="policy tools")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    check = with_config(psub.add_parser("check", help="validate a policy directory"))
    check.add_argument("dir")
    check.set_defaults(func=cmd_policy_check)

    status = with_config(sub.add_parser("status", help="what is attached and in force"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    uninstall = with_config(sub.add_parser("uninstall",
                                           help="detach everything and remove pinned objects"))
    uninstall.set_defaults(func=cmd_uninstall)

    from hostagent.api.tail import register as register_events
    from hostagent.collector.cli import register as register_collector

    register_events(sub)
    register_collector(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HostAgentError as err:
        logging.getLogger("hostagent").error("%s", err)
        return 1
