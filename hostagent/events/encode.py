"""Kernel event records -> serialized hostagent.v1.Event, the form every sink starts from.

A busy node sends a flood of records that differ in little: the same workload connects to the
same few destinations under the same decision. So an Event is put together from pieces
serialized once and cached: the node and version, the decision (verdict, reason, policy, rule,
ticket, generation, hook), the workload (identity and process), the destination. Only the seq,
the time and the socket are encoded per record. Concatenating serialized fields is how
protobuf itself merges messages, so the result parses as one Event.

Caches are dropped every second (reset()) and whenever they grow past their bound: identity
(pod metadata arriving), process details (exe, ppid) and resolved names are never staler than
that.

Every event names the workload, the destination, the verdict, and the policy and rule behind
it. The README's event table describes each field; keep both in step.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from hostagent.bpf import abi
from hostagent.events.convert import workload_message
from hostagent.v1 import events_pb2 as pb

_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
              socket.IPPROTO_ICMPV6: "icmpv6", socket.IPPROTO_RAW: "raw", 262: "mptcp",
              socket.IPPROTO_SCTP: "sctp", 0: "ip"}
_VERDICTS = {abi.Verdict.ALLOW: pb.VERDICT_ALLOW, abi.Verdict.DENY: pb.VERDICT_DENY,
             abi.Verdict.AUDIT: pb.VERDICT_AUDIT}
MAX_CACHED = 8192   # entries per cache; a full cache is dropped and refilled


class BootClock:
    """Turns CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns) into wall-clock time."""

    def __init__(self) -> None:
        self.resync()

    def resync(self) -> None:
        # re-read now and then: the wall clock can be stepped by NTP
        self._offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def split(self, boot_ns: int) -> tuple[int, int]:
        """(seconds, nanoseconds) since the epoch, as a protobuf Timestamp holds them."""
        return divmod(boot_ns + self._offset, 1_000_000_000)


def protocol_name(proto: int) -> str:
    return _PROTOCOLS.get(proto, str(proto))


class ConnectionEncoder:
    """encode(record, seq) -> the serialized Event of a kernel decision.

    identity(cgroup_id) gives the workload's identity fields (kind, namespace, pod, ..., cgroup
    path); process(pid, tid, comm) what user space adds about the process (exe, ppid), or None;
    name_of(cgroup_id, daddr) the name the workload resolved the address from. The kernel's own
    fields (cgroup id, pid, tid, comm, uid, gid) win over anything looked up.
    """

    def __init__(self, node: str, version: str, clock: BootClock,
                 policy_name: Callable[[int], str],
                 rule_name: Callable[[int, int], str | None],
                 ticket: Callable[[int, int], str | None],
                 identity: Callable[[int], dict],
                 process: Callable[[int, int, str], dict | None] | None = None,
                 name_of: Callable[[int, bytes], str | None] | None = None) -> None:
        self._clock = clock
        self._policy_name, self._rule_name, self._ticket = policy_name, rule_name, ticket
        self._identity, self._process, self._name_of = identity, process, name_of
        self._head = pb.Event(node=node, agent_version=version,
                              kind=pb.KIND_CONNECTION).SerializeToString()
        self._close_head = pb.Event(node=node, agent_version=version,
                                    kind=pb.KIND_CONNECTION_CLOSE).SerializeToString()
        self._close = pb.Event(close=pb.ConnectionClose())
        # per (family, protocol): an Event holding the per-record fields, reused: setting four
        # fields of a live message costs a third of building one
        self._templates: dict[tuple[int, int], pb.Event] = {}
        self._decisions: dict[tuple, bytes] = {}
        self._workloads: dict[tuple, bytes] = {}
        self._destinations: dict[tuple, bytes] = {}

    def reset(self) -> None:
        self._decisions.clear()
        self._workloads.clear()
        self._destinations.clear()

    def encode_close(self, c: abi.CloseEvent, seq: int) -> bytes:
        """The serialized Event of a connection that ended: the decision it was opened under,
        with what it carried (kind connection_close)."""
        detail = self._close.close
        detail.bytes_sent, detail.bytes_received = c.bytes_sent, c.bytes_received
        detail.duration_ns = c.duration_ns
        return self.encode(c.event, seq, head=self._close_head) + \
            self._close.SerializeToString()

    def encode(self, e: abi.Event, seq: int, count: int = 0, head: bytes | None = None) -> bytes:
        seconds, nanos = self._clock.split(e.time_ns)
        tmpl = self._templates.get((e.family, e.protocol))
        if tmpl is None:
            tmpl = self._templates[e.family, e.protocol] = pb.Event(socket=pb.Socket(
                family="ipv6" if e.family == socket.AF_INET6 else "ipv4",
                protocol=protocol_name(e.protocol)))
        tmpl.seq, tmpl.count = seq, count
        tmpl.time.seconds, tmpl.time.nanos = seconds, nanos
        tmpl.socket.cookie = e.sock_cookie
        tail = tmpl.SerializeToString()
        key = (e.verdict, e.reason, e.policy_id, e.ruleset_id, e.rule, e.generation, e.hook)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._store(self._decisions, key, self._decision(e))
        key = (e.cgroup_id, e.pid, e.tid, e.comm, e.uid, e.gid)
        workload = self._workloads.get(key)
        if workload is None:
            workload = self._store(self._workloads, key, self._workload(e))
        destination = b""
        if e.hook != abi.Hook.SOCK_CREATE:
            daddr = bytes(e.daddr)
            name = self._name_of(e.cgroup_id, daddr) if self._name_of else None
            key = (daddr, e.dport, e.protocol, name)
            destination = self._destinations.get(key)
            if destination is None:
                destination = self._store(self._destinations, key, pb.Event(
                    destination=pb.Destination(ip=str(abi.address_of(daddr)), port=e.dport,
                                               protocol=protocol_name(e.protocol),
                                               name=name or "")).SerializeToString())
        return tail + (head or self._head) + decision + workload + destination

    @staticmethod
    def _store(cache: dict, key: tuple, value: bytes) -> bytes:
        if len(cache) >= MAX_CACHED:
            cache.clear()
        cache[key] = value
        return value

    def _decision(self, e: abi.Event) -> bytes:
        ruled = e.rule != abi.RULE_NONE
        return pb.Event(
            verdict=_VERDICTS.get(e.verdict, pb.VERDICT_UNSPECIFIED),
            reason=abi.Reason(e.reason).name.lower(),
            policy=self._policy_name(e.policy_id) or "",
            rule=(self._rule_name(e.ruleset_id, e.rule) or "") if ruled else "",
            ticket=(self._ticket(e.ruleset_id, e.rule) or "") if ruled else "",
            generation=e.generation, hook=abi.Hook(e.hook).name.lower()).SerializeToString()

    def _workload(self, e: abi.Event) -> bytes:
        comm = e.comm.decode(errors="replace")
        fields = dict(self._identity(e.cgroup_id))
        if self._process is not None and e.pid:
            fields.update(self._process(e.pid, e.tid, comm) or {})
        fields.update(cgroup_id=e.cgroup_id, pid=e.pid, tid=e.tid, comm=comm, uid=e.uid,
                      gid=e.gid)
        return pb.Event(workload=workload_message(fields)).SerializeToString()
