"""Kernel event records -> the event dictionaries users read (event log, later gRPC).

Every event names the workload, the destination, the verdict, and the policy and rule behind
it. the README's event table describes each field; keep both in step.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

from hostagent.bpf import abi

_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
              socket.IPPROTO_ICMPV6: "icmpv6", socket.IPPROTO_RAW: "raw", 262: "mptcp",
              socket.IPPROTO_SCTP: "sctp", 0: "ip"}


class BootClock:
    """Turns CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns) into wall-clock time."""

    def __init__(self) -> None:
        self.resync()

    def resync(self) -> None:
        # re-read now and then: the wall clock can be stepped by NTP
        self._offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def wall(self, boot_ns: int) -> datetime:
        return datetime.fromtimestamp((boot_ns + self._offset) / 1e9, tz=timezone.utc)


def protocol_name(proto: int) -> str:
    return _PROTOCOLS.get(proto, str(proto))


def to_dict(e: abi.Event, clock: BootClock, policy_name: Callable[[int], str],
            rule_name: Callable[[int, int], str | None],
            identity: Callable[[int], dict],
            process: Callable[[int, int, str], dict | None] | None = None) -> dict:
    """One event record as the documented dictionary.

    identity(cgroup_id) gives the workload's identity fields (kind, namespace, pod, ..., cgroup
    path); process(pid, tid, comm) what user space adds about the process (exe, ppid). The kernel's
    own fields (cgroup id, pid, tid, comm, uid, gid) are written last, so nothing looked up
    later can overwrite them.
    """
    dest = None
    comm = e.comm.decode(errors="replace")
    if e.hook != abi.Hook.SOCK_CREATE:
        dest = {"ip": str(abi.address_of(bytes(e.daddr))), "port": e.dport,
                "protocol": protocol_name(e.protocol), "name": None}
    return {
        "kind": "connection",
        "time": clock.wall(e.time_ns).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "verdict": abi.Verdict(e.verdict).name.lower(),
        "reason": abi.Reason(e.reason).name.lower(),
        "policy": policy_name(e.policy_id) or None,
        "rule": rule_name(e.ruleset_id, e.rule) if e.rule != abi.RULE_NONE else None,
        "generation": e.generation,
        "hook": abi.Hook(e.hook).name.lower(),
        "workload": {
            **identity(e.cgroup_id),
            **((process(e.pid, e.tid, comm) if process and e.pid else None)
               or {"exe": None, "ppid": None}),
            "cgroup_id": e.cgroup_id,
            "pid": e.pid,
            "tid": e.tid,
            "comm": comm,
            "uid": e.uid,
            "gid": e.gid,
        },
        "destination": dest,
        "socket": {"cookie": e.sock_cookie, "family": "ipv6" if e.family == socket.AF_INET6
                   else "ipv4", "protocol": protocol_name(e.protocol)},
    }
