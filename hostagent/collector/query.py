"""The questions asked of the store, as functions returning plain rows (the CLI prints them).

Workload selectors
------------------
``KEY=PATTERN`` with fnmatch patterns (``*``, ``?``, ``[...]``; case-sensitive), as for
``hostagent events --workload``. Several flags: any may match (OR); several selectors in one
flag, separated by commas, must all match (AND): ``--workload namespace=prod,label:app=web``.

Keys: ``workload`` (the collector's workload key, rows.py: ``pod:prod/api``, ``unit:x.service``,
``cgroup:/w``), ``kind`` (the agent's workload kind: pod, container, service, scope, slice,
cgroup), ``namespace``, ``pod``, ``container``, ``container_id``, ``service_account``, ``unit``,
``cgroup_path``, ``spiffe_id``, ``owner`` (a pod's controller, rows.py), ``label:KEY``, and for
event queries ``node``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hostagent.collector.rows import address_key
from hostagent.collector.store import Store
from hostagent.errors import HostAgentError

IDENTITY_KEYS = {"workload": "workload", "kind": "w_kind", "namespace": "namespace",
                 "pod": "pod", "container": "container", "container_id": "container_id",
                 "service_account": "service_account", "unit": "unit",
                 "cgroup_path": "cgroup_path", "spiffe_id": "spiffe_id"}
WORKLOAD_KEYS = {"owner": "owner"}


class QueryError(HostAgentError):
    """The query is invalid."""


@dataclass(frozen=True)
class Selector:
    """OR of ANDs of (key, pattern)."""

    alternatives: tuple[tuple[tuple[str, str], ...], ...] = ()

    @classmethod
    def parse(cls, flags: Sequence[str], allow_node: bool = True) -> "Selector":
        alts = []
        for flag in flags:
            terms = []
            for part in flag.split(","):
                key, sep, pattern = part.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise QueryError(f"workload selector {part!r}: expected KEY=PATTERN "
                                     "(namespace=prod, label:app=web, cgroup_path=/w/*)")
                if not (key in IDENTITY_KEYS or key in WORKLOAD_KEYS
                        or (key.startswith("label:") and len(key) > 6)
                        or (key == "node" and allow_node)):
                    keys = [*IDENTITY_KEYS, *WORKLOAD_KEYS, "label:KEY"] + \
                        (["node"] if allow_node else [])
                    raise QueryError(f"workload selector {part!r}: unknown key {key!r} "
                                     f"(keys: {', '.join(keys)})")
                terms.append((key, pattern.strip()))
            alts.append(tuple(terms))
        return cls(tuple(alts))

    @property
    def empty(self) -> bool:
        return not self.alternatives

    def sql(self, store: Store, *, wid: str | None = None, key: str | None = None,
            agent: str | None = None) -> tuple[str, list]:
        """A condition on rows whose workload is in column ``wid`` (an identity id) or ``key``
        (a workload key), and agent in ``agent`` (an agents.id)."""
        if self.empty:
            return "1 = 1", []
        ors, params = [], []
        for terms in self.alternatives:
            ands = []
            for k, pattern in terms:
                if k == "node":
                    cond, p = store.glob("node", pattern)
                    ands.append(f"{agent} IN (SELECT id FROM agents WHERE {cond})")
                    params.append(p)
                    continue
                if k in IDENTITY_KEYS:
                    cond, p = store.glob(IDENTITY_KEYS[k], pattern)
                    inner = f"SELECT {{col}} FROM identities WHERE {cond}"
                else:
                    if k.startswith("label:"):
                        expr, p0 = store.json_text("labels", k[6:])
                        cond, p = store.glob(expr, pattern)
                        params.append(p0)
                    else:
                        cond, p = store.glob(WORKLOAD_KEYS[k], pattern)
                    inner = ("SELECT i.{col} FROM identities i JOIN workloads w "
                             f"ON w.key = i.workload WHERE {cond}")
                params.append(p)
                if wid is not None:
                    ands.append(f"{wid} IN ({inner.format(col='wid')})")
                else:
                    ands.append(f"{key} IN ({inner.format(col='workload')})")
            ors.append("(" + " AND ".join(ands) + ")")
        return "(" + " OR ".join(ors) + ")", params


@dataclass(frozen=True)
class Destination:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Destination":
        try:
            return cls(network=ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
        if not text or " " in text or "/" in text:
            raise QueryError(f"destination {text!r}: expected a CIDR, an address or a DNS name "
                             "pattern (*.example.com)")
        return cls(name=text.lower().rstrip("."))

    def sql(self, store: Store, addr: str, name: str) -> tuple[str, list]:
        if self.network is not None:
            net = self.network
            lo = address_key(str(net.network_address))
            hi = address_key(str(net.broadcast_address))
            return f"{addr} BETWEEN ? AND ?", [lo, hi]
        cond, p = store.glob(name, self.name)
        return cond, [p]


def _time_sql(column: str, since: int | None, until: int | None) -> tuple[str, list]:
    conds, params = [], []
    if since is not None:
        conds.append(f"{column} >= ?")
        params.append(since)
    if until is not None:
        conds.append(f"{column} < ?")
        params.append(until)
    return (" AND ".join(conds) or "1 = 1"), params


_VERDICT_SUMS = ("SUM(CASE WHEN e.verdict = 'allow' THEN e.n ELSE 0 END) AS allow_n, "
                 "SUM(CASE WHEN e.verdict = 'audit' THEN e.n ELSE 0 END) AS audit_n, "
                 "SUM(CASE WHEN e.verdict = 'deny' THEN e.n ELSE 0 END) AS deny_n, "
                 "SUM(e.n) AS n, MIN(e.time_us) AS first_us, MAX(e.time_us) AS last_us")


def reached(store: Store, selector: Selector, since: int | None = None,
            until: int | None = None) -> list[dict]:
    """What the selected workloads reached (connections) or asked for (DNS) in the range:
    one row per workload and destination, with counts per verdict."""
    tcond, tparams = _time_sql("e.time_us", since, until)
    scond, sparams = selector.sql(store, wid="e.wid", agent="e.agent_id")
    return store.rows(
        f"SELECT i.workload AS workload, e.kind AS kind, e.dst_name AS dst_name, "
        f"e.dst_ip AS dst_ip, e.dst_port AS dst_port, e.protocol AS protocol, {_VERDICT_SUMS} "
        f"FROM events e JOIN identities i ON i.wid = e.wid "
        f"WHERE e.kind IN ('connection', 'dns') AND {tcond} AND {scond} "
        f"GROUP BY i.workload, e.kind, e.dst_name, e.dst_ip, e.dst_port, e.protocol "
        f"ORDER BY i.workload, MAX(e.time_us) DESC", tparams + sparams)


def who(store: Store, destination: Destination, port: int | None = None,
        since: int | None = None, until: int | None = None,
        selector: Selector = Selector()) -> list[dict]:
    """Which workloads reached (or asked DNS for) the destination in the range."""
    tcond, tparams = _time_sql("e.time_us", since, until)
    dcond, dparams = destination.sql(store, "e.dst_addr", "e.dst_name")
    scond, sparams = selector.sql(store, wid="e.wid", agent="e.agent_id")
    pcond, pparams = ("e.dst_port = ?", [port]) if port else ("1 = 1", [])
    return store.rows(
        f"SELECT i.workload AS workload, e.kind AS kind, e.dst_name AS dst_name, "
        f"e.dst_ip AS dst_ip, e.dst_port AS dst_port, e.protocol AS protocol, "
        f"COUNT(DISTINCT e.agent_id) AS agents, {_VERDICT_SUMS} "
        f"FROM events e JOIN identities i ON i.wid = e.wid "
        f"WHERE e.kind IN ('connection', 'dns') AND {dcond} AND {pcond} AND {tcond} "
        f"AND {scond} "
        f"GROUP BY i.workload, e.kind, e.dst_name, e.dst_ip, e.dst_port, e.protocol "
        f"ORDER BY MAX(e.time_us) DESC", dparams + pparams + tparams + sparams)


_DEPENDENCY_COLUMNS = (
    "d.id AS id, d.workload AS workload, d.dst_name AS dst_name, d.dst_ip AS dst_ip, "
    "d.dst_port AS dst_port, d.protocol AS protocol, d.first_us AS first_us, "
    "d.last_us AS last_us, d.n AS n, d.allow_n AS allow_n, d.audit_n AS audit_n, "
    "d.deny_n AS deny_n, d.reason AS reason, d.policy AS policy, d.rule AS rule, "
    "a.node AS first_node, d.first_seq AS first_seq")


def first_seen(store: Store, selector: Selector = Selector(), since: int | None = None,
               after_id: int | None = None, limit: int | None = None) -> list[dict]:
    """Destinations new to their workload: first seen at or after ``since``, or stored after
    row ``after_id`` (for following), oldest first."""
    scond, sparams = selector.sql(store, key="d.workload")
    conds, params = [scond], list(sparams)
    if since is not None:
        conds.append("d.first_us >= ?")
        params.append(since)
    if after_id is not None:
        conds.append("d.id > ?")
        params.append(after_id)
    order = "d.id" if after_id is not None else "d.first_us, d.id"
    sql = (f"SELECT {_DEPENDENCY_COLUMNS} FROM dependencies d LEFT JOIN agents a "
           f"ON a.id = d.first_agent_id WHERE {' AND '.join(conds)} ORDER BY {order}")
    if limit:
        sql += f" LIMIT {int(limit)}"
    return store.rows(sql, params)


def last_dependency_id(store: Store) -> int:
    return store.scalar("SELECT MAX(id) FROM dependencies") or 0


def follow_first_seen(store: Store, selector: Selector, since: int | None,
                      interval: float, stop) -> Iterator[dict]:
    """First-seen destinations as they are stored: those first seen since ``since`` (if given),
    then each new one, polling every ``interval`` seconds until ``stop`` (an Event) is set.

    New rows are found by id: the one writer numbers them in commit order, so a row with a
    lower id than one already shown can never appear later."""
    mark = last_dependency_id(store)
    if since is not None:
        for row in first_seen(store, selector, since=since):
            if row["id"] <= mark:
                yield row
    while not stop.wait(interval):
        newest = last_dependency_id(store)
        if newest <= mark:
            continue
        for row in first_seen(store, selector, after_id=mark):
            if row["id"] <= newest:
                yield row
        mark = newest


def inventory(store: Store, selector: Selector = Selector(), since: int | None = None
              ) -> list[dict]:
    """Every destination each selected workload reached (first and last seen, counts), the
    outbound dependencies of the workload. ``since``: used at or after it."""
    scond, sparams = selector.sql(store, key="d.workload")
    tcond, tparams = _time_sql("d.last_us", since, None)
    return store.rows(
        f"SELECT {_DEPENDENCY_COLUMNS} FROM dependencies d LEFT JOIN agents a "
        f"ON a.id = d.first_agent_id WHERE {scond} AND {tcond} "
        f"ORDER BY d.workload, d.dst_name, d.dst_ip, d.dst_port, d.protocol",
        sparams + tparams)


def workloads(store: Store, selector: Selector = Selector()) -> list[dict]:
    scond, sparams = selector.sql(store, key="w.key")
    return store.rows(f"SELECT w.key AS workload, w.kind AS kind, w.namespace AS namespace, "
                      f"w.owner AS owner, w.service_account AS service_account, w.unit AS unit, "
                      f"w.cgroup_path AS cgroup_path, w.spiffe_id AS spiffe_id, "
                      f"w.labels AS labels, w.first_us AS first_us, w.last_us AS last_us "
                      f"FROM workloads w WHERE {scond} ORDER BY w.key", sparams)


def coverage(store: Store, selector: Selector = Selector(), since: int | None = None,
             until: int | None = None, top: int = 20) -> dict:
    """How much of the traffic policy and identity account for.

    - unknown-destination rate: among connection decisions with a destination (DNS queries
      redirected to the node resolver, reason ``dns_redirect``, left out), the share whose
      destination has neither a name the workload resolved through the node resolver
      (``destination.name``) nor a policy rule that allowed it (``rule``): connections to
      addresses nothing on record explains (hard-coded IPs, resolvers bypassed, caches).
    - identity coverage: among connection and DNS events, the share whose workload the agent
      identified beyond a bare cgroup: a pod it has Kubernetes metadata for (namespace and
      pod), a container (runtime id), or a systemd unit. The rest are cgroups of no layout the
      agent recognises, and cgroups gone before the agent read the event.

    Events count with their ``count`` (aggregated allowed flows count as many).
    """
    tcond, tparams = _time_sql("e.time_us", since, until)
    scond, sparams = selector.sql(store, wid="e.wid", agent="e.agent_id")
    conn = ("e.kind = 'connection' AND e.dst_ip IS NOT NULL "
            "AND COALESCE(e.reason, '') <> 'dns_redirect'")
    unknown = f"{conn} AND e.dst_name IS NULL AND e.rule IS NULL"
    identified = ("(i.pod IS NOT NULL AND i.namespace IS NOT NULL) "
                  "OR i.container_id IS NOT NULL OR i.unit IS NOT NULL")
    where = f"e.kind IN ('connection', 'dns') AND {tcond} AND {scond}"
    totals = store.rows(
        f"SELECT SUM(CASE WHEN {conn} THEN e.n ELSE 0 END) AS connections, "
        f"SUM(CASE WHEN {conn} AND e.dst_name IS NOT NULL THEN e.n ELSE 0 END) AS named, "
        f"SUM(CASE WHEN {conn} AND e.rule IS NOT NULL THEN e.n ELSE 0 END) AS ruled, "
        f"SUM(CASE WHEN {unknown} THEN e.n ELSE 0 END) AS unknown, "
        f"SUM(e.n) AS events, "
        f"SUM(CASE WHEN {identified} THEN e.n ELSE 0 END) AS identified "
        f"FROM events e LEFT JOIN identities i ON i.wid = e.wid WHERE {where}",
        tparams + sparams)[0]
    totals = {k: int(v or 0) for k, v in totals.items()}
    by_kind = store.rows(
        f"SELECT COALESCE(i.w_kind, '(gone)') AS kind, SUM(e.n) AS events, "
        f"SUM(CASE WHEN {identified} THEN e.n ELSE 0 END) AS identified "
        f"FROM events e LEFT JOIN identities i ON i.wid = e.wid WHERE {where} "
        f"GROUP BY COALESCE(i.w_kind, '(gone)') ORDER BY SUM(e.n) DESC", tparams + sparams)
    worst = store.rows(
        f"SELECT i.workload AS workload, SUM(CASE WHEN {conn} THEN e.n ELSE 0 END) "
        f"AS connections, SUM(CASE WHEN {unknown} THEN e.n ELSE 0 END) AS unknown "
        f"FROM events e JOIN identities i ON i.wid = e.wid WHERE {where} "
        f"GROUP BY i.workload HAVING SUM(CASE WHEN {unknown} THEN e.n ELSE 0 END) > 0 "
        f"ORDER BY SUM(CASE WHEN {unknown} THEN e.n ELSE 0 END) DESC LIMIT {int(top)}",
        tparams + sparams)

    def rate(part: int, whole: int) -> float | None:
        return round(part / whole, 6) if whole else None

    return {
        "since_us": since, "until_us": until,
        "unknown_destination": {"connections": totals["connections"],
                                "named": totals["named"], "ruled": totals["ruled"],
                                "unknown": totals["unknown"],
                                "rate": rate(totals["unknown"], totals["connections"])},
        "identity": {"events": totals["events"], "identified": totals["identified"],
                     "coverage": rate(totals["identified"], totals["events"]),
                     "by_kind": [{"kind": r["kind"], "events": int(r["events"] or 0),
                                  "identified": int(r["identified"] or 0)} for r in by_kind]},
        "workloads_with_unknown": [{"workload": r["workload"],
                                    "connections": int(r["connections"] or 0),
                                    "unknown": int(r["unknown"] or 0),
                                    "rate": rate(int(r["unknown"] or 0),
                                                 int(r["connections"] or 0))} for r in worst],
    }


def event_rows(store: Store, selector: Selector = Selector(), since: int | None = None,
               until: int | None = None, kinds: Sequence[str] = (),
               verdicts: Sequence[str] = (), destination: Destination | None = None,
               limit: int | None = None) -> list[dict]:
    """Matching events' (agent_id, seq, node), in time order."""
    tcond, tparams = _time_sql("e.time_us", since, until)
    scond, sparams = selector.sql(store, wid="e.wid", agent="e.agent_id")
    conds, params = [tcond, scond], tparams + sparams
    if kinds:
        conds.append(f"e.kind IN ({', '.join('?' * len(kinds))})")
        params += list(kinds)
    if verdicts:
        conds.append(f"e.verdict IN ({', '.join('?' * len(verdicts))})")
        params += list(verdicts)
    if destination is not None:
        dcond, dparams = destination.sql(store, "e.dst_addr", "e.dst_name")
        conds.append(dcond)
        params += dparams
    sql = (f"SELECT e.agent_id AS agent_id, e.seq AS seq, a.node AS node FROM events e "
           f"JOIN agents a ON a.id = e.agent_id WHERE {' AND '.join(conds)} "
           f"ORDER BY e.time_us, e.agent_id, e.seq")
    if limit:
        sql += f" LIMIT {int(limit)}"
    return store.rows(sql, params)


