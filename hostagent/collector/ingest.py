"""Streams from agents into the store.

Threads:

- one ``AgentStream`` per agent address: connect (TLS), ask the agent who it is (GetStatus:
  node, newest seq), ask the writer where that agent's stream stands in the store, then
  GetEvents from there and turn each received batch into rows (sequence.Sequencer). Reconnects
  with exponential backoff and jitter; an agent's restart is one more reconnect, since its
  numbering continues;
- one ``Writer``: the only thread that writes. It takes received batches in order from a
  bounded queue (a full queue blocks the streams, and gRPC flow control then holds the events
  in the agents' buffers), writes each group of them with their cursor advances in one
  transaction, retries a failed write until it succeeds, and prunes on the retention timer.

Resuming without loss or duplicates: the cursor an AgentStream resumes from is read by the
writer after every batch queued before it is committed, so it is exactly what the store holds.
To prove that the agent on the other end still numbers the same stream, the request starts one
event early: the agent's event at the cursor must equal the stored one (protobuf equality). If
it differs, or the agent's newest seq is below the cursor, the agent gave stored numbers to
other events: a binary search finds the first such seq, and a new epoch of the stream starts
there (from 1 when the agent's state directory was lost), so that no seq ever means two
events.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc

from hostagent.api.client import SERVICE, AgentClient, ClientError, Tls
from hostagent.api.server import is_local
from hostagent.collector import times
from hostagent.collector.config import CollectorConfig
from hostagent.collector.discovery import sources_of
from hostagent.collector.metrics import CollectorMetrics
from hostagent.collector.sequence import Sequencer
from hostagent.collector.store import (PRUNE_CHUNK, Batch, Conflict, Store, StoreError, Stream,
                                       open_store)
from hostagent.errors import ConfigError, HostAgentError
from hostagent.v1 import agent_pb2 as api
from hostagent.v1 import events_pb2 as pb

log = logging.getLogger(__name__)

# Timeouts and pacing, each with its reason.
STATUS_TIMEOUT = 10.0      # s: GetStatus is a dictionary copy in the agent; 10 s is a dead agent
BACKOFF_FIRST = 0.5        # s: an agent restart takes ~1-3 s, the first retry should be quick
BACKOFF_MAX = 30.0         # s: a node that is gone costs one attempt per 30 s
HEALTHY_AFTER = 30.0       # s: a stream that lived this long resets the backoff
QUEUE_BATCHES = 64         # received batches waiting for the writer (x 4096 events at most)
TXN_EVENTS = 32768         # events per write transaction, when the queue holds that many
WRITE_RETRY_MAX = 30.0     # s: between attempts to write to a failing database
ROLLUP_INTERVAL = 1.0      # s: first-seen destinations show within this of being stored
FIRST_PRUNE = 5.0          # s: retention's first pass, once the streams are under way
STOP_CALL_TIMEOUT = 5.0    # s: recording "stopped" must not hold up a stop
DISCOVERY_TICK = 1.0       # s: how often sources are asked (DNS sources keep their own pace)
WRITER_CALL_TIMEOUT = 120.0  # s: a full queue (64 batches) is written in seconds; longer is a
                             # database outage, and the stream retries later


class _Call:
    """A function the writer runs on its store between batches, for a waiting thread."""

    def __init__(self, fn: Callable[[Store], object]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()


_STOP = object()


class Writer(threading.Thread):
    def __init__(self, url: str, metrics: CollectorMetrics, retention: float | None = None,
                 retention_interval: float = 600.0,
                 on_conflict: Callable[[int], None] = lambda agent_id: None,
                 first_prune: float = FIRST_PRUNE) -> None:
        super().__init__(name="collector-writer", daemon=True)
        self.url = url
        self.store = open_store(url)   # here, so that a bad URL fails the start
        self.metrics = metrics
        self.retention = retention
        self.retention_interval = retention_interval
        self.on_conflict = on_conflict
        self._queue: queue.Queue = queue.Queue(QUEUE_BATCHES)
        self._fenced: set[int] = set()     # streams whose queued batches are void (conflict)
        self._next_prune = time.monotonic() + first_prune if retention else float("inf")
        self._next_rollup = 0.0
        self._rollup_due = False
        self._pruning = False
        self.failed: BaseException | None = None

    # -- for other threads --------------------------------------------------------------------

    def submit(self, batch: Batch, stop: threading.Event) -> bool:
        """Queue a batch (blocks while the queue is full); False if told to stop meanwhile."""
        while not stop.is_set():
            try:
                self._queue.put(batch, timeout=0.5)
                self.metrics.queue.set(self._queue.qsize())
                return True
            except queue.Full:
                continue
        return False

    def call(self, fn: Callable[[Store], object], timeout: float | None = None):
        """Run fn(store) in the writer, after everything queued before; its result or error."""
        c = _Call(fn)
        try:
            self._queue.put(c, timeout=timeout)
        except queue.Full:
            raise TimeoutError("the collector's writer is busy (database down?)") from None
        return c.future.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop."""
        deadline = time.monotonic() + timeout
        while self.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.5)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    log.error("the writer did not take the stop in %.0f s", timeout)
                    return
        self.join(max(0.0, deadline - time.monotonic()))

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - recorded for the main loop to report
            log.exception("collector writer failed")
            self.failed = err
        finally:
            self.store.close()

    def _loop(self) -> None:
        carry: deque = deque()
        while True:
            if carry:
                item = carry.popleft()
            else:
                try:
                    item = self._queue.get(timeout=self._wait())
                except queue.Empty:
                    self._rollup()
                    self._maybe_prune()
                    continue
            if item is _STOP:
                self._rollup(force=True)
                return
            if isinstance(item, _Call):
                self._run_call(item)
                self._rollup()
                self._maybe_prune()
                continue
            group, n = [item], len(item.events)
            while n < TXN_EVENTS:
                try:
                    more = carry.popleft() if carry else self._queue.get_nowait()
                except (queue.Empty, IndexError):
                    break
                if not isinstance(more, Batch):
                    carry.appendleft(more)
                    break
                group.append(more)
                n += len(more.events)
            self.metrics.queue.set(self._queue.qsize())
            self._write(group)
            self._rollup()
            self._maybe_prune()

    def _wait(self) -> float:
        due = min(self._next_prune, self._next_rollup if self._rollup_due else float("inf"))
        return max(0.05, min(1.0, due - time.monotonic()))

    def _rollup(self, force: bool = False) -> None:
        """The dependencies table, about once a second while events come in."""
        if not self._rollup_due or (not force and time.monotonic() < self._next_rollup):
            return
        try:
            new = self.store.rollup()
        except StoreError as err:
            self.metrics.store_errors.inc()
            log.error("counting events into dependencies (retrying): %s", err)
            self._next_rollup = time.monotonic() + ROLLUP_INTERVAL
            return
        self.metrics.new_destinations.inc(new)
        self._rollup_due = False
        self._next_rollup = time.monotonic() + ROLLUP_INTERVAL

    def _run_call(self, c: _Call) -> None:
        try:
            result = c.fn(self.store)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            c.future.set_exception(err)
            return
        if isinstance(result, Stream):
            self._fenced.discard(result.agent_id)   # a fresh start for that stream
        c.future.set_result(result)

    def _write(self, group: list[Batch]) -> None:
        delay = 0.5
        while True:
            group = [b for b in group if b.agent_id not in self._fenced]
            if not group:
                return
            t0 = time.monotonic()
            try:
                self.store.write(group)
            except Conflict as err:
                self.metrics.conflicts.inc()
                agent_id = getattr(err, "agent_id", None)
                if agent_id is None and len(group) > 1:
                    for b in group:          # find which: one at a time
                        self._write([b])
                    return
                agent_id = agent_id if agent_id is not None else group[0].agent_id
                log.error("%s; its stream starts over from what the database holds", err)
                self._fenced.add(agent_id)
                self.on_conflict(agent_id)
                continue
            except StoreError as err:
                self.metrics.store_errors.inc()
                log.error("writing %d events failed (retrying in %.1f s): %s",
                          sum(len(b.events) for b in group), delay, err)
                time.sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX)
                self._reopen()
                continue
            self.metrics.write_seconds.observe(time.monotonic() - t0)
            self.metrics.transactions.inc()
            self._rollup_due = True
            for b in group:
                self.metrics.events.inc(len(b.events))
                if b.duplicates:
                    self.metrics.duplicates.inc(b.duplicates)
                for lost in b.lost:
                    self.metrics.lost.labels(lost[3]).inc(lost[2] or 0)
            return

    def _reopen(self) -> None:
        try:
            self.store.close()
        except Exception as err:  # noqa: BLE001 - a broken connection may fail to close
            log.debug("closing the failed database connection: %s", err)
        try:
            self.store = open_store(self.url)
        except StoreError as err:
            log.error("reconnecting to the database: %s", err)

    def _maybe_prune(self) -> None:
        if self.retention is None or time.monotonic() < self._next_prune:
            return
        cutoff = times.now_us() - int(self.retention * 1_000_000)
        try:
            n = self.store.prune(cutoff)
        except StoreError as err:
            log.error("retention: %s", err)
            self._next_prune = time.monotonic() + 60.0
            return
        self.metrics.pruned.inc(n)
        if n >= 1 and not self._pruning:
            log.info("retention: deleting events older than %.0f s", self.retention)
        # a full chunk: more to delete, after the next received batch
        self._pruning = n >= PRUNE_CHUNK
        self._next_prune = time.monotonic() + (0.0 if self._pruning
                                               else self.retention_interval)


