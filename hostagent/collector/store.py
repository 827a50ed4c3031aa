"""Where the collector keeps events: SQLite (embedded, the default) or PostgreSQL.

One schema, two dialects (docs/collector.md describes each table):

- ``agents``: one row per event stream: an agent's node and its numbering ``epoch`` (a new
  epoch when the agent numbers events differently from what is stored: its state directory
  was lost and it counts from 1 again, or it restarted without events it had already sent
  and renumbered from ``first_seq``), and the cursor ``last_seq``: every event of the stream
  from ``first_seq`` up to it is in ``events`` or in ``lost``;
- ``events``: one row per event, unique by (agent_id, seq), with the columns queries use;
- ``batches``: the events themselves, as the agent sent them: each received EventBatch
  (hostagent.v1, zlib-compressed) covering seqs first_seq..last_seq of one agent;
- ``identities``: each distinct workload identity (pod, container, unit, cgroup path, ...)
  once; events refer to it by ``wid``;
- ``lost``: seq ranges (and counts) that will never be stored, and who said so;
- ``workloads``: every workload (by its key, rows.py), kept up to date on ingest;
- ``dependencies``: every destination each workload reached, with counts per verdict, first
  and last seen: the events are added up into it by the database (rollup(), about once a
  second; ``agents.rolled_seq`` says how far). The inventory, first-seen destinations and
  draft policies read it, not the events, so they stay fast.

Writes come from one thread (hostagent.collector.ingest.Writer): every Batch of a write() is
stored in one transaction together with its cursor advance, and the advance is a
compare-and-set on the cursor (``... WHERE last_seq = <the batch's start>``): a crash leaves the
cursor and the events in agreement, and a second collector writing the same agent's stream to
the same database is detected instead of interleaving.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from hostagent.collector.rows import EVENT_COLUMNS, IDENTITY_COLUMNS
from hostagent.collector.times import now_us
from hostagent.errors import HostAgentError
from hostagent.v1 import events_pb2 as pb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_DB = "sqlite:///var/lib/hostagent-collector/events.db"
PRUNE_CHUNK = 20000          # rows per retention delete: short transactions, ingest goes on


class StoreError(HostAgentError):
    """The collector's database failed."""


class Conflict(StoreError):
    """Another writer advanced this stream's cursor: a second collector on the same database."""


# -- what the ingest side hands the store ----------------------------------------------------------

@dataclass
class Batch:
    """Rows of one received EventBatch, and the cursor move they make: after -> last_seq."""

    agent_id: int
    after: int
    last_seq: int
    events: list[tuple] = field(default_factory=list)
    data: bytes | None = None          # the EventBatch as received, zlib-compressed
    identities: list[tuple] = field(default_factory=list)   # identity rows new to the sender
    # (first_seq, last_seq, count, source, seq, time_us); first/last None: a count only
    lost: list[tuple] = field(default_factory=list)
    # key -> (workload, first_us, last_us)
    workloads: dict[str, list] = field(default_factory=dict)
    duplicates: int = 0
    last_time_us: int | None = None


@dataclass(frozen=True)
class Stream:
    """One agent's event stream as the store knows it."""

    agent_id: int
    node: str
    epoch: int
    last_seq: int
    last_event: pb.Event | None   # the stored event at last_seq (None: none, or pruned)


# -- schema ---------------------------------------------------------------------------------------