def events(store: Store, keys: Sequence[tuple[int, int]], chunk: int = 4096) -> Iterator:
    """The stored hostagent.v1.Event of each (agent_id, seq), in the given order."""
    for i in range(0, len(keys), chunk):
        part = keys[i:i + chunk]
        found = store.load_events(part)
        for k in part:
            if k in found:
                yield found[k]


def agents(store: Store) -> list[dict]:
    rows = store.rows(
        "SELECT a.id AS agent_id, a.node AS node, a.epoch AS epoch, a.first_seq AS first_seq, "
        "a.address AS address, "
        "a.agent_version AS agent_version, a.state AS state, a.error AS error, "
        "a.last_seq AS last_seq, a.events AS events, a.duplicates AS duplicates, "
        "a.last_time_us AS last_time_us, a.connected_us AS connected_us, "
        "a.state_us AS state_us FROM agents a ORDER BY a.node, a.epoch")
    lost = store.rows("SELECT agent_id, source, SUM(count) AS count FROM lost "
                      "GROUP BY agent_id, source")
    for r in rows:
        r["lost"] = {x["source"]: int(x["count"]) for x in lost
                     if x["agent_id"] == r["agent_id"]}
    return rows


def lost(store: Store, node: str | None = None) -> list[dict]:
    cond, params = ("1 = 1", [])
    if node:
        cond, p = store.glob("a.node", node)
        params = [p]
    return store.rows(
        f"SELECT a.node AS node, a.epoch AS epoch, l.first_seq AS first_seq, "
        f"l.last_seq AS last_seq, l.count AS count, l.source AS source, l.seq AS seq, "
        f"l.time_us AS time_us, l.detected_us AS detected_us FROM lost l "
        f"JOIN agents a ON a.id = l.agent_id WHERE {cond} ORDER BY a.node, a.epoch, "
        f"l.first_seq, l.seq", params)