class _Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST

    def next(self) -> float:
        # half fixed, half random: agents restarted together do not come back in lockstep
        d = self.delay * (0.5 + random.random() / 2)
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return d

    def reset(self) -> None:
        self.delay = BACKOFF_FIRST


class _NewEpoch(Exception):
    """A new epoch of the agent's stream was started: resume it at once."""


class AgentStream(threading.Thread):
    """One agent address: connect, resume, read, hand batches to the writer; again on failure."""

    def __init__(self, address: str, tls: Tls | None, writer: Writer, claim, release,
                 metrics: CollectorMetrics, max_batch: int = 4096) -> None:
        super().__init__(name=f"agent {address}", daemon=True)
        self.address = address
        self.tls = tls
        self.writer = writer
        self._claim, self._release = claim, release
        self.metrics = metrics
        self.max_batch = max_batch
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._call = None
        self.client: AgentClient | None = None
        self.node: str | None = None
        self.agent_id: int | None = None
        self.cursor: int | None = None
        self.lag: int | None = None
        self.state = "starting"
        self.error: str | None = None
        self.sessions = 0

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()
        self.cancel()

    def cancel(self, why: str | None = None) -> None:
        """End the current stream (it reconnects unless stopped)."""
        with self._lock:
            call = self._call
        if call is not None:
            if why:
                log.warning("agent %s (%s): %s", self.node or "?", self.address, why)
            call.cancel()

    def probe(self) -> None:
        """GetStatus on the stream's connection: no answer means the agent is gone even if
        the TCP connection looks open (a host that died without a reset)."""
        client = self.client
        if client is None or self.state != "streaming":
            return
        try:
            st = client.status(timeout=STATUS_TIMEOUT)
        except grpc.RpcError as err:
            self.cancel(f"no answer to GetStatus ({err.code().name}): reconnecting")
            return
        except ValueError:      # the session ended meanwhile and closed the channel
            return
        if self.cursor is not None:
            self.lag = max(0, st.last_seq - self.cursor)

    def info(self) -> dict:
        return {"address": self.address, "node": self.node, "state": self.state,
                "cursor": self.cursor, "lag": self.lag, "error": self.error}

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        backoff = _Backoff()
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self._session()
                if not self.stop_event.is_set():
                    self.state, self.error = "retrying", "the agent ended the stream"
            except _NewEpoch:
                continue      # at once, from where the new epoch starts
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.CANCELLED and self.stop_event.is_set():
                    break
                self.metrics.stream_errors.labels(code.name).inc()
                self._failed(f"{code.name}: {err.details()}")
            except (HostAgentError, OSError) as err:
                self._failed(str(err))
            finally:
                self._end_session()
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            if self.stop_event.wait(backoff.next()):
                break
        self.state = "stopped"
        if self.agent_id is not None:
            agent_id = self.agent_id
            try:
                self.writer.call(lambda s: s.set_state(agent_id, "stopped"), STOP_CALL_TIMEOUT)
            except (StoreError, TimeoutError):
                pass     # the store says "connected" until the next collector connects

    def _failed(self, error: str) -> None:
        if error != self.error:
            log.warning("agent %s (%s): %s", self.node or "?", self.address, error)
        self.error = error
        self.state = "retrying"
        if self.agent_id is not None:
            agent_id = self.agent_id
            try:
                self.writer.call(lambda s: s.set_state(agent_id, "disconnected", error),
                                 WRITER_CALL_TIMEOUT)
            except (StoreError, TimeoutError):
                pass

    def _end_session(self) -> None:
        with self._lock:
            call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.node is not None:
            self._release(self.node, self)

    def _session(self) -> None:
        self.state = "connecting"
        self.client = client = AgentClient(self.address, self.tls)
        status = client.status(timeout=STATUS_TIMEOUT)
        node = status.node or self.address
        if not self._claim(node, self):
            raise ClientError(f"agent {node} is streamed through another address already")
        self.node = node
        stream = self.writer.call(lambda s: s.stream(node, self.address, status.agent_version),
                                  WRITER_CALL_TIMEOUT)
        if status.last_seq < stream.last_seq:
            self._renumbered(client, stream, status, f"its newest seq is {status.last_seq}")
        self._read(client, stream, status)

    def _events_method(self, client: AgentClient):
        # raw responses: the batch is kept as received, and parsed once
        return client.channel.unary_stream(
            SERVICE + "GetEvents", request_serializer=api.GetEventsRequest.SerializeToString,
            response_deserializer=None)

    def _read(self, client: AgentClient, stream: Stream, status: api.Status) -> None:
        self.agent_id, self.cursor = stream.agent_id, stream.last_seq
        seq = Sequencer(stream.agent_id, stream.last_seq)
        verify = stream.last_event if stream.last_seq else None
        request = api.GetEventsRequest(max_batch=self.max_batch)
        if stream.last_seq == 0:
            request.from_oldest = True
        elif verify is not None and stream.last_seq == 1:
            # since=0 would mean "from now on": the oldest is seq 1 itself, if still kept
            if status.oldest_seq <= 1:
                request.from_oldest = True
            else:
                request.since, verify = 1, None
        else:
            request.since = stream.last_seq - 1 if verify is not None else stream.last_seq
        with self._lock:
            if self.stop_event.is_set():
                return
            self._call = call = self._events_method(client)(request)
        self.sessions += 1
        self.state, self.error = "streaming", None
        self.lag = max(0, status.last_seq - stream.last_seq)
        log.info("agent %s (%s): streaming from seq %d (epoch %d, agent at %d)", stream.node,
                 self.address, stream.last_seq + 1, stream.epoch, status.last_seq)
        for raw in call:
            events = pb.EventBatch.FromString(raw).events
            if verify is not None and events:
                first = events[0]
                if first.seq == stream.last_seq:
                    if first != verify:
                        self._renumbered(client, stream, status,
                                         f"its event {first.seq} is not the one stored")
                    events = events[1:]
                verify = None
            batch = seq.feed(events, raw)
            if batch.events or batch.lost or batch.duplicates:
                if not self.writer.submit(batch, self.stop_event):
                    return
            self.cursor = seq.cursor

    # -- an agent that numbers differently from what is stored ----------------------------------

    def _renumbered(self, client: AgentClient, stream: Stream, status: api.Status,
                    why: str) -> None:
        """The agent's events are not the stored stream's from some seq on: find the first
        such seq (a binary search, comparing one event at a time) and start a new epoch there.
        From seq 1: its state directory was lost. Later: it restarted without events it had
        sent (killed before they reached its spool, or a host crash before they reached the
        disk), and gave their numbers to new events; the stored ones are kept."""
        first = self._divergence(client, stream, status)
        if first <= 1:
            log.error("agent %s (%s): %s: it numbers its events anew (state lost?): they are "
                      "a new stream, epoch %d", stream.node, self.address, why, stream.epoch + 1)
        else:
            log.error("agent %s (%s): %s: it gave seqs %d..%d to other events than those "
                      "stored (events it had sent were lost in a restart); the stored ones stay "
                      "in epoch %d, its events from seq %d on are epoch %d", stream.node,
                      self.address, why, first, stream.last_seq, stream.epoch, first,
                      stream.epoch + 1)
        self.writer.call(lambda s: s.new_epoch(stream.node, self.address, status.agent_version,
                                               max(first - 1, 0)), WRITER_CALL_TIMEOUT)
        raise _NewEpoch()

    def _divergence(self, client: AgentClient, stream: Stream, status: api.Status) -> int:
        """The first seq whose event on the agent differs from the stored one (or that the
        agent does not have). Seqs only one side still keeps compare as equal."""
        agent_id = stream.agent_id

        def same(s: int) -> bool:
            if s > status.last_seq:
                return False
            mine = self.writer.call(lambda st: st.load_events([(agent_id, s)]),
                                    WRITER_CALL_TIMEOUT).get((agent_id, s))
            theirs = self._agent_event(client, s)
            return mine is None or theirs is None or mine == theirs

        hi = min(stream.last_seq, status.last_seq + 1)     # known to differ
        lo = max(status.oldest_seq, 1)
        if lo >= hi:
            return hi
        if not same(lo):
            return lo
        while hi - lo > 1:                                 # same(lo), not same(hi)
            mid = (lo + hi) // 2
            if same(mid):
                lo = mid
            else:
                hi = mid
        return hi

    def _agent_event(self, client: AgentClient, seq: int) -> pb.Event | None:
        """The agent's event with this seq (which it has numbered), None if it has not kept it."""
        request = api.GetEventsRequest(max_batch=1)
        if seq <= 1:
            request.from_oldest = True
        else:
            request.since = seq - 1
        call = self._events_method(client)(request, timeout=STATUS_TIMEOUT)
        try:
            for raw in call:
                events = pb.EventBatch.FromString(raw).events
                if events:
                    return events[0] if events[0].seq == seq else None
            return None
        finally:
            call.cancel()


