"""Event dictionaries (the event log's JSON) <-> hostagent.v1.Event (the gRPC API).

One event has one meaning in both forms: from_proto(to_proto(d)) gives d back, field for field,
with None where the dictionary has None (the protobuf's empty string or zero). So the event
log, `hostagent events --json` and the collector's store all read alike.
"""

from __future__ import annotations

from datetime import datetime, timezone

from hostagent.v1 import events_pb2 as pb

KINDS = {"connection": pb.KIND_CONNECTION, "dns": pb.KIND_DNS, "policy": pb.KIND_POLICY,
         "workload": pb.KIND_WORKLOAD, "agent": pb.KIND_AGENT, "lost": pb.KIND_LOST,
         "connection_close": pb.KIND_CONNECTION_CLOSE}
KIND_NAMES = {v: k for k, v in KINDS.items()}
VERDICTS = {"allow": pb.VERDICT_ALLOW, "deny": pb.VERDICT_DENY, "audit": pb.VERDICT_AUDIT}
VERDICT_NAMES = {v: k for k, v in VERDICTS.items()}

# workload fields, by type in the protobuf
_WORKLOAD_STR = ("kind", "namespace", "pod", "pod_uid", "container", "container_id", "runtime",
                 "service_account", "unit", "spiffe_id", "cgroup_path", "comm", "exe")
_WORKLOAD_INT = ("cgroup_id", "pid", "tid", "uid", "gid", "ppid")
# present in the dictionary form of events that carry a process (connection events)
_PROCESS_KEYS = ("exe", "ppid", "pid", "tid", "comm", "uid", "gid")
_POLICY_LISTS = ("policies", "added", "removed", "changed", "files")


def _timestamp(msg, iso: str | None) -> None:
    if not iso:
        return
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    seconds = int(dt.timestamp())
    msg.seconds, msg.nanos = seconds, dt.microsecond * 1000


def iso_time(us: int, precision: str = "microseconds") -> str:
    """Microseconds since the epoch -> ``2026-11-21T09:07:48.300975Z``, the events' time form."""
    dt = datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(
        microsecond=us % 1_000_000)
    return dt.isoformat(timespec=precision).replace("+00:00", "Z")


def _workload(msg: pb.Workload, w: dict) -> None:
    for key in _WORKLOAD_STR + _WORKLOAD_INT:
        value = w.get(key)
        if value:
            setattr(msg, key, value)
    if w.get("pending"):
        msg.pending = True
    labels = w.get("labels")
    if labels:
        msg.labels.update(labels)


def workload_message(w: dict) -> pb.Workload:
    msg = pb.Workload()
    _workload(msg, w)
    return msg


def to_proto(event: dict) -> pb.Event:
    e = pb.Event(seq=event.get("seq") or 0, node=event.get("node") or "",
                 agent_version=event.get("agent_version") or "",
                 kind=KINDS.get(event.get("kind"), pb.KIND_UNSPECIFIED),
                 verdict=VERDICTS.get(event.get("verdict"), pb.VERDICT_UNSPECIFIED),
                 reason=event.get("reason") or "", policy=event.get("policy") or "",
                 generation=event.get("generation") or 0, rule=event.get("rule") or "",
                 ticket=event.get("ticket") or "", hook=event.get("hook") or "",
                 count=event.get("count") or 0)
    _timestamp(e.time, event.get("time"))
    if (w := event.get("workload")) is not None:
        _workload(e.workload, w)
    if (d := event.get("destination")) is not None:
        e.destination.ip = d.get("ip") or ""
        e.destination.port = d.get("port") or 0
        e.destination.protocol = d.get("protocol") or ""
        e.destination.name = d.get("name") or ""
    if (s := event.get("socket")) is not None:
        e.socket.cookie = s.get("cookie") or 0
        e.socket.family = s.get("family") or ""
        e.socket.protocol = s.get("protocol") or ""
    kind = event.get("kind")
    if kind == "dns":
        q, c = event.get("query") or {}, event.get("client") or {}
        dns = e.dns
        dns.name, dns.type, dns.rcode = q.get("name") or "", q.get("type") or "", \
            event.get("rcode") or ""
        for a in event.get("answers") or ():
            dns.answers.add(ip=a["ip"], ttl=a.get("ttl") or 0)
        dns.cnames.extend(event.get("cnames") or ())
        dns.dropped.extend(event.get("dropped") or ())
        dns.client_ip, dns.client_port = c.get("ip") or "", c.get("port") or 0
        dns.client_protocol = c.get("protocol") or ""
    elif kind == "policy":
        p = event.get("policy_change") or {}
        e.policy_change.ok = bool(p.get("ok"))
        for key in _POLICY_LISTS:
            getattr(e.policy_change, key).extend(p.get(key) or ())
        e.policy_change.error = p.get("error") or ""
    elif kind == "workload":
        e.workload_change.change = event.get("change") or ""
    elif kind == "agent":
        a = event.get("agent") or {}
        e.agent.phase, e.agent.adopted, e.agent.pid = a.get("phase") or "", \
            bool(a.get("adopted")), a.get("pid") or 0
    elif kind == "lost":
        lost = event.get("lost") or {}
        e.lost.source, e.lost.count = lost.get("source") or "", lost.get("count") or 0
        e.lost.first_seq, e.lost.last_seq = lost.get("first_seq") or 0, \
            lost.get("last_seq") or 0
    elif kind == "connection_close":
        c = event.get("close") or {}
        e.close.bytes_sent, e.close.bytes_received = c.get("bytes_sent") or 0, \
            c.get("bytes_received") or 0
        e.close.duration_ns = c.get("duration_ns") or 0
    return e


