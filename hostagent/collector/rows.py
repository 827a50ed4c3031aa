"""One received hostagent.v1.Event -> the columns the store indexes, and who the workload is.

The events themselves are kept as the agent sent them: each received EventBatch, compressed,
is one row of the batches table, and an event is found there by its seq (store.py). The
columns below are what queries look at; the workload's identity columns are in an identities
table, one row per distinct identity, which the events refer to by a 64-bit hash (``wid``)
computed here, so that ingest never waits for the database to number an identity.

The workload key
----------------
Inventories, first-seen destinations and draft policies are per *workload*, and a workload must
outlive the pod instances, containers and cgroups that run it, or every rollout would make
every destination "first seen" again. So each event's workload gets a key, the most stable
name the agent gave it:

- ``pod:<namespace>/<owner>``: a pod the Kubernetes API named. ``owner`` is its controller's
  name, read off the labels controllers set: Deployment (``pod-template-hash``: the pod name
  without ``-<hash>-<suffix>``), StatefulSet (``statefulset.kubernetes.io/pod-name``: without
  ``-<ordinal>``), Job (``job-name``; a CronJob's job without its ``-<schedule time>``),
  DaemonSet (``controller-revision-hash``: without ``-<5 characters>``); else the pod name.
  Containers of the pod share its key (policies select pods).
- ``container:<id, 12 hex digits>``: a container outside Kubernetes, or of a pod whose
  metadata the agent does not have yet (``pending``).
- ``unit:<name>``: a systemd unit (service, scope, slice).
- ``cgroup:<path>``: any other cgroup, by its path below the agent's cgroup root.
- ``unknown``: the cgroup was gone before the agent read the event.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass

from hostagent.events.convert import KIND_NAMES, VERDICT_NAMES
from hostagent.v1 import events_pb2 as pb

# the events table's columns, in this order (store.py creates them)
EVENT_COLUMNS = ("agent_id", "seq", "time_us", "kind", "verdict", "reason", "policy", "rule",
                 "generation", "hook", "n", "wid", "dst_ip", "dst_addr", "dst_port", "protocol",
                 "dst_name")
# the identities table's columns: one row per distinct workload identity
IDENTITY_COLUMNS = ("wid", "workload", "w_kind", "namespace", "pod", "container",
                    "container_id", "service_account", "unit", "cgroup_path", "spiffe_id")
# positions in an event row
COL_TIME, COL_VERDICT, COL_REASON, COL_POLICY, COL_RULE, COL_N = 2, 4, 5, 6, 7, 10
COL_DST_IP, COL_DST_ADDR, COL_DST_PORT, COL_PROTOCOL, COL_DST_NAME = 12, 13, 14, 15, 16

# labels controllers put on every pod they make, which differ between pods of one workload
EPHEMERAL_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "pod-template-generation",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index", "job-name",
    "batch.kubernetes.io/job-name", "controller-uid", "batch.kubernetes.io/controller-uid",
    "job-completion-index", "batch.kubernetes.io/job-completion-index"})

_STS_ORDINAL = re.compile(r"-[0-9]+\Z")
_DS_SUFFIX = re.compile(r"-[a-z0-9]{5}\Z")
_CRONJOB_TIME = re.compile(r"-[0-9]{8,}\Z")
_CACHE_MAX = 65536
_DECISIONS = frozenset({"connection", "dns"})


def pod_owner(pod: str, labels: dict[str, str]) -> str:
    """The name of the controller that made this pod, as far as its standard labels tell."""
    template = labels.get("pod-template-hash")
    if template:
        cut = pod.rfind(f"-{template}-")
        if cut > 0:
            return pod[:cut]
    if labels.get("statefulset.kubernetes.io/pod-name") == pod and _STS_ORDINAL.search(pod):
        return _STS_ORDINAL.sub("", pod)
    job = labels.get("job-name") or labels.get("batch.kubernetes.io/job-name")
    if job:
        return _CRONJOB_TIME.sub("", job)
    if labels.get("controller-revision-hash") and _DS_SUFFIX.search(pod):
        return _DS_SUFFIX.sub("", pod)
    return pod


@dataclass(frozen=True)
class Workload:
    """A workload as the workloads table holds it (one row per key)."""

    key: str
    kind: str                 # pod, container, unit, cgroup, unknown: the key's class
    namespace: str | None
    owner: str | None
    service_account: str | None
    unit: str | None
    cgroup_path: str | None
    spiffe_id: str | None
    labels: str | None        # JSON of the stable labels (EPHEMERAL_LABELS removed); pods only


def workload_of(w: pb.Workload) -> Workload:
    ns, pod = w.namespace, w.pod
    if ns and pod:
        labels = dict(w.labels)
        owner = pod_owner(pod, labels)
        stable = {k: v for k, v in sorted(labels.items()) if k not in EPHEMERAL_LABELS}
        return Workload(f"pod:{ns}/{owner}", "pod", ns, owner, w.service_account or None,
                        None, w.cgroup_path or None, w.spiffe_id or None,
                        json.dumps(stable, separators=(",", ":")))
    if w.container_id:
        return Workload(f"container:{w.container_id[:12]}", "container", ns or None, None,
                        None, w.unit or None, w.cgroup_path or None, w.spiffe_id or None, None)
    if w.unit:
        return Workload(f"unit:{w.unit}", "unit", None, None, None, w.unit,
                        w.cgroup_path or None, w.spiffe_id or None, None)
    if w.cgroup_path:
        return Workload(f"cgroup:{w.cgroup_path}", "cgroup", None, None, None, None,
                        w.cgroup_path, w.spiffe_id or None, None)
    return Workload("unknown", "unknown", None, None, None, None, None, None, None)


def address_key(ip: str) -> bytes | None:
    """16 bytes that sort like the addresses (IPv4 as ::ffff:a.b.c.d), for CIDR range scans."""
    try:
        return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        return None


def identity_id(values: tuple) -> int:
    """A stable signed 64-bit id for an identity row's values (BLAKE2b of their text)."""
    text = "\x1f".join("\x00" if v is None else str(v) for v in values)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big",
                          signed=True)