class Collector:
    """Discovery, one AgentStream per address, the writer, retention and metrics."""

    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.tls = self._tls(cfg)
        self.metrics = CollectorMetrics()
        self.sources = sources_of(cfg)
        self.streams: dict[str, AgentStream] = {}
        self._streams_lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._owners: dict[str, AgentStream] = {}     # node -> the stream that has it
        self._owners_lock = threading.Lock()
        self._signals: deque[int] = deque()
        self._stop = threading.Event()
        self._probes = concurrent.futures.ThreadPoolExecutor(4, "collector-probe")
        self._next_probe = 0.0
        self.writer = Writer(cfg.database, self.metrics, cfg.retention, cfg.retention_interval,
                             on_conflict=self._on_conflict)
        self.metrics.watch_agents(lambda: [s.info() for s in list(self.streams.values())])
        self._metrics_server = None

    @staticmethod
    def _tls(cfg: CollectorConfig) -> Tls | None:
        t = cfg.tls
        if not t.ca:
            plain = [a for a in cfg.agents if not is_local(a)]
            if plain or cfg.discover_dns or cfg.discover_files:
                raise ConfigError("tls.ca is required: events are sent in plain text only to "
                                  "agents on loopback or a Unix socket")
            return None
        tls = Tls(t.ca, t.cert, t.key, t.server_name)
        tls.credentials()     # the files are readable: fail at start, not per agent
        return tls

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything, with discovery and probes in a thread of their own (run() adds the
        signal handling of the foreground process)."""
        self.writer.start()
        if self.cfg.metrics_listen:
            from hostagent.metrics.server import MetricsServer

            host, port = self.cfg.metrics_listen
            self._metrics_server = MetricsServer(host, port, self.metrics.registry,
                                                 ready=lambda: self.writer.is_alive())
            self._metrics_server.start()
            log.info("collector metrics on http://%s:%d/metrics",
                     *self._metrics_server.address)
        self.refresh()
        log.info("collector: %d agent addresses, storing in %s", len(self.streams),
                 self.writer.store.display())
        self._ticker = threading.Thread(target=self._tick_loop, name="collector-discovery",
                                        daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(DISCOVERY_TICK):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - discovery must go on; the error is logged
                log.exception("collector: discovery failed")

    def refresh(self) -> None:
        """Start streams for addresses the sources name, stop those they no longer name."""
        with self._streams_lock:
            wanted: set[str] = set()
            for source in self.sources:
                wanted |= source.addresses()
            for address in sorted(wanted - self.streams.keys()):
                if not self.tls and not is_local(address):
                    log.error("agent %s: not on loopback and tls.ca is not set: not "
                              "connecting", address)
                    continue
                s = AgentStream(address, self.tls, self.writer, self._claim, self._release,
                                self.metrics, self.cfg.max_batch)
                self.streams[address] = s
                s.start()
            for address in sorted(self.streams.keys() - wanted):
                log.info("agent %s: no longer discovered: disconnecting", address)
                self.streams.pop(address).stop()

    def run(self) -> int:
        """In the foreground until SIGTERM/SIGINT (queued by the handlers, handled here);
        SIGHUP looks at the discovery sources at once."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda n, _f: self._signals.append(n))
        self.start()
        try:
            while not self._stop.is_set():
                while self._signals:
                    signum = self._signals.popleft()
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: discovery now")
                        for source in self.sources:
                            source.due()
                        self.refresh()
                    else:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        self._stop.set()
                if not self.writer.is_alive():
                    log.error("the writer stopped (%s): exiting", self.writer.failed)
                    return 1
                self._stop.wait(0.2)
        finally:
            self.stop()
        return 0

    def tick(self) -> None:
        self.refresh()
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + self.cfg.probe_interval
            for s in list(self.streams.values()):
                self._probes.submit(s.probe)

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(10)
        with self._streams_lock:
            streams = list(self.streams.values())
        for s in streams:
            s.stop()
        for s in streams:
            s.join(10)
        self._probes.shutdown(wait=False, cancel_futures=True)
        self.writer.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()

    # -- one stream per node ------------------------------------------------------------------

    def _claim(self, node: str, stream: AgentStream) -> bool:
        with self._owners_lock:
            owner = self._owners.get(node)
            if owner is not None and owner is not stream and owner.is_alive() \
                    and owner.node == node and owner.state in ("connecting", "streaming"):
                return False
            self._owners[node] = stream
            return True

    def _release(self, node: str, stream: AgentStream) -> None:
        with self._owners_lock:
            if self._owners.get(node) is stream:
                del self._owners[node]

    def _on_conflict(self, agent_id: int) -> None:
        for s in list(self.streams.values()):
            if s.agent_id == agent_id:
                s.cancel("the database cursor moved under this stream: resuming from it")
