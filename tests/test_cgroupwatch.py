"""CgroupWatcher against the real cgroup v2 filesystem, and against a plain directory tree.

The cgroupfs tests need root and a writable cgroup v2 mount. They skip without root, like the
`privileged` tests; as root, a missing cgroup v2 mount fails the run (tests/conftest.py).
Each test makes its own cgroup below the mount and removes everything it made, even on failure.
The plain-directory tests (tmp_path) cover renames and moves, which cgroup v2 refuses (EPERM),
and run anywhere.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import select
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psutil
import pytest

from hostagent.cgroupfs import CgroupRoot, cgroup2_mount
from hostagent.cgroupwatch import CREATED, REMOVED, CgroupEvent, CgroupWatcher
from hostagent.errors import SetupError
from tests.conftest import privileged_unavailable
from tests.harness import REPO

_seq = itertools.count()
_LIMIT_WARNING = "cannot watch more cgroups"


# -- helpers ------------------------------------------------------------------------------------

def _kill_and_wait(cgroup: str, timeout: float = 5.0) -> None:
    """Empty a cgroup of processes (our own, if a test left any)."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            if not f.read().strip():
                return
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
            f.write("1")
    except FileNotFoundError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(cgroup, "cgroup.events")) as f:
            if "populated 0" in f.read():
                return
        time.sleep(0.01)


