"""The on-disk spool: every published event, numbered, kept up to a size cap.

It is what lets a collector resume after the agent itself restarted: the new agent numbers on
from the spool's last seq, and events older than the memory replay buffer are read back from
here. Segments are files ``<first seq>.evt`` of records ``seq (u64) | length (u32) | Event``
(the serialized protobuf); the oldest segment is deleted when the spool outgrows its cap.

Writes are buffered per tick and go out in one write(2) on an O_APPEND descriptor: a SIGKILLed
agent loses nothing the kernel accepted, and a torn last record (power loss) is cut off when
the spool is opened again.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<QI")
SEGMENTS_PER_CAP = 8   # a segment is a cap / 8: deleting one frees an eighth of the spool
MAX_RECORD = 1 << 20   # larger lengths in a record header mean a corrupt segment
# A reader finds where a seq lies in a segment from a sparse index: (seq, offset) of every
# INDEX_EVERY-th record, kept in memory (built as records are appended, or by one scan of a
# segment an earlier agent wrote), then reads from there in chunks of READ_CHUNK bytes.
# Without it, each batch re-read its whole segment from the start: 54k events/s of catch-up.
INDEX_EVERY = 128
READ_CHUNK = 256 * 1024


class Spool:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self._segment_bytes = max(max_bytes // SEGMENTS_PER_CAP, 64 * 1024)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()    # segment list: readers are the gRPC threads
        self._segments: list[int] = sorted(
            int(n[:-4]) for n in os.listdir(directory) if n.endswith(".evt") and n[:-4].isdigit())
        self._buf: list[bytes] = []   # records since the last flush, joined once per flush
        # first seq of a segment -> [(seq, offset)] of every INDEX_EVERY-th record; a segment
        # missing here is scanned once when first read. Lists only grow (appends are atomic
        # for the gRPC threads that bisect them).
        self._index: dict[int, list[tuple[int, int]]] = {}
        self._current_index: list[tuple[int, int]] = []
        self._count = 0   # records in the current segment
        self._pending = 0
        self._fd: int | None = None
        self._size = 0
        self.last_seq = 0
        self.truncated = 0
        if self._segments:
            self.last_seq = self._recover(self._segments[-1])
        self._total = sum(self._file_size(s) for s in self._segments)

    def _path(self, first: int) -> str:
        return os.path.join(self.dir, f"{first:020d}.evt")

    def _file_size(self, first: int) -> int:
        try:
            return os.path.getsize(self._path(first))
        except FileNotFoundError:
            return 0

    def _recover(self, first: int) -> int:
        """The last whole record's seq; a torn tail is cut off. The segment is indexed from
        the same read."""
        last, good = first - 1, 0
        with open(self._path(first), "rb") as f:
            data = f.read()
        index = []
        for i, (seq, pos, end) in enumerate(_records(data)):
            if i % INDEX_EVERY == 0:
                index.append((seq, pos))
            last, good = seq, end
        if good < len(data):
            self.truncated = len(data) - good
            log.warning("spool %s: cut %d bytes of a torn record", self._path(first),
                        self.truncated)
            os.truncate(self._path(first), good)
        if good == 0:  # nothing whole: the segment starts over
            os.unlink(self._path(first))
            self._segments.pop()
            return self._recover(self._segments[-1]) if self._segments else 0
        self._index[first] = index
        return last

    def append(self, seq: int, wire: bytes) -> None:
        if self._fd is None or self._size + self._pending >= self._segment_bytes:
            self.flush()
            self._roll(seq)   # a segment's name is the seq of its first record
        if self._count % INDEX_EVERY == 0:
            self._current_index.append((seq, self._size + self._pending))
        self._count += 1
        self._buf.append(_HEAD.pack(seq, len(wire)))
        self._buf.append(wire)
        self._pending += _HEAD.size + len(wire)
        self.last_seq = seq

    def _roll(self, first: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path(first), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                           | os.O_CLOEXEC, 0o600)
        self._size = self._file_size(first)   # a recovered segment is appended to
        with self._lock:
            if not self._segments or self._segments[-1] != first:
                self._segments.append(first)
            index = self._index.get(first) if self._size else None
            if index is None:
                index = self._scan(first) if self._size else []
                self._index[first] = index
            self._current_index = index
            self._count = INDEX_EVERY if self._size else 0   # next record: a new sample
            while self._total > self.max_bytes and len(self._segments) > 1:
                oldest = self._segments.pop(0)
                self._index.pop(oldest, None)
                self._total -= self._file_size(oldest)
                try:
                    os.unlink(self._path(oldest))
                except FileNotFoundError:
                    pass

    def flush(self) -> None:
        if not self._buf or self._fd is None:
            return
        data = b"".join(self._buf)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._size += len(data)
        self._total += len(data)
        self._buf, self._pending = [], 0

    @property
    def first_seq(self) -> int:
        """The oldest seq the spool still holds (last_seq + 1 when it holds none)."""
        with self._lock:
            return self._segments[0] if self._segments else self.last_seq + 1

    def _scan(self, first: int) -> list[tuple[int, int]]:
        """The sparse index of a segment on disk, by reading it once."""
        try:
            with open(self._path(first), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        return [(seq, pos) for i, (seq, pos, _end) in enumerate(_records(data))
                if i % INDEX_EVERY == 0]

    def _offset(self, first: int, start: int) -> int:
        """Where to start reading a segment for seq ``start``: the last sample at or before."""
        with self._lock:
            index = self._index.get(first)
            if index is None:
                index = self._index[first] = self._scan(first)
        i = bisect.bisect_right(index, (start, 1 << 62)) - 1
        return index[i][1] if i >= 0 else 0

    def read(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to limit records with seq >= start, from the files (what flush() wrote)."""
        with self._lock:
            segments = list(self._segments)
        out: list[tuple[int, bytes]] = []
        firsts = [s for s in segments if s <= start] or segments[:1]
        for first in segments[segments.index(firsts[-1]):]:
            try:
                f = open(self._path(first), "rb")
            except FileNotFoundError:   # deleted under us: the next one is newer
                continue
            with f:
                offset = self._offset(first, start) if first <= start else 0
                self._read_from(f, offset, start, limit, out)
            if len(out) >= limit:
                break
        return out

    @staticmethod
    def _read_from(f, offset: int, start: int, limit: int, out: list) -> None:
        """Append records with seq >= start from ``offset`` on, in chunks, until limit or the
        end of what was written."""
        f.seek(offset)
        data = b""
        while more := f.read(READ_CHUNK):
            data += more
            pos = 0
            for seq, head, end in _records(data):
                if seq >= start:
                    out.append((seq, data[head + _HEAD.size:end]))
                    if len(out) >= limit:
                        return
                pos = end
            data = data[pos:]   # a record the chunk cut in two: completed by the next one

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _records(data: bytes):
    """(seq, offset, end) of each whole record of ``data``, in order, up to the first torn or
    corrupt one (a length past MAX_RECORD)."""
    pos = 0
    while pos + _HEAD.size <= len(data):
        seq, n = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + n
        if n > MAX_RECORD or end > len(data):
            return
        yield seq, pos, end
        pos = end

