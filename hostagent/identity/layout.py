"""What a cgroup v2 path says about the workload in it: pod, container, systemd unit, or nothing.

The agent sees cgroups, while policies talk about pods, containers and units. This module
reads the names that kubelet, the container runtimes and systemd give to the cgroups they create,
and it reads nothing else. It does no I/O and makes no guesses: a name that is not exactly what
one of those programs creates is not recognised, and the cgroup keeps the identity of its nearest
recognised ancestor, or gets Kind.CGROUP with no other fields set.

Names recognised (sources: kubelet pkg/kubelet/cm cgroup_manager_linux.go, pod_container_manager
and qos_container_manager; kubelet pkg/kubelet/config/common.go for static pod UIDs; containerd's
CRI plugin getCgroupsPath; CRI-O internal/config/cgmgr; podman libpod/oci_conmon_linux.go; runc's
systemd driver, which turns ``slice:prefix:id`` into ``<prefix>-<id>.scope``; systemd.unit(5) and
systemd.slice(5)):

systemd (``driver=Driver.SYSTEMD``)
    ``a.slice/a-b.slice`` are slices (Kind.SLICE). systemd names a slice after its whole path,
    so a child slice must be named ``<parent stem>-<one component>.slice``; a directory that
    breaks that rule was not made by systemd and is not a slice. ``*.service`` is Kind.SERVICE
    (templates such as ``getty@tty1.service`` too), ``*.scope`` is Kind.SCOPE. Unit names are
    reported exactly as they appear, systemd's ``\\x2d`` escapes included.

    Container scopes (Kind.CONTAINER, the 64-hex id lower case):
    ``cri-containerd-<id>.scope`` (containerd CRI, runtime "containerd"), ``crio-<id>.scope``
    (runtime "cri-o"), ``docker-<id>.scope`` (Docker and cri-dockerd, runtime "docker"),
    ``libpod-<id>.scope`` (podman, runtime "podman"). The runtimes' monitor processes get a scope
    of their own, ``crio-conmon-<id>.scope`` and ``libpod-conmon-<id>.scope``: they are reported
    as Kind.CONTAINER with the id and runtime of the container they watch (the process belongs to
    that container's lifecycle and sits in its pod), and :attr:`CgroupIdentity.runtime_helper`
    tells them apart from the container itself. Any other scope is a plain Kind.SCOPE, even when
    it looks like a container's: ``docker-xyz.scope`` (not a hex id), or ``nerdctl-<id>.scope``
    (nerdctl's naming is not one this module could confirm from its source).

    Kubernetes: kubelet's slices are named ``[<root>-]kubepods[-<qos>][-pod<uid>].slice``, where
    ``<root>`` comes from kubelet's --cgroup-root (kind uses ``kubelet``) and ``<qos>`` is
    ``burstable`` or ``besteffort`` (guaranteed pods sit directly in the kubepods slice). The
    pod UID has its dashes turned into underscores because ``-`` is systemd's hierarchy
    separator. The kubepods and QoS slices are Kind.SLICE; the pod slice is Kind.POD. Inside a
    pod slice only CRI runtimes' scopes (containerd, CRI-O, Docker) are containers.

cgroupfs (``driver=Driver.CGROUPFS``)
    ``kubepods[/burstable|/besteffort]/pod<uid>`` is a pod (UID with dashes); below it a bare
    64-hex directory is a container of an unknown runtime (containerd and cri-dockerd both use
    the bare id), ``crio-<id>`` a CRI-O container and ``crio-conmon-<id>`` CRI-O's monitor.
    ``docker/<id>`` is a Docker container. The ``kubepods`` and QoS directories themselves are
    plain cgroups (Kind.CGROUP): under cgroupfs nothing but their place names them.

Pod UIDs are validated and reported in their canonical form: lower-case dashed 8-4-4-4-12 for
pods from the API server. Static pods are the exception: kubelet gives them the 32-hex MD5 of the
manifest as UID (no dashes), which is also the mirror pod's ``kubernetes.io/config.hash``
annotation; that value is reported as it is, because a dashed spelling of it would match nothing
anywhere. Container ids are accepted only as 64 lower-case hex digits, the only form containerd,
CRI-O, Docker and podman generate.

Where a layout starts. The path is relative to the agent's cgroup root, which may be the real
root, a test cgroup, or a cgroup inside a layout. The rule is: while nothing is recognised,
segments that start no layout are skipped (a test root such as ``/hostagent-test-123``, or
kubelet's cgroupfs ``--cgroup-root`` directories); the first segment that starts a layout (a
systemd unit or slice, ``kubepods`` or ``docker``) begins it, and from then on every segment must
continue that layout or recognition stops there. Because systemd names are self-describing, a
systemd layout may begin anywhere (a root of ``kubepods-burstable.slice`` still finds pods); a
cgroupfs layout must begin at its ``kubepods`` or ``docker`` directory.

Delegation, and why recognition stops below a unit. Whoever owns a delegated subtree (a
container, a service with Delegate=yes) can create any directory names in it, so names below a
service, scope, container or pod are never read: ``/system.slice/x.service/kubepods.slice/
kubepods-pod<uid>.slice`` is x.service, not a pod. The one exception is a systemd user manager,
``user@<uid>.service``, which runs its own systemd: units, slices and (rootless) containers inside
it are recognised, as the user's own, but Kubernetes names never are, so that a user cannot claim
a pod's identity. :attr:`CgroupIdentity.delegated` marks identities found inside a user manager.
Both need the agent's root at or above the user manager, so that its name is in the path. For
the same reason a kind node (itself a container) shows as that container with its pods nested:
to see those pods, give the agent the node container's cgroup as its root.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["Kind", "Driver", "CgroupIdentity", "parse_cgroup_path", "pod_uid_from_path"]


class Kind(str, enum.Enum):
    """What the cgroup (or its nearest recognised ancestor) is."""

    POD = "pod"
    CONTAINER = "container"
    SERVICE = "service"
    SCOPE = "scope"
    SLICE = "slice"
    CGROUP = "cgroup"  # nothing recognised: only path and anchor are set


class Driver(str, enum.Enum):
    """Whose naming scheme the identity was read from."""

    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    """The identity of one cgroup, read from its path by :func:`parse_cgroup_path`.

    ``path`` is the normalised path asked about; ``anchor`` the cgroup the identity was
    recognised at (``path`` itself, or an ancestor when the cgroup is nested below a recognised
    one; for Kind.CGROUP always ``path``). Fields that do not apply are None (or ``()``):

    * ``pod_uid`` and ``qos`` are set exactly for Kubernetes pods and the containers in them;
      ``qos`` is "guaranteed", "burstable" or "besteffort". See the module docstring for the
      UID's form (dashed, or 32 hex for static pods).
    * ``container_id`` and ``runtime`` are set for Kind.CONTAINER; ``runtime`` is
      "containerd", "cri-o", "docker", "podman", or None where the name does not say (a bare id
      under cgroupfs kubepods).
    * ``unit`` is the systemd unit at ``anchor`` under the systemd driver (a slice for
      Kind.SLICE and for pods, a scope for containers); None under cgroupfs.
    * ``slices`` are the systemd slices from where the layout starts down to ``anchor``,
      outermost first, ``anchor`` included when it is a slice.
    """

    path: str
    kind: Kind
    driver: Driver | None
    pod_uid: str | None
    qos: str | None
    container_id: str | None
    runtime: str | None
    unit: str | None
    slices: tuple[str, ...]
    anchor: str

    @property
    def nested(self) -> bool:
        """The cgroup lies below the one its identity was recognised at."""
        return self.path != self.anchor

    @property
    def runtime_helper(self) -> bool:
        """A runtime's monitor (CRI-O's or podman's conmon), not the container it monitors.

        Reported as its container so it follows the container's pod and lifecycle; callers
        that must count or attach to containers themselves can skip these.
        """
        if self.kind is not Kind.CONTAINER:
            return False
        name = self.anchor.rpartition("/")[2]
        return name.startswith(_HELPER_PREFIXES)

    @property
    def delegated(self) -> bool:
        """Recognised inside a systemd user manager (``user@<uid>.service``).

        Names there are chosen by that user: they identify the user's own units and rootless
        containers, and must not be confused with the system manager's units of the same name.
        """
        return _USER_MANAGER_INSIDE.search(self.anchor) is not None


def pod_uid_from_path(path: str) -> str | None:
    """The Kubernetes pod UID of the cgroup at ``path`` (or of its pod ancestor), if any."""
    return parse_cgroup_path(path).pod_uid


# --- names ----------------------------------------------------------------------------------
#
# All patterns are ASCII-only and used with fullmatch: \d and \w would accept other scripts'
# digits, and $ would accept a trailing newline.

_A = re.ASCII

# systemd.unit(5): letters, digits, ":", "-", "_", ".", "\" (for \xNN escapes); a service may be a
# template instance, "prefix@instance". Cgroup directory names are at most 255 bytes anyway.
_UNIT_CHARS = r"[A-Za-z0-9:_.\\-]"
_SLICE = re.compile(r"(?P<stem>[A-Za-z0-9:_.\\]+(?:-[A-Za-z0-9:_.\\]+)*)\.slice", _A)
_SERVICE = re.compile(rf"{_UNIT_CHARS}+(?:@{_UNIT_CHARS}*)?\.service", _A)
_SCOPE = re.compile(rf"{_UNIT_CHARS}+(?:@{_UNIT_CHARS}*)?\.scope", _A)
_UNIT_MAX = 255

_USER_MANAGER = re.compile(r"user@[0-9]+\.service", _A)
_USER_MANAGER_INSIDE = re.compile(r"/user@[0-9]+\.service/", _A)

_ID = r"(?P<id>[0-9a-f]{64})"

# runc's systemd driver names a container's scope "<prefix>-<id>.scope"; the prefix says who
# asked for it. crio-conmon-/libpod-conmon- must not be confused with crio-/libpod-: the id
# pattern (hex only) keeps "conmon-..." from matching as an id.
_CONTAINER_SCOPE = re.compile(
    rf"(?P<prefix>cri-containerd|crio-conmon|crio|docker|libpod-conmon|libpod)-{_ID}\.scope", _A
)
_SCOPE_RUNTIMES = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
    "docker": "docker",
    "libpod": "podman",
    "libpod-conmon": "podman",
}
# Runtimes kubelet talks to through CRI: the only ones whose scopes a pod slice holds.
_CRI_PREFIXES = frozenset({"cri-containerd", "crio", "crio-conmon", "docker"})
_HELPER_PREFIXES = ("crio-conmon-", "libpod-conmon-")

# kubelet's slice for a pod: [<cgroup-root components>-]kubepods[-<qos>][-pod<uid>] where the UID
# has "_" for "-". The root components cannot contain "-" (systemd escapes it), so the pattern
# is unambiguous.
_QOS_NAMES = "burstable|besteffort"
_K8S_SLICE = re.compile(
    rf"(?:.+-)?kubepods(?:-(?P<qos>{_QOS_NAMES}))?(?:-pod(?P<uid>[^-]+))?", _A
)
_UID_SYSTEMD = re.compile(r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}", _A)
_UID_CGROUPFS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", _A)
_UID_STATIC = re.compile(r"[0-9a-f]{32}", _A)  # static pods: hex MD5, no dashes

_HEX_ID = re.compile(_ID, _A)
_FS_POD = re.compile(r"pod(?P<uid>.+)", _A)
_FS_CONTAINER = re.compile(rf"(?P<prefix>crio-conmon-|crio-)?{_ID}", _A)
_FS_RUNTIMES = {None: None, "crio-": "cri-o", "crio-conmon-": "cri-o"}
_FS_QOS = frozenset({"burstable", "besteffort"})


def _pod_uid(raw: str, separated: re.Pattern[str]) -> str | None:
    """The canonical pod UID, if ``raw`` is one in the driver's spelling (see module docstring)."""
    if separated.fullmatch(raw):
        return raw.replace("_", "-")
    if _UID_STATIC.fullmatch(raw):
        return raw
    return None


