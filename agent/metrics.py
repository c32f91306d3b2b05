"""Prometheus metrics: prometheus-client's exposition, fed by a collector that reads the
agent's state when scraped. Nothing here runs per request: the core and the IPC server
only bump integers (softlb/_counters.py, runtime.Stats), and this turns them into
families on demand.

Label cardinality is bounded: `service` labels come from the catalog (not from callers:
resolves of unknown names are one unlabelled counter), and per-endpoint families label at
most MAX_ENDPOINTS_LABELLED endpoints per service, in catalog order; the picks of the rest
are summed under endpoint="_other" and their health shows only in the per-service gauges.
The families and their labels are listed in docs/monitoring/README.md.

A scrape is served in slices (issue 10, item 9): with 1,000 services of 100 endpoints the
exposition is ~164,000 lines (12 MB) and `generate_latest` took 2.3-8 s here, all on the loop:
the one stall of seconds the big-reload bystander bench saw was the bench's own scrape.
`render_stepped` collects the families a few thousand endpoints at a time and formats them
SAMPLES_PER_TURN samples at a time, with a checkpoint between, so other clients are
answered meanwhile (the scrape itself takes as long as before).
"""

from __future__ import annotations

import platform
import re
from typing import TYPE_CHECKING, Iterable, Iterator

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric as _Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from softlb import __version__

from .proxy.figures import METRICS as PROXY_METRICS
from .proxy.figures import Figures, ProxyFigures

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .runtime import Runtime