def _rmdir(path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            # EBUSY while killed processes are still exiting
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def remove_cgroup_tree(top: str) -> None:
    """rmdir depth-first: a cgroup with children or processes cannot be removed."""
    for dirpath, _, _ in os.walk(top, topdown=False):
        _kill_and_wait(dirpath)
        _rmdir(dirpath)


def drain(w: CgroupWatcher, settle_ms: int = 30) -> list[CgroupEvent]:
    """Read until no inotify event arrives for settle_ms."""
    out: list[CgroupEvent] = []
    while True:
        before = w.stats["inotify_events"]
        out += w.read(timeout_ms=settle_ms)
        if w.stats["inotify_events"] == before:
            return out


def replay(state: dict[str, int], events: list[CgroupEvent], *,
           check_order: bool = True) -> dict[str, int]:
    """Apply events to a view, checking the guarantees documented in hostagent.cgroupwatch."""
    state = dict(state)
    for ev in events:
        if ev.kind == CREATED:
            assert ev.path not in state, f"created twice: {ev}"
            if check_order and ev.path != "/":
                parent = ev.path.rsplit("/", 1)[0] or "/"
                assert parent in state, f"created before its parent: {ev}"
            state[ev.path] = ev.cgroup_id
        else:
            assert ev.kind == REMOVED, ev
            assert state.get(ev.path) == ev.cgroup_id, f"removed with another id: {ev}"
            if check_order:
                below = [p for p in state if p.startswith(ev.path.rstrip("/") + "/")]
                assert not below, f"removed before its children {below}: {ev}"
            del state[ev.path]
    return state


def kernel_watches(w: CgroupWatcher) -> int:
    """Watches the kernel holds for this inotify fd (not what the watcher thinks it holds)."""
    with open(f"/proc/self/fdinfo/{w.fileno()}") as f:
        return sum(line.startswith("inotify wd:") for line in f)


def ino(root: CgroupRoot, rel: str) -> int:
    return os.stat(root.absolute(rel)).st_ino


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def cgroot():
    reason = privileged_unavailable()
    if reason:
        pytest.skip(reason)
    mount = cgroup2_mount()
    path = os.path.join(mount, f"hostagent-cgw-test-{os.getpid()}-{next(_seq)}")
    os.mkdir(path)   # as root on a cgroup2 mount this works; a failure here is a real one
    try:
        yield CgroupRoot(path, mount)
    finally:
        remove_cgroup_tree(path)


@contextmanager
def watching(root: CgroupRoot, **kw):
    w = CgroupWatcher(root, **kw)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def fsroot(tmp_path):
    """A plain directory tree standing in for cgroupfs (renames work there)."""
    path = tmp_path / "root"
    path.mkdir()
    return CgroupRoot(str(path), str(tmp_path))


# -- pure ---------------------------------------------------------------------------------------

def test_rejects_max_watches_below_one(fsroot):
    with pytest.raises(ValueError):
        CgroupWatcher(fsroot, max_watches=0)


def test_start_twice_and_missing_root(fsroot, tmp_path):
    with watching(fsroot) as w:
        w.start()
        with pytest.raises(RuntimeError):
            w.start()
    with watching(CgroupRoot(str(tmp_path / "absent"), str(tmp_path))) as w:
        with pytest.raises(SetupError):
            w.start()


def test_event_is_frozen():
    ev = CgroupEvent(CREATED, "/a", 1)
    with pytest.raises(AttributeError):
        ev.path = "/b"   # type: ignore[misc]


# -- cgroupfs -----------------------------------------------------------------------------------

def test_start_snapshot_equals_walk(cgroot):
    for rel in ("a/b", "a/c", "d"):
        os.makedirs(cgroot.absolute(rel))
    with watching(cgroot) as w:
        snap = w.start()
        assert snap == cgroot.walk()
        assert set(snap) == {"/", "/a", "/a/b", "/a/c", "/d"}
        assert snap["/a/b"] == ino(cgroot, "/a/b")
        assert w.known() == snap
        assert w.stats["watches"] == kernel_watches(w) == 5
        assert drain(w) == []


def test_mkdir_and_rmdir_single(cgroot):
    with watching(cgroot) as w:
        w.start()
        os.mkdir(cgroot.absolute("/x"))
        x = ino(cgroot, "/x")
        assert drain(w) == [CgroupEvent(CREATED, "/x", x)]
        assert w.known()["/x"] == x
        os.rmdir(cgroot.absolute("/x"))
        assert drain(w) == [CgroupEvent(REMOVED, "/x", x)]
        assert w.known() == {"/": cgroot.id}
        # cgroupfs sends no IN_IGNORED for a removed cgroup: the watcher dropped the watch itself
        assert w.stats["watches"] == kernel_watches(w) == 1


def test_nested_mkdir_and_rmdir(cgroot):
    with watching(cgroot) as w:
        w.start()
        os.mkdir(cgroot.absolute("/a"))
        a = ino(cgroot, "/a")
        assert drain(w) == [CgroupEvent(CREATED, "/a", a)]
        os.mkdir(cgroot.absolute("/a/b"))
        b = ino(cgroot, "/a/b")
        assert drain(w) == [CgroupEvent(CREATED, "/a/b", b)]
        os.rmdir(cgroot.absolute("/a/b"))
        os.rmdir(cgroot.absolute("/a"))
        assert drain(w) == [CgroupEvent(REMOVED, "/a/b", b), CgroupEvent(REMOVED, "/a", a)]
        assert w.stats["watches"] == kernel_watches(w) == 1


def test_makedirs_deep_chain_reported_parent_first(cgroot):
    with watching(cgroot) as w:
        snap = w.start()
        for n in range(10):
            # made faster than the watcher can watch each level: levels made before their
            # parent's watch are found by listing, the others come as events; each is
            # reported once, in order
            chain = [f"/m{n}" + "".join(f"/l{i}" for i in range(1, depth))
                     for depth in range(1, 33)]
            os.makedirs(cgroot.absolute(chain[-1]))
            events = drain(w)
            assert [(e.kind, e.path) for e in events] == [(CREATED, p) for p in chain]
            assert [e.cgroup_id for e in events] == [ino(cgroot, p) for p in chain]
            snap = replay(snap, events)
        assert snap == w.known() == cgroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == len(snap)

        remove_cgroup_tree(cgroot.absolute("/m3"))
        events = drain(w)
        assert [e.path for e in events] == ["/m3" + p[len("/m9"):] for p in reversed(chain)]
        assert all(e.kind == REMOVED for e in events)
        snap = replay(snap, events)
        assert snap == w.known() == cgroot.walk()


def test_subtree_removal_children_first_each_once(cgroot):
    tree = ["a/b/c", "a/b/d", "a/e", "f"]
    with watching(cgroot) as w:
        base = w.start()
        for rel in tree:
            os.makedirs(cgroot.absolute(rel))
        created = drain(w)
        state = replay(base, created)
        ids = {e.path: e.cgroup_id for e in created}
        assert set(ids) == {"/a", "/a/b", "/a/b/c", "/a/b/d", "/a/e", "/f"}

        remove_cgroup_tree(cgroot.absolute("/a"))
        removed = drain(w)
        assert sorted(e.path for e in removed) == ["/a", "/a/b", "/a/b/c", "/a/b/d", "/a/e"]
        assert all(e.kind == REMOVED and e.cgroup_id == ids[e.path] for e in removed)
        state = replay(state, removed)    # checks children before parents
        assert state == w.known() == cgroot.walk()
        assert set(state) == {"/", "/f"}
        assert w.stats["watches"] == kernel_watches(w) == 2


def test_interface_files_raise_no_inotify_events(cgroot):
    with watching(cgroot) as w:
        w.start()
        os.mkdir(cgroot.absolute("/x"))
        assert [e.path for e in drain(w)] == ["/x"]
        # the new cgroup came with ~18 interface files, yet only its own IN_CREATE was queued
        assert w.stats["inotify_events"] == 1
        pressure = cgroot.absolute("/x/cgroup.pressure")
        if os.path.exists(pressure):
            # hiding and showing *.pressure files removes/adds kernfs nodes in a watched cgroup
            before = set(os.listdir(cgroot.absolute("/x")))
            with open(pressure, "w") as f:
                f.write("0")
            hidden = set(os.listdir(cgroot.absolute("/x")))
            with open(pressure, "w") as f:
                f.write("1")
            assert hidden < before
            assert set(os.listdir(cgroot.absolute("/x"))) == before
        with open(cgroot.absolute("/x/cgroup.procs")) as f:
            f.read()
        assert drain(w) == []
        assert w.stats["inotify_events"] == 1


def test_rename_on_cgroup2(cgroot):
    os.makedirs(cgroot.absolute("/a/c"))
    with watching(cgroot) as w:
        snap = w.start()
        try:
            os.rename(cgroot.absolute("/a"), cgroot.absolute("/b"))
        except PermissionError:
            # what Linux does: cgroup v2 has no kernfs rename operation (v1 has)
            assert drain(w) == []
            assert w.known() == snap == cgroot.walk()
            return
        events = drain(w)
        assert events == [CgroupEvent(REMOVED, "/a/c", snap["/a/c"]),
                          CgroupEvent(REMOVED, "/a", snap["/a"]),
                          CgroupEvent(CREATED, "/b", snap["/a"]),
                          CgroupEvent(CREATED, "/b/c", snap["/a/c"])]
        assert w.known() == cgroot.walk()


def test_rescan_reports_what_happened_behind_the_watchers_back(cgroot):
    for rel in ("r/r1", "s", "keep"):
        os.makedirs(cgroot.absolute(rel))
    with watching(cgroot) as w:
        snap = w.start()
        # changes whose events are still queued when rescan() walks
        remove_cgroup_tree(cgroot.absolute("/r"))
        os.rmdir(cgroot.absolute("/s"))
        os.mkdir(cgroot.absolute("/s"))          # same name, new cgroup id
        os.makedirs(cgroot.absolute("/p/q"))
        events = w.rescan()
        assert events == [
            CgroupEvent(REMOVED, "/r/r1", snap["/r/r1"]),
            CgroupEvent(REMOVED, "/r", snap["/r"]),
            CgroupEvent(REMOVED, "/s", snap["/s"]),
            CgroupEvent(CREATED, "/p", ino(cgroot, "/p")),
            CgroupEvent(CREATED, "/p/q", ino(cgroot, "/p/q")),
            CgroupEvent(CREATED, "/s", ino(cgroot, "/s")),
        ]
        assert replay(snap, events) == w.known() == cgroot.walk()
        assert w.stats["rescans"] == 1
        # the queued inotify events describe what the rescan already reported
        assert drain(w) == []
        assert w.known() == cgroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == len(w.known())


@contextmanager
def queue_limit(limit: int):
    """fs.inotify.max_queued_events at most ``limit`` for inotify instances made meanwhile (the
    kernel reads it at inotify_init), so a node tuned for huge queues still overflows quickly."""
    sysctl = "/proc/sys/fs/inotify/max_queued_events"
    with open(sysctl) as f:
        before = int(f.read())
    if before > limit:
        with open(sysctl, "w") as f:
            f.write(str(limit))
    try:
        yield min(before, limit)
    finally:
        if before > limit:
            with open(sysctl, "w") as f:
                f.write(str(before))


def test_queue_overflow_rescans(cgroot, caplog):
    for rel in ("k0", "k1", "d0/d00", "d1"):
        os.makedirs(cgroot.absolute(rel))
    with queue_limit(200_000) as queue, watching(cgroot) as w:
        snap = w.start()
        remove_cgroup_tree(cgroot.absolute("/d0"))
        os.rmdir(cgroot.absolute("/d1"))
        os.makedirs(cgroot.absolute("/n0/n00"))
        # two events per pair: this overflows the queue
        for i in range(queue // 2 + 64):
            path = cgroot.absolute(f"/churn{i}")
            os.mkdir(path)
            os.rmdir(path)
        os.mkdir(cgroot.absolute("/late"))     # its event is dropped: the rescan finds it
        with caplog.at_level(logging.WARNING, logger="hostagent.cgroupwatch"):
            events = drain(w)
        assert w.stats["overflows"] == 1
        assert w.stats["rescans"] == 1
        assert any("overflow" in r.getMessage() for r in caplog.records)
        assert replay(snap, events) == w.known() == cgroot.walk()
        assert sorted((e.kind, e.path) for e in events) == [
            (CREATED, "/late"), (CREATED, "/n0"), (CREATED, "/n0/n00"),
            (REMOVED, "/d0"), (REMOVED, "/d0/d00"), (REMOVED, "/d1")]
        assert w.stats["watches"] == kernel_watches(w) == len(w.known())


def test_max_watches_is_respected(cgroot, caplog):
    with caplog.at_level(logging.WARNING, logger="hostagent.cgroupwatch"), \
            watching(cgroot, max_watches=3) as w:
        snap = w.start()
        os.makedirs(cgroot.absolute("/a/b/c/d"))
        events = drain(w)
        # root, /a and /a/b take the 3 watches; /a/b/c is reported and listed, not watched
        assert [e.path for e in events] == ["/a", "/a/b", "/a/b/c", "/a/b/c/d"]
        snap = replay(snap, events)
        assert w.stats["watches"] == kernel_watches(w) == 3
        assert w.stats["watch_limit_hits"] >= 1

        os.mkdir(cgroot.absolute("/a/b/c/e"))
        os.mkdir(cgroot.absolute("/a/b/x"))       # watched parent: seen, but not watched
        events = drain(w)
        assert [e.path for e in events] == ["/a/b/x"]
        snap = replay(snap, events)
        # below an unwatched cgroup only the resync sees changes
        events = w.rescan()
        assert [(e.kind, e.path) for e in events] == [(CREATED, "/a/b/c/e")]
        snap = replay(snap, events)
        assert snap == w.known() == cgroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == 3

        # removals below /a/b/c go unseen; removing /a/b/c reports them all, children first
        os.rmdir(cgroot.absolute("/a/b/c/e"))
        os.rmdir(cgroot.absolute("/a/b/c/d"))
        os.rmdir(cgroot.absolute("/a/b/c"))
        events = drain(w)
        assert sorted(e.path for e in events[:2]) == ["/a/b/c/d", "/a/b/c/e"]
        assert events[2].path == "/a/b/c"
        snap = replay(snap, events)
        assert snap == w.known() == cgroot.walk()

        # a freed watch is reused by the next cgroup
        os.rmdir(cgroot.absolute("/a/b/x"))
        remove_cgroup_tree(cgroot.absolute("/a/b"))
        os.makedirs(cgroot.absolute("/a/y/z"))
        snap = replay(snap, drain(w))
        assert snap == w.known() == cgroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == 3   # /, /a, /a/y

    warnings = [r for r in caplog.records if _LIMIT_WARNING in r.getMessage()]
    assert len(warnings) == 1, "the limit is logged once"
    assert "max_watches=3" in warnings[0].getMessage()


def test_kernel_watch_limit_enospc_does_not_crash(cgroot, caplog):
    with watching(cgroot) as w:
        w.start()
        real = w._inotify.add_watch

        def add_watch(path, mask):
            if "/full" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, mask)

        w._inotify.add_watch = add_watch     # what fs.inotify.max_user_watches does
        with caplog.at_level(logging.WARNING, logger="hostagent.cgroupwatch"):
            os.makedirs(cgroot.absolute("/full/inner"))
            os.mkdir(cgroot.absolute("/ok"))
            events = drain(w)
        assert [e.path for e in events] == ["/full", "/full/inner", "/ok"]
        assert w.stats["watch_limit_hits"] == 2
        assert w.stats["watches"] == kernel_watches(w) == 2   # / and /ok
        warnings = [r for r in caplog.records if _LIMIT_WARNING in r.getMessage()]
        assert len(warnings) == 1 and "max_user_watches" in warnings[0].getMessage()
        remove_cgroup_tree(cgroot.absolute("/full"))
        assert [e.path for e in drain(w)] == ["/full/inner", "/full"]


def test_select_wakes_on_mkdir_quickly(cgroot):
    with watching(cgroot) as w:
        w.start()
        assert select.select([w.fileno()], [], [], 0)[0] == []
        latencies = []
        for i in range(20):
            made = []

            def mkdir(i=i, made=made):
                time.sleep(0.005)
                made.append(time.monotonic())
                os.mkdir(cgroot.absolute(f"/sel{i}"))

            t = threading.Thread(target=mkdir)
            t.start()
            try:
                readable, _, _ = select.select([w.fileno()], [], [], 5.0)
                events = w.read()
                seen = time.monotonic()
            finally:
                t.join()
            assert readable == [w.fileno()]
            assert [e.path for e in events] == [f"/sel{i}"]
            latencies.append(seen - made[0])
        latencies.sort()
        # a sanity bound, not a performance assertion (a few ms is typical)
        assert latencies[-1] < 1.0, latencies
        print(f"mkdir -> event: median {latencies[10] * 1e3:.2f} ms, "
              f"max {latencies[-1] * 1e3:.2f} ms")


def test_churn_returns_to_baseline_without_leaks(cgroot):
    proc = psutil.Process()
    os.mkdir(cgroot.absolute("/steady"))
    with watching(cgroot) as w:
        baseline = w.start()
        watches = w.stats["watches"]
        assert kernel_watches(w) == watches

        def one_round(tag: str, parents: int = 250) -> None:
            state = dict(baseline)
            for i in range(parents):     # 2 cgroups each: 500 per round
                os.makedirs(cgroot.absolute(f"/{tag}p{i}/c"))
                if i % 50 == 49:         # bounded queue: the agent's loop reads as it goes
                    state = replay(state, w.read())
            state = replay(state, drain(w))
            assert len(state) == len(baseline) + 2 * parents
            assert w.stats["watches"] == watches + 2 * parents
            for i in range(parents):
                os.rmdir(cgroot.absolute(f"/{tag}p{i}/c"))
                os.rmdir(cgroot.absolute(f"/{tag}p{i}"))
                if i % 50 == 49:
                    state = replay(state, w.read())
            state = replay(state, drain(w))
            assert state == w.known() == baseline
            assert w.stats["watches"] == kernel_watches(w) == watches

        one_round("warm")
        rss = proc.memory_info().rss
        for n in range(4):              # 2,000 cgroups made and removed
            one_round(f"r{n}")
        grown = proc.memory_info().rss - rss
        assert w.known() == baseline == cgroot.walk()
        assert w.stats["overflows"] == 0
        assert grown < 4 << 20, f"RSS grew by {grown} bytes"


def test_random_churn_replays_to_the_walk(cgroot):
    rng = random.Random(20240611)
    with watching(cgroot) as w:
        state = w.start()
        dirs = ["/"]
        for _ in range(1500):
            leaves = [d for d in dirs if d != "/" and not any(
                x.startswith(d + "/") for x in dirs)]
            if leaves and rng.random() < 0.45:
                victim = rng.choice(leaves)
                os.rmdir(cgroot.absolute(victim))
                dirs.remove(victim)
            else:
                parent = rng.choice([d for d in dirs if d.count("/") < 5])
                child = (parent.rstrip("/") + f"/g{rng.randrange(6)}")
                if child in dirs:
                    continue
                os.mkdir(cgroot.absolute(child))
                dirs.append(child)
            if rng.random() < 0.1:
                state = replay(state, w.read())
        state = replay(state, drain(w))
        assert state == w.known() == cgroot.walk()
        assert set(state) == set(dirs)
        assert w.stats["watches"] == kernel_watches(w) == len(state)


# -- plain directory tree: moves, non-directories, root removal ---------------------------------

def test_rename_reports_removed_then_created_with_same_ids(fsroot):
    os.makedirs(fsroot.absolute("/a/b"))
    with watching(fsroot) as w:
        snap = w.start()
        os.rename(fsroot.absolute("/a"), fsroot.absolute("/z"))
        events = drain(w)
        assert events == [CgroupEvent(REMOVED, "/a/b", snap["/a/b"]),
                          CgroupEvent(REMOVED, "/a", snap["/a"]),
                          CgroupEvent(CREATED, "/z", snap["/a"]),
                          CgroupEvent(CREATED, "/z/b", snap["/a/b"])]
        assert replay(snap, events) == w.known() == fsroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == 3
        os.mkdir(fsroot.absolute("/z/b/new"))
        assert [e.path for e in drain(w)] == ["/z/b/new"]


def test_move_away_and_back_is_silent(fsroot):
    os.mkdir(fsroot.absolute("/a"))
    with watching(fsroot) as w:
        snap = w.start()
        os.rename(fsroot.absolute("/a"), fsroot.absolute("/t"))
        os.rename(fsroot.absolute("/t"), fsroot.absolute("/a"))
        assert drain(w) == []
        assert w.known() == snap
        os.mkdir(fsroot.absolute("/a/n"))
        assert [e.path for e in drain(w)] == ["/a/n"]


def test_moves_into_and_out_of_the_tree(fsroot, tmp_path):
    outside = tmp_path / "outside"
    (outside / "in").mkdir(parents=True)
    with watching(fsroot) as w:
        w.start()
        os.rename(outside, fsroot.absolute("/m"))
        events = drain(w)
        assert [(e.kind, e.path) for e in events] == [(CREATED, "/m"), (CREATED, "/m/in")]
        os.rename(fsroot.absolute("/m"), outside)
        events = drain(w)
        assert [(e.kind, e.path) for e in events] == [(REMOVED, "/m/in"), (REMOVED, "/m")]
        assert w.known() == fsroot.walk()
        assert w.stats["watches"] == kernel_watches(w) == 1


def test_non_directories_are_ignored(fsroot, tmp_path):
    (tmp_path / "target").mkdir()
    with watching(fsroot) as w:
        w.start()
        with open(fsroot.absolute("/file"), "w") as f:
            f.write("x")
        os.symlink(tmp_path / "target", fsroot.absolute("/link"))
        os.unlink(fsroot.absolute("/file"))
        os.unlink(fsroot.absolute("/link"))
        assert drain(w) == []
        assert w.known() == {"/": fsroot.id}


def test_root_removed(fsroot):
    with watching(fsroot) as w:
        root_id = w.start()["/"]
        os.rmdir(fsroot.path)
        assert drain(w) == [CgroupEvent(REMOVED, "/", root_id)]
        assert w.known() == {}
        assert w.stats["watches"] == kernel_watches(w) == 0


def test_directory_vanishing_while_listed_is_skipped(fsroot, monkeypatch):
    os.makedirs(fsroot.absolute("/a/b"))
    real = os.scandir

    def scandir(path):
        if os.path.basename(path) == "a":
            raise FileNotFoundError(errno.ENOENT, "gone", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with watching(fsroot) as w:
        assert set(w.start()) == {"/", "/a"}
        monkeypatch.setattr(os, "scandir", real)
        assert [(e.kind, e.path) for e in w.rescan()] == [(CREATED, "/a/b")]


@pytest.mark.parametrize("namespace", [False, True], ids=["host", "private-cgroupns"])
def test_own_cgroup_id_in_a_private_cgroup_namespace(cgroot, namespace):
    """A pod in its own cgroup namespace with the node's hierarchy mounted in (the DaemonSet)
    reads "0::/" in /proc/self/cgroup; its id is still its real cgroup's, not the root's."""
    inner = os.path.join(cgroot.path, "agent", "pod")
    os.makedirs(inner)
    unshare = ["unshare", "--cgroup"] if namespace else []
    script = ("import sys; from hostagent.cgroupfs import CgroupRoot, own_cgroup_id; "
              "print(open('/proc/self/cgroup').read().strip().splitlines()[-1]); "
              "print(own_cgroup_id(CgroupRoot(sys.argv[1], sys.argv[1])))")
    out = subprocess.run(
        ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", inner,
         *unshare, sys.executable, "-c", script, cgroot.mount],
        capture_output=True, text=True, timeout=30, check=True, cwd=REPO).stdout.split("\n")
    assert out[0] == "0::/" + ("" if namespace else os.path.relpath(inner, cgroot.mount))
    assert int(out[1]) == os.stat(inner).st_ino
