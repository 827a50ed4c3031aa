"""Draining the kernel's ring buffer.

The programs submit without waking us (BPF_RB_NO_WAKEUP, see bpf/lib/events.h), so the daemon
calls drain() on a short timer instead of blocking in epoll.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable

from hostagent.bpf import abi

DRAIN_INTERVAL = 0.010  # seconds: bounds event latency; the ring holds ~40k events of slack


class RingReader:
    def __init__(self, programs, handle: Callable[[abi.Event], None]) -> None:
        self._bpf = programs.bpf
        self._handle = handle
        self.received = 0

        def _cb(_ctx, data, size):
            if size < ct.sizeof(abi.Event):
                return 0
            event = abi.Event.from_buffer_copy(ct.string_at(data, ct.sizeof(abi.Event)))
            self.received += 1
            self._handle(event)
            return 0

        self._cb = _cb  # keep a reference: bcc holds only a C pointer to it
        programs["events"].open_ring_buffer(_cb)

    def drain(self) -> None:
        self._bpf.ring_buffer_consume()