# --- the parser -----------------------------------------------------------------------------


class _At(enum.IntEnum):
    """Where the walk is: which names may come next. (IntEnum: hashed in C, it is hot.)"""

    PREFIX = enum.auto()  # nothing recognised yet; unrecognised segments are skipped
    MANAGER = enum.auto()  # directly inside a systemd user manager
    SLICE = enum.auto()  # inside a systemd slice
    POD_SLICE = enum.auto()  # inside kubelet's pod slice
    FS_KUBEPODS = enum.auto()  # cgroupfs: inside kubepods
    FS_QOS = enum.auto()  # cgroupfs: inside kubepods/<qos>
    FS_POD = enum.auto()  # cgroupfs: inside a pod
    FS_DOCKER = enum.auto()  # cgroupfs: inside docker
    LEAF = enum.auto()  # inside a unit or container: nothing below is read


# Places where systemd names are read.
_SYSTEMD_PLACES = frozenset({_At.PREFIX, _At.MANAGER, _At.SLICE, _At.POD_SLICE})


def _segments(path: str) -> list[str]:
    # "." and empty segments are spelling; ".." is kept, and stops recognition: no cgroup is
    # named "..", so a path with one does not name a cgroup and is not identified past it.
    return [s for s in path.split("/") if s and s != "."]


