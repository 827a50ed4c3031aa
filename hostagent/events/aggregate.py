"""Folding repeated allowed flows (events.aggregate.window) so a busy node does not drown the
pipeline in identical evidence.

A flow is (workload cgroup, destination address, port, protocol, policy, rule). Its first
allowed event in a window is sent at once, as usual: the first contact is never delayed. Every
further identical event in the window is only counted; when the window closes, one event
stands for them all, carrying `count` (how many it stands for) and the last one's process and
socket. Denies and audits never come here: each of them is evidence of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hostagent.bpf import abi

MAX_FLOWS = 65536   # distinct flows tracked per window; beyond it events pass unaggregated


class Aggregator:
    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._opened = clock()
        # flow -> [events absorbed, the last absorbed record (None until one is)]
        self._flows: dict[tuple, list] = {}
        self.absorbed = 0

    @staticmethod
    def flow(e: abi.Event) -> tuple:
        return (e.cgroup_id, bytes(e.daddr), e.dport, e.protocol, e.policy_id, e.ruleset_id,
                e.rule)

    def absorb(self, e: abi.Event) -> bool:
        """True if the event is folded into its flow's summary (the caller sends nothing)."""
        key = self.flow(e)
        entry = self._flows.get(key)
        if entry is None:
            if len(self._flows) < MAX_FLOWS:
                self._flows[key] = [0, None]
            return False
        entry[0] += 1
        entry[1] = abi.Event.from_buffer_copy(e)
        self.absorbed += 1
        return True

    def due(self) -> bool:
        return self._clock() - self._opened >= self.window

    def close_window(self) -> list[tuple[int, abi.Event]]:
        """(count, last record) of every flow that absorbed events; a new window opens."""
        out = [(n, last) for n, last in self._flows.values() if n]
        self._flows = {}
        self._opened = self._clock()
        return out