class RowMaker:
    """Events -> rows, with each cgroup's identity and workload worked out once (a bounded
    cache). ``new_identities`` collects the identity rows first seen since the last take."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[int, Workload]] = {}
        self.new_identities: dict[int, tuple] = {}

    def identity(self, w: pb.Workload) -> tuple[int, Workload]:
        # the rest of the identity (kind, container id, unit, SPIFFE ID) follows from these
        key = (w.cgroup_path, w.namespace, w.pod, w.container, w.service_account)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            wl = workload_of(w)
            values = (wl.key, w.kind or None, w.namespace or None, w.pod or None,
                      w.container or None, w.container_id or None, w.service_account or None,
                      w.unit or None, w.cgroup_path or None, w.spiffe_id or None)
            wid = identity_id(values)
            hit = self._cache[key] = (wid, wl)
            self.new_identities[wid] = (wid, *values)
        return hit

    def take_identities(self) -> list[tuple]:
        out = list(self.new_identities.values())
        self.new_identities.clear()
        return out

    def row(self, agent_id: int, e: pb.Event, received_us: int) -> tuple[tuple, Workload | None]:
        """The events-table row of one event (seq > 0), and its workload if it has one."""
        kind = KIND_NAMES.get(e.kind, "unspecified")
        if e.HasField("time"):
            t = e.time
            time_us = t.seconds * 1_000_000 + t.nanos // 1000
        else:
            time_us = received_us
        wid = wl = None
        if kind in _DECISIONS or e.HasField("workload"):
            # a decision always has a workload: an empty one is a cgroup gone before the agent
            # read the event (key "unknown")
            wid, wl = self.identity(e.workload)
        dst_ip = dst_addr = dst_port = proto = dst_name = None
        if kind == "connection":
            if e.HasField("destination"):
                d = e.destination
                dst_ip, dst_port, proto = d.ip or None, d.port, d.protocol or None
                dst_name = d.name.lower() or None
                dst_addr = address_key(d.ip) if d.ip else None
        elif kind == "dns":
            proto, dst_name = "dns", e.dns.name.lower() or None
        return ((agent_id, e.seq, time_us, kind, VERDICT_NAMES.get(e.verdict), e.reason or None,
                 e.policy or None, e.rule or None, e.generation, e.hook or None, e.count or 1,
                 wid, dst_ip, dst_addr, dst_port, proto, dst_name), wl)