def parse_cgroup_path(path: str) -> CgroupIdentity:
    """Read the identity of the cgroup at ``path`` (relative to the agent's cgroup root).

    Never raises for a string: what is not recognised is Kind.CGROUP. See the module docstring
    for the names recognised and where a layout may start. Cheap enough to call for every
    cgroup on every walk (a few precompiled fullmatches per segment), so there is no cache.
    """
    segments = _segments(path)
    norm = "/" + "/".join(segments)

    at = _At.PREFIX
    parent_stem: str | None = None  # stem of the enclosing slice, for systemd's naming rule
    in_user = False  # inside a user manager: Kubernetes names are not read
    slices: list[str] = []
    pod_uid: str | None = None
    qos: str | None = None
    # The innermost recognised cgroup so far: CgroupIdentity's fields from kind to unit, and its
    # depth. Built into a CgroupIdentity once, at the end. Every slice appended to ``slices`` is
    # recorded at once, so at the end ``slices`` holds exactly those down to the anchor.
    found: tuple | None = None

    def record(
        depth: int,
        kind: Kind,
        driver: Driver,
        *,
        pod_uid: str | None = None,
        qos: str | None = None,
        container_id: str | None = None,
        runtime: str | None = None,
        unit: str | None = None,
    ) -> tuple:
        return (kind, driver, pod_uid, qos, container_id, runtime, unit, depth)

    for depth, seg in enumerate(segments, 1):
        if seg == "..":
            break

        if at in _SYSTEMD_PLACES and len(seg) <= _UNIT_MAX:
            step = _systemd_step(seg, at, parent_stem, in_user)
            if step is not None:
                kind, at, stem, extra = step
                if kind is Kind.SLICE or kind is Kind.POD:
                    slices.append(seg)
                    parent_stem = stem
                if kind is Kind.POD:
                    pod_uid, qos = extra
                    found = record(depth, kind, Driver.SYSTEMD, pod_uid=pod_uid, qos=qos, unit=seg)
                elif kind is Kind.CONTAINER:
                    cid, runtime = extra
                    found = record(depth, kind, Driver.SYSTEMD, pod_uid=pod_uid, qos=qos,
                                   container_id=cid, runtime=runtime, unit=seg)
                else:
                    found = record(depth, kind, Driver.SYSTEMD, unit=seg)
                if at is _At.MANAGER:
                    in_user, parent_stem = True, None
                continue

        if at is _At.PREFIX:
            if seg == "kubepods":
                at = _At.FS_KUBEPODS
            elif seg == "docker":
                at = _At.FS_DOCKER
            # anything else is part of the prefix the layout starts below
            continue

        if at is _At.FS_KUBEPODS and seg in _FS_QOS:
            at, qos = _At.FS_QOS, seg
            continue

        if at is _At.FS_KUBEPODS or at is _At.FS_QOS:
            m = _FS_POD.fullmatch(seg)
            uid = _pod_uid(m["uid"], _UID_CGROUPFS) if m else None
            if uid is None:
                break
            pod_uid, qos = uid, qos or "guaranteed"
            found = record(depth, Kind.POD, Driver.CGROUPFS, pod_uid=pod_uid, qos=qos)
            at = _At.FS_POD
            continue

        if at is _At.FS_POD:
            m = _FS_CONTAINER.fullmatch(seg)
            if m is None:
                break
            found = record(depth, Kind.CONTAINER, Driver.CGROUPFS, pod_uid=pod_uid, qos=qos,
                           container_id=m["id"], runtime=_FS_RUNTIMES[m["prefix"]])
            at = _At.LEAF
            continue

        if at is _At.FS_DOCKER and _HEX_ID.fullmatch(seg):
            found = record(depth, Kind.CONTAINER, Driver.CGROUPFS, container_id=seg, runtime="docker")
            at = _At.LEAF
            continue

        break  # the segment does not continue the layout: nothing below it is read

    if found is None:
        return CgroupIdentity(norm, Kind.CGROUP, None, None, None, None, None, None, (), norm)
    *fields, depth = found
    anchor = "/" + "/".join(segments[:depth])
    return CgroupIdentity(norm, *fields, tuple(slices), anchor)


