"""`hostagent collector ...`: run the collector, and ask the store the incident and rollout
questions. Every query prints a readable table, or with --json one JSON document (--follow:
one JSON object a line)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from hostagent.collector import query, times
from hostagent.collector.store import DEFAULT_DB, StoreError, open_store
from hostagent.errors import HostAgentError

DEFAULT_CONFIG = "/etc/hostagent/collector.yaml"

_FLAGS = {"agents": "--agent", "discovery.dns": "--discover-dns",
          "discovery.files": "--discover-file", "database": "--db",
          "retention.maxAge": "--retention", "tls.ca": "--ca", "tls.cert": "--cert",
          "tls.key": "--key", "tls.serverName": "--server-name",
          "metrics.listen": "--metrics-listen", "logLevel": "--log-level"}


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def _db_abs(url: str | None) -> str | None:
    """A relative SQLite path on the command line is relative to where the user stands."""
    if not url:
        return url
    from hostagent.collector.store import sqlite_path

    path = sqlite_path(url)
    if path is not None and not os.path.isabs(path):
        return "sqlite://" + os.path.abspath(path)
    return url


def _config(args, **overrides):
    from hostagent.collector.config import load_config

    path = getattr(args, "config", None)
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, overrides, flag_names=_FLAGS)


# -- run -----------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from hostagent.collector.ingest import Collector

    cfg = _config(args, **{
        "agents": args.agent, "discovery.dns": args.discover_dns,
        "discovery.files": [_abs(p) for p in args.discover_file], "database": _db_abs(args.db),
        "retention.maxAge": args.retention, "tls.ca": _abs(args.ca), "tls.cert": _abs(args.cert),
        "tls.key": _abs(args.key), "tls.serverName": args.server_name,
        "metrics.listen": args.metrics_listen, "logLevel": args.log_level})
    logging.getLogger().setLevel(cfg.log_level.upper())
    if not (cfg.agents or cfg.discover_dns or cfg.discover_files):
        raise HostAgentError("no agents: give --agent, --discover-dns or --discover-file (or "
                             "agents/discovery in the config)")
    return Collector(cfg).run()


# -- queries -------------------------------------------------------------------------------------

def _store(args):
    url = _db_abs(args.db)
    if url is None:
        url = _config(args).database
    return open_store(url, readonly=True)


def _time(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return times.point(value)
    except ValueError as err:
        raise query.QueryError(str(err)) from None


def _t(us) -> str:
    return times.iso(us, "seconds") if us is not None else "-"


def _destination(r: dict) -> str:
    if r.get("kind") == "dns":
        return f"? {r['dst_name']} (dns)"
    ip = f"[{r['dst_ip']}]" if ":" in (r["dst_ip"] or "") else r["dst_ip"]
    where = f"{ip}:{r['dst_port']}/{r['protocol']}"
    return f"{r['dst_name']} ({where})" if r.get("dst_name") else where


def _verdicts(r: dict) -> str:
    parts = [f"{k} {r[k + '_n']}" for k in ("allow", "audit", "deny") if r.get(k + "_n")]
    return ", ".join(parts) or "-"


def table(rows: list[dict], columns: list[tuple[str, object]]) -> str:
    """Aligned columns; each column is (title, key or function of the row)."""
    cells = [[str(c(r) if callable(c) else ("-" if r.get(c) is None else r.get(c)))
              for _, c in columns] for r in rows]
    titles = [t for t, _ in columns]
    widths = [max([len(t)] + [len(row[i]) for row in cells]) for i, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _json_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if k.endswith("_us"):
                d[k[:-3]] = times.iso(v)
            elif isinstance(v, (bytes, memoryview)):
                continue
            else:
                d[k] = v
        out.append(d)
    return out


def _emit(args, rows: list[dict], columns, empty: str) -> int:
    if args.json:
        print(json.dumps(_json_rows(rows), indent=1))
    elif rows:
        print(table(rows, columns))
    else:
        print(empty)
    return 0


_DEST_COLUMNS = [("destination", _destination), ("verdicts", _verdicts), ("n", "n"),
                 ("first", lambda r: _t(r["first_us"])), ("last", lambda r: _t(r["last_us"]))]


def cmd_reached(args) -> int:
    with _closing(_store(args)) as store:
        rows = query.reached(store, query.Selector.parse(args.workload), _time(args.since),
                             _time(args.until))
    return _emit(args, rows, [("workload", "workload")] + _DEST_COLUMNS,
                 "nothing: no connection or DNS event of the selected workloads in the range")


def cmd_who(args) -> int:
    with _closing(_store(args)) as store:
        rows = query.who(store, query.Destination.parse(args.destination), args.port,
                         _time(args.since), _time(args.until),
                         query.Selector.parse(args.workload))
    return _emit(args, rows, [("workload", "workload")] + _DEST_COLUMNS[:2]
                 + [("agents", "agents")] + _DEST_COLUMNS[2:],
                 f"nobody: no event to {args.destination} in the range")


_FIRST_SEEN_COLUMNS = [("first seen", lambda r: _t(r["first_us"])), ("workload", "workload"),
                       ("destination", _destination), ("verdicts", _verdicts),
                       ("where", lambda r: f"{r['first_node']} seq {r['first_seq']}")]


def cmd_first_seen(args) -> int:
    selector = query.Selector.parse(args.workload, allow_node=False)
    since = _time(args.since)
    with _closing(_store(args)) as store:
        if not args.follow:
            rows = query.first_seen(store, selector, since=since)
            return _emit(args, rows, _FIRST_SEEN_COLUMNS, "no destination first seen in the "
                         "range")
        stop = threading.Event()
        header = False
        try:
            for row in query.follow_first_seen(store, selector, since, args.interval, stop):
                if args.json:
                    print(json.dumps(_json_rows([row])[0]), flush=True)
                else:
                    text = table([row], _FIRST_SEEN_COLUMNS).splitlines()
                    if not header:
                        print(text[0])
                        header = True
                    print(text[1], flush=True)
        except KeyboardInterrupt:
            stop.set()
    return 0


def cmd_coverage(args) -> int:
    with _closing(_store(args)) as store:
        c = query.coverage(store, query.Selector.parse(args.workload), _time(args.since),
                           _time(args.until), top=args.top)
    if args.json:
        c = dict(c, since=times.iso(c.pop("since_us")), until=times.iso(c.pop("until_us")))
        print(json.dumps(c, indent=1))
        return 0
    u, i = c["unknown_destination"], c["identity"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    print(f"unknown-destination rate: {pct(u['rate'])} ({u['unknown']} of {u['connections']} "
          f"connections have neither a resolved name nor a rule; {u['named']} named, "
          f"{u['ruled']} by a rule)")
    print(f"identity coverage:        {pct(i['coverage'])} ({i['identified']} of {i['events']} "
          "events name a pod, container or unit)")
    if i["by_kind"]:
        print()
        print(table(i["by_kind"], [("workload kind", "kind"), ("events", "events"),
                                   ("identified", "identified")]))
    if c["workloads_with_unknown"]:
        print()
        print(table(c["workloads_with_unknown"],
                    [("workload", "workload"), ("unknown", "unknown"),
                     ("connections", "connections"), ("rate", lambda r: pct(r["rate"]))]))
    return 0


def cmd_inventory(args) -> int:
    with _closing(_store(args)) as store:
        rows = query.inventory(store, query.Selector.parse(args.workload, allow_node=False),
                               _time(args.since))
    if args.json:
        by: dict[str, list] = {}
        for r in _json_rows(rows):
            by.setdefault(r.pop("workload"), []).append(r)
        print(json.dumps([{"workload": k, "destinations": v} for k, v in by.items()],
                         indent=1))
        return 0
    if not rows:
        print("no destinations recorded for the selected workloads")
        return 0
    current = None
    for r in rows:
        if r["workload"] != current:
            if current is not None:
                print()
            current = r["workload"]
            group = [x for x in rows if x["workload"] == current]
            print(f"{current}: {len(group)} destinations")
            print(table(group, [("  destination", lambda x: "  " + _destination(x)),
                                ("verdicts", _verdicts), ("reason", "reason"),
                                ("rule", "rule"), ("first", lambda x: _t(x["first_us"])),
                                ("last", lambda x: _t(x["last_us"]))]))
    return 0


def cmd_draft_policy(args) -> int:
    from hostagent.collector.policy_draft import drafts

    with _closing(_store(args)) as store:
        made = drafts(store, query.Selector.parse(args.workload, allow_node=False), args.name,
                      _time(args.since))
    text = "---\n".join(d.yaml() for d in made)
    if args.output:
        path = args.output
        if os.path.isdir(path):
            path = os.path.join(path, f"{made[0].name if len(made) == 1 else 'drafts'}.yaml")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"{path}: {len(made)} draft policies", file=sys.stderr)
    if args.json:
        print(json.dumps({"policies": [{"workload": d.workload, "policy": d.policy(),
                                        "excluded": d.excluded, "notes": d.notes}
                                       for d in made], "yaml": text}, indent=1))
    elif not args.output:
        sys.stdout.write(text)
    return 0


def cmd_events(args) -> int:
    from hostagent.api.tail import line
    from hostagent.events.convert import from_proto

    dest = query.Destination.parse(args.destination) if args.destination else None
    with _closing(_store(args)) as store:
        keys = query.event_rows(store, query.Selector.parse(args.workload), _time(args.since),
                                _time(args.until), args.kind, args.verdict, dest, args.limit)
        for e in query.events(store, [(k["agent_id"], k["seq"]) for k in keys]):
            d = from_proto(e)
            print(json.dumps(d, separators=(",", ":")) if args.json
                  else f"{d['node'] or '-'} {line(d).lstrip()}")
    return 0


def cmd_agents(args) -> int:
    with _closing(_store(args)) as store:
        rows = query.agents(store)
    return _emit(args, rows, [
        ("node", "node"), ("epoch", "epoch"), ("address", "address"), ("state", "state"),
        ("stored up to seq", "last_seq"), ("events", "events"),
        ("last event", lambda r: _t(r["last_time_us"])),
        ("lost", lambda r: ", ".join(f"{k} {v}" for k, v in r["lost"].items()) or "-"),
        ("error", "error")], "no agents yet")


def cmd_lost(args) -> int:
    with _closing(_store(args)) as store:
        rows = query.lost(store, args.node)
    return _emit(args, rows, [
        ("node", "node"), ("epoch", "epoch"),
        ("seqs", lambda r: f"{r['first_seq']}..{r['last_seq']}" if r["first_seq"] else "-"),
        ("count", "count"), ("source", "source"),
        ("reported by seq", lambda r: r["seq"] or "-"), ("time", lambda r: _t(r["time_us"]))],
        "nothing lost")


def cmd_prune(args) -> int:
    url = _db_abs(args.db) or _config(args).database
    try:
        age = times.duration(args.older_than)
    except ValueError as err:
        raise query.QueryError(f"--older-than {err}") from None
    cutoff = times.now_us() - int(age * 1_000_000)
    total = 0
    open_store(url, readonly=True).close()      # an existing collector database, not a new one
    with _closing(open_store(url)) as store:
        while True:
            n = store.prune(cutoff)
            total += n
            if n == 0:
                break
    print(f"deleted {total} events older than {times.iso(cutoff, 'seconds')}")
    return 0


class _closing:
    def __init__(self, store) -> None:
        self.store = store

    def __enter__(self):
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


# -- the parser ----------------------------------------------------------------------------------

def add_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="collector_command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the collector in the foreground")
    run.add_argument("--config", metavar="FILE",
                     help=f"collector config (default: {DEFAULT_CONFIG} if present)")
    run.add_argument("--agent", action="append", default=[], metavar="ADDR",
                     help="an agent's gRPC address, HOST:PORT or unix:///PATH (repeatable)")
    run.add_argument("--discover-dns", action="append", default=[], metavar="NAME:PORT",
                     help="every A/AAAA record of NAME is an agent (repeatable)")
    run.add_argument("--discover-file", action="append", default=[], metavar="PATH",
                     help="a file of agent addresses, one a line (repeatable)")
    run.add_argument("--db", metavar="URL", help=f"sqlite:///PATH or postgresql://... "
                     f"(default: {DEFAULT_DB})")
    run.add_argument("--retention", metavar="AGE",
                     help="delete events older than this (30d, 12h; default 30d; forever)")
    run.add_argument("--ca", metavar="PEM", help="CA of the agents' certificates (TLS)")
    run.add_argument("--cert", metavar="PEM", help="the collector's client certificate")
    run.add_argument("--key", metavar="PEM", help="the collector's client key")
    run.add_argument("--server-name", metavar="NAME",
                     help="the name agents' certificates must carry (default: the address)")
    run.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus /metrics")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.set_defaults(func=cmd_run)

    def query_parser(name: str, help_: str, workload: str | None = "optional",
                     times_: bool = True) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        q.add_argument("--db", metavar="URL",
                       help="sqlite:///PATH or postgresql://... (default: the config's)")
        q.add_argument("--config", metavar="FILE", help="collector config, for its database")
        q.add_argument("--json", action="store_true", help="JSON instead of a table")
        if workload:
            q.add_argument("--workload", action="append", default=[],
                           required=workload == "required", metavar="KEY=PATTERN[,...]",
                           help="namespace=prod, pod=api-*, label:app=web, cgroup_path=/w/*, "
                                "workload=pod:prod/api; repeat for OR, commas for AND")
        if times_:
            q.add_argument("--since", metavar="TIME",
                           help="ISO-8601 or back from now (30m, 1h, 7d)")
            q.add_argument("--until", metavar="TIME", help="ISO-8601 or back from now")
        return q

    q = query_parser("reached", "what the workloads reached (connections, DNS) in a time range",
                     workload="required")
    q.set_defaults(func=cmd_reached)

    q = query_parser("who", "which workloads reached a destination")
    q.add_argument("--destination", required=True, metavar="CIDR|NAME",
                   help="10.0.0.0/8, 203.0.113.9, api.example.com, *.example.com")
    q.add_argument("--port", type=int, metavar="N")
    q.set_defaults(func=cmd_who)

    q = query_parser("first-seen", "destinations new to their workload (--follow: as they "
                     "are stored)", times_=False)
    q.add_argument("--since", metavar="TIME", help="first seen at or after (30m, 1h, ISO)")
    q.add_argument("--follow", action="store_true",
                   help="keep printing new first-seen destinations as they are stored")
    q.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often --follow looks (default 1)")
    q.set_defaults(func=cmd_first_seen)

    q = query_parser("coverage", "unknown-destination rate and identity coverage")
    q.add_argument("--top", type=int, default=20, metavar="N",
                   help="workloads with the most unknown destinations to list (default 20)")
    q.set_defaults(func=cmd_coverage)

    q = query_parser("inventory", "the outbound dependencies of each workload", times_=False)
    q.add_argument("--since", metavar="TIME", help="only destinations used since")
    q.set_defaults(func=cmd_inventory)

    q = query_parser("draft-policy", "a draft EgressPolicy (audit mode) from observed traffic",
                     workload="required", times_=False)
    q.add_argument("--name", metavar="NAME", help="the policy's name (one workload only)")
    q.add_argument("--since", metavar="TIME", help="only destinations used since")
    q.add_argument("--output", metavar="FILE|DIR", help="write the YAML there")
    q.set_defaults(func=cmd_draft_policy)

    q = query_parser("events", "the stored events themselves (as the agent's event log)")
    q.add_argument("--destination", metavar="CIDR|NAME")
    q.add_argument("--kind", action="append", default=[],
                   choices=("connection", "dns", "policy", "workload", "agent", "lost",
                            "connection_close"))
    q.add_argument("--verdict", action="append", default=[], choices=("allow", "audit", "deny"))
    q.add_argument("--limit", type=int, default=0, metavar="N", help="at most N events")
    q.set_defaults(func=cmd_events)

    q = query_parser("agents", "the agents' streams: where each stands, what was lost",
                     workload=None, times_=False)
    q.set_defaults(func=cmd_agents)

    q = query_parser("lost", "seq ranges that will never be stored, and who said so",
                     workload=None, times_=False)
    q.add_argument("--node", metavar="PATTERN")
    q.set_defaults(func=cmd_lost)

    q = sub.add_parser("prune", help="delete events older than an age now (as retention does)")
    q.add_argument("--db", metavar="URL")
    q.add_argument("--config", metavar="FILE")
    q.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, ...")
    q.set_defaults(func=cmd_prune)


def register(sub) -> None:
    """Add `collector` to hostagent's subcommands."""
    p = sub.add_parser("collector", help="the central collector: run it, query its store",
                       description=__doc__)
    add_commands(p)


def main(argv: list[str] | None = None) -> int:
    """`python -m hostagent.collector ...`, the same as `hostagent collector ...`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    p = argparse.ArgumentParser(prog="hostagent collector", description=__doc__)
    add_commands(p)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (HostAgentError, StoreError) as err:
        print(f"hostagent collector: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
