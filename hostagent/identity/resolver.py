"""Cgroup -> workload: the identity every connection event of that cgroup is tagged with.

Three sources, in order of trust:

1. The cgroup path (layout.parse_cgroup_path): what kubelet, the container runtimes and systemd
   named the cgroup. This is the kernel's side: the cgroup id comes with every event, and only
   root (or the owner of a delegated subtree, which layout accounts for) can name cgroups.
2. The Kubernetes API (kube.PodWatcher), looked up by the pod UID from the path: namespace, pod
   name, service account, labels and the container's name. Never the other way round: a pod
   object cannot claim a cgroup.
3. Configuration: the trust domain, this node's name, and the SPIFFE ID templates.

What gets a SPIFFE ID (see spiffe.py for the forms and the encoding):

* A pod, or a container in a pod, whose pod the watcher knows: the pod's
  ``spiffe://<td>/ns/<ns>/sa/<sa>``, the same for every container of the pod (the service
  account is the pod's identity in Kubernetes). The runtime's monitor process (conmon) that the
  layout reports as its container gets the same.
* A pod or pod container whose pod is not known: none. With a watcher the workload is
  ``pending`` (pod created before the watch delivered it, or the watch is not synced yet)
  until pods_changed() for its UID drops the cached answer and the caller identifies it again. Without a watcher it stays without an
  ID: the container template is for containers *outside* Kubernetes, and giving a pod's
  container a node-local ID would give one workload two IDs depending on configuration.
* A container outside Kubernetes (Docker, podman, a runtime's scope under system.slice): the
  container template.
* A systemd service or scope: the unit template.
* A slice: none. A slice holds no processes of its own (systemd.slice(5); cgroup v2's
  no-internal-processes rule), so a cgroup identified as a slice is an unrecognised directory
  below one, and every such directory of that slice would share the ID: a grouping, not a
  workload. Policies and events still see ``kind="slice"`` and the slice's unit name.
* Anything inside a systemd user manager (layout's ``delegated``: the user's own units,
  slices and rootless containers): the user manager's unit ID (``user@1000.service``), never an
  ID of its own. The user chooses those names, so ``user@1000.service/app.slice/sshd.service``
  must not get the same ID as the system's sshd.service, nor a rootless ``libpod-<id>.scope``
  the ID of a system container with that id.
* A plain cgroup: none.

Nested cgroups (layout's anchor above the path: a container's or service's own subcgroups)
carry the identity of the anchor, with their own path and id; ``{cgroupPath}`` in templates is
the anchor's path, because the names below it are chosen by the workload.

Caching. Identities are cached per path, keyed by the path exactly as given (the cgroup watcher
gives normalised paths; the Workload carries the normalised form), with the cgroup id: the same
path asked about with another id (the cgroup was removed and made again) is identified again.
The cache is bounded at max_entries, least recently used out first, and indexed by pod UID so
pods_changed() costs the number of cgroups of the changed pods.

Static pods: kubelet names their cgroups with the manifest hash, which is not the mirror pod's
API UID; PodWatcher.pod() also finds a mirror pod by its ``kubernetes.io/config.hash``, so the
hash in the path resolves like a UID.

Threads: identify, pods_changed and forget are for one thread (the agent's main loop); the
watcher is read only through its thread-safe lookups. Its on_change callback runs on the
watcher's thread: queue the uids to the main loop and call pods_changed there. Because the
watcher updates its cache before calling on_change, an identity read before the update is
always followed by the pods_changed that replaces it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hostagent.identity.layout import CgroupIdentity, Kind, parse_cgroup_path
from hostagent.identity.spiffe import (
    pod_id,
    render,
    validate_template,
    validate_trust_domain,
)

if TYPE_CHECKING:
    from hostagent.identity.kube import PodWatcher

__all__ = ["IdentityResolver", "Workload"]

KUBERNETES_DISABLED = "disabled"

# layout marks identities found inside a user manager; this finds that manager in the anchor
# (the first user@<uid>.service: layout reads no second one as a manager)
_USER_MANAGER = re.compile(r"/user@[0-9]+\.service(?=/)", re.ASCII)


@dataclass(frozen=True, slots=True)
class Workload:
    """Who a cgroup's connections belong to; fields that do not apply or are unknown are None.

    ``kind`` is the layout's Kind value. Kubernetes fields (namespace, pod, service_account,
    labels, container) are set only when the watcher knows the pod; pod_uid, container_id,
    runtime and unit come from the cgroup path (runtime from the API when the path does not
    say). ``pending`` is True for a pod or pod container while a configured watcher does not
    know its pod.
    """

    cgroup_id: int
    cgroup_path: str
    kind: str
    namespace: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    container: str | None = None
    container_id: str | None = None
    runtime: str | None = None
    service_account: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    unit: str | None = None
    spiffe_id: str | None = None
    pending: bool = False
    # what the path said, for callers that match on it (the Binder); not part of the event
    layout: CgroupIdentity | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def event_keys() -> tuple[str, ...]:
        return tuple(Workload(0, "/", "cgroup").as_event())

    def as_event(self) -> dict[str, Any]:
        """The identity fields of an event's "workload": every key present, None if unknown."""
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "pod": self.pod,
            "pod_uid": self.pod_uid,
            "container": self.container,
            "container_id": self.container_id,
            "runtime": self.runtime,
            "service_account": self.service_account,
            "labels": dict(self.labels),
            "unit": self.unit,
            "spiffe_id": self.spiffe_id,
            "cgroup_path": self.cgroup_path,
            "cgroup_id": self.cgroup_id,
            "pending": self.pending,
        }