def _none(value):
    return value if value not in ("", 0) else None


def _workload_dict(w: pb.Workload, with_process: bool) -> dict:
    out: dict = {key: _none(getattr(w, key)) for key in _WORKLOAD_STR if key not in
                 _PROCESS_KEYS}
    out["labels"] = dict(w.labels)
    out["pending"] = w.pending
    out["cgroup_id"] = w.cgroup_id or None
    if with_process:
        out.update(exe=_none(w.exe), ppid=_none(w.ppid), pid=w.pid, tid=w.tid, comm=w.comm,
                   uid=w.uid, gid=w.gid)
    return out


# kernel records about one flow: they carry the process, the destination and the socket
_FLOW_KINDS = frozenset({"connection", "connection_close"})


def from_proto(e: pb.Event) -> dict:
    """The dictionary form: what the agent's event log holds for the same event."""
    kind = KIND_NAMES.get(e.kind, "unspecified")
    out: dict = {"seq": e.seq, "kind": kind,
                 "time": (iso_time(e.time.seconds * 1_000_000 + e.time.nanos // 1000)
                          if e.HasField("time") else None),
                 "node": _none(e.node), "agent_version": _none(e.agent_version),
                 "verdict": VERDICT_NAMES.get(e.verdict), "reason": _none(e.reason),
                 "policy": _none(e.policy), "rule": _none(e.rule),
                 "generation": e.generation, "ticket": _none(e.ticket)}
    if e.count:
        out["count"] = e.count
    if e.HasField("workload"):
        out["workload"] = _workload_dict(e.workload, with_process=kind in _FLOW_KINDS)
    if kind in _FLOW_KINDS:
        out["hook"] = e.hook
        d = e.destination
        out["destination"] = ({"ip": d.ip, "port": d.port, "protocol": d.protocol,
                               "name": _none(d.name)} if e.HasField("destination") else None)
        out["socket"] = {"cookie": e.socket.cookie, "family": e.socket.family,
                         "protocol": e.socket.protocol}
        if kind == "connection_close":
            out["close"] = {"bytes_sent": e.close.bytes_sent,
                            "bytes_received": e.close.bytes_received,
                            "duration_ns": e.close.duration_ns}
    elif kind == "dns":
        d = e.dns
        out.update(query={"name": d.name, "type": d.type}, rcode=d.rcode,
                   answers=[{"ip": a.ip, "ttl": a.ttl} for a in d.answers],
                   cnames=list(d.cnames), dropped=list(d.dropped),
                   socket={"cookie": e.socket.cookie},
                   client={"ip": d.client_ip, "port": d.client_port,
                           "protocol": d.client_protocol})
    elif kind == "policy":
        p = e.policy_change
        out["policy_change"] = {"ok": p.ok, **{k: list(getattr(p, k))
                                               for k in _POLICY_LISTS},
                                "error": _none(p.error)}
    elif kind == "workload":
        out["change"] = e.workload_change.change
    elif kind == "agent":
        out["agent"] = {"phase": e.agent.phase, "adopted": e.agent.adopted, "pid": e.agent.pid}
    elif kind == "lost":
        out["lost"] = {"source": e.lost.source, "count": e.lost.count,
                       "first_seq": e.lost.first_seq, "last_seq": e.lost.last_seq}
    return out
