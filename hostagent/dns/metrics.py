"""Prometheus metrics of the resolver, built at scrape time from its plain-int counters.

The hot path counts in ints (Resolver.stats() copies them); prometheus_client objects would cost
a lock per increment. Labels come from bounded sets only: policy names, verdicts, rcodes and the
configured upstreams, never query names or addresses.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from hostagent.dns.upstream import LATENCY_BUCKETS

__all__ = ["DnsCollector"]

log = logging.getLogger(__name__)


class DnsCollector:
    """Register with ``registry.register(DnsCollector(resolver))``.

    ``on_error`` (optional) is called when a collection fails, e.g. to increment the agent's
    hostagent_collector_errors_total; the scrape then carries no DNS metrics instead of failing.
    """

    def __init__(self, resolver, on_error=None) -> None:
        self._resolver = resolver
        self._on_error = on_error

    def describe(self):
        # Lets the registry check names without calling collect() at registration.
        return list(self._families({}))

    def collect(self):
        try:
            stats = self._resolver.stats()
        except Exception:  # a scrape must never take the agent down; count it instead
            log.exception("reading DNS resolver counters for metrics failed")
            if self._on_error is not None:
                self._on_error()
            return
        yield from self._families(stats)

    @staticmethod
    def _families(s: dict):
        queries = CounterMetricFamily(
            "hostagent_dns_queries", "DNS queries answered by the node resolver",
            labels=["policy", "verdict", "rcode"])
        for row in s.get("queries_by", ()):
            queries.add_metric([row["policy"], row["verdict"], row["rcode"]], row["count"])
        yield queries

        def counter(name: str, doc: str, key: str):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], s.get(key, 0))
            return family

        yield counter("hostagent_dns_cache_hits", "Queries answered from the cache", "cache_hits")
        yield counter("hostagent_dns_hot_hits", "Cache hits answered as an exact repeat of a "
                      "query the workload sent before, without parsing it", "hot_hits")
        yield counter("hostagent_dns_cache_misses", "Queries that needed an upstream",
                      "cache_misses")
        yield counter("hostagent_dns_tunnel_refused",
                      "Queries refused as DNS tunnelling (label shape or unique-name rate)",
                      "tunnel_refused")
        yield counter("hostagent_dns_rate_limited", "Queries refused by the per-workload limit",
                      "rate_limited")
        yield counter("hostagent_dns_unattributed",
                      "Queries refused because the kernel could not name their sender",
                      "unattributed")
        yield counter("hostagent_dns_internal_errors",
                      "Queries answered SERVFAIL because handling them raised", "internal_errors")
        yield counter("hostagent_dns_allowance_failures",
                      "Answers withheld (SERVFAIL) because opening their addresses failed",
                      "allowance_failures")

        failures = CounterMetricFamily(
            "hostagent_dns_upstream_failures",
            "Upstream exchanges that timed out, failed or gave an unusable rcode",
            labels=["upstream"])
        for upstream, n in s.get("upstream_failures_by", {}).items():
            failures.add_metric([upstream], n)
        yield failures

        latency = HistogramMetricFamily(
            "hostagent_dns_upstream_latency_seconds", "Time for an upstream to answer")
        counts = s.get("upstream_latency", {}).get("counts") or [0] * (len(LATENCY_BUCKETS) + 1)
        buckets, total = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts):
            total += n
            buckets.append((bound, total))
        latency.add_metric([], buckets, s.get("upstream_latency", {}).get("sum", 0.0))
        yield latency

        cache = GaugeMetricFamily("hostagent_dns_cache_entries", "Answers in the cache")
        cache.add_metric([], s.get("cache_entries", 0))
        yield cache
        inflight = GaugeMetricFamily("hostagent_dns_upstream_inflight",
                                     "Distinct upstream queries in flight")
        inflight.add_metric([], s.get("inflight", 0))
        yield inflight
        healthy = GaugeMetricFamily("hostagent_dns_upstream_healthy",
                                    "1 unless the upstream is backing off after failures",
                                    labels=["upstream"])
        for row in s.get("upstreams", ()):
            healthy.add_metric([row["upstream"]], 1 if row["healthy"] else 0)
        yield healthy
