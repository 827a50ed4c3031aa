"""Follow cgroup creation and removal below a cgroup root with inotify.

The agent binds a cgroup's policy in the kernel as soon as the cgroup exists, so it cannot wait
for the periodic full walk (which its caller keeps as a safety net). Every cgroup directory below
the root gets an inotify watch for directories appearing and disappearing in it; a new directory
is watched and *then* listed, so children made before its watch existed (``mkdir -p``) are found
by the listing and children made after it arrive as events. Duplicates are dropped by comparing
with what is already known.

What cgroupfs (kernfs) does under inotify, checked on Linux 6.18 and by tests/test_cgroupwatch.py:

- mkdir/rmdir of a cgroup raise IN_CREATE/IN_DELETE with IN_ISDIR in the parent's watch.
- Interface files raise no events: kernfs fills a new cgroup before it becomes visible, and adds,
  shows or hides files in existing cgroups without fsnotify (checked with ``cgroup.pressure``,
  which hides and shows the *.pressure files; enabling a controller uses the same kernfs calls).
  Non-directory events are dropped anyway.
- rmdir does NOT send IN_DELETE_SELF/IN_IGNORED to the removed cgroup's own watch. The mark stays,
  pinning the inode and counting against fs.inotify.max_user_watches, until inotify_rm_watch().
  So when a parent reports a child's removal, we remove the watches of that whole subtree.
- rename(2) of a cgroup v2 directory fails with EPERM (only cgroup v1 implements kernfs rename).
  IN_MOVED_FROM/IN_MOVED_TO are still handled, as a removal plus a creation with the same id, so
  the watcher is right on any filesystem (tests exercise it on tmpfs).
- A cgroup with children cannot be removed (EBUSY), so the kernel removes subtrees bottom-up.

Ordering guarantees of the events from read() and rescan():

1. "created" is reported parent first: a cgroup is never reported before its parent.
2. "removed" is reported children first, and every known path below a removed one is reported
   once, with the id it was reported with when it was created. This holds even if a child's own
   removal was never seen (for example because its parent had no watch).
3. For one path, events alternate created/removed, starting from the state that start() returned:
   never two "created" without a "removed" between them. A path that was removed and made again
   with a new id reports "removed" (old id), then "created" (new id).
4. After any read(), applying its events to the previous known() gives the new known().

Limits: when max_watches (ours) or fs.inotify.max_user_watches (the kernel's, ENOSPC) is reached,
a directory is still reported and listed, but not watched. The refusal is counted in
stats["watch_limit_hits"] and logged once. Changes below an unwatched directory (children made or
removed later) are not seen until the caller's periodic resync calls rescan(). rescan() walks
everything, reports the difference and tries again to add the missing watches, once watches have
been freed. When the unwatched directory itself is removed (its parent is watched), everything
known below it is reported removed with it. So start() and rescan() always leave known() equal to
a full walk, and below an unwatched directory known() is as old as the last listing.
A directory that vanishes, or cannot be read, while it is being listed is skipped without a
message: cgroups go away at any time, and the next event or rescan tells the truth.

On IN_Q_OVERFLOW the watcher walks the whole tree once, reports the difference from what it knew,
and counts it in stats["overflows"]. Otherwise there is no full walk per event: one stat, one
inotify_add_watch and one scandir per new directory.

Not thread-safe: call it from the agent's main loop.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from inotify_simple import INotify, flags

from hostagent.cgroupfs import CgroupRoot
from hostagent.errors import SetupError

log = logging.getLogger("hostagent.cgroupwatch")

CREATED = "created"
REMOVED = "removed"

# IN_DELETE_SELF only matters for the root; IN_IGNORED and IN_Q_OVERFLOW are always delivered.
_WATCH_MASK = (flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
               | flags.DELETE_SELF | flags.ONLYDIR | flags.DONT_FOLLOW)
_APPEARED = flags.CREATE | flags.MOVED_TO
_VANISHED = flags.DELETE | flags.MOVED_FROM

# inotify_add_watch errors that mean "no room for another watch": ENOSPC is the per-user
# fs.inotify.max_user_watches.
_NO_ROOM = (errno.ENOSPC, errno.ENOMEM)
# ...and the ones that mean the directory is gone since we stat()ed it
_GONE = (errno.ENOENT, errno.ENOTDIR)


@dataclass(frozen=True, slots=True)
class CgroupEvent:
    kind: str        # CREATED or REMOVED
    path: str        # relative to the root, "/a/b"
    cgroup_id: int   # inode number; for REMOVED, the id the path was reported with


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] or "/"


def _depth(rel: str) -> int:
    return 0 if rel == "/" else rel.count("/")


class CgroupWatcher:
    """The cgroups below a root, kept current from inotify events.

    Call start() once for the initial state, then read() whenever fileno() is readable.
    """

    def __init__(self, root: CgroupRoot, *, max_watches: int = 65536) -> None:
        if max_watches < 1:
            raise ValueError(repr(max_watches))
        self._root = root
        self._max_watches = max_watches
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as err:
            # EMFILE: fs.inotify.max_user_instances
            raise SetupError(f"cannot create an inotify instance: {err.strerror}",
                             path=root.path) from err
        self._started = False
        self._known: dict[str, int] = {}            # path -> cgroup id
        self._children: dict[str, set[str]] = {}    # path -> known child paths
        self._wd_path: dict[int, str] = {}          # watch descriptor -> path
        self._path_wd: dict[str, int] = {}
        self._warned_limit = False
        self._inotify_events = 0
        self._events = 0
        self._overflows = 0
        self._rescans = 0
        self._watch_limit_hits = 0

    # -- public ---------------------------------------------------------------------------------

    def start(self) -> dict[str, int]:
        """Watch the tree and return what exists: {path: cgroup id}, the root included.

        Each directory is watched before it is listed, so a cgroup made while this runs is in
        the result, or reported by a later read(), or both (and then read() drops it).
        """
        if self._started:
            raise RuntimeError("CgroupWatcher.start() called twice")
        nodes = self._explore("/", self._max_watches)
        if not nodes:
            raise SetupError("the cgroup root does not exist", path=self._root.path)
        for node in nodes:
            self._record(*node)
        self._started = True
        return self.known()

    def fileno(self) -> int:
        return self._inotify.fileno()

    def read(self, timeout_ms: int = 0) -> list[CgroupEvent]:
        """Turn the pending inotify events into cgroup events, in order.

        Waits up to timeout_ms for the first event (0: do not wait, negative: wait forever).
        """
        out: list[CgroupEvent] = []
        for ev in self._inotify.read(timeout=timeout_ms):
            self._inotify_events += 1
            out += self._handle(ev.wd, ev.mask, ev.name)
        self._events += len(out)
        return out

    def rescan(self) -> list[CgroupEvent]:
        """Walk the whole tree, watch what is not watched, and report the difference.

        Used after an overflow, and meant for the caller's periodic resync.
        """
        out = self._resync()
        self._events += len(out)
        return out

    def known(self) -> dict[str, int]:
        return dict(self._known)

    @property
    def stats(self) -> dict[str, int]:
        return {
            "events": self._events,                    # cgroup events reported
            "inotify_events": self._inotify_events,    # raw events read
            "overflows": self._overflows,
            "rescans": self._rescans,
            "watches": len(self._wd_path),
            "watch_limit_hits": self._watch_limit_hits,
            "cgroups": len(self._known),
        }

    def close(self) -> None:
        """Close the inotify fd; the kernel drops every watch with it. Safe to call twice."""
        self._inotify.close()
        self._wd_path.clear()
        self._path_wd.clear()

    def __enter__(self) -> CgroupWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events ---------------------------------------------------------------------------------

    def _resync(self) -> list[CgroupEvent]:
        self._rescans += 1
        fresh = self._explore("/", self._max_watches)
        old_known, old_wds = self._known, set(self._wd_path)
        fresh_ids = {rel: ino for rel, ino, _ in fresh}
        gone = [rel for rel, ino in old_known.items() if fresh_ids.get(rel) != ino]
        gone.sort(key=lambda rel: (-_depth(rel), rel))
        out = [CgroupEvent(REMOVED, rel, old_known[rel]) for rel in gone]

        self._known, self._children, self._wd_path, self._path_wd = {}, {}, {}, {}
        for node in fresh:
            self._record(*node)
        for wd in old_wds - self._wd_path.keys():
            self._unwatch(wd)
        # fresh is in listing order, parents first
        out += [CgroupEvent(CREATED, rel, ino) for rel, ino, _ in fresh
                if old_known.get(rel) != ino]
        return out

    def _handle(self, wd: int, mask: int, name: str) -> list[CgroupEvent]:
        if mask & flags.Q_OVERFLOW:
            self._overflows += 1
            log.warning("inotify queue overflowed below %s (fs.inotify.max_queued_events); "
                        "rescanning", self._root.path)
            # the events after this one are newer than the walk: they are handled after it
            # and dropped where the walk already saw their effect
            return self._resync()
        if mask & flags.IGNORED:
            # the kernel dropped the watch (ours via rm_watch, or the directory is gone)
            rel = self._wd_path.pop(wd, None)
            if rel is not None and self._path_wd.get(rel) == wd:
                del self._path_wd[rel]
            return []
        parent = self._wd_path.get(wd)
        if parent is None:
            return []   # queued before we dropped that watch
        if mask & flags.DELETE_SELF:
            # other directories report their removal through their parent's watch; the root
            # has no watched parent
            return self._forget("/") if parent == "/" else []
        if not mask & flags.ISDIR:
            return []
        if mask & _APPEARED:
            return self._appeared(_join(parent, name))
        if mask & _VANISHED:
            return self._vanished(_join(parent, name))
        return []

    def _appeared(self, rel: str) -> list[CgroupEvent]:
        try:
            st = os.stat(self._root.absolute(rel), follow_symlinks=False)
        except OSError:
            return []   # gone again; a removal event may follow and is dropped too
        if not stat.S_ISDIR(st.st_mode):
            return []
        old = self._known.get(rel)
        if old == st.st_ino:
            return []   # found by listing its parent already
        out = self._forget(rel) if old is not None else []
        for node in self._explore(rel, self._max_watches - len(self._wd_path)):
            self._record(*node)
            out.append(CgroupEvent(CREATED, node[0], node[1]))
        return out

    def _vanished(self, rel: str) -> list[CgroupEvent]:
        old = self._known.get(rel)
        if old is None:
            return []
        try:
            now = os.stat(self._root.absolute(rel), follow_symlinks=False).st_ino
        except OSError:
            now = None
        if now == old:
            # the event is about an earlier directory of that name that we never reported
            # (made and removed before we listed the parent), or this one was moved away and
            # back: either way, what we know is still true
            return []
        return self._forget(rel)

    # -- state ----------------------------------------------------------------------------------

    def _explore(self, top: str, budget: int) -> list[tuple[str, int, int | None]]:
        """Watch, then list, every directory from top down: [(path, id, wd or None)], parents
        first. At most `budget` watches are added."""
        found: list[tuple[str, int, int | None]] = []
        stack = [top]
        while stack:
            rel = stack.pop()
            path = self._root.absolute(rel)
            try:
                # the id is taken before the watch: if the directory is replaced in between,
                # the watch is on the newer one and the parent's events correct the id
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            wd = None
            if budget <= 0:
                self._refused(None)
            else:
                try:
                    wd = self._inotify.add_watch(path, _WATCH_MASK)
                except OSError as err:
                    if err.errno in _GONE:
                        continue    # removed since the stat: its parent reports nothing new
                    if err.errno in _NO_ROOM:
                        self._refused(err)
                    else:
                        log.debug("cannot watch %s: %s", path, err)
                else:
                    budget -= 1
            found.append((rel, st.st_ino, wd))
            try:
                with os.scandir(path) as it:
                    names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            names.sort(reverse=True)    # popped in name order
            stack.extend(_join(rel, name) for name in names)
        return found

    def _record(self, rel: str, ino: int, wd: int | None) -> None:
        self._known[rel] = ino
        if rel != "/":
            self._children.setdefault(_parent(rel), set()).add(rel)
        if wd is not None:
            stale = self._wd_path.get(wd)
            if stale is not None and stale != rel:
                # same inode under another name: only a rename we have not processed yet
                self._path_wd.pop(stale, None)
            self._wd_path[wd] = rel
            self._path_wd[rel] = wd

    def _forget(self, top: str) -> list[CgroupEvent]:
        """Drop top and everything known below it; report them children first."""
        order, stack = [], [top]
        while stack:
            rel = stack.pop()
            order.append(rel)
            stack.extend(sorted(self._children.get(rel, ())))
        out = []
        for rel in reversed(order):     # reversed pre-order: every path before its parent
            self._children.pop(rel, None)
            wd = self._path_wd.pop(rel, None)
            if wd is not None:
                del self._wd_path[wd]
                self._unwatch(wd)
            out.append(CgroupEvent(REMOVED, rel, self._known.pop(rel)))
        if top != "/":
            self._children.get(_parent(top), set()).discard(top)
        return out

    def _unwatch(self, wd: int) -> None:
        try:
            self._inotify.rm_watch(wd)
        except OSError as err:
            # EINVAL: the kernel dropped it already (IN_IGNORED is on its way)
            if err.errno != errno.EINVAL:
                log.debug("inotify_rm_watch(%d): %s", wd, err)

    def _refused(self, err: OSError | None) -> None:
        self._watch_limit_hits += 1
        if self._warned_limit:
            return
        self._warned_limit = True
        why = (f"the kernel refused ({err.strerror}; see fs.inotify.max_user_watches)" if err
               else f"max_watches={self._max_watches} reached")
        log.warning("cannot watch more cgroups below %s: %s; cgroups below the unwatched ones "
                    "are found only by the periodic resync", self._root.path, why)