def _systemd_step(
    seg: str, at: _At, parent_stem: str | None, in_user: bool
) -> tuple[Kind, _At, str | None, tuple] | None:
    """Classify one segment by systemd's naming, or None if it is not a systemd name here.

    Returns (kind, where the walk is next, the slice stem for a slice, kind-specific extras).
    """
    if at is _At.POD_SLICE:
        # kubelet puts only CRI runtimes' container scopes in a pod slice
        m = _CONTAINER_SCOPE.fullmatch(seg)
        if m is None or m["prefix"] not in _CRI_PREFIXES:
            return None
        return Kind.CONTAINER, _At.LEAF, None, (m["id"], _SCOPE_RUNTIMES[m["prefix"]])

    if seg.endswith(".slice"):
        m = _SLICE.fullmatch(seg)
        if m is None:
            return None
        stem = m["stem"]
        if parent_stem is not None:
            # systemd names a child slice "<parent stem>-<component>"
            if not stem.startswith(parent_stem + "-") or "-" in stem[len(parent_stem) + 1 :]:
                return None
        if not in_user:
            k = _K8S_SLICE.fullmatch(stem)
            if k is not None and k["uid"] is not None:
                uid = _pod_uid(k["uid"], _UID_SYSTEMD)
                if uid is not None:
                    return Kind.POD, _At.POD_SLICE, stem, (uid, k["qos"] or "guaranteed")
        return Kind.SLICE, _At.SLICE, stem, ()

    if seg.endswith(".scope"):
        m = _CONTAINER_SCOPE.fullmatch(seg)
        if m is not None:
            return Kind.CONTAINER, _At.LEAF, None, (m["id"], _SCOPE_RUNTIMES[m["prefix"]])
        if _SCOPE.fullmatch(seg):
            return Kind.SCOPE, _At.LEAF, None, ()
        return None

    if seg.endswith(".service") and _SERVICE.fullmatch(seg):
        if not in_user and _USER_MANAGER.fullmatch(seg):
            return Kind.SERVICE, _At.MANAGER, None, ()
        return Kind.SERVICE, _At.LEAF, None, ()
    return None
