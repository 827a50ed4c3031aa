"""Draining the kernel's ring buffer.

The programs submit without waking us (BPF_RB_NO_WAKEUP, see bpf/lib/events.h), so the daemon
calls drain() on a short timer instead of blocking in epoll.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable

from hostagent.bpf import abi

DRAIN_INTERVAL = 0.010  # seconds: bounds event latency; the ring holds ~40k events of slack
# Records handled per drain. libbpf's consume loops until the ring is empty, so a workload
# flooding denied connects could otherwise keep the agent's loop (reloads, signals) from ever
# getting its turn. A drain that used its whole budget says so, and the loop drains again
# without sleeping once it has looked at signals and cgroup events.
DRAIN_BUDGET = 4096


class RingReader:
    """handle(event) for each decision record, handle_close(record) for each close_event
    (event.hook == Hook.TCP_CLOSE, bpf/sock_ops.c)."""

    def __init__(self, programs, handle: Callable[[abi.Event], None],
                 handle_close: Callable[[abi.CloseEvent], None] | None = None) -> None:
        self._bpf = programs.bpf
        self._handle = handle
        self._handle_close = handle_close
        self.received = 0
        self.malformed = 0
        self._budget = DRAIN_BUDGET

        def _cb(_ctx, data, size):
            # the record is consumed whatever we return; < 0 only stops this drain
            if size < ct.sizeof(abi.Event):
                self.malformed += 1
            else:
                # a view of the ring, not a copy: valid until the callback returns, which is
                # as long as a handler may keep it (it copies what it keeps)
                event = abi.Event.from_address(data)
                if event.hook != abi.Hook.TCP_CLOSE:
                    self.received += 1
                    self._handle(event)
                elif size < ct.sizeof(abi.CloseEvent) or self._handle_close is None:
                    self.malformed += 1
                else:
                    self.received += 1
                    self._handle_close(abi.CloseEvent.from_address(data))
            self._budget -= 1
            return -1 if self._budget <= 0 else 0

        self._cb = _cb  # keep a reference: bcc holds only a C pointer to it
        programs["events"].open_ring_buffer(_cb)

    def drain(self) -> bool:
        """Handle what the ring holds, up to the budget; True if records may be left."""
        self._budget = DRAIN_BUDGET
        self._bpf.ring_buffer_consume()
        return self._budget <= 0