#: Per service, endpoints labelled in per-endpoint families (see the module docstring).
MAX_ENDPOINTS_LABELLED = 50
OTHER = "_other"
#: A stepped scrape pauses after walking this many endpoints' health, and after formatting
#: this many samples (~1-2 ms each here).
ENDPOINTS_PER_TURN = 200
SAMPLES_PER_TURN = 200
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector(Collector):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        return (m for m in self.collect_steps() if m is not None)

    def collect_steps(self) -> Iterator[Metric | None]:
        """The families, with a None wherever a stepped scrape may pause."""
        rt = self.rt
        s = rt.stats
        engine = rt.engine
        now = rt.now()

        info = InfoMetricFamily("softlb_build", "The agent's version.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        yield _gauge("softlb_start_time_seconds", "When the agent started (Unix time).", s.started_wall)

        yield _counter("softlb_requests", "Wire-protocol requests received.", s.requests)
        errors = CounterMetricFamily("softlb_errors", "Error answers, by code: frame-level and INTERNAL errors and "
                                     "request errors (UNKNOWN_SERVICE, NO_HEALTHY_ENDPOINT, BAD_ARGUMENT...).",
                                     labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        yield _counter("softlb_unknown_service_resolves", "Resolves of a service no source knows (no per-name label: "
                       "callers choose the names).", engine.unknown_service_picks)
        busy = CounterMetricFamily("softlb_busy_poll", "Spins after an answer, by whether they found the next request.",
                                   labels=["result"])
        busy.add_metric(["hit"], s.busy_poll_hits)
        busy.add_metric(["miss"], s.busy_poll_misses)
        yield busy
        yield _gauge("softlb_connections_open", "Client connections open now.", s.connections_open)
        yield _counter("softlb_connections", "Client connections accepted.", s.connections_total)
        yield _gauge("softlb_admin_connections_open", "Admin HTTP connections open now (capped apart).",
                     s.admin_connections_open)
        yield _gauge("softlb_dns_tcp_connections_open", "DNS-over-TCP connections open now (capped apart).",
                     s.dns_connections_open)
        yield _gauge("softlb_leases_open", "Leases handed out by resolve and not yet reported or expired.",
                     len(engine.leases))

        reloads = CounterMetricFamily("softlb_reloads", "Config and catalog loads, by what and whether they applied "
                                      "(refused: the previous one kept serving).", labels=["what", "result"])
        reloads.add_metric(["catalog", "ok"], s.catalog_reloads)
        reloads.add_metric(["catalog", "refused"], s.catalog_errors)
        reloads.add_metric(["config", "ok"], s.config_reloads)
        reloads.add_metric(["config", "refused"], s.config_reload_errors)
        yield reloads
        yield _gauge("softlb_last_reload_ok", "1 if the last config and catalog loads both applied, 0 if one was "
                     "refused and an older one still serves.", int(not rt.reload_problem()))
        yield _gauge("softlb_source_up", "1 while the catalog source answers (file readable, Consul reachable).",
                     int(rt.source_up()))

        # Isolation: a bound was hit (docs/RELIABILITY.md).
        refused = CounterMetricFamily("softlb_connections_refused", "Connections refused at accept, by reason "
                                      "(limit: max_connections, peer_limit: max_connections_per_uid, denied: "
                                      "allow_uids/allow_gids).", labels=["reason"])
        for reason in ("limit", "peer_limit", "denied"):
            refused.add_metric([reason], s.connections_refused[reason])
        yield refused
        yield _counter("softlb_connections_idle_closed", "Connections closed after idle_timeout.",
                       s.connections_idle_closed)
        yield _counter("softlb_accept_capacity_errors", "accept() failures for lack of fds or memory.",
                       s.accept_capacity_errors)
        yield _counter("softlb_turns_yielded", "Times a connection used its turn and yielded with requests left.",
                       s.turns_yielded)
        yield _counter("softlb_watches_refused", "watch requests refused by max_watches(_per_connection).",
                       s.watches_refused)
        yield _counter("softlb_deferred_refused", "Requests refused: too many waiting on the catalog source.",
                       s.deferred_refused)
        yield _counter("softlb_probe_local_failures", "Probe rounds skipped: the agent was out of fds or memory.",
                       s.probe_local_failures)
        builds = CounterMetricFamily("softlb_table_builds", "Consistent-hash tables rebuilt in steps (maglev, "
                                     "ring_hash), and builds dropped because a newer change superseded them.",
                                     labels=["result"])
        builds.add_metric(["installed"], s.table_builds)
        builds.add_metric(["superseded"], s.table_builds_superseded)
        yield builds
        sets = CounterMetricFamily("softlb_set_builds", "Big endpoint sets applied in steps, and those dropped "
                                   "because a newer update of the service superseded them.", labels=["result"])
        sets.add_metric(["installed"], s.set_builds)
        sets.add_metric(["superseded"], s.set_builds_superseded)
        yield sets
        yield _counter("softlb_turns_queued", "Connection wakeups, proxied requests and relay rounds that waited "
                       "for their turn: more were runnable at once than a scheduler pass allows (agent/turns.py).",
                       rt.turns.queued_total if rt.turns is not None else 0)
        yield _counter("softlb_gc_full_collections", "Full garbage collections, run on a timer rather than "
                       "whenever a flood of connections ages objects (agent/gc_pauses.py).", s.gc_full_collections)
        yield _gauge("softlb_gc_full_seconds_max", "The longest full garbage collection so far.",
                     s.gc_full_seconds_max)
        yield _counter("softlb_gc_full_skipped", "Full-collection timer ticks skipped: the interpreter's "
                       "memory had grown by less than a quarter since the last one (agent/gc_pauses.py).",
                       s.gc_full_skipped)
        yield _counter("softlb_catalog_refused", "Catalog files refused for their type or size.", s.catalog_refused)

        # DNS front end (agent/dns.py): answers by transport and rcode; "dropped" and "refused"
        # are datagrams not answered and TCP connections closed at the cap.
        dns = CounterMetricFamily("softlb_dns_queries", "DNS queries by transport and answer code.",
                                  labels=["transport", "rcode"])
        for key in sorted(s.dns):
            transport, _, rcode = key.partition(":")
            dns.add_metric([transport, rcode], s.dns[key])
        yield dns

        yield from self._services(now)
        source_metrics = getattr(rt, "source_metrics", None)  # the Consul source's own counters
        if source_metrics is not None:
            for name, kind, help_, rows in source_metrics():
                yield _family(name, kind, help_, rows)
        if rt.proxy_figures is not None:
            yield from self._proxy(rt.proxy_figures)

    def _proxy(self, figures: ProxyFigures) -> Iterator[Metric]:
        """softlb_proxy_listener_* by service and softlb_proxy_endpoint_* by service and
        endpoint (the latter capped per service like every per-endpoint family)."""
        per_service: dict[str, list[tuple[str, Figures]]] = {}
        for (service, eid), f in sorted(figures.endpoints.items()):
            per_service.setdefault(service, []).append((eid, f))
        for suffix, kind, help_, attr in PROXY_METRICS:
            name = suffix[: -len("_total")] if suffix.endswith("_total") else suffix
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            lst = family(f"softlb_proxy_listener_{name}", help_, labels=["service"])
            for service, f in sorted(figures.listeners.items()):
                lst.add_metric([service], getattr(f, attr))
            eps = family(f"softlb_proxy_endpoint_{name}", help_, labels=["service", "endpoint"])
            for service, rows in per_service.items():
                for eid, f in rows[:MAX_ENDPOINTS_LABELLED]:
                    eps.add_metric([service, eid], getattr(f, attr))
                if len(rows) > MAX_ENDPOINTS_LABELLED:
                    eps.add_metric([service, OTHER], sum(getattr(f, attr) for _, f in rows[MAX_ENDPOINTS_LABELLED:]))
            yield lst
            yield eps
        h2 = CounterMetricFamily(
            "softlb_proxy_http2_protocol_errors",
            "HTTP/2 connections the proxy ended for breaking the protocol or one of its bounds "
            "(docs/PROXY.md), by peer (client or upstream) and the GOAWAY's error code.",
            labels=["peer", "code"])
        for (peer, code), n in sorted(figures.http2_errors.items()):
            h2.add_metric([peer, code], n)
        yield h2
        waits = CounterMetricFamily("softlb_proxy_fd_reserve_waits", "Times a proxy listener stopped accepting "
                                    "because the agent's open fds came within agent.fd_reserve of the limit.")
        waits.add_metric([], figures.fd_waits)
        yield waits

    def _services(self, now: float) -> Iterator[Metric | None]:
        engine = self.rt.engine
        svc = ["service"]
        fams = {
            "endpoints": GaugeMetricFamily("softlb_service_endpoints", "Endpoints the catalog lists (before the "
                                           "service's tag filter).", labels=svc),
            "eligible": GaugeMetricFamily("softlb_service_eligible_endpoints", "Endpoints passing the tag filter and "
                                          "registry, probe and outlier checks.", labels=svc),
            "served": GaugeMetricFamily("softlb_service_served_endpoints", "Endpoints picks may land on now (after "
                                        "locality; in panic, ineligible ones too).", labels=svc),
            "ejected": GaugeMetricFamily("softlb_service_ejected_endpoints", "Endpoints ejected by outlier detection.",
                                         labels=svc),
            "probe_down": GaugeMetricFamily("softlb_service_probe_down_endpoints", "Endpoints the active probe holds "
                                            "down.", labels=svc),
            "panic": GaugeMetricFamily("softlb_service_panic", "1 while too few endpoints are eligible and all are "
                                       "balanced over.", labels=svc),
            "stale": GaugeMetricFamily("softlb_service_stale", "1 while answers come from old data (the catalog "
                                       "source is unreachable).", labels=svc),
            "age": GaugeMetricFamily("softlb_service_data_age_seconds", "Seconds since the catalog source last "
                                     "confirmed this service's data.", labels=svc),
        }
        svc_ejections = CounterMetricFamily("softlb_service_ejections", "Outlier ejections of the endpoints listed "
                                            "now.", labels=svc)
        resolves = CounterMetricFamily("softlb_resolves", "Resolves of a known service, by result code.",
                                       labels=["service", "code"])
        reports = CounterMetricFamily("softlb_reports", "Outcomes callers reported, by outcome.",
                                      labels=["service", "outcome"])
        picks = CounterMetricFamily("softlb_endpoint_picks", "Picks per endpoint (at most "
                                    f"{MAX_ENDPOINTS_LABELLED} labelled per service, the rest as \"{OTHER}\").",
                                    labels=["service", "endpoint"])
        healthy = GaugeMetricFamily("softlb_endpoint_eligible", "1 if the endpoint passes every check.",
                                    labels=["service", "endpoint"])
        ejections = CounterMetricFamily("softlb_endpoint_ejections", "Outlier ejections of the endpoint.",
                                        labels=["service", "endpoint"])
        latency = SummaryMetricFamily("softlb_endpoint_latency_seconds", "Latency callers reported for the endpoint.",
                                      labels=["service", "endpoint"])
        confirmed = self.rt.source_confirmed_at
        walked = 0
        for name in sorted(engine.services):
            if walked >= ENDPOINTS_PER_TURN:
                walked = 0
                yield None
            b = engine.services.get(name)
            if b is None:  # removed while the scrape paused
                continue
            walked += min(len(b.catalog_endpoints), MAX_ENDPOINTS_LABELLED) + 1
            rows = b.health.snapshot(now, limit=MAX_ENDPOINTS_LABELLED).endpoints
            n_ejected, n_ejections, n_down = b.health.tally()
            lbl = [name]
            fams["endpoints"].add_metric(lbl, len(b.catalog_endpoints))
            fams["eligible"].add_metric(lbl, b.eligible_count)
            fams["served"].add_metric(lbl, len(b.served))
            fams["ejected"].add_metric(lbl, n_ejected)
            svc_ejections.add_metric(lbl, n_ejections)
            fams["probe_down"].add_metric(lbl, n_down)
            fams["panic"].add_metric(lbl, int(b.panic))
            fams["stale"].add_metric(lbl, int(b.stale))
            at = b.fetched_at if self.rt.config.source != "file" else confirmed
            if at is not None:
                fams["age"].add_metric(lbl, round(max(0.0, now - at), 3))
            c = b.counters
            resolves.add_metric([name, "OK"], c.resolved)
            resolves.add_metric([name, "NO_HEALTHY_ENDPOINT"], c.no_healthy)
            reports.add_metric([name, "ok"], c.reports_ok)
            reports.add_metric([name, "failed"], c.reports_failed)
            labelled = 0
            for r in rows:
                ec = c.endpoints.get(r.id)
                labelled += 0 if ec is None else ec.picks
                el = [name, r.id]
                picks.add_metric(el, 0 if ec is None else ec.picks)
                healthy.add_metric(el, int(r.eligible))
                ejections.add_metric(el, r.ejections)
                if ec is not None and ec.latency_count:
                    latency.add_metric(el, ec.latency_count, ec.latency_sum)
            if len(b.health) > MAX_ENDPOINTS_LABELLED:
                # Counters are kept for listed endpoints only (ServiceCounters.keep_only).
                picks.add_metric([name, OTHER], sum(ec.picks for ec in c.endpoints.values()) - labelled)
        yield from fams.values()
        yield from (svc_ejections, resolves, reports, picks, healthy, ejections, latency)


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _family(name: str, kind: str, help_: str, rows: list[tuple[str, float | int]]) -> Metric:
    """A family from (`{k="v",...}` label text, value) rows, the shape sources hand over."""
    parsed = [(dict(_LABEL.findall(lbl)), v) for lbl, v in rows]
    labels = sorted({k for d, _ in parsed for k in d})
    if kind == "counter":
        fam: Metric = CounterMetricFamily(name[: -len("_total")] if name.endswith("_total") else name, help_,
                                          labels=labels)
    else:
        fam = GaugeMetricFamily(name, help_, labels=labels)
    for d, v in parsed:
        fam.add_metric([d.get(k, "") for k in labels], v)  # type: ignore[attr-defined]
    return fam


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


class AgentRegistry(CollectorRegistry):
    """The agent's registry: its own collector plus the process's CPU, memory and fds, each
    kept by name so a stepped scrape can walk them in the registry's order."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(auto_describe=False)
        self.agent = AgentCollector(rt)
        self.register(self.agent)
        self.process = ProcessCollector(registry=self)


def make_registry(rt: Runtime) -> AgentRegistry:
    return AgentRegistry(rt)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class _Families:
    """A registry stand-in over families already collected (what generate_latest reads)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def render_stepped(registry: AgentRegistry) -> bytes:
    """What `render` returns, made with a checkpoint every ENDPOINTS_PER_TURN endpoints
    collected and every SAMPLES_PER_TURN samples formatted (see the module docstring)."""
    families: list[Metric] = []
    for m in registry.agent.collect_steps():
        if m is None:
            await trio.lowlevel.checkpoint()
        else:
            families.append(m)
    families.extend(registry.process.collect())
    out: list[bytes] = []
    for family in families:
        samples = family.samples
        for i in range(0, max(1, len(samples)), SAMPLES_PER_TURN):
            part = _Metric(family.name, family.documentation, family.type, family.unit)
            part.samples = samples[i : i + SAMPLES_PER_TURN]
            text = generate_latest(_Families((part,)))  # type: ignore[arg-type]
            # A family's HELP and TYPE lines open its first part only.
            out.append(text if i == 0 else text.split(b"\n", 2)[2])
            await trio.lowlevel.checkpoint()
    return b"".join(out)
