import random

import trio
import trio.testing

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent.admin import render_metrics
from softlb_agent.runtime import Runtime

CATALOG = "".join(f'[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = {p}\n' for p in (1, 2, 3))


def assert_prometheus_layout(text: str) -> None:
    """Every sample follows its own metric's HELP and TYPE, and no metric is split."""
    seen, current = set(), None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            assert current not in seen, f"{current} appears twice"
            seen.add(current)
        elif line.startswith("# TYPE "):
            assert line.split()[2] == current
        else:
            assert line.split("{")[0].split(" ")[0] == current, line


def test_metrics_count_ejections_and_panic():
    async def main():
        rt = Runtime(AgentConfig(source="consul"), None, random.Random(1))
        now = trio.current_time()
        rt.engine.replace_all(parse_catalog_text(CATALOG), now)
        for _ in range(5):
            rt.engine.report(now, ok=False, service="web", endpoint_id="127.0.0.1:1")
        text = render_metrics(rt)
        assert_prometheus_layout(text)
        assert 'softlb_service_ejected_endpoints{service="web"} 1' in text
        assert 'softlb_service_ejections_total{service="web"} 1' in text
        assert 'softlb_service_eligible_endpoints{service="web"} 2' in text
        assert 'softlb_service_panic{service="web"} 0' in text
        await trio.sleep(3600)  # past the ejection
        rt.dispatch(rt.engine.tick(trio.current_time())[0])
        text = render_metrics(rt)
        assert 'softlb_service_ejected_endpoints{service="web"} 0' in text
        assert 'softlb_service_data_age_seconds{service="web"} 3600.000' in text

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_health_changes_are_logged_with_their_reason(caplog):
    import logging

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
