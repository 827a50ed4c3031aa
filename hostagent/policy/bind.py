"""Which policy governs each cgroup: the binding the kernel looks up by cgroup id.

A policy selects cgroups directly, by one of four kinds of selector (hostagent.policy.model):
a cgroup path glob, a systemd unit, a Kubernetes pod, a container. A selected cgroup governs
its descendants unless one of them is selected itself. Where several policies select the same
cgroup, the strongest kind wins (container > kubernetes > systemdUnit > cgroupPath), then the
most specific selector of that kind. A tie at the top cannot be settled safely, so the cgroup
gets a *conflict* binding: everything denied, and the policies named in status and logs. Ties
between cgroupPath or systemdUnit selectors never get this far: `policy check` rejects them.

Identity-based selectors need to know the workload. A Kubernetes pod whose metadata the agent
does not have yet (the pod watch has not delivered it, or is not synced) gets a *pending*
binding whose verdict is the node's pendingAction, so a new pod is governed from its first
connection rather than judged by nothing. kubelet's pod parents (kubepods.slice and its QoS
slices, or /kubepods/... under cgroupfs) get the pending binding too: a pod cgroup the agent has
not bound yet inherits it through the kernel's ancestor walk.

bind() computes every cgroup; rebind() recomputes some paths and their descendants, which is
what a new cgroup or a pod label change costs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hostagent.bpf.abi import BindingMode
from hostagent.cgroupfs import parent_path
from hostagent.identity.layout import CgroupIdentity, Kind, parse_cgroup_path
from hostagent.policy.model import Mode, Policy, Selector, SelectorKind
from hostagent.policy.selector import compile_cgroup_pattern, name_glob_specificity, specificity


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """What governs one cgroup, before ids are assigned."""

    policy: str | None      # None: no policy, node defaultAction
    mode: BindingMode
    exempt: bool            # from the metadata block
    allow_raw: bool
    pending: bool = False   # identity not known yet: mode (node pendingAction) decides everything
    conflict: bool = False  # policies of equal precedence select it: denied, reported


_UNIT_KINDS = (Kind.SERVICE, Kind.SCOPE, Kind.SLICE)

# precedence of selector kinds, strongest first
_RANK = {SelectorKind.CONTAINER: 3, SelectorKind.KUBERNETES: 2, SelectorKind.SYSTEMD_UNIT: 1,
         SelectorKind.CGROUP_PATH: 0}


@dataclass(frozen=True, slots=True)
class _Direct:
    """What selects one cgroup itself (not through an ancestor)."""

    policy: Policy | None = None
    conflict: tuple[str, ...] = ()   # names of the tied policies
    pending: bool = False
    # kubelet's pod parents: pending only for what the kernel finds through them before the
    # agent binds it; never inherited by cgroups the agent has bound
    parent_only: bool = False

    @property
    def selects(self) -> bool:
        return self.policy is not None or bool(self.conflict) or self.pending


_NOTHING = _Direct()


class Binder:
    """Computes every cgroup's binding and keeps what it needs to recompute a few cheaply.

    identify(path, cgroup_id) gives the workload identity (hostagent.identity.resolver.Workload);
    namespace_labels(name) the labels of a Kubernetes namespace. Without them (plain VMs, unit
    tests) only cgroupPath selectors can match, and systemdUnit ones from the path alone.
    """

    def __init__(self, policies: Sequence[Policy], exempt: Sequence[str],
                 identify: Callable[[str, int], object] | None = None,
                 namespace_labels: Callable[[str], Mapping[str, str] | None] | None = None,
                 pending_mode: BindingMode = BindingMode.ENFORCE) -> None:
        self._paths = [(compile_cgroup_pattern(p.selector.cgroup_path),
                        specificity(p.selector.cgroup_path), p)
                       for p in policies if p.selector.kind is SelectorKind.CGROUP_PATH]
        self._units = [p for p in policies if p.selector.kind is SelectorKind.SYSTEMD_UNIT]
        self._pods = [p for p in policies if p.selector.kind is SelectorKind.KUBERNETES]
        self._containers = [p for p in policies if p.selector.kind is SelectorKind.CONTAINER]
        self._exempt = [compile_cgroup_pattern(e) for e in exempt]
        self._identify = identify
        self._namespace_labels = namespace_labels
        self._pending_mode = pending_mode
        self._ids: dict[str, int] = {}
        self._children: dict[str, set[str]] = {}
        self._resolved: dict[str, tuple[_Direct, bool]] = {}   # path -> (effective, exempt)
        self.conflicts: dict[str, tuple[str, ...]] = {}          # path -> tied policy names

    # -- matching one cgroup ----------------------------------------------------------------------

    def _direct(self, path: str, cgid: int) -> _Direct:
        found: list[tuple[tuple[int, ...], Policy]] = []
        for regex, spec, policy in self._paths:
            if regex.fullmatch(path):
                found.append(((_RANK[SelectorKind.CGROUP_PATH], *spec), policy))
        layout = None
        if self._units or self._pods or self._containers:
            # the resolver caches the layout with the identity: a resync does not re-parse
            workload = self._identify(path, cgid) if self._identify else None
            layout = workload.layout if workload is not None else parse_cgroup_path(path)
            if layout.anchor == path:   # identity selectors pick a workload's own cgroup
                if self._pods and layout.kind is Kind.POD and workload is not None:
                    if workload.pending:
                        return _Direct(pending=True)
                    # without pod metadata (no cluster) a pod selector matches nothing rather
                    # than judging empty labels: podSelector: {} must not mean "every cgroup"
                    if workload.namespace is not None:
                        rank = _RANK[SelectorKind.KUBERNETES]
                        found += [((rank, p.selector.kubernetes.specificity()), p)
                                  for p in self._pods if self._pod_matches(p.selector, workload)]
                # Names inside a user's own systemd manager are the user's to choose: a user
                # unit called sshd.service must not get sshd.service's policy.
                if not layout.delegated:
                    found += self._unit_and_container_matches(layout, workload)
        if not found:
            if self._pods and self._identify and _is_pod_parent(path, layout):
                # New pod cgroups appear here. Until the agent has bound one itself (inotify,
                # within milliseconds) the kernel's ancestor walk lands on this binding: make
                # that the pending action rather than the node default.
                return _Direct(pending=True, parent_only=True)
            return _NOTHING
        best = max(rank for rank, _ in found)
        top = sorted(p.name for rank, p in found if rank == best)
        if len(top) > 1:
            return _Direct(conflict=tuple(top))
        return _Direct(policy=next(p for rank, p in found if rank == best))

    def _unit_and_container_matches(self, layout: CgroupIdentity, workload
                                    ) -> list[tuple[tuple[int, ...], Policy]]:
        found: list[tuple[tuple[int, ...], Policy]] = []
        if self._units and layout.unit and layout.kind in _UNIT_KINDS:
            rank = _RANK[SelectorKind.SYSTEMD_UNIT]
            found += [((rank, *name_glob_specificity(p.selector.systemd_unit)), p)
                      for p in self._units
                      if fnmatch.fnmatchcase(layout.unit, p.selector.systemd_unit)]
        if self._containers and layout.kind is Kind.CONTAINER:
            name = workload.container if workload is not None else None
            rank = _RANK[SelectorKind.CONTAINER]
            found += [((rank, p.selector.container.specificity()), p) for p in self._containers
                      if _container_matches(p.selector, layout.container_id, name)]
        return found

    def _pod_matches(self, selector: Selector, workload) -> bool:
        k = selector.kubernetes
        if k.namespace is not None and workload.namespace != k.namespace:
            return False
        if k.service_account is not None and workload.service_account != k.service_account:
            return False
        if k.pod_selector is not None and not k.pod_selector.matches(dict(workload.labels)):
            return False
        if k.namespace_selector is not None:
            labels = self._namespace_labels(workload.namespace) if self._namespace_labels else None
            if labels is None or not k.namespace_selector.matches(labels):
                return False
        return True

    # -- whole node and increments ----------------------------------------------------------------

    def bind(self, cgroups: Mapping[str, int]) -> dict[int, BindingSpec]:
        """Every cgroup: path -> id in, cgroup id -> binding out."""
        self._ids = dict(cgroups)
        self._children = {}
        for path in cgroups:
            parent = parent_path(path)
            if parent is not None:
                self._children.setdefault(parent, set()).add(path)
        self._resolved = {}
        self.conflicts = {}
        return self._resolve(sorted(cgroups, key=lambda p: (p.count("/"), p)))

    def rebind(self, paths: Iterable[str], cgroups: Mapping[str, int]) -> dict[int, BindingSpec]:
        """Recompute the given paths (new, or whose identity changed) and their descendants."""
        todo: list[str] = []
        stack = [p for p in paths if p in cgroups]
        for path in stack:
            if path not in self._ids:
                self._ids[path] = cgroups[path]
                parent = parent_path(path)
                if parent is not None:
                    self._children.setdefault(parent, set()).add(path)
        seen: set[str] = set()
        while stack:
            path = stack.pop()
            if path in seen:
                continue
            seen.add(path)
            todo.append(path)
            stack.extend(self._children.get(path, ()))
        return self._resolve(sorted(todo, key=lambda p: (p.count("/"), p)))

    def forget(self, paths: Iterable[str]) -> None:
        for path in paths:
            self._ids.pop(path, None)
            self._resolved.pop(path, None)
            self.conflicts.pop(path, None)
            self._children.pop(path, None)
            parent = parent_path(path)
            if parent is not None and parent in self._children:
                self._children[parent].discard(path)

    def _resolve(self, ordered: list[str]) -> dict[int, BindingSpec]:
        """Resolve paths in depth order (parents first) and return their specs."""
        out = {}
        for path in ordered:
            cgid = self._ids[path]
            direct = self._direct(path, cgid)
            exempt = any(r.fullmatch(path) for r in self._exempt)
            parent = parent_path(path)
            inherited = self._resolved.get(parent) if parent is not None else None
            if not direct.selects and inherited is not None and not inherited[0].parent_only:
                direct = inherited[0]
            if inherited is not None:
                exempt = exempt or inherited[1]
            self._resolved[path] = (direct, exempt)
            if direct.conflict:
                self.conflicts[path] = direct.conflict
            else:
                self.conflicts.pop(path, None)
            out[cgid] = self._spec(direct, exempt)
        return out

    def _spec(self, direct: _Direct, exempt: bool) -> BindingSpec:
        if direct.conflict:
            return BindingSpec(None, BindingMode.ENFORCE, exempt, False, conflict=True)
        if direct.pending:
            return BindingSpec(None, self._pending_mode, exempt, False, pending=True)
        policy = direct.policy
        if policy is None:
            return BindingSpec(None, BindingMode.NONE, exempt, False)
        mode = BindingMode.AUDIT if policy.mode is Mode.AUDIT else BindingMode.ENFORCE
        return BindingSpec(policy.name, mode, exempt, policy.allow_raw_sockets)


_POD_PARENT_SLICE = re.compile(r"(?:[a-z0-9_]+-)?kubepods(?:-(?:burstable|besteffort))?\.slice")
_POD_PARENT_DIRS = ("/kubepods", "/kubepods/burstable", "/kubepods/besteffort")


def _is_pod_parent(path: str, layout) -> bool:
    """kubelet's slices (systemd driver) or directories (cgroupfs) that pod cgroups are made in;
    never a name found inside a unit, container or pod (those are the workload's to choose)."""
    if layout is None or layout.anchor != path or layout.delegated:
        return False
    if _POD_PARENT_SLICE.fullmatch(path.rsplit("/", 1)[-1]):
        return True
    return path.endswith(_POD_PARENT_DIRS)


def _container_matches(selector: Selector, container_id: str | None, name: str | None) -> bool:
    c = selector.container
    if c.id is not None and not (container_id and container_id.startswith(c.id)):
        return False
    if c.name is not None and name != c.name:
        return False
    return True
