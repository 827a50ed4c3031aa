"""From received events to a Batch, keeping the books on sequence numbers.

An agent numbers its events 1, 2, 3, ... without gaps. The collector keeps, per agent, a cursor:
the highest seq such that every seq up to it is either stored or recorded as lost. Each batch
moves the cursor forward, and everything between the old and the new cursor is accounted for:

- an event with seq = cursor + 1 is stored;
- an event with seq <= cursor was stored already: it is dropped and counted (``duplicates``);
- a lost record with seq 0 (the agent's replay buffer no longer held what this subscriber had
  not read) names the range: it is recorded as lost with the agent's source, and the cursor
  moves past it;
- a lost event with a seq of its own (the kernel ring buffer overflowed, or an agent that was
  killed left reserved numbers unused) is stored as an event; if it names a seq range, the
  range is recorded as lost with its source;
- a jump the agent did not explain (seq > cursor + 1 with no lost record for the numbers in
  between) is recorded as lost with source ``unexplained``: the store says exactly what is
  missing, and a non-empty ``unexplained`` is a bug to report. On the first connection to an
  agent, numbers before its oldest kept event are ``before_collector`` instead.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from hostagent.collector.rows import COL_TIME, RowMaker
from hostagent.collector.store import Batch
from hostagent.collector.times import now_us
from hostagent.v1 import events_pb2 as pb

UNEXPLAINED = "unexplained"
BEFORE_COLLECTOR = "before_collector"


def _subtract(lo: int, hi: int, cover: tuple[int, int] | None) -> list[tuple[int, int]]:
    """[lo, hi] without the range ``cover``, as 0-2 ranges."""
    if cover is None or cover[1] < lo or cover[0] > hi:
        return [(lo, hi)]
    out = []
    if cover[0] > lo:
        out.append((lo, cover[0] - 1))
    if cover[1] < hi:
        out.append((cover[1] + 1, hi))
    return out


class Sequencer:
    """One agent stream's cursor, and the rows each received batch makes."""

    def __init__(self, agent_id: int, cursor: int, rows: RowMaker | None = None) -> None:
        self.agent_id = agent_id
        self.cursor = cursor
        self.fresh = cursor == 0          # nothing of this stream stored yet
        self.rows = rows or RowMaker()

    def feed(self, events: Sequence[pb.Event], raw: bytes | None = None) -> Batch:
        """The batch of rows for received events; ``raw`` is their EventBatch as received (kept
        compressed with the rows when any of them is stored)."""
        b = Batch(self.agent_id, after=self.cursor, last_seq=self.cursor)
        received = now_us()
        for e in events:
            declared = None
            if e.kind == pb.KIND_LOST:
                lost = e.lost
                rng = (lost.first_seq, lost.last_seq) if lost.first_seq and \
                    lost.last_seq >= lost.first_seq else None
                when = _time(e, received)
                if e.seq == 0:
                    if rng is not None and rng[1] > self.cursor:
                        first = max(rng[0], self.cursor + 1)
                        if first > self.cursor + 1:   # the record skips numbers as well
                            self._gap(b, self.cursor + 1, first - 1, None, when)
                        b.lost.append((first, rng[1], rng[1] - first + 1,
                                       lost.source or "replay_buffer", 0, when))
                        self.cursor = rng[1]
                        self.fresh = False
                    continue
                if e.seq > self.cursor:
                    if rng is not None and rng[1] > self.cursor:
                        first = max(rng[0], self.cursor + 1)
                        declared = (first, rng[1])
                        b.lost.append((first, rng[1], rng[1] - first + 1,
                                       lost.source or "agent", e.seq, when))
                    elif rng is None:
                        b.lost.append((None, None, lost.count, lost.source or "agent", e.seq,
                                       when))
            if e.seq <= self.cursor:
                b.duplicates += 1
                continue
            if e.seq > self.cursor + 1:
                for lo, hi in _subtract(self.cursor + 1, e.seq - 1, declared):
                    self._gap(b, lo, hi, e, received)
            self._store(b, e, received)
            self.cursor = e.seq
            self.fresh = False
        b.last_seq = self.cursor
        if b.events:
            if raw is None:
                raw = pb.EventBatch(events=list(events)).SerializeToString()
            b.data = zlib.compress(raw, 1)
            b.identities = self.rows.take_identities()
        return b

    def _gap(self, b: Batch, lo: int, hi: int, e: pb.Event | None, received: int) -> None:
        source = BEFORE_COLLECTOR if self.fresh else UNEXPLAINED
        b.lost.append((lo, hi, hi - lo + 1, source, 0, _time(e, received) if e else received))

    def _store(self, b: Batch, e: pb.Event, received: int) -> None:
        row, wl = self.rows.row(self.agent_id, e, received)
        b.events.append(row)
        t = row[COL_TIME]
        if b.last_time_us is None or t > b.last_time_us:
            b.last_time_us = t
        if wl is None:
            return
        seen = b.workloads.get(wl.key)
        if seen is None:
            b.workloads[wl.key] = [wl, t, t]
        else:
            seen[0] = wl if t >= seen[2] else seen[0]
            seen[1], seen[2] = min(seen[1], t), max(seen[2], t)


def _time(e: pb.Event | None, default: int) -> int:
    if e is not None and e.HasField("time"):
        return e.time.seconds * 1_000_000 + e.time.nanos // 1000
    return default
