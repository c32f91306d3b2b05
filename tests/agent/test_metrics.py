"""The /metrics families, read back with prometheus_client's own text parser."""

import logging
import random

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent.admin import ask, render_metrics
from softlb_agent.metrics import MAX_ENDPOINTS_LABELLED
from softlb_agent.runtime import Runtime

CATALOG = "".join(f'[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = {p}\n' for p in (1, 2, 3))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}, parsed as Prometheus would."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_metrics_count_ejections_panic_resolves_and_reports():
    async def main():
        rt = Runtime(AgentConfig(source="consul"), None, random.Random(1))
        now = trio.current_time()
        rt.engine.replace_all(parse_catalog_text(CATALOG), now)
        for _ in range(5):
            rt.engine.report(now, ok=False, latency=0.5, service="web", endpoint_id="127.0.0.1:1")
        for _ in range(4):
            rt.engine.pick("web", now)
        text = render_metrics(rt)
        assert value(text, "softlb_service_ejected_endpoints", service="web") == 1
        assert value(text, "softlb_service_ejections_total", service="web") == 1
        assert value(text, "softlb_endpoint_ejections_total", service="web", endpoint="127.0.0.1:1") == 1
        assert value(text, "softlb_endpoint_eligible", service="web", endpoint="127.0.0.1:1") == 0
        assert value(text, "softlb_service_eligible_endpoints", service="web") == 2
        assert value(text, "softlb_service_panic", service="web") == 0
        assert value(text, "softlb_resolves_total", service="web", code="OK") == 4
        assert value(text, "softlb_reports_total", service="web", outcome="failed") == 5
        assert value(text, "softlb_endpoint_latency_seconds_sum", service="web", endpoint="127.0.0.1:1") == 2.5
        picks = [value(text, "softlb_endpoint_picks_total", service="web", endpoint=f"127.0.0.1:{p}") for p in (2, 3)]
        assert sum(picks) == 4
        assert value(text, "process_resident_memory_bytes") > 0
        assert ("softlb_build_info", ()) not in samples(text)  # it has labels
        await trio.sleep(3600)  # past the ejection
        rt.dispatch(rt.engine.tick(trio.current_time())[0])
        text = render_metrics(rt)
        assert value(text, "softlb_service_ejected_endpoints", service="web") == 0
        assert value(text, "softlb_service_data_age_seconds", service="web") == 3600

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_error_answers_are_counted_by_code():
    async def main():
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.engine.replace_all(parse_catalog_text(CATALOG), trio.current_time())
        for name in ("nope", "nope2"):
            assert (await ask(rt, {"op": "resolve", "service": name}, "test"))[0] == 404
        assert (await ask(rt, {"op": "resolve", "service": "web", "key": 5}, "test"))[0] == 400
        text = render_metrics(rt)
        assert value(text, "softlb_errors_total", code="UNKNOWN_SERVICE") == 2
        assert value(text, "softlb_errors_total", code="BAD_ARGUMENT") == 1
        assert value(text, "softlb_unknown_service_resolves_total") == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_endpoint_labels_are_capped():
    async def main():
        n = MAX_ENDPOINTS_LABELLED + 30
        cat = "".join(f'[[services.big.endpoints]]\naddress = "127.0.0.1"\nport = {p}\n' for p in range(1, n + 1))
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.engine.replace_all(parse_catalog_text(cat), trio.current_time())
        for _ in range(n):
            rt.engine.pick("big", trio.current_time())
        s = samples(render_metrics(rt))
        picks = {dict(k[1])["endpoint"]: v for k, v in s.items() if k[0] == "softlb_endpoint_picks_total"}
        assert len(picks) == MAX_ENDPOINTS_LABELLED + 1 and picks["_other"] == 30 and sum(picks.values()) == n
        assert sum(1 for k in s if k[0] == "softlb_endpoint_eligible") == MAX_ENDPOINTS_LABELLED

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_file_source_has_a_data_age_sample():
    async def main():
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.engine.replace_all(parse_catalog_text(CATALOG), trio.current_time())
        rt.source_confirmed_at = trio.current_time()
        await trio.sleep(2)
        assert value(render_metrics(rt), "softlb_service_data_age_seconds", service="web") == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_health_changes_are_logged_with_their_reason(caplog):
    async def main():
        rt = Runtime(AgentConfig(), None, random.Random(1))
        now = trio.current_time()
        rt.dispatch(rt.engine.replace_all(parse_catalog_text(CATALOG), now))
        with caplog.at_level(logging.INFO, logger="softlb.health"):
            for _ in range(5):
                rt.dispatch(rt.engine.report(now, ok=False, service="web", endpoint_id="127.0.0.1:1"))
            await trio.sleep(3600)
            rt.dispatch(rt.engine.tick(trio.current_time())[0])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    msgs = [r.getMessage() for r in caplog.records if r.name == "softlb.health"]
    assert msgs[0].startswith("web: endpoint 127.0.0.1:1 is no longer eligible (ejected by outlier detection for 30s")
    assert msgs[1] == "web: endpoint 127.0.0.1:1 is eligible again"
    assert len(msgs) == 2


def test_a_stepped_scrape_equals_the_inline_one_and_lets_others_run():
    """Issue 10, item 9: a scrape of a big catalog (here 60 services x 100 endpoints) is made
    in slices; what it renders is what the one-piece render gives, and another task gets
    turns while it runs."""
    from softlb_agent import metrics

    async def main():
        cat = "".join(f'[[services.s{s}.endpoints]]\naddress = "127.0.{s}.1"\nport = {p}\n'
                      for s in range(60) for p in range(1, 101))
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.engine.replace_all(parse_catalog_text(cat), trio.current_time())
        for _ in range(500):
            rt.engine.pick("s7", trio.current_time())
        registry = metrics.make_registry(rt)
        turns = 0

        async def other():
            nonlocal turns
            while True:
                await trio.lowlevel.checkpoint()
                turns += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            stepped = (await metrics.render_stepped(registry)).decode()
            nursery.cancel_scope.cancel()
        whole = metrics.render(registry).decode()

        def ours(text):  # the process collector's CPU and memory move between two scrapes
            return {k: v for k, v in samples(text).items() if not k[0].startswith("process_")}

        assert ours(stepped) == ours(whole) and len(ours(whole)) > 6000
        assert stepped.count("# HELP softlb_endpoint_picks_total ") == 1  # one family, not one per slice
        assert turns > 6000 // metrics.SAMPLES_PER_TURN  # the other task ran between slices

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
