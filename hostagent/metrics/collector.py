"""Prometheus metrics, read from the kernel maps at scrape time.

One explicit CollectorRegistry per agent (no import-time globals). Labels come from bounded
sets only: policy names, verdicts, reasons, hooks, map names; never addresses.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hostagent import __version__
from hostagent.bpf import abi

log = logging.getLogger(__name__)


class KernelCollector:
    """Decisions, kernel-side errors and map fill, straight from the maps."""

    def __init__(self, agent) -> None:
        self._agent = agent

    def collect(self):
        decisions = CounterMetricFamily(
            "hostagent_decisions", "Connection decisions made in the kernel, allow included",
            labels=["policy", "verdict", "reason", "hook"])
        errors = CounterMetricFamily(
            "hostagent_kernel_errors", "Kernel-side failures (map updates, ring buffer)",
            labels=["error", "file", "line"])
        drops = CounterMetricFamily(
            "hostagent_ringbuf_dropped_events", "Events the kernel could not queue")
        entries = GaugeMetricFamily("hostagent_map_entries", "Entries in use per map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("hostagent_map_capacity", "Capacity per map",
                                     labels=["map"])
        enf = self._agent.enforcement
        try:
            if enf is not None:
                for (pid, verdict, reason, hook), n in enf.decisions().items():
                    decisions.add_metric([enf.policy_name(pid) or "", _name(abi.Verdict, verdict),
                                          _name(abi.Reason, reason), _name(abi.Hook, hook)], n)
                dropped = 0
                for (err, file_id, line), n in enf.errors().items():
                    errors.add_metric([_name(abi.KernelError, err),
                                       _name(abi.SourceFile, file_id), str(line)], n)
                    if err == abi.KernelError.RINGBUF_FULL:
                        dropped += n
                drops.add_metric([], dropped)
                for name, (used, cap) in enf.fill().items():
                    entries.add_metric([name], used)
                    capacity.add_metric([name], cap)
        except Exception:  # a scrape must never take the agent down; count it instead
            log.exception("reading kernel maps for metrics failed")
            self._agent.metrics.collector_errors.inc()
        yield from (decisions, errors, drops, entries, capacity)


def _name(enum_cls, value: int) -> str:
    try:
        return enum_cls(value).name.lower()
    except ValueError:
        return str(value)


class AgentMetrics:
    """The agent's own metrics plus the kernel collector, in one registry."""

    def __init__(self, agent) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.collector_errors = Counter("hostagent_collector_errors_total",
                                        "Metric collections that failed", registry=r)
        self.reloads = Counter("hostagent_policy_reloads_total", "Policy reloads by result",
                               ["result"], registry=r)
        self.generation = Gauge("hostagent_policy_generation", "Policy generation in force",
                                registry=r)
        self.attached = Gauge("hostagent_program_attached", "1 when the program is attached",
                              ["program"], registry=r)
        self.ready = Gauge("hostagent_ready", "1 once programs are attached and a policy is in "
                           "force", registry=r)
        self.events = Counter("hostagent_events_total", "Events read from the kernel",
                              ["verdict"], registry=r)
        self.cgroups = Gauge("hostagent_cgroups", "cgroups below the agent's root", registry=r)
        self.conflicts = Gauge("hostagent_selector_conflicts",
                               "cgroups denied everything because policies of equal precedence "
                               "select them", registry=r)
        self.conflicts.set_function(lambda: len(agent._binder.conflicts) if agent._binder else 0)
        self.kubernetes = Gauge("hostagent_kubernetes_synced",
                                "1 while the pod watch of this node is in sync", registry=r)
        self.kubernetes.set_function(
            lambda: 1 if agent.identity and agent.identity.kubernetes_state == "synced" else 0)
        self.info = Gauge("hostagent_build_info", "Agent version", ["version"], registry=r)
        self.info.labels(__version__).set(1)
        r.register(KernelCollector(agent))
