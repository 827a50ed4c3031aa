"""The --event-log sink: one JSON object per line, to a file or stdout."""

from __future__ import annotations

import json
import os
import sys


class EventLog:
    """Each event is one write(2) of one whole line on an O_APPEND descriptor.

    A tailing reader (or a second agent appending to the same file during a takeover) never sees
    half an event: a buffered text stream may split a long line across two writes.
    """

    def __init__(self, target: str | None) -> None:
        self._fd: int | None = None
        self._own = False
        if target == "-":
            sys.stdout.flush()
            self._fd = sys.stdout.fileno()
        elif target:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._own = True
        self.written = 0

    def write(self, event: dict) -> None:
        if self._fd is None:
            return
        data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # a pipe on stdout may take a long line in parts
            view = view[os.write(self._fd, view):]
        self.written += 1

    def flush(self) -> None:
        """Nothing is buffered in user space; kept for callers that flush at shutdown."""

    def close(self) -> None:
        if self._own and self._fd is not None:
            os.close(self._fd)
        self._fd = None
