"""cgroup v2 filesystem: where it is mounted, and which cgroups exist below a root.

The mount point is read from mountinfo, never assumed: it is /sys/fs/cgroup on most nodes and
/sys/fs/cgroup/unified on hybrid ones. A cgroup v2 id is its directory's inode number, which is
what the kernel's bpf_get_current_cgroup_id() returns. The proc path is a constructor argument
so tests can feed a fixture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hostagent.errors import SetupError


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_of_type(fstype: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of a filesystem type, in mountinfo order."""
    points = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            pre, sep, post = line.partition(" - ")
            if not sep:
                continue
            if post.split()[0] == fstype:
                points.append(_unescape(pre.split()[4]))
    return points


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str:
    points = mounts_of_type("cgroup2", mountinfo)
    if not points:
        raise SetupError("no cgroup v2 filesystem is mounted (cgroup v1-only nodes are not "
                         "supported; see docs/deploy-vm.md, Troubleshooting)", path=mountinfo)
    # the shortest is the hierarchy's top when it is mounted more than once
    return min(points, key=len)


@dataclass(frozen=True)
class CgroupRoot:
    """The cgroup the agent attaches to, and everything it governs below it."""

    path: str    # absolute directory, e.g. /sys/fs/cgroup/unified
    mount: str   # the cgroup2 mount it lies in

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino

    def relative(self, path: str) -> str:
        rel = os.path.relpath(path, self.path)
        return "/" if rel == "." else "/" + rel

    def absolute(self, rel: str) -> str:
        return os.path.join(self.path, rel.lstrip("/")) if rel != "/" else self.path

    def walk(self) -> dict[str, int]:
        """Every cgroup below the root (itself included): relative path -> cgroup id.

        cgroups come and go while we walk: one that vanishes is simply not reported.
        """
        found: dict[str, int] = {}
        stack = [self.path]
        while stack:
            path = stack.pop()
            try:
                found[self.relative(path)] = os.stat(path).st_ino
                with os.scandir(path) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
            except FileNotFoundError:
                continue
        return found


def resolve_root(configured: str, mountinfo: str = "/proc/self/mountinfo") -> CgroupRoot:
    """The node config's cgroupRoot ("auto" or a directory inside a cgroup2 mount)."""
    mount = cgroup2_mount(mountinfo)
    if configured == "auto":
        return CgroupRoot(mount, mount)
    path = os.path.realpath(configured)
    mounts = mounts_of_type("cgroup2", mountinfo)
    inside = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    if not inside:
        raise SetupError(f"cgroupRoot {configured!r} is not inside a cgroup v2 mount "
                         f"({', '.join(mounts)})")
    if not os.path.isdir(path):
        raise SetupError(f"cgroupRoot {configured!r} does not exist")
    return CgroupRoot(path, max(inside, key=len))


def parent_path(path: str) -> str | None:
    """The parent of a cgroup path relative to the root ("/a/b" -> "/a"); None for the root."""
    if path == "/":
        return None
    return path.rsplit("/", 1)[0] or "/"


def own_cgroup_id(root: CgroupRoot, proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The cgroup v2 id of this process, 0 if unknown.

    /proc/self/cgroup names the cgroup relative to the process's cgroup namespace, and the
    mount we read may show more than that namespace (a container in a private cgroup namespace
    with the node's hierarchy mounted in, as the DaemonSet does: it reads "0::/"). So the path
    is taken as is only when that cgroup holds this process; otherwise the cgroup that does is
    looked for below the mount, among those whose path ends with the one given.
    """
    pid = os.getpid()
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            rel = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), None)
    except OSError:
        return 0
    if rel is None:
        return 0
    path = os.path.join(root.mount, rel.lstrip("/"))
    if _holds(path, pid):
        return os.stat(path).st_ino
    suffix = rel.rstrip("/")
    for dirpath, _dirs, _files in os.walk(root.mount):
        if dirpath.endswith(suffix) and _holds(dirpath, pid):
            try:
                return os.stat(dirpath).st_ino
            except OSError:
                return 0
    return 0


def _holds(path: str, pid: int) -> bool:
    """Is ``pid`` (a thread group id) a member of the cgroup at ``path``?"""
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
            return str(pid) in f.read().split()
    except OSError:
        return False
