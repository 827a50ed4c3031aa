"""The agent's event stream: numbering, the replay buffer, and subscribers' cursors.

Every event the agent emits goes through publish(), which gives it the next seq and keeps it in
a fixed ring of the newest `capacity` events (and in the on-disk spool, if there is one).

A subscriber is only a cursor: it reads from the ring at its own pace, in its own thread. So a
slow or stalled subscriber can never block the main loop, the kernel's ring buffer reader, or
another subscriber; the most it can fall behind is the ring (then the spool). Events it fell
further behind than that are gone for it, and it is told exactly which: a lost record with
seq 0 naming the range, counted in `lost_by_subscribers`.

Nothing leaves before it is in the spool: subscribers and listeners (the event log) see events
up to `sent_seq`, which wake() moves once per tick after the spool's write. So an agent killed
between two ticks never gave out a seq that its successor, numbering on from the spool, gives
to another event.

The main loop is the only writer. It writes the slot, then bumps last_seq; a reader that finds
a slot holding another seq than the one it wants was overtaken while reading, which is the
same "fell behind" case.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from google.protobuf.internal.encoder import _VarintBytes

from hostagent.events.convert import from_proto, to_proto
from hostagent.events.filter import EventFilter
from hostagent.events.spool import Spool
from hostagent.v1 import events_pb2 as pb


class SeqFile:
    """Numbering across restarts without a spool: seqs are reserved ahead, a block at a time.

    The file holds "<published> <reserved>". An agent killed mid-stream may have sent seqs up
    to `reserved` that nobody kept; the next agent starts after `reserved` and says so with a
    lost record for the range, instead of sending numbers twice with different events.
    """

    BLOCK = 1_000_000

    def __init__(self, path: str) -> None:
        self.path = path
        published = reserved = 0
        try:
            with open(path, encoding="ascii") as f:
                published, reserved = (int(x) for x in f.read().split()[:2])
        except (FileNotFoundError, ValueError):
            pass
        self.gap = (published + 1, reserved) if reserved > published else None
        self.last_seq = max(published, reserved)
        self.reserved = self.last_seq

    def reserve(self, seq: int) -> None:
        self.reserved = seq + self.BLOCK - 1
        self.save(seq - 1)

    def save(self, published: int) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{published} {max(self.reserved, published)}\n")
        os.replace(tmp, self.path)


class EventBus:
    def __init__(self, capacity: int, node: str, version: str,
                 spool: Spool | None = None, seqfile: SeqFile | None = None) -> None:
        self.capacity = capacity
        self.node, self.version = node, version
        self.spool = spool
        self.seqfile = seqfile
        # (seq, the event framed as an EventBatch element): bytes only, ~0.5-1 KiB an event
        self._slots: list[tuple[int, bytes] | None] = [None] * capacity
        self._cond = threading.Condition()
        self.last_seq = spool.last_seq if spool else (seqfile.last_seq if seqfile else 0)
        self._first_memory = self.last_seq + 1    # memory holds nothing older than this
        self.lost_by_subscribers = 0              # events subscribers fell too far behind for
        self.subscribers = 0
        self.closed = False
        self.listeners: list[Callable[[dict], None]] = []   # the event log
        self.sent_seq = self.last_seq             # what subscribers and listeners may see
        self._unsent: list[bytes] = []            # for listeners: events since sent_seq

    # -- the writer (main loop) -------------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self.last_seq + 1
        if self.seqfile is not None and seq > self.seqfile.reserved:
            self.seqfile.reserve(seq)
        return seq

    def publish(self, event: dict) -> int:
        """An event in its dictionary form: numbered, encoded, kept, handed to listeners."""
        seq = self.next_seq()
        event["seq"] = seq
        event["node"] = self.node
        event["agent_version"] = self.version
        self._keep(seq, to_proto(event).SerializeToString())
        return seq

    def publish_encoded(self, seq: int, wire: bytes) -> None:
        """An event already serialized (hostagent.events.encode), seq and node included; its
        dictionary form is made only if a listener or a filtering subscriber asks."""
        self._keep(seq, wire)

    def _keep(self, seq: int, wire: bytes) -> None:
        framed = _frame(wire)
        self._slots[seq % self.capacity] = (seq, framed)
        self.last_seq = seq   # after the slot: a reader never sees a seq before its event
        if self.spool is not None:
            self.spool.append(seq, framed)
        if self.listeners:
            self._unsent.append(framed)

    def wake(self) -> None:
        """Once per tick, after publishing: spool to disk, then hand the new events to the
        listeners (in their dictionary form, the same for every kind of event: from_proto of
        what subscribers get) and to waiting subscribers."""
        if self.sent_seq == self.last_seq:
            return
        if self.spool is not None:
            self.spool.flush()
        unsent, self._unsent = self._unsent, []
        for framed in unsent:
            event = from_proto(_parse(framed))
            for listener in self.listeners:
                listener(event)
        with self._cond:
            self.sent_seq = self.last_seq
            self._cond.notify_all()

    def close(self) -> None:
        self.wake()   # the last events out first
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self.spool is not None:
            self.spool.close()
        if self.seqfile is not None:
            self.seqfile.reserved = self.last_seq   # a clean stop leaves no gap
            self.seqfile.save(self.last_seq)

    @property
    def oldest_seq(self) -> int:
        """The oldest seq a subscriber can still get (memory or spool)."""
        oldest = max(self._first_memory, self.last_seq - self.capacity + 1, 1)
        if self.spool is not None:
            oldest = min(oldest, self.spool.first_seq)
        return oldest

    # -- readers (gRPC threads) -------------------------------------------------------------------

    @contextlib.contextmanager
    def subscription(self) -> Iterator[None]:
        """Counts a subscriber for as long as it reads (status: events.subscribers)."""
        with self._cond:
            self.subscribers += 1
        try:
            yield
        finally:
            with self._cond:
                self.subscribers -= 1

    def wait(self, after: int, timeout: float) -> bool:
        """Until an event newer than `after` exists (True), or timeout/close (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.sent_seq > after or self.closed, timeout) \
                and self.sent_seq > after

    def read(self, after: int, limit: int, flt: EventFilter | None = None
             ) -> tuple[list[bytes], int]:
        """Events with seq > after: at most `limit` looked at, fewer returned if filtered.

        Returns (events, new cursor), each event framed as an element of EventBatch.events
        (b"".join(events) is an EventBatch). Where the cursor had fallen behind everything still
        kept, a lost record (seq 0) naming the range stands in its place, in order.
        """
        out: list[bytes] = []
        seq = after + 1
        last = min(self.sent_seq, after + limit)
        while seq <= last:
            slot = self._slots[seq % self.capacity]
            if slot is not None and slot[0] == seq and seq >= self._first_memory:
                if _wanted(flt, slot[1]):
                    out.append(slot[1])
                seq += 1
                continue
            # not in memory (older, or overwritten while we read): the spool, else a gap
            spooled = self.spool.read(seq, last - seq + 1) if self.spool is not None else []
            if spooled and spooled[0][0] == seq:
                for s, framed in spooled:
                    if _wanted(flt, framed):
                        out.append(framed)
                    seq = s + 1
                continue
            resume = spooled[0][0] if spooled else max(self.last_seq - self.capacity + 1,
                                                        self._first_memory, seq + 1)
            out.append(_frame(self._gap(seq, resume - 1).SerializeToString()))
            seq = resume
        return out, max(seq - 1, after)

    def _gap(self, first: int, last: int) -> pb.Event:
        n = last - first + 1
        with self._cond:
            self.lost_by_subscribers += n
        e = pb.Event(seq=0, kind=pb.KIND_LOST, node=self.node, agent_version=self.version)
        e.time.GetCurrentTime()
        e.lost.source, e.lost.count = "replay_buffer", n
        e.lost.first_seq, e.lost.last_seq = first, last
        return e


def _frame(wire: bytes) -> bytes:
    """A serialized Event as one element of EventBatch.events: a batch is a join of these."""
    return b"\x0a" + _VarintBytes(len(wire)) + wire


def _parse(framed: bytes) -> pb.Event:
    return pb.EventBatch.FromString(framed).events[0]


def _wanted(flt: EventFilter | None, framed: bytes) -> bool:
    """Whether a subscriber's filter passes an event (its dictionary form is made only here)."""
    return flt is None or flt.empty or flt.match(from_proto(_parse(framed)))
