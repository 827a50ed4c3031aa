"""Process details for events: what the kernel did not say, read from /proc, bounded and cached.

Each connect event carries what the kernel knew at that instant: pid, tid, uid, gid and comm (the
16-byte task name). That is the record; this module only *adds* to it: the executable, the
command line, the parent pid and the start time, read with psutil some microseconds to
milliseconds later. Those are details, never identity (the threat model: identity is never taken
from what a workload controls), and by the time they are read the process may have exited,
exec'd another program or, its pid having been freed, been replaced by an unrelated process.
The cache is built so that none of that can attach one process's details to another's event:

* Reused pids. Every entry records the process's start time (``starttime`` in
  ``/proc/<pid>/stat``, clock ticks since boot, which with the pid identifies a process for the
  life of the system, as psutil's own identity check uses). Every lookup, hit or miss, reads
  that one line again; a different start time means another process owns the pid and the
  entry is thrown away. A miss also re-reads it after psutil's reads, so details gathered while
  the pid changed hands are discarded rather than returned.
* Exec. An exec keeps the pid and start time but replaces the program, and always resets the
  task name to the new program's. The same stat read gives the current name; when it differs
  from the name recorded with the entry, the entry is read again. An exec of a program with the
  same 15-character name is not noticed until the entry's TTL runs out.
* The kernel's comm. If the name the kernel put in the event differs from the process's name
  now (exec between the event and the lookup, or a prctl(PR_SET_NAME)), the details describe
  the process as it is now, not as the event saw it: they are returned with
  ``matches_kernel=False`` so the event can say so. A thread may carry its own name (thread
  pools, runtimes); pass the event's tid and the thread's name is compared instead.
* Gone processes (and zombies, whose exe and command line are gone) give None.

Cost on the hot path (a lookup per event, thousands per second): a hit is one open/read/close
of ``/proc/<pid>/stat`` plus a dict operation, a few microseconds; a miss adds one
psutil.Process and its ``oneshot()`` reads (exe link, cmdline, stat). Memory is bounded by
max_entries and by truncating command lines to MAX_CMDLINE_ARGS arguments and
MAX_CMDLINE_CHARS characters.

psutil reads ``psutil.PROCFS_PATH`` (a process-wide setting this module leaves alone); the
``procfs`` argument only moves this module's own stat reads, for tests with a fixture tree.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import psutil

__all__ = [
    "MAX_CMDLINE_ARGS",
    "MAX_CMDLINE_CHARS",
    "ProcessCache",
    "ProcessInfo",
    "truncate_cmdline",
]

# Bounds on what an event carries of a command line: enough to tell "python3 -m app.worker"
# from "python3 manage.py shell", small enough that 4096 cached entries stay a few MiB and a
# process with a 2 MiB argv costs an event no more than any other.
MAX_CMDLINE_ARGS = 32
MAX_CMDLINE_CHARS = 512

# A /proc/<pid>/stat line is about 300 bytes: 52 numeric fields and a comm of at most 15 raw
# bytes. One read of this size always gets the whole line.
_STAT_READ = 4096
# Field 22 of /proc/<pid>/stat (proc(5)) is starttime; after the ")" ending comm, field 3
# (state) is the first, so starttime is the 20th.
_STARTTIME_AFTER_COMM = 19
# Process states (proc(5)) of a process that has exited: zombie, dead.
_DEAD = frozenset({"Z", "X"})


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What /proc said about a process, as an event attaches it.

    ``exe`` is None where it cannot be read (another user's process without the privilege, a
    kernel thread); ``cmdline`` is truncated to the module's bounds; ``started`` is the process
    start time in seconds since the epoch. ``matches_kernel`` is False when the task name the
    kernel reported for the event differs from the process's (or given thread's) name at lookup
    time: the other fields then describe what the process became, not what made the event.
    True when no name was given to compare.
    """

    pid: int
    exe: str | None
    cmdline: tuple[str, ...]
    ppid: int | None
    started: float | None
    matches_kernel: bool = True


