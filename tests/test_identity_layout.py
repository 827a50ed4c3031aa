"""Cgroup path -> workload identity: real layouts, look-alikes that must not match, and fuzzing.

Every table row states the whole expected identity (fields left out are None or ()), so a field
set where it should not be fails as loudly as one that is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.identity import CgroupIdentity, Driver, Kind, parse_cgroup_path, pod_uid_from_path

# Pod UIDs as the API server generates them (random v4 UUIDs), and as kubelet's systemd driver
# spells them in slice names ("-" is systemd's hierarchy separator, so it becomes "_").
UID = "5f0e2b4a-8c1d-4e7f-9a3b-6d2c1e0f4a5b"
UID_ = UID.replace("-", "_")
UID2 = "0b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4"
UID2_ = UID2.replace("-", "_")
# A static pod's UID: kubelet's hex MD5 of the manifest (also its config.hash annotation).
STATIC = hashlib.md5(b"kube-apiserver").hexdigest()
# Container ids: 64 lower-case hex, as containerd, CRI-O, Docker and podman generate them.
CID = hashlib.sha256(b"nginx").hexdigest()
CID2 = hashlib.sha256(b"pause").hexdigest()

SYSTEMD, CGROUPFS = Driver.SYSTEMD, Driver.CGROUPFS

BURSTABLE_POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
BESTEFFORT_POD = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID2_}.slice"
GUARANTEED_POD = f"/kubepods.slice/kubepods-pod{UID_}.slice"
BURSTABLE_SLICES = ("kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{UID_}.slice")
BESTEFFORT_SLICES = ("kubepods.slice", "kubepods-besteffort.slice", f"kubepods-besteffort-pod{UID2_}.slice")
KIND_POD = (
    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
    f"kubelet-kubepods-besteffort-pod{UID_}.slice"
)
USER_MANAGER = "/user.slice/user-1000.slice/user@1000.service"


def ident(path: str, kind: Kind, anchor: str | None = None, **fields) -> CgroupIdentity:
    """The expected identity: path and kind given, anchor defaulting to path, the rest empty."""
    values = dict(
        driver=None, pod_uid=None, qos=None, container_id=None, runtime=None, unit=None, slices=()
    )
    values.update(fields)
    return CgroupIdentity(path=path, kind=kind, anchor=anchor or path, **values)


def plain(path: str) -> CgroupIdentity:
    return ident(path, Kind.CGROUP)


# (path, expected identity)
KUBERNETES_SYSTEMD = [
    ("/kubepods.slice", ident("/kubepods.slice", Kind.SLICE, driver=SYSTEMD, unit="kubepods.slice",
                              slices=("kubepods.slice",))),
    ("/kubepods.slice/kubepods-burstable.slice",
     ident("/kubepods.slice/kubepods-burstable.slice", Kind.SLICE, driver=SYSTEMD,
           unit="kubepods-burstable.slice", slices=("kubepods.slice", "kubepods-burstable.slice"))),
    (BURSTABLE_POD,
     ident(BURSTABLE_POD, Kind.POD, driver=SYSTEMD, pod_uid=UID, qos="burstable",
           unit=f"kubepods-burstable-pod{UID_}.slice", slices=BURSTABLE_SLICES)),
    # containerd's CRI plugin: cgroupsPath "<pod slice>:cri-containerd:<id>"
    (f"{BURSTABLE_POD}/cri-containerd-{CID}.scope",
     ident(f"{BURSTABLE_POD}/cri-containerd-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD,
           pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd",
           unit=f"cri-containerd-{CID}.scope", slices=BURSTABLE_SLICES)),
    (BESTEFFORT_POD,
     ident(BESTEFFORT_POD, Kind.POD, driver=SYSTEMD, pod_uid=UID2, qos="besteffort",
           unit=f"kubepods-besteffort-pod{UID2_}.slice", slices=BESTEFFORT_SLICES)),
    (f"{BESTEFFORT_POD}/crio-{CID}.scope",
     ident(f"{BESTEFFORT_POD}/crio-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, pod_uid=UID2,
           qos="besteffort", container_id=CID, runtime="cri-o", unit=f"crio-{CID}.scope",
           slices=BESTEFFORT_SLICES)),
    # CRI-O's conmon: the container's id and runtime, told apart by runtime_helper
    (f"{BESTEFFORT_POD}/crio-conmon-{CID}.scope",
     ident(f"{BESTEFFORT_POD}/crio-conmon-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, pod_uid=UID2,
           qos="besteffort", container_id=CID, runtime="cri-o", unit=f"crio-conmon-{CID}.scope",
           slices=BESTEFFORT_SLICES)),
    # crun's systemd sub-cgroup below CRI-O's scope: nested, keeps the container
    (f"{BESTEFFORT_POD}/crio-{CID}.scope/container",
     ident(f"{BESTEFFORT_POD}/crio-{CID}.scope/container", Kind.CONTAINER,
           anchor=f"{BESTEFFORT_POD}/crio-{CID}.scope", driver=SYSTEMD, pod_uid=UID2,
           qos="besteffort", container_id=CID, runtime="cri-o", unit=f"crio-{CID}.scope",
           slices=BESTEFFORT_SLICES)),
    # guaranteed pods sit directly in kubepods.slice
    (GUARANTEED_POD,
     ident(GUARANTEED_POD, Kind.POD, driver=SYSTEMD, pod_uid=UID, qos="guaranteed",
           unit=f"kubepods-pod{UID_}.slice", slices=("kubepods.slice", f"kubepods-pod{UID_}.slice"))),
    # cri-dockerd: dockerd's systemd driver names the scope docker-<id>.scope
    (f"{GUARANTEED_POD}/docker-{CID2}.scope",
     ident(f"{GUARANTEED_POD}/docker-{CID2}.scope", Kind.CONTAINER, driver=SYSTEMD, pod_uid=UID,
           qos="guaranteed", container_id=CID2, runtime="docker", unit=f"docker-{CID2}.scope",
           slices=("kubepods.slice", f"kubepods-pod{UID_}.slice"))),
    # kind: kubelet --cgroup-root=/kubelet prefixes every slice name with "kubelet-"
    (f"{KIND_POD}/cri-containerd-{CID}.scope",
     ident(f"{KIND_POD}/cri-containerd-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, pod_uid=UID,
           qos="besteffort", container_id=CID, runtime="containerd", unit=f"cri-containerd-{CID}.scope",
           slices=("kubelet.slice", "kubelet-kubepods.slice", "kubelet-kubepods-besteffort.slice",
                   f"kubelet-kubepods-besteffort-pod{UID_}.slice"))),
    # static pod: the UID is kubelet's 32-hex MD5, reported as it is
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice",
     ident(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice", Kind.POD,
           driver=SYSTEMD, pod_uid=STATIC, qos="burstable", unit=f"kubepods-burstable-pod{STATIC}.slice",
           slices=("kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{STATIC}.slice"))),
    # agent root inside the layout (at kubepods-burstable.slice): systemd names say it all
    (f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     ident(f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope", Kind.CONTAINER,
           driver=SYSTEMD, pod_uid=UID, qos="burstable", container_id=CID, runtime="containerd",
           unit=f"cri-containerd-{CID}.scope", slices=(f"kubepods-burstable-pod{UID_}.slice",))),
]

KUBERNETES_CGROUPFS = [
    (f"/kubepods/burstable/pod{UID}",
     ident(f"/kubepods/burstable/pod{UID}", Kind.POD, driver=CGROUPFS, pod_uid=UID, qos="burstable")),
    # containerd and cri-dockerd both use the bare id: the runtime is not in the name
    (f"/kubepods/burstable/pod{UID}/{CID}",
     ident(f"/kubepods/burstable/pod{UID}/{CID}", Kind.CONTAINER, driver=CGROUPFS, pod_uid=UID,
           qos="burstable", container_id=CID)),
    (f"/kubepods/besteffort/pod{UID2}/crio-{CID}",
     ident(f"/kubepods/besteffort/pod{UID2}/crio-{CID}", Kind.CONTAINER, driver=CGROUPFS, pod_uid=UID2,
           qos="besteffort", container_id=CID, runtime="cri-o")),
    (f"/kubepods/besteffort/pod{UID2}/crio-conmon-{CID}",
     ident(f"/kubepods/besteffort/pod{UID2}/crio-conmon-{CID}", Kind.CONTAINER, driver=CGROUPFS,
           pod_uid=UID2, qos="besteffort", container_id=CID, runtime="cri-o")),
    (f"/kubepods/pod{UID}",
     ident(f"/kubepods/pod{UID}", Kind.POD, driver=CGROUPFS, pod_uid=UID, qos="guaranteed")),
    (f"/kubepods/pod{UID}/{CID2}",
     ident(f"/kubepods/pod{UID}/{CID2}", Kind.CONTAINER, driver=CGROUPFS, pod_uid=UID, qos="guaranteed",
           container_id=CID2)),
    (f"/kubepods/pod{STATIC}",
     ident(f"/kubepods/pod{STATIC}", Kind.POD, driver=CGROUPFS, pod_uid=STATIC, qos="guaranteed")),
    # kubelet --cgroup-root=/kubelet under cgroupfs: a plain directory above kubepods
    (f"/kubelet/kubepods/burstable/pod{UID}/{CID}",
     ident(f"/kubelet/kubepods/burstable/pod{UID}/{CID}", Kind.CONTAINER, driver=CGROUPFS, pod_uid=UID,
           qos="burstable", container_id=CID)),
    # a process's own sub-cgroup inside a container
    (f"/kubepods/burstable/pod{UID}/{CID}/worker",
     ident(f"/kubepods/burstable/pod{UID}/{CID}/worker", Kind.CONTAINER,
           anchor=f"/kubepods/burstable/pod{UID}/{CID}", driver=CGROUPFS, pod_uid=UID, qos="burstable",
           container_id=CID)),
    # the kubepods and QoS directories are plain cgroups under cgroupfs
    ("/kubepods", plain("/kubepods")),
    ("/kubepods/burstable", plain("/kubepods/burstable")),
]

CONTAINERS = [
    (f"/system.slice/docker-{CID}.scope",
     ident(f"/system.slice/docker-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, container_id=CID,
           runtime="docker", unit=f"docker-{CID}.scope", slices=("system.slice",))),
    (f"/docker/{CID}",
     ident(f"/docker/{CID}", Kind.CONTAINER, driver=CGROUPFS, container_id=CID, runtime="docker")),
    (f"/machine.slice/libpod-{CID}.scope",
     ident(f"/machine.slice/libpod-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, container_id=CID,
           runtime="podman", unit=f"libpod-{CID}.scope", slices=("machine.slice",))),
    (f"/machine.slice/libpod-conmon-{CID}.scope",
     ident(f"/machine.slice/libpod-conmon-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD, container_id=CID,
           runtime="podman", unit=f"libpod-conmon-{CID}.scope", slices=("machine.slice",))),
    # a podman pod's slice
    (f"/machine.slice/machine-libpod_pod_{CID2}.slice/libpod-{CID}.scope",
     ident(f"/machine.slice/machine-libpod_pod_{CID2}.slice/libpod-{CID}.scope", Kind.CONTAINER,
           driver=SYSTEMD, container_id=CID, runtime="podman", unit=f"libpod-{CID}.scope",
           slices=("machine.slice", f"machine-libpod_pod_{CID2}.slice"))),
    # rootless podman, in the user's systemd manager
    (f"{USER_MANAGER}/user.slice/libpod-{CID}.scope",
     ident(f"{USER_MANAGER}/user.slice/libpod-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD,
           container_id=CID, runtime="podman", unit=f"libpod-{CID}.scope",
           slices=("user.slice", "user-1000.slice", "user.slice"))),
    # rootless kubelet without QoS cgroups (KEP-2033): a CRI scope outside any pod slice
    (f"{USER_MANAGER}/user.slice/cri-containerd-{CID}.scope",
     ident(f"{USER_MANAGER}/user.slice/cri-containerd-{CID}.scope", Kind.CONTAINER, driver=SYSTEMD,
           container_id=CID, runtime="containerd", unit=f"cri-containerd-{CID}.scope",
           slices=("user.slice", "user-1000.slice", "user.slice"))),
    # the daemons themselves are services
    ("/system.slice/docker.service",
     ident("/system.slice/docker.service", Kind.SERVICE, driver=SYSTEMD, unit="docker.service",
           slices=("system.slice",))),
    ("/system.slice/containerd.service",
     ident("/system.slice/containerd.service", Kind.SERVICE, driver=SYSTEMD, unit="containerd.service",
           slices=("system.slice",))),
    # nerdctl's scope naming is not recognised: a scope, not a guessed container
    (f"/system.slice/nerdctl-{CID}.scope",
     ident(f"/system.slice/nerdctl-{CID}.scope", Kind.SCOPE, driver=SYSTEMD, unit=f"nerdctl-{CID}.scope",
           slices=("system.slice",))),
]

FSCK = r"system-systemd\x2dfsck.slice"
FSCK_UNIT = r"systemd-fsck@dev-disk-by\x2duuid-4f1c\x2d9a2b.service"

SYSTEMD_UNITS = [
    ("/system.slice", ident("/system.slice", Kind.SLICE, driver=SYSTEMD, unit="system.slice",
                            slices=("system.slice",))),
    ("/system.slice/nginx.service",
     ident("/system.slice/nginx.service", Kind.SERVICE, driver=SYSTEMD, unit="nginx.service",
           slices=("system.slice",))),
    ("/system.slice/nginx.service/worker/1",
     ident("/system.slice/nginx.service/worker/1", Kind.SERVICE, anchor="/system.slice/nginx.service",
           driver=SYSTEMD, unit="nginx.service", slices=("system.slice",))),
    ("/system.slice/system-getty.slice/getty@tty1.service",
     ident("/system.slice/system-getty.slice/getty@tty1.service", Kind.SERVICE, driver=SYSTEMD,
           unit="getty@tty1.service", slices=("system.slice", "system-getty.slice"))),
    # systemd's \xNN escapes are kept as they appear
    (f"/system.slice/{FSCK}/{FSCK_UNIT}",
     ident(f"/system.slice/{FSCK}/{FSCK_UNIT}", Kind.SERVICE, driver=SYSTEMD, unit=FSCK_UNIT,
           slices=("system.slice", FSCK))),
    (r"/machine.slice/machine-qemu\x2d1\x2dvm1.scope",
     ident(r"/machine.slice/machine-qemu\x2d1\x2dvm1.scope", Kind.SCOPE, driver=SYSTEMD,
           unit=r"machine-qemu\x2d1\x2dvm1.scope", slices=("machine.slice",))),
    ("/init.scope", ident("/init.scope", Kind.SCOPE, driver=SYSTEMD, unit="init.scope")),
    ("/user.slice", ident("/user.slice", Kind.SLICE, driver=SYSTEMD, unit="user.slice",
                          slices=("user.slice",))),
    ("/user.slice/user-1000.slice",
     ident("/user.slice/user-1000.slice", Kind.SLICE, driver=SYSTEMD, unit="user-1000.slice",
           slices=("user.slice", "user-1000.slice"))),
    ("/user.slice/user-1000.slice/session-3.scope",
     ident("/user.slice/user-1000.slice/session-3.scope", Kind.SCOPE, driver=SYSTEMD,
           unit="session-3.scope", slices=("user.slice", "user-1000.slice"))),
    (USER_MANAGER,
     ident(USER_MANAGER, Kind.SERVICE, driver=SYSTEMD, unit="user@1000.service",
           slices=("user.slice", "user-1000.slice"))),
    (f"{USER_MANAGER}/init.scope",
     ident(f"{USER_MANAGER}/init.scope", Kind.SCOPE, driver=SYSTEMD, unit="init.scope",
           slices=("user.slice", "user-1000.slice"))),
    (f"{USER_MANAGER}/app.slice/foo.service",
     ident(f"{USER_MANAGER}/app.slice/foo.service", Kind.SERVICE, driver=SYSTEMD, unit="foo.service",
           slices=("user.slice", "user-1000.slice", "app.slice"))),
    (f"{USER_MANAGER}/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1b2c.scope",
     ident(f"{USER_MANAGER}/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1b2c.scope", Kind.SCOPE,
           driver=SYSTEMD, unit="vte-spawn-1b2c.scope",
           slices=("user.slice", "user-1000.slice", "app.slice", "app-org.gnome.Terminal.slice"))),
]

# Names that look like a layout but are not what the software creates: never a guess.
LOOK_ALIKES = [
    ("/", plain("/")),
    ("/workloads/agent-a", plain("/workloads/agent-a")),
    ("/kubepods/burstable/pod1234", plain("/kubepods/burstable/pod1234")),
    # cgroupfs spells the UID with dashes; underscores are the systemd driver's
    (f"/kubepods/burstable/pod{UID_}", plain(f"/kubepods/burstable/pod{UID_}")),
    (f"/kubepods/burstable/pod{UID.upper()}", plain(f"/kubepods/burstable/pod{UID.upper()}")),
    (f"/kubepods/burstable/pod{UID[:-1]}", plain(f"/kubepods/burstable/pod{UID[:-1]}")),
    (f"/kubepods/guaranteed/pod{UID}", plain(f"/kubepods/guaranteed/pod{UID}")),
    (f"/kubepods-x/pod{UID}", plain(f"/kubepods-x/pod{UID}")),
    # a static pod's UID is exactly 32 hex digits
    (f"/kubepods/pod{STATIC[:-1]}", plain(f"/kubepods/pod{STATIC[:-1]}")),
    (f"/kubepods/pod{STATIC}0", plain(f"/kubepods/pod{STATIC}0")),
    (f"/kubepods.slice/kubepods-pod{STATIC}0.slice",
     ident(f"/kubepods.slice/kubepods-pod{STATIC}0.slice", Kind.SLICE, driver=SYSTEMD,
           unit=f"kubepods-pod{STATIC}0.slice", slices=("kubepods.slice", f"kubepods-pod{STATIC}0.slice"))),
    (f"/docker/{CID[:-1]}", plain(f"/docker/{CID[:-1]}")),
    (f"/docker/{CID}0", plain(f"/docker/{CID}0")),
    (f"/docker/{CID.upper()}", plain(f"/docker/{CID.upper()}")),
    (f"/{CID}", plain(f"/{CID}")),
    # a pod slice whose UID is not one: a slice, not a pod
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice",
     ident("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice", Kind.SLICE,
           driver=SYSTEMD, unit="kubepods-burstable-pod1234.slice",
           slices=("kubepods.slice", "kubepods-burstable.slice", "kubepods-burstable-pod1234.slice"))),
    # a dashed UID in a slice name breaks systemd's naming: not a slice of kubepods-burstable
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice",
     ident(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice", Kind.SLICE,
           anchor="/kubepods.slice/kubepods-burstable.slice", driver=SYSTEMD, unit="kubepods-burstable.slice",
           slices=("kubepods.slice", "kubepods-burstable.slice"))),
    # a pod slice in the wrong QoS slice is not a child systemd would make
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{UID_}.slice",
     ident(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{UID_}.slice", Kind.SLICE,
           anchor="/kubepods.slice/kubepods-besteffort.slice", driver=SYSTEMD,
           unit="kubepods-besteffort.slice", slices=("kubepods.slice", "kubepods-besteffort.slice"))),
    (f"/mykubepods.slice/mykubepods-pod{UID_}.slice",
     ident(f"/mykubepods.slice/mykubepods-pod{UID_}.slice", Kind.SLICE, driver=SYSTEMD,
           unit=f"mykubepods-pod{UID_}.slice", slices=("mykubepods.slice", f"mykubepods-pod{UID_}.slice"))),
    # container ids of the wrong length or case: the pod, nested
    (f"{BURSTABLE_POD}/cri-containerd-{CID[:-1]}.scope",
     ident(f"{BURSTABLE_POD}/cri-containerd-{CID[:-1]}.scope", Kind.POD, anchor=BURSTABLE_POD,
           driver=SYSTEMD, pod_uid=UID, qos="burstable", unit=f"kubepods-burstable-pod{UID_}.slice",
           slices=BURSTABLE_SLICES)),
    (f"{BURSTABLE_POD}/cri-containerd-{CID.upper()}.scope",
     ident(f"{BURSTABLE_POD}/cri-containerd-{CID.upper()}.scope", Kind.POD, anchor=BURSTABLE_POD,
           driver=SYSTEMD, pod_uid=UID, qos="burstable", unit=f"kubepods-burstable-pod{UID_}.slice",
           slices=BURSTABLE_SLICES)),
    # kubelet's pods never hold podman scopes
    (f"{BURSTABLE_POD}/libpod-{CID}.scope",
     ident(f"{BURSTABLE_POD}/libpod-{CID}.scope", Kind.POD, anchor=BURSTABLE_POD, driver=SYSTEMD,
           pod_uid=UID, qos="burstable", unit=f"kubepods-burstable-pod{UID_}.slice", slices=BURSTABLE_SLICES)),
    (f"/kubepods/burstable/pod{UID}/not-a-container",
     ident(f"/kubepods/burstable/pod{UID}/not-a-container", Kind.POD, anchor=f"/kubepods/burstable/pod{UID}",
           driver=CGROUPFS, pod_uid=UID, qos="burstable")),
    # a scope named like Docker's with a non-hex id: a scope, not a container
    ("/system.slice/docker-xyz.scope",
     ident("/system.slice/docker-xyz.scope", Kind.SCOPE, driver=SYSTEMD, unit="docker-xyz.scope",
           slices=("system.slice",))),
    (f"/system.slice/docker-{CID}0.scope",
     ident(f"/system.slice/docker-{CID}0.scope", Kind.SCOPE, driver=SYSTEMD, unit=f"docker-{CID}0.scope",
           slices=("system.slice",))),
    # a slice breaking systemd's naming rule below system.slice is not a slice
    ("/system.slice/foo.slice/bar.service",
     ident("/system.slice/foo.slice/bar.service", Kind.SLICE, anchor="/system.slice", driver=SYSTEMD,
           unit="system.slice", slices=("system.slice",))),
    ("/system.slice/not-a-unit/nginx.service",
     ident("/system.slice/not-a-unit/nginx.service", Kind.SLICE, anchor="/system.slice", driver=SYSTEMD,
           unit="system.slice", slices=("system.slice",))),
    # ".." names no cgroup: nothing is read past it
    ("/../kubepods.slice", plain("/../kubepods.slice")),
    (f"/kubepods/../kubepods/pod{UID}", plain(f"/kubepods/../kubepods/pod{UID}")),
]

# Names below a delegated subtree belong to whoever owns it: never another workload's identity.
DELEGATED = [
    (f"/system.slice/nginx.service/kubepods.slice/kubepods-pod{UID_}.slice",
     ident(f"/system.slice/nginx.service/kubepods.slice/kubepods-pod{UID_}.slice", Kind.SERVICE,
           anchor="/system.slice/nginx.service", driver=SYSTEMD, unit="nginx.service",
           slices=("system.slice",))),
    (f"/system.slice/docker-{CID}.scope/docker/{CID2}",
     ident(f"/system.slice/docker-{CID}.scope/docker/{CID2}", Kind.CONTAINER,
           anchor=f"/system.slice/docker-{CID}.scope", driver=SYSTEMD, container_id=CID, runtime="docker",
           unit=f"docker-{CID}.scope", slices=("system.slice",))),
    # a kind node (a Docker container) holding kubelet's slices: the node container
    (f"/system.slice/docker-{CID}.scope{KIND_POD}/cri-containerd-{CID2}.scope",
     ident(f"/system.slice/docker-{CID}.scope{KIND_POD}/cri-containerd-{CID2}.scope", Kind.CONTAINER,
           anchor=f"/system.slice/docker-{CID}.scope", driver=SYSTEMD, container_id=CID, runtime="docker",
           unit=f"docker-{CID}.scope", slices=("system.slice",))),
    (f"/kubepods/pod{UID}/{CID}/kubepods/pod{UID2}",
     ident(f"/kubepods/pod{UID}/{CID}/kubepods/pod{UID2}", Kind.CONTAINER,
           anchor=f"/kubepods/pod{UID}/{CID}", driver=CGROUPFS, pod_uid=UID, qos="guaranteed",
           container_id=CID)),
    # in a user manager, the user's own slice is not a pod, whatever its name
    (f"{USER_MANAGER}/kubepods.slice/kubepods-pod{UID_}.slice",
     ident(f"{USER_MANAGER}/kubepods.slice/kubepods-pod{UID_}.slice", Kind.SLICE, driver=SYSTEMD,
           unit=f"kubepods-pod{UID_}.slice",
           slices=("user.slice", "user-1000.slice", "kubepods.slice", f"kubepods-pod{UID_}.slice"))),
    (f"{USER_MANAGER}/kubepods/pod{UID}",
     ident(f"{USER_MANAGER}/kubepods/pod{UID}", Kind.SERVICE, anchor=USER_MANAGER, driver=SYSTEMD,
           unit="user@1000.service", slices=("user.slice", "user-1000.slice"))),
    # and a user manager inside a user manager is just a service of the user
    (f"{USER_MANAGER}/user@1001.service/app.slice",
     ident(f"{USER_MANAGER}/user@1001.service/app.slice", Kind.SERVICE, anchor=f"{USER_MANAGER}/user@1001.service",
           driver=SYSTEMD, unit="user@1001.service", slices=("user.slice", "user-1000.slice"))),
]

TABLE = KUBERNETES_SYSTEMD + KUBERNETES_CGROUPFS + CONTAINERS + SYSTEMD_UNITS + LOOK_ALIKES + DELEGATED
IDS = [path for path, _ in TABLE]


@pytest.mark.parametrize("path, expected", TABLE, ids=IDS)
def test_layouts(path, expected):
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize("path, expected", TABLE, ids=IDS)
def test_layout_found_below_a_prefix(path, expected):
    """The agent's root may be a test cgroup: the same layout reproduced below it reads the same."""
    if path == "/":
        return
    prefix = "/hostagent-test-123/run-7"
    got = parse_cgroup_path(prefix + path)
    assert got == dataclasses.replace(expected, path=prefix + expected.path, anchor=prefix + expected.anchor)


