"""`hostagent events`: one agent's event stream, as JSON lines or one readable line each."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from hostagent.api.client import AgentClient, ClientError, Tls
from hostagent.events.convert import KINDS, VERDICTS, from_proto


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", metavar="PEM", help="CA of the agent's certificate (turns on TLS)")
    p.add_argument("--cert", metavar="PEM", help="client certificate, for mutual TLS")
    p.add_argument("--key", metavar="PEM", help="client key, for mutual TLS")
    p.add_argument("--server-name", metavar="NAME",
                   help="the name the agent's certificate must carry (default: the host)")


def tls_of(args) -> Tls | None:
    if not (args.ca or args.cert or args.key):
        return None
    if not args.ca:
        raise ClientError("--cert/--key need --ca: mutual TLS is on top of TLS")
    return Tls(args.ca, args.cert, args.key, args.server_name)


def workload_label(w: dict | None) -> str:
    if not w:
        return "-"
    if w.get("pod"):
        who = f"{w.get('namespace')}/{w['pod']}" + (f"/{w['container']}" if w.get("container")
                                                   else "")
    elif w.get("unit"):
        who = w["unit"]
    else:
        who = w.get("cgroup_path") or f"cgroup:{w.get('cgroup_id')}"
    return who + (f" ({w['comm']}[{w['pid']}])" if w.get("comm") else "")


def line(e: dict) -> str:
    """One event as a readable line: seq time kind verdict who -> where why."""
    kind = e["kind"]
    head = f"{e['seq']:>8} {e.get('time') or '-'} {kind:10s} {e.get('verdict') or '-':5s}"
    who = workload_label(e.get("workload"))
    why = " ".join(x for x in (e.get("reason"), e.get("policy") and f"policy={e['policy']}",
                               e.get("rule") and f"rule={e['rule']}") if x)
    if kind in ("connection", "connection_close"):
        d = e.get("destination") or {}
        where = (f"{d.get('ip')}:{d.get('port')}/{d.get('protocol')}"
                 + (f" ({d['name']})" if d.get("name") else "")) if d else e.get("hook")
        c = e.get("close")
        carried = (f" sent={c['bytes_sent']} received={c['bytes_received']} "
                   f"lived={c['duration_ns'] / 1e9:.3f}s" if c else "")
        return f"{head} {who} -> {where}{carried} {why}"
    if kind == "dns":
        q = e.get("query") or {}
        answers = ",".join(a["ip"] for a in e.get("answers") or ())
        return f"{head} {who} ? {q.get('name')} {q.get('type')} {e.get('rcode')} " \
               f"[{answers}] {why}"
    if kind == "policy":
        p = e.get("policy_change") or {}
        state = "in force" if p.get("ok") else f"REJECTED: {p.get('error')}"
        return f"{head} generation {e.get('generation')} {state} " \
               f"added={p.get('added')} removed={p.get('removed')} changed={p.get('changed')}"
    if kind == "workload":
        return f"{head} {e.get('change')} {who}"
    if kind == "lost":
        lost = e.get("lost") or {}
        rng = f" seq {lost['first_seq']}..{lost['last_seq']}" if lost.get("first_seq") else ""
        return f"{head} {lost.get('count')} events lost at {lost.get('source')}{rng}"
    if kind == "agent":
        return f"{head} agent {(e.get('agent') or {}).get('phase')}"
    return f"{head} {json.dumps(e)}"


def cmd_events(args) -> int:
    tls = tls_of(args)
    server = args.server
    if server is None:   # the local agent, where its node config says it listens
        from hostagent.cli import _config

        server = _config(args).grpc_listen
        if server is None:
            raise ClientError("grpc.listen is off in the node config: pass --server")
    args.server = server
    with AgentClient(server, tls) as client:
        stream = client.events(since=args.since, from_oldest=args.from_oldest,
                               kinds=args.kind, verdicts=args.verdict,
                               workloads=args.workload, destinations=args.destination)
        printed = 0
        try:
            for batch in stream:
                for event in batch.events:
                    e = from_proto(event)
                    sys.stdout.write((json.dumps(e, separators=(",", ":")) if args.json
                                      else line(e)) + "\n")
                    printed += 1
                    if args.count and printed >= args.count:
                        sys.stdout.flush()
                        stream.cancel()
                        return 0
                sys.stdout.flush()
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return 0
            print(f"hostagent events: {args.server}: {err.code().name}: {err.details()}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            stream.cancel()
        except BrokenPipeError:   # `hostagent events | head`
            stream.cancel()
    return 0


def register(sub) -> None:
    p = sub.add_parser("events", help="tail an agent's event stream (gRPC)")
    p.add_argument("--server", metavar="ADDR",
                   help="HOST:PORT or unix:///path (default: grpc.listen of the node config)")
    p.add_argument("--config", metavar="FILE", help="node config, for the default --server")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--since", type=int, default=0, metavar="SEQ",
                   help="events after this seq (resume); default: from now on")
    p.add_argument("--from-oldest", action="store_true",
                   help="start at the oldest event the agent still keeps")
    p.add_argument("--kind", action="append", default=[], choices=sorted(KINDS))
    p.add_argument("--verdict", action="append", default=[], choices=sorted(VERDICTS))
    p.add_argument("--workload", action="append", default=[], metavar="KEY=PATTERN",
                   help="namespace=prod, pod=api-*, label:app=web, cgroup_path=/x/**")
    p.add_argument("--destination", action="append", default=[], metavar="CIDR|NAME",
                   help="10.0.0.0/8, 2001:db8::1, *.openai.com")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    add_tls_flags(p)
    p.set_defaults(func=cmd_events)