@dataclass(slots=True)
class _Entry:
    cgroup_id: int
    layout: CgroupIdentity         # depends on the path only, so kept across re-identification
    workload: Workload | None      # None: to be built again (pod changed, id changed)


class IdentityResolver:
    """Identifies cgroups as workloads and keeps the answers until they change.

    ValueError from the constructor for an invalid trust domain, template, node name or size.
    """

    def __init__(self, *, node_name: str, trust_domain: str, unit_template: str,
                 container_template: str, pods: PodWatcher | None = None,
                 max_entries: int = 65536) -> None:
        if not isinstance(node_name, str) or not node_name:
            raise ValueError(f"{node_name!r}: the node name must be a non-empty string")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"{max_entries!r}: max_entries must be a positive integer")
        self._node = node_name
        self._td = validate_trust_domain(trust_domain)
        self._unit_template = validate_template(unit_template, "unit")
        self._container_template = validate_template(container_template, "container")
        self._pods = pods
        self._max = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_pod: dict[str, set[str]] = {}
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}

    @property
    def node_name(self) -> str:
        return self._node

    @property
    def kubernetes_state(self) -> str:
        """"disabled" without a watcher, else the watcher's state (connecting/synced/error)."""
        return KUBERNETES_DISABLED if self._pods is None else self._pods.state

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def cached(self) -> int:
        return len(self._entries)

    def identify(self, path: str, cgroup_id: int) -> Workload:
        """The workload of the cgroup at ``path`` (relative to the agent's cgroup root)."""
        entry = self._entries.get(path)
        if entry is not None:
            self._entries.move_to_end(path)
            if entry.cgroup_id == cgroup_id and entry.workload is not None:
                self._stats["hits"] += 1
                return entry.workload
            entry.cgroup_id = cgroup_id
        else:
            entry = _Entry(cgroup_id, parse_cgroup_path(path), None)
            self._insert(path, entry)
        self._stats["misses"] += 1
        entry.workload = self._build(entry.layout, cgroup_id)
        return entry.workload

    def pods_changed(self, uids: set[str]) -> set[str]:
        """Forget the identities of the cgroups of these pods; returns their paths.

        The caller identifies those paths again (and rebinds them if the answer changed).
        """
        affected: set[str] = set()
        for uid in uids:
            paths = self._by_pod.get(uid)
            if not paths:
                continue
            for path in paths:
                self._entries[path].workload = None
            affected |= paths
        return affected

    def forget(self, path: str) -> None:
        """The cgroup at ``path`` was removed."""
        entry = self._entries.pop(path, None)
        if entry is not None:
            self._unindex(path, entry)

    # -- internals -----------------------------------------------------------------------

    def _insert(self, path: str, entry: _Entry) -> None:
        self._entries[path] = entry
        uid = entry.layout.pod_uid
        if uid is not None:
            self._by_pod.setdefault(uid, set()).add(path)
        while len(self._entries) > self._max:
            old_path, old = self._entries.popitem(last=False)
            self._unindex(old_path, old)
            self._stats["evictions"] += 1

    def _unindex(self, path: str, entry: _Entry) -> None:
        uid = entry.layout.pod_uid
        if uid is None:
            return
        paths = self._by_pod.get(uid)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._by_pod[uid]

    def _build(self, layout: CgroupIdentity, cgroup_id: int) -> Workload:
        base: dict[str, Any] = dict(
            cgroup_id=cgroup_id, cgroup_path=layout.path, kind=layout.kind.value,
            pod_uid=layout.pod_uid, container_id=layout.container_id, runtime=layout.runtime,
            unit=layout.unit, layout=layout)
        if layout.pod_uid is not None:
            if self._pods is None:
                return Workload(**base)
            pod = self._pods.pod(layout.pod_uid)
            if pod is None:
                return Workload(**base, pending=True)
            cid = layout.container_id
            if cid is not None:
                base["container"] = pod.container_name(cid)
                base["runtime"] = layout.runtime or pod.container_runtime(cid) or None
            return Workload(**base, namespace=pod.namespace, pod=pod.name,
                            service_account=pod.service_account, labels=pod.labels,
                            spiffe_id=pod_id(self._td, pod.namespace, pod.service_account))
        return Workload(**base, spiffe_id=self._spiffe(layout))

    def _spiffe(self, layout: CgroupIdentity) -> str | None:
        """The SPIFFE ID of an identity outside Kubernetes (module docstring: which get one)."""
        if layout.delegated:
            m = _USER_MANAGER.search(layout.anchor)
            if m is None:   # layout and this pattern disagree: claim nothing
                return None
            manager = parse_cgroup_path(layout.anchor[:m.end()])
            if manager.kind is not Kind.SERVICE or manager.delegated:
                return None
            return self._unit_id(manager)
        if layout.kind is Kind.SERVICE or layout.kind is Kind.SCOPE:
            return self._unit_id(layout)
        if layout.kind is Kind.CONTAINER:
            return render(self._container_template, trustDomain=self._td, node=self._node,
                          containerId=layout.container_id, runtime=layout.runtime,
                          cgroupPath=layout.anchor)
        return None

    def _unit_id(self, layout: CgroupIdentity) -> str | None:
        return render(self._unit_template, trustDomain=self._td, node=self._node,
                      unit=layout.unit, slice=layout.slices[-1] if layout.slices else None,
                      cgroupPath=layout.anchor)