@pytest.mark.parametrize("path, expected", TABLE, ids=IDS)
def test_identity_is_the_anchors(path, expected):
    """Everything in an identity is read at the anchor; a workload's own sub-cgroup inherits it."""
    assert parse_cgroup_path(expected.anchor) == dataclasses.replace(expected, path=expected.anchor)
    if expected.kind is not Kind.CGROUP:
        child = expected.path + "/payload"
        assert parse_cgroup_path(child) == dataclasses.replace(expected, path=child)


def test_runtime_helper_and_delegated():
    conmon = parse_cgroup_path(f"{BESTEFFORT_POD}/crio-conmon-{CID}.scope")
    assert conmon.runtime_helper and conmon.container_id == CID
    assert parse_cgroup_path(f"/kubepods/besteffort/pod{UID2}/crio-conmon-{CID}").runtime_helper
    assert parse_cgroup_path(f"/machine.slice/libpod-conmon-{CID}.scope").runtime_helper
    assert not parse_cgroup_path(f"{BESTEFFORT_POD}/crio-{CID}.scope").runtime_helper
    assert not parse_cgroup_path(f"{BESTEFFORT_POD}/crio-{CID}.scope/container").runtime_helper
    assert not parse_cgroup_path(f"{BESTEFFORT_POD}").runtime_helper

    assert parse_cgroup_path(f"{USER_MANAGER}/user.slice/libpod-{CID}.scope").delegated
    assert parse_cgroup_path(f"{USER_MANAGER}/app.slice").delegated
    assert not parse_cgroup_path(USER_MANAGER).delegated  # the system manager's unit
    assert not parse_cgroup_path(f"{USER_MANAGER}/kubepods/pod{UID}").delegated  # anchored at it
    assert not parse_cgroup_path(f"/machine.slice/libpod-{CID}.scope").delegated

    nested = parse_cgroup_path("/system.slice/nginx.service/worker")
    assert nested.nested and not parse_cgroup_path("/system.slice/nginx.service").nested


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("", "/"),
        ("/", "/"),
        ("//", "/"),
        ("system.slice/nginx.service", "/system.slice/nginx.service"),
        ("/system.slice//nginx.service/", "/system.slice/nginx.service"),
        ("/system.slice/./nginx.service", "/system.slice/nginx.service"),
    ],
)
def test_path_is_normalised(raw, normalised):
    got = parse_cgroup_path(raw)
    assert got.path == normalised
    assert got == parse_cgroup_path(normalised)


