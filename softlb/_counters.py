"""Plain counters the core bumps as it answers, read by the agent's metrics at scrape time.

Only integer (and one float) additions happen per request; everything else (rates,
label sets, caps on label cardinality) is the reader's work when Prometheus scrapes.
"""

from __future__ import annotations

from typing import Collection


class EndpointCounters:
    __slots__ = ("picks", "reports_ok", "reports_failed", "latency_sum", "latency_count")

    def __init__(self) -> None:
        self.picks = 0
        self.reports_ok = 0
        self.reports_failed = 0
        #: Sum and count of reported latencies (seconds), a Prometheus summary's two halves.
        self.latency_sum = 0.0
        self.latency_count = 0


class ServiceCounters:
    """One service's answers since it appeared (a config reload keeps them)."""

    __slots__ = ("resolved", "no_healthy", "reports_ok", "reports_failed", "endpoints")

    def __init__(self) -> None:
        self.resolved = 0  # resolves answered with an endpoint
        self.no_healthy = 0  # resolves answered NO_HEALTHY_ENDPOINT
        self.reports_ok = 0
        self.reports_failed = 0
        #: Per endpoint id; entries of endpoints that left the catalog are dropped.
        self.endpoints: dict[str, EndpointCounters] = {}

    def endpoint(self, endpoint_id: str) -> EndpointCounters:
        c = self.endpoints.get(endpoint_id)
        if c is None:
            c = self.endpoints[endpoint_id] = EndpointCounters()
        return c

    def keep_only(self, endpoint_ids: Collection[str]) -> None:
        for eid in [e for e in self.endpoints if e not in endpoint_ids]:
            del self.endpoints[eid]

    def report(self, endpoint_id: str, ok: bool, latency: float | None) -> None:
        c = self.endpoint(endpoint_id)
        if ok:
            self.reports_ok += 1
            c.reports_ok += 1
        else:
            self.reports_failed += 1
            c.reports_failed += 1
        if latency is not None:
            c.latency_sum += latency
            c.latency_count += 1
