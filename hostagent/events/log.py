"""The --event-log sink: one JSON object per line, to a file or stdout."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO


class EventLog:
    def __init__(self, target: str | None) -> None:
        self._own = False
        self._f: TextIO | None = None
        if target == "-":
            self._f = sys.stdout
        elif target:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            # line-buffered: an event is on disk (in the page cache) as soon as it is written
            self._f = open(target, "a", buffering=1, encoding="utf-8")
            self._own = True
        self.written = 0

    def write(self, event: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
            self.written += 1

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._own and self._f is not None:
            self._f.close()
        self._f = None