def test_uid_is_reported_dashed_whatever_the_driver():
    systemd = parse_cgroup_path(f"{BURSTABLE_POD}/cri-containerd-{CID}.scope")
    cgroupfs = parse_cgroup_path(f"/kubepods/burstable/pod{UID}/{CID}")
    assert systemd.pod_uid == cgroupfs.pod_uid == UID
    assert pod_uid_from_path(f"/x{GUARANTEED_POD}/crio-{CID}.scope/container") == UID
    assert pod_uid_from_path(f"/system.slice/docker-{CID}.scope") is None
    assert pod_uid_from_path("/") is None


def test_enums_are_strings():
    # They are written to logs and metrics labels as their values.
    assert Kind.POD == "pod" and Driver.SYSTEMD == "systemd"
    assert {k.value for k in Kind} == {"pod", "container", "service", "scope", "slice", "cgroup"}


# --- fuzzing --------------------------------------------------------------------------------

_INTERESTING = [
    "kubepods", "burstable", "besteffort", "guaranteed", "docker", "..", ".", "",
    f"pod{UID}", f"pod{UID_}", f"pod{STATIC}", "pod1234", CID, f"crio-{CID}", f"crio-conmon-{CID}",
    "kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{UID_}.slice",
    f"kubepods-pod{UID_}.slice", f"kubepods-besteffort-pod{UID_}.slice", "kubelet.slice",
    "kubelet-kubepods.slice", f"cri-containerd-{CID}.scope", f"crio-{CID}.scope",
    f"crio-conmon-{CID}.scope", f"docker-{CID}.scope", f"libpod-{CID}.scope", "docker-xyz.scope",
    "system.slice", "user.slice", "user-1000.slice", "user@1000.service", "app.slice",
    "nginx.service", "getty@tty1.service", "session-3.scope", "init.scope", "-.slice", ".slice",
    "a-.slice", "a--b.slice", "@.service", r"x\x2dy.slice",
]
_segment = st.one_of(
    st.sampled_from(_INTERESTING),
    st.text(max_size=20),
    st.text(alphabet="abkuepods-_.@0123456789f/\\", max_size=30),
)
_paths = st.lists(_segment, max_size=8).map(lambda segs: "/" + "/".join(segs))