def _schema(big: str, blob: str, serial: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS agents (
            id {serial}, node TEXT NOT NULL, epoch INTEGER NOT NULL,
            first_seq {big} NOT NULL DEFAULT 1,
            address TEXT, agent_version TEXT,
            last_seq {big} NOT NULL DEFAULT 0, rolled_seq {big} NOT NULL DEFAULT 0,
            last_time_us {big},
            events {big} NOT NULL DEFAULT 0, duplicates {big} NOT NULL DEFAULT 0,
            created_us {big} NOT NULL, connected_us {big},
            state TEXT, error TEXT, state_us {big},
            UNIQUE (node, epoch))""",
        # who reached what is answered from dependencies first, then events by wid and time: no
        # index on destinations (each index costs ingest a third of its speed)
        f"""CREATE TABLE IF NOT EXISTS events (
            agent_id {big} NOT NULL, seq {big} NOT NULL, time_us {big} NOT NULL,
            kind TEXT NOT NULL, verdict TEXT, reason TEXT, policy TEXT, rule TEXT,
            generation {big}, hook TEXT, n {big} NOT NULL, wid {big},
            dst_ip TEXT, dst_addr {blob}, dst_port INTEGER, protocol TEXT, dst_name TEXT,
            UNIQUE (agent_id, seq))""",
        "CREATE INDEX IF NOT EXISTS events_time ON events (time_us)",
        "CREATE INDEX IF NOT EXISTS events_wid ON events (wid, time_us)",
        f"""CREATE TABLE IF NOT EXISTS batches (
            agent_id {big} NOT NULL, first_seq {big} NOT NULL, last_seq {big} NOT NULL,
            time_us {big} NOT NULL, data {blob} NOT NULL,
            PRIMARY KEY (agent_id, first_seq))""",
        "CREATE INDEX IF NOT EXISTS batches_time ON batches (time_us)",
        f"""CREATE TABLE IF NOT EXISTS identities (
            wid {big} PRIMARY KEY, workload TEXT NOT NULL, w_kind TEXT, namespace TEXT,
            pod TEXT, container TEXT, container_id TEXT, service_account TEXT, unit TEXT,
            cgroup_path TEXT, spiffe_id TEXT)""",
        "CREATE INDEX IF NOT EXISTS identities_workload ON identities (workload)",
        f"""CREATE TABLE IF NOT EXISTS lost (
            id {serial}, agent_id {big} NOT NULL,
            first_seq {big}, last_seq {big}, count {big} NOT NULL, source TEXT NOT NULL,
            seq {big} NOT NULL, time_us {big} NOT NULL, detected_us {big} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS lost_agent ON lost (agent_id, first_seq)",
        f"""CREATE TABLE IF NOT EXISTS workloads (
            key TEXT PRIMARY KEY, kind TEXT NOT NULL, namespace TEXT, owner TEXT,
            service_account TEXT, unit TEXT, cgroup_path TEXT, spiffe_id TEXT, labels TEXT,
            first_us {big} NOT NULL, last_us {big} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS dependencies (
            id {serial}, workload TEXT NOT NULL, dst_ip TEXT NOT NULL,
            dst_port INTEGER NOT NULL, protocol TEXT NOT NULL, dst_name TEXT NOT NULL,
            dst_addr {blob}, first_us {big} NOT NULL, last_us {big} NOT NULL,
            n {big} NOT NULL, allow_n {big} NOT NULL, audit_n {big} NOT NULL,
            deny_n {big} NOT NULL, first_agent_id {big}, first_seq {big},
            reason TEXT, policy TEXT, rule TEXT,
            UNIQUE (workload, dst_ip, dst_port, protocol, dst_name))""",
        "CREATE INDEX IF NOT EXISTS dependencies_first ON dependencies (first_us)",
        # the rows rollup() has yet to find the first event of
        "CREATE INDEX IF NOT EXISTS dependencies_unplaced ON dependencies (id) "
        "WHERE first_agent_id IS NULL",
    ]


_INSERT_EVENTS = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
_INSERT_BATCH = ("INSERT INTO batches (agent_id, first_seq, last_seq, time_us, data) "
                 "VALUES (?, ?, ?, ?, ?)")
_INSERT_IDENTITY = (f"INSERT INTO identities ({', '.join(IDENTITY_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(IDENTITY_COLUMNS))}) ON CONFLICT (wid) DO NOTHING")
_INSERT_LOST = ("INSERT INTO lost (agent_id, first_seq, last_seq, count, source, seq, time_us, "
                "detected_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_ADVANCE = ("UPDATE agents SET last_seq = ?, last_time_us = {greatest}(COALESCE(last_time_us, 0), "
            "?), events = events + ?, duplicates = duplicates + ? WHERE id = ? AND last_seq = ?")
_UPSERT_WORKLOAD = """
    INSERT INTO workloads (key, kind, namespace, owner, service_account, unit, cgroup_path,
                           spiffe_id, labels, first_us, last_us)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET
        first_us = {least}(workloads.first_us, excluded.first_us),
        last_us = {greatest}(workloads.last_us, excluded.last_us),
        namespace = COALESCE(excluded.namespace, workloads.namespace),
        service_account = COALESCE(excluded.service_account, workloads.service_account),
        cgroup_path = CASE WHEN excluded.last_us >= workloads.last_us
                           THEN excluded.cgroup_path ELSE workloads.cgroup_path END,
        spiffe_id = COALESCE(excluded.spiffe_id, workloads.spiffe_id),
        labels = CASE WHEN excluded.last_us >= workloads.last_us AND excluded.labels IS NOT NULL
                      THEN excluded.labels ELSE workloads.labels END"""
# Connection events not yet counted in dependencies (seq past the stream's rolled_seq), added
# up per workload and destination by the database itself: no Python per event, and it runs
# while the streams go on parsing (SQLite releases the GIL; PostgreSQL is another process)
_ROLLUP = """
    INSERT INTO dependencies (workload, dst_ip, dst_port, protocol, dst_name, dst_addr, first_us,
                              last_us, n, allow_n, audit_n, deny_n, reason, policy, rule)
    SELECT i.workload, e.dst_ip, COALESCE(e.dst_port, 0), COALESCE(e.protocol, ''),
           COALESCE(e.dst_name, ''), e.dst_addr, MIN(e.time_us), MAX(e.time_us), SUM(e.n),
           SUM(CASE WHEN e.verdict = 'allow' THEN e.n ELSE 0 END),
           SUM(CASE WHEN e.verdict = 'audit' THEN e.n ELSE 0 END),
           SUM(CASE WHEN e.verdict = 'deny' THEN e.n ELSE 0 END),
           MAX(e.reason), MAX(e.policy), MAX(e.rule)
    FROM events e JOIN identities i ON i.wid = e.wid
    WHERE e.agent_id = ? AND e.seq > ? AND e.seq <= ?
          AND e.kind = 'connection' AND e.dst_ip IS NOT NULL
    GROUP BY i.workload, e.dst_ip, COALESCE(e.dst_port, 0), COALESCE(e.protocol, ''),
             COALESCE(e.dst_name, ''), e.dst_addr
    ON CONFLICT (workload, dst_ip, dst_port, protocol, dst_name) DO UPDATE SET
        first_agent_id = CASE WHEN excluded.first_us < dependencies.first_us
                              THEN NULL ELSE dependencies.first_agent_id END,
        first_us = {least}(dependencies.first_us, excluded.first_us),
        last_us = {greatest}(dependencies.last_us, excluded.last_us),
        n = dependencies.n + excluded.n, allow_n = dependencies.allow_n + excluded.allow_n,
        audit_n = dependencies.audit_n + excluded.audit_n,
        deny_n = dependencies.deny_n + excluded.deny_n,
        reason = COALESCE({greatest}(dependencies.reason, excluded.reason),
                          dependencies.reason, excluded.reason),
        policy = COALESCE({greatest}(dependencies.policy, excluded.policy),
                          dependencies.policy, excluded.policy),
        rule = COALESCE({greatest}(dependencies.rule, excluded.rule), dependencies.rule,
                        excluded.rule)"""
# where each new (or earlier-seen) dependency was first seen: the event at its first_us
_FIRST_EVENT = """
    SELECT e.{col} FROM events e WHERE e.time_us = dependencies.first_us
        AND e.wid IN (SELECT wid FROM identities WHERE workload = dependencies.workload)
        AND e.kind = 'connection' AND e.dst_ip = dependencies.dst_ip
        AND COALESCE(e.dst_port, 0) = dependencies.dst_port
        AND COALESCE(e.protocol, '') = dependencies.protocol
        AND COALESCE(e.dst_name, '') = dependencies.dst_name
    ORDER BY e.agent_id, e.seq LIMIT 1"""
_ROLLUP_FIRST = (f"UPDATE dependencies SET "
                 f"first_agent_id = ({_FIRST_EVENT.format(col='agent_id')}), "
                 f"first_seq = ({_FIRST_EVENT.format(col='seq')}) WHERE first_agent_id IS NULL")
_ROLLED = "UPDATE agents SET rolled_seq = ? WHERE id = ?"


def merge_batches(batches: Sequence[Batch]) -> tuple[dict[int, tuple[int, int, int, int, int]],
                                                     dict[str, list]]:
    """Per stream (first after, last seq, events, duplicates, newest time), and the combined
    workload rows. Raises Conflict if one stream's batches do not chain."""
    streams: dict[int, list[int]] = {}
    workloads: dict[str, list] = {}
    for b in batches:
        s = streams.get(b.agent_id)
        if s is None:
            streams[b.agent_id] = [b.after, b.last_seq, len(b.events), b.duplicates,
                                   b.last_time_us or 0]
        else:
            if b.after != s[1]:
                raise Conflict(f"agent {b.agent_id}: a batch after seq {b.after} follows one "
                               f"ending at {s[1]}", agent_id=b.agent_id)
            s[1] = b.last_seq
            s[2] += len(b.events)
            s[3] += b.duplicates
            s[4] = max(s[4], b.last_time_us or 0)
        for key, (wl, first, last) in b.workloads.items():
            have = workloads.get(key)
            if have is None:
                workloads[key] = [wl, first, last]
            else:
                if last >= have[2]:
                    have[0] = wl
                have[1], have[2] = min(have[1], first), max(have[2], last)
    return {k: tuple(v) for k, v in streams.items()}, workloads


class Store:
    """A connection to the collector database. Not thread-safe: one per thread."""

    dialect = "?"
    greatest, least = "MAX", "MIN"

    def __init__(self, url: str) -> None:
        self.url = url
        self._known: set[int] = set()     # identity ids this connection has committed

    # -- dialect hooks ------------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence = ()):
        raise NotImplementedError

    def _executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        raise NotImplementedError

    def _insert_events(self, rows: list[tuple]) -> None:
        self._executemany(_INSERT_EVENTS, rows)

    def transaction(self):
        raise NotImplementedError

    def glob(self, column: str, pattern: str) -> tuple[str, object]:
        """SQL that matches ``column`` against an fnmatch pattern (case-sensitive), and the
        parameter it takes."""
        raise NotImplementedError

    def json_text(self, column: str, key: str) -> tuple[str, object]:
        """SQL for the string at ``key`` of the JSON object in ``column``."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- schema -------------------------------------------------------------------------------

    def create(self) -> None:
        with self.transaction():
            for stmt in self._ddl():
                self._execute(stmt)
            row = self._execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.display()}: schema version {row[0]}, this collector "
                                 f"has {SCHEMA_VERSION}")

    def check(self) -> None:
        """For readers: the schema is there and of this version."""
        try:
            row = self._execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except Exception as err:  # noqa: BLE001 - either driver's "no such table"
            raise StoreError(f"{self.display()}: not a collector database ({err})") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.display()}: schema version {row and row[0]}, expected "
                             f"{SCHEMA_VERSION}")

    def _ddl(self) -> list[str]:
        raise NotImplementedError

    def display(self) -> str:
        """The URL without a password."""
        parts = urlsplit(self.url)
        if parts.password:
            return self.url.replace(f":{parts.password}@", ":***@")
        return self.url

    # -- streams ------------------------------------------------------------------------------

    def stream(self, node: str, address: str, version: str) -> Stream:
        """The stream to resume for the agent of this node (its newest epoch; a new one for a
        node never seen). Records the connection."""
        now = now_us()
        with self.transaction():
            row = self._execute("SELECT id, epoch, last_seq FROM agents WHERE node = ? "
                                "ORDER BY epoch DESC LIMIT 1", (node,)).fetchone()
            if row is None:
                row = self._new_stream(node, 1, address, version, now, 0)
            agent_id, epoch, last_seq = row
            self._execute("UPDATE agents SET address = ?, agent_version = ?, connected_us = ?, "
                          "state = 'connected', error = NULL, state_us = ? WHERE id = ?",
                          (address, version, now, now, agent_id))
        last = self.load_events([(agent_id, last_seq)]).get((agent_id, last_seq)) \
            if last_seq else None
        return Stream(agent_id, node, epoch, last_seq, last)

    def new_epoch(self, node: str, address: str, version: str, after: int = 0) -> Stream:
        """A new stream for this node, whose events from seq ``after`` + 1 on are not the ones
        stored under those numbers: the agent numbered anew (its state was lost: after = 0),
        or renumbered from ``after`` + 1 (it restarted without events it had already sent)."""
        now = now_us()
        with self.transaction():
            row = self._execute("SELECT MAX(epoch) FROM agents WHERE node = ?",
                                (node,)).fetchone()
            agent_id, epoch, last_seq = self._new_stream(node, (row[0] or 0) + 1, address,
                                                         version, now, after)
        return Stream(agent_id, node, epoch, last_seq, None)

    def _new_stream(self, node, epoch, address, version, now, after) -> tuple[int, int, int]:
        self._execute("INSERT INTO agents (node, epoch, first_seq, last_seq, rolled_seq, "
                      "address, agent_version, created_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (node, epoch, after + 1, after, after, address, version, now))
        row = self._execute("SELECT id FROM agents WHERE node = ? AND epoch = ?",
                            (node, epoch)).fetchone()
        return row[0], epoch, after

    def set_state(self, agent_id: int, state: str, error: str | None = None) -> None:
        with self.transaction():
            self._execute("UPDATE agents SET state = ?, error = ?, state_us = ? WHERE id = ?",
                          (state, error, now_us(), agent_id))

    def cursor(self, agent_id: int) -> int:
        row = self._execute("SELECT last_seq FROM agents WHERE id = ?", (agent_id,)).fetchone()
        return row[0] if row else 0

    # -- ingest -------------------------------------------------------------------------------

    def write(self, batches: Sequence[Batch]) -> None:
        """Store the batches and advance their streams' cursors, in one transaction.

        Raises Conflict (nothing written) when a stream's cursor is not where a batch starts.
        """
        streams, workloads = merge_batches(batches)
        detected = now_us()
        with self.transaction():
            advance = _ADVANCE.format(greatest=self.greatest)
            for agent_id, (after, last, n, dups, last_time) in streams.items():
                if self._execute(advance, (last, last_time, n, dups, agent_id, after)
                                 ).rowcount != 1:
                    raise Conflict(f"agent stream {agent_id}: the stored cursor is not at {after}"
                                   ": another collector writes this agent's events to the same "
                                   "database", agent_id=agent_id)
            identities = {r[0]: r for b in batches for r in b.identities
                          if r[0] not in self._known}
            if identities:
                self._executemany(_INSERT_IDENTITY, sorted(identities.values()))
            blobs = [(b.agent_id, b.events[0][1], b.events[-1][1], b.last_time_us, b.data)
                     for b in batches if b.events and b.data is not None]
            if blobs:
                self._executemany(_INSERT_BATCH, blobs)
            events = [r for b in batches for r in b.events]
            if events:
                self._insert_events(events)
            lost = [(b.agent_id, *x, detected) for b in batches for x in b.lost]
            if lost:
                self._executemany(_INSERT_LOST, lost)
            if workloads:
                self._executemany(
                    _UPSERT_WORKLOAD.format(greatest=self.greatest, least=self.least),
                    [(w.key, w.kind, w.namespace, w.owner, w.service_account, w.unit,
                      w.cgroup_path, w.spiffe_id, w.labels, first, last)
                     for w, first, last in sorted(workloads.values(), key=lambda x: x[0].key)])
        self._known.update(identities)
        if len(self._known) > 1 << 20:
            self._known.clear()

    def rollup(self) -> int:
        """Count the events stored since the last rollup into dependencies (one transaction);
        the number of new dependency rows."""
        rollup = _ROLLUP.format(greatest=self.greatest, least=self.least)
        with self.transaction():
            before = self.scalar("SELECT COALESCE(MAX(id), 0) FROM dependencies")
            # stream by stream: each a range of the (agent_id, seq) index
            for agent_id, rolled, last in self._execute(
                    "SELECT id, rolled_seq, last_seq FROM agents WHERE rolled_seq < last_seq "
                    "ORDER BY id").fetchall():
                self._execute(rollup, (agent_id, rolled, last))
                self._execute(_ROLLED, (last, agent_id))
            self._execute(_ROLLUP_FIRST)
            return self.scalar("SELECT COALESCE(MAX(id), 0) FROM dependencies") - before

    # -- retention ----------------------------------------------------------------------------

    def prune(self, before_us: int, limit: int = PRUNE_CHUNK) -> int:
        """Delete up to ``limit`` events older than ``before_us``, in one short transaction;
        with fewer deleted (the last chunk) also lost ranges, workloads and dependencies not
        seen since. Returns the events deleted."""
        with self.transaction():
            n = self._prune_events(before_us, limit)
            if n < limit:
                self._execute("DELETE FROM batches WHERE time_us < ?", (before_us,))
                self._execute("DELETE FROM lost WHERE time_us < ?", (before_us,))
                self._execute("DELETE FROM dependencies WHERE last_us < ?", (before_us,))
                self._execute("DELETE FROM workloads WHERE last_us < ?", (before_us,))
        return n

    def _prune_events(self, before_us: int, limit: int) -> int:
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------

    def load_events(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], pb.Event]:
        """The stored events at (agent_id, seq) keys (those whose batch is still kept)."""
        out: dict[tuple[int, int], pb.Event] = {}
        loaded: dict[int, list[tuple[int, int]]] = {}     # agent -> ranges already parsed
        for agent_id, seq in sorted(set(keys)):
            if any(lo <= seq <= hi for lo, hi in loaded.get(agent_id, ())):
                continue
            row = self._execute("SELECT first_seq, last_seq, data FROM batches WHERE agent_id = ? "
                                "AND first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
                                (agent_id, seq)).fetchone()
            if row is None or row[1] < seq:
                continue
            loaded.setdefault(agent_id, []).append((row[0], row[1]))
            for e in pb.EventBatch.FromString(zlib.decompress(row[2])).events:
                if row[0] <= e.seq <= row[1]:
                    out[(agent_id, e.seq)] = e
        return {k: out[k] for k in keys if k in out}

    def rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        cur = self._execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def scalar(self, sql: str, params: Sequence = ()):
        row = self._execute(sql, params).fetchone()
        return row[0] if row else None


# -- SQLite -------------------------------------------------------------------------------------

class SQLiteStore(Store):
    dialect = "sqlite"
    greatest, least = "MAX", "MIN"

    def __init__(self, url: str, path: str, readonly: bool = False) -> None:
        super().__init__(url)
        self.path = path
        try:
            if readonly:
                if not os.path.exists(path):
                    raise StoreError(f"{url}: no such database (has the collector run?)")
                self.db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True,
                                          isolation_level=None,
                                          check_same_thread=False, timeout=30)
            else:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                          timeout=30)
                # WAL: readers (the query commands) never block the writer nor it them;
                # synchronous=NORMAL: a commit is durable against a process crash, and against
                # power loss up to the last checkpoint (the agent keeps what we lose: we resume)
                # 16 KiB pages: ingest measured ~1.5x faster than with 4 KiB (set before the
                # first table; an existing database keeps its page size)
                self.db.execute("PRAGMA page_size=16384")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as err:
            raise StoreError(f"{url}: {err}") from None
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.execute("PRAGMA cache_size=-65536")       # KiB: 64 MiB of page cache

    def _ddl(self) -> list[str]:
        return _schema("INTEGER", "BLOB", "INTEGER PRIMARY KEY")

    def _execute(self, sql: str, params: Sequence = ()):
        try:
            return self.db.execute(sql, params)
        except sqlite3.Error as err:
            raise StoreError(f"{self.url}: {err}") from err

    def _executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        try:
            self.db.executemany(sql, rows)
        except sqlite3.IntegrityError as err:
            raise Conflict(f"{self.url}: {err}") from err
        except sqlite3.Error as err:
            raise StoreError(f"{self.url}: {err}") from err

    def transaction(self):
        return _SQLiteTransaction(self)

    def glob(self, column: str, pattern: str) -> tuple[str, object]:
        # SQLite's GLOB is fnmatch with [^...] for a negated class
        return f"{column} GLOB ?", pattern.replace("[!", "[^")

    def json_text(self, column: str, key: str) -> tuple[str, object]:
        return f"json_extract({column}, ?)", '$."' + key.replace('"', '""') + '"'

    def _prune_events(self, before_us: int, limit: int) -> int:
        return self._execute("DELETE FROM events WHERE rowid IN (SELECT rowid FROM events "
                             "WHERE time_us < ? LIMIT ?)", (before_us, limit)).rowcount

    def close(self) -> None:
        self.db.close()


class _SQLiteTransaction:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def __enter__(self):
        # IMMEDIATE: take the write lock now, not at the first write (no upgrade deadlocks)
        self.store._execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.store._execute("COMMIT")
        else:
            try:
                self.store.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass   # the failure itself may have ended the transaction
        return False


# -- PostgreSQL ---------------------------------------------------------------------------------

class PostgresStore(Store):
    dialect = "postgresql"
    greatest, least = "GREATEST", "LEAST"

    def __init__(self, url: str, readonly: bool = False) -> None:
        super().__init__(url)
        try:
            import psycopg
        except ImportError:
            raise StoreError("PostgreSQL needs psycopg 3 (pip install 'psycopg[binary]')") \
                from None
        self._psycopg = psycopg
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            raise StoreError(f"{self.display()}: {_pg_message(err)}") from None
        if readonly:
            self.db.execute("SET default_transaction_read_only = on")

    def _ddl(self) -> list[str]:
        return _schema("BIGINT", "BYTEA", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY") + [
            # compressed already: do not let TOAST try again
            "ALTER TABLE batches ALTER COLUMN data SET STORAGE EXTERNAL"]

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _execute(self, sql: str, params: Sequence = ()):
        try:
            return self.db.execute(self._sql(sql), params)
        except self._psycopg.Error as err:
            raise StoreError(f"{self.display()}: {_pg_message(err)}") from err

    def _executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        try:
            with self.db.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        except self._psycopg.errors.UniqueViolation as err:
            raise Conflict(f"{self.display()}: {_pg_message(err)}") from err
        except self._psycopg.Error as err:
            raise StoreError(f"{self.display()}: {_pg_message(err)}") from err

    def _insert_events(self, rows: list[tuple]) -> None:
        # COPY: one round trip and no per-row statement
        try:
            with self.db.cursor() as cur:
                with cur.copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(r)
        except self._psycopg.errors.UniqueViolation as err:
            raise Conflict(f"{self.display()}: {_pg_message(err)}") from err
        except self._psycopg.Error as err:
            raise StoreError(f"{self.display()}: {_pg_message(err)}") from err

    def transaction(self):
        return _PgTransaction(self)

    def glob(self, column: str, pattern: str) -> tuple[str, object]:
        return f"{column} ~ ?", glob_regex(pattern)

    def json_text(self, column: str, key: str) -> tuple[str, object]:
        return f"(({column})::jsonb ->> ?)", key

    def _prune_events(self, before_us: int, limit: int) -> int:
        return self._execute("DELETE FROM events WHERE ctid IN (SELECT ctid FROM events "
                             "WHERE time_us < ? LIMIT ?)", (before_us, limit)).rowcount

    def close(self) -> None:
        self.db.close()


class _PgTransaction:
    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._tx = None

    def __enter__(self):
        self._tx = self.store.db.transaction()
        try:
            self._tx.__enter__()
        except self.store._psycopg.Error as err:
            raise StoreError(f"{self.store.display()}: {_pg_message(err)}") from err
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._tx.__exit__(exc_type, exc, tb)
        except self.store._psycopg.Error as err:
            if exc_type is not None:
                return False
            raise StoreError(f"{self.store.display()}: {_pg_message(err)}") from err


def _pg_message(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def glob_regex(pattern: str) -> str:
    """An fnmatch pattern as an anchored POSIX regular expression (PostgreSQL's ``~``)."""
    out, i = ["^"], 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 1
            if j >= len(pattern):
                out.append("\\[")
            else:
                body = pattern[i:j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c) if not c.isalnum() else c)
    out.append("$")
    return "".join(out)


# -- opening ------------------------------------------------------------------------------------

def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL or plain path; None for other URLs. ``sqlite:///var/x.db`` (and
    SQLAlchemy's ``sqlite:////var/x.db``) is /var/x.db; ``sqlite://x.db`` is x.db, relative."""
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:"):]
        if rest.startswith("//"):
            rest = rest[2:]
        if rest.startswith("/"):
            rest = "/" + rest.lstrip("/")
        if not rest:
            raise StoreError(f"{url}: no file (sqlite:///path/to/events.db)")
        return rest
    if "://" not in url:
        return url
    return None


def check_url(url: str) -> str:
    """A --db / database value, checked without connecting; raises ValueError."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{url!r}: expected sqlite:///PATH or postgresql://...")
    if url.startswith(("postgresql://", "postgres://")) or sqlite_path(url) is not None:
        return url
    raise ValueError(f"{url!r}: expected sqlite:///PATH or postgresql://...")


def open_store(url: str, readonly: bool = False) -> Store:
    """Connect; the writer (readonly=False) also creates the schema."""
    if url.startswith(("postgresql://", "postgres://")):
        store: Store = PostgresStore(url, readonly=readonly)
    else:
        path = sqlite_path(url)
        if path is None:
            raise StoreError(f"{url}: expected sqlite:///PATH or postgresql://...")
        store = SQLiteStore(url, os.path.abspath(path), readonly=readonly)
    try:
        if readonly:
            store.check()
        else:
            store.create()
    except BaseException:
        store.close()
        raise
    return store


__all__ = ["Batch", "Conflict", "DEFAULT_DB", "Store", "StoreError", "Stream",
           "check_url", "open_store"]