@dataclass(frozen=True, slots=True)
class _Stat:
    """The parts of /proc/<pid>/stat that identify a process at one instant."""

    start_ticks: int   # starttime: with the pid, names one process for the life of the system
    comm: str          # the task name now
    state: str         # "R", "S", "Z", ...


@dataclass(slots=True)
class _Entry:
    info: ProcessInfo
    start_ticks: int
    comm: str           # task name when info was read: a different one now means an exec
    fetched: float      # clock() when info was read


def truncate_cmdline(args: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """At most MAX_CMDLINE_ARGS arguments and MAX_CMDLINE_CHARS characters in all.

    The argument that crosses the character budget is cut at it; later ones are dropped.
    """
    out: list[str] = []
    budget = MAX_CMDLINE_CHARS
    for arg in args[:MAX_CMDLINE_ARGS]:
        if budget <= 0:
            break
        if len(arg) > budget:
            arg = arg[:budget]
        out.append(arg)
        budget -= len(arg)
    return tuple(out)


class ProcessCache:
    """pid -> ProcessInfo, least recently used first out, validated on every lookup.

    ``ttl`` bounds how long details are reused without reading them again (an exec that keeps
    the task name goes unnoticed for at most this long); ``max_entries`` bounds memory. Safe to
    call from several threads (one lock; a miss holds it for its psutil reads, ~100 µs).
    ``clock`` and ``procfs`` exist for tests.
    """

    def __init__(self, max_entries: int = 4096, ttl: float = 30.0, *,
                 procfs: str = "/proc",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(repr(max_entries))
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
            raise ValueError(repr(ttl))
        self._max = max_entries
        self._ttl = float(ttl)
        self._procfs = procfs.rstrip("/") or "/"
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        # hits/misses: lookups answered from the cache or by reading the process; gone: the
        # process no longer existed (or was a zombie); reused: a cached pid turned out to
        # belong to another process; evictions: entries dropped for room; mismatched: lookups
        # whose kernel comm differed from the process's name.
        self._stats = {"hits": 0, "misses": 0, "evictions": 0, "gone": 0, "reused": 0,
                       "mismatched": 0}

    # -- public --------------------------------------------------------------------------

    def lookup(self, pid: int, comm: str | None = None, *, tid: int | None = None
               ) -> ProcessInfo | None:
        """Details of process ``pid``, or None for pid 0, a bad pid or a gone process.

        ``comm`` is the task name from the event (NUL padding is ignored); with ``tid`` (the
        event's thread id) it is compared with that thread's name, otherwise with the
        process's. See ProcessInfo.matches_kernel.
        """
        if pid <= 0:
            return None
        with self._lock:
            now = self._stat(pid)
            entry = self._entries.get(pid)
            if now is None or now.state in _DEAD:
                if entry is not None:
                    del self._entries[pid]
                self._stats["gone"] += 1
                return None
            if entry is not None and not self._still_valid(entry, now):
                del self._entries[pid]
                entry = None
            if entry is not None:
                self._entries.move_to_end(pid)
                self._stats["hits"] += 1
            else:
                self._stats["misses"] += 1
                entry = self._fetch(pid, now)
                if entry is None:
                    self._stats["gone"] += 1
                    return None
                self._store(pid, entry)
            info = entry.info
        if comm is not None and not self._same_name(pid, tid, comm, now.comm):
            with self._lock:
                self._stats["mismatched"] += 1
            return replace(info, matches_kernel=False)
        return info

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def forget(self, pid: int) -> None:
        """Drop a pid (for example on a process-exit event)."""
        with self._lock:
            self._entries.pop(pid, None)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    # -- internals -----------------------------------------------------------------------

    def _still_valid(self, entry: _Entry, now: _Stat) -> bool:
        """Whether the cached entry still describes the process that owns the pid ``now``.

        A different start time is another process (pid reused); a different task name is an
        exec (or rename) since the entry was read; and details older than the TTL are read
        again whatever they say.
        """
        if entry.start_ticks != now.start_ticks:
            self._stats["reused"] += 1
            return False
        if entry.comm != now.comm:
            return False
        return self._clock() - entry.fetched < self._ttl

    def _fetch(self, pid: int, before: _Stat) -> _Entry | None:
        """Read the process's details with one psutil.Process; None if it is not ``before``.

        ``before`` is the stat read that decided to fetch; it is read again afterwards, and if
        the start time changed the details may belong to the pid's next owner and are dropped.
        """
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                ppid = proc.ppid()
                started = proc.create_time()
                exe = _exe(pid)
                cmdline = truncate_cmdline(_readable(proc.cmdline) or ())
        except psutil.NoSuchProcess:  # ZombieProcess included: its exe and cmdline are gone
            return None
        after = self._stat(pid)
        if after is None or after.start_ticks != before.start_ticks or after.state in _DEAD:
            return None
        info = ProcessInfo(pid=pid, exe=exe, cmdline=cmdline, ppid=ppid, started=started)
        # the name the details go with is the one after the reads: an exec during them shows
        # as a changed name at the next lookup, which then reads again
        return _Entry(info=info, start_ticks=after.start_ticks, comm=after.comm,
                      fetched=self._clock())

    def _store(self, pid: int, entry: _Entry) -> None:
        self._entries[pid] = entry
        self._entries.move_to_end(pid)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self._stats["evictions"] += 1

    def _same_name(self, pid: int, tid: int | None, comm: str, process_comm: str) -> bool:
        comm = comm.rstrip("\x00")
        if comm == process_comm:
            return True
        if tid is None or tid == pid:
            return False
        # threads inherit the leader's name but may set their own; only read it when needed
        thread = self._stat(pid, tid)
        return thread is not None and thread.comm == comm

    def _stat(self, pid: int, tid: int | None = None) -> _Stat | None:
        """Parse /proc/<pid>/stat (or a thread's); None if it is gone or unreadable."""
        path = (f"{self._procfs}/{pid}/stat" if tid is None
                else f"{self._procfs}/{pid}/task/{tid}/stat")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.read(fd, _STAT_READ)
        except OSError:   # ESRCH: the process exited between open and read
            return None
        finally:
            os.close(fd)
        return _parse_stat(data)


def _parse_stat(data: bytes) -> _Stat | None:
    """The start time, name and state from a /proc/<pid>/stat line; None if malformed.

    comm may contain spaces and parentheses, so it is everything between the first "(" and
    the *last* ")".
    """
    open_paren = data.find(b"(")
    close_paren = data.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    fields = data[close_paren + 1:].split(None, _STARTTIME_AFTER_COMM + 1)
    if len(fields) <= _STARTTIME_AFTER_COMM:
        return None
    try:
        start = int(fields[_STARTTIME_AFTER_COMM])
    except ValueError:
        return None
    comm = data[open_paren + 1:close_paren].decode("utf-8", "replace")
    return _Stat(start_ticks=start, comm=comm, state=fields[0].decode("ascii", "replace"))


def _exe(pid: int) -> str | None:
    """The exe link itself, or None where it cannot be read. Not psutil's exe(), which guesses
    from the command line when the link is denied (an agent without CAP_SYS_PTRACE): that
    would put the workload's own argv[0], which it chooses, into the evidence."""
    try:
        return os.readlink(f"/proc/{pid}/exe") or None
    except OSError:   # denied, a kernel thread, or gone (the stat re-read catches that)
        return None


def _readable(read: Callable[[], object]) -> object:
    """read(), or None when only that detail is denied (another user's exe link)."""
    try:
        return read()
    except psutil.AccessDenied:
        return None
