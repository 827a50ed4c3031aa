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

import logging
import os
import struct
import threading

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<QI")
SEGMENTS_PER_CAP = 8   # a segment is a cap / 8: deleting one frees an eighth of the spool
MAX_RECORD = 1 << 20   # larger lengths in a record header mean a corrupt segment


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
        """The last whole record's seq; a torn tail is cut off."""
        last, good = first - 1, 0
        with open(self._path(first), "rb") as f:
            data = f.read()
        pos = 0
        while pos + _HEAD.size <= len(data):
            seq, n = _HEAD.unpack_from(data, pos)
            if n > MAX_RECORD or pos + _HEAD.size + n > len(data):
                break
            last, pos = seq, pos + _HEAD.size + n
            good = pos
        if good < len(data):
            self.truncated = len(data) - good
            log.warning("spool %s: cut %d bytes of a torn record", self._path(first),
                        self.truncated)
            os.truncate(self._path(first), good)
        if good == 0:  # nothing whole: the segment starts over
            os.unlink(self._path(first))
            self._segments.pop()
            return self._recover(self._segments[-1]) if self._segments else 0
        return last

    def append(self, seq: int, wire: bytes) -> None:
        if self._fd is None or self._size + self._pending >= self._segment_bytes:
            self.flush()
            self._roll(seq)   # a segment's name is the seq of its first record
        self._buf.append(_HEAD.pack(seq, len(wire)))
        self._buf.append(wire)
        self._pending += _HEAD.size + len(wire)
        self.last_seq = seq

    def _roll(self, first: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path(first), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                           | os.O_CLOEXEC, 0o600)
        self._size = 0
        with self._lock:
            if not self._segments or self._segments[-1] != first:
                self._segments.append(first)
            while self._total > self.max_bytes and len(self._segments) > 1:
                oldest = self._segments.pop(0)
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

    def read(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to limit records with seq >= start, from the files (what flush() wrote)."""
        with self._lock:
            segments = list(self._segments)
        out: list[tuple[int, bytes]] = []
        firsts = [s for s in segments if s <= start] or segments[:1]
        for first in segments[segments.index(firsts[-1]):]:
            try:
                with open(self._path(first), "rb") as f:
                    data = f.read()
            except FileNotFoundError:   # deleted under us: the next one is newer
                continue
            pos = 0
            while pos + _HEAD.size <= len(data) and len(out) < limit:
                seq, n = _HEAD.unpack_from(data, pos)
                if pos + _HEAD.size + n > len(data):
                    break
                if seq >= start:
                    out.append((seq, bytes(data[pos + _HEAD.size:pos + _HEAD.size + n])))
                pos += _HEAD.size + n
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
