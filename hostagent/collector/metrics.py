"""The collector's own metrics (``metrics.listen``): one explicit registry, no globals.

Labels come from bounded sets: the agents' node names (the fleet), gRPC status codes, lost
sources; never addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("hostagent_collector_events_stored", "Events stored", registry=r)
        self.transactions = Counter("hostagent_collector_transactions",
                                    "Write transactions committed (each holds one or more "
                                    "received batches and their cursor advances)", registry=r)
        self.write_seconds = Histogram("hostagent_collector_write_seconds",
                                       "Time to write one transaction", registry=r,
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                                5, 10))
        self.lost = Counter("hostagent_collector_lost_events",
                            "Events recorded as lost, by who said so", ["source"], registry=r)
        self.duplicates = Counter("hostagent_collector_duplicates",
                                  "Events received again and dropped (seq already stored)",
                                  registry=r)
        self.stream_errors = Counter("hostagent_collector_stream_errors",
                                     "Agent streams that ended in an error, by gRPC code",
                                     ["code"], registry=r)
        self.store_errors = Counter("hostagent_collector_store_errors",
                                    "Database writes that failed (retried)", registry=r)
        self.conflicts = Counter("hostagent_collector_cursor_conflicts",
                                 "Writes refused because another writer moved an agent's cursor",
                                 registry=r)
        self.pruned = Counter("hostagent_collector_pruned_events",
                              "Events deleted by retention", registry=r)
        self.new_destinations = Counter("hostagent_collector_first_seen_destinations",
                                        "Destinations seen for the first time by their "
                                        "workload", registry=r)
        self.queue = Gauge("hostagent_collector_queue_batches",
                           "Received batches waiting for the writer", registry=r)

    def watch_agents(self, agents: Callable[[], Iterable[dict]]) -> None:
        """Per-agent gauges read at scrape time from ``agents()``: dicts with node, state,
        cursor and lag (None when unknown)."""
        self.registry.register(_AgentCollector(agents))


class _AgentCollector:
    def __init__(self, agents: Callable[[], Iterable[dict]]) -> None:
        self._agents = agents

    def describe(self):
        return []

    def collect(self):
        connected = GaugeMetricFamily("hostagent_collector_agent_connected",
                                      "1 while the agent's event stream is open", labels=["node"])
        cursor = GaugeMetricFamily("hostagent_collector_agent_cursor",
                                   "Highest seq up to which the agent's events were received "
                                   "(stored or recorded lost, or queued to be)", labels=["node"])
        lag = GaugeMetricFamily("hostagent_collector_agent_lag_events",
                                "Events the agent has numbered that are not stored yet (at the "
                                "last probe)", labels=["node"])
        for a in self._agents():
            if not a.get("node"):
                continue
            connected.add_metric([a["node"]], 1.0 if a["state"] == "streaming" else 0.0)
            if a.get("cursor") is not None:
                cursor.add_metric([a["node"]], float(a["cursor"]))
            if a.get("lag") is not None:
                lag.add_metric([a["node"]], float(a["lag"]))
        yield connected
        yield cursor
        yield lag