_DASHED_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@settings(max_examples=2000, deadline=None)
@given(_paths)
def test_parse_never_raises_and_keeps_its_promises(path):
    got = parse_cgroup_path(path)
    assert got.path.startswith("/") and "//" not in got.path
    assert got.path == "/" or not got.path.endswith("/")
    assert got.anchor == got.path or got.path.startswith(got.anchor + "/")
    assert parse_cgroup_path(got.path) == got
    assert parse_cgroup_path(got.anchor) == dataclasses.replace(got, path=got.anchor)
    if got.kind is Kind.CGROUP:
        assert got == CgroupIdentity(got.path, Kind.CGROUP, None, None, None, None, None, None, (), got.path)
        return
    assert got.driver is not None
    assert (got.pod_uid is None) == (got.qos is None)
    if got.pod_uid is not None:
        assert _DASHED_UID.fullmatch(got.pod_uid) or re.fullmatch(r"[0-9a-f]{32}", got.pod_uid)
        assert got.qos in ("guaranteed", "burstable", "besteffort")
        assert not got.delegated
    assert (got.kind is Kind.CONTAINER) == (got.container_id is not None)
    if got.container_id is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", got.container_id)
    else:
        assert got.runtime is None
    assert (got.unit is not None) == (got.driver is Driver.SYSTEMD)
    if got.kind is Kind.SLICE:
        assert got.slices and got.slices[-1] == got.unit
