"""Health wired through the Engine: probes, reports, ticks and panic as the agent drives them."""

from __future__ import annotations

import random
from collections import Counter

from softlb import AgentConfig, Endpoint, ServiceConfig
from softlb._config import OutlierConfig, ProbeConfig
from softlb._engine import Engine
from tests.core.engine_calls import RecordingEngine, handle, resolve

OUTLIER = OutlierConfig(consecutive_failures=5, base_ejection_time=30, max_ejection_time=300, max_ejection_percent=50)


def engine(**svc) -> tuple[Engine, list[str]]:
    e = RecordingEngine(AgentConfig(services={"web": ServiceConfig(**svc)}), random.Random(3))
    changed = e.changed
    e.replace_all({"web": [Endpoint(f"e{i}", "127.0.0.1", 9000 + i) for i in range(3)]}, 0.0)
    changed.clear()
    return e, changed


def picks(e: Engine, now: float, n: int = 60) -> Counter[str]:
    return Counter(resolve(e, "web", now, lease=False).endpoint.id for _ in range(n))


def test_probe_results_drive_what_resolve_answers():
    e, changed = engine(probe=ProbeConfig(rise=2, fall=2))
    e.probe_result("web", "e1", False, 1.0, "connect: Connection refused")
    assert changed == [] and "e1" in picks(e, 1.0)
    e.probe_result("web", "e1", False, 2.0)
    assert changed == ["web"] and picks(e, 2.0) == {"e0": 30, "e2": 30}
    e.probe_result("web", "e1", True, 3.0)
    assert "e1" not in picks(e, 3.0)
    e.probe_result("web", "e1", True, 4.0)
    assert picks(e, 4.0) == {"e0": 20, "e1": 20, "e2": 20}
    e.probe_result("gone", "e1", False, 5.0)  # late results for vanished services are ignored
    e.probe_result("web", "gone", False, 5.0)


def test_reports_eject_by_endpoint_or_by_lease_and_expire_on_tick():
    e, changed = engine(outlier=OUTLIER)
    for _ in range(5):
        e.report(1.0, ok=False, service="web", endpoint_id="e0")
    assert changed == ["web"] and "e0" not in picks(e, 1.0)
    assert e.tick(2.0)[1] == 31.0
    r = resolve(e, "web", 2.0)
    while r.endpoint.id != "e1":
        e.report(2.0, ok=True, lease=r.lease)
        r = resolve(e, "web", 2.0)
    e.report(2.0, ok=False, lease=r.lease)
    assert e.services["web"].health.snapshot(2.0).endpoints[1].consecutive_failures == 1
    assert e.tick(31.0)[1] is None
    assert changed == ["web", "web"] and "e0" in picks(e, 31.0)


def test_resolve_returns_an_expired_ejection_even_before_the_tick():
    e, changed = engine(outlier=OUTLIER)
    for _ in range(5):
        e.report(1.0, ok=False, service="web", endpoint_id="e0")
    assert "e0" in picks(e, 31.0)
    # The pick ran the due timer itself; the change is handed out with the next changes.
    assert e.take_changes() == {"web"} and changed == ["web"]


def test_panic_reaches_the_answer():
    e, _ = engine(probe=ProbeConfig(fall=1), panic_threshold=50)
    e.probe_result("web", "e0", False, 1.0)
    assert not resolve(e, "web", 1.0).panic
    e.probe_result("web", "e1", False, 1.0)
    r = resolve(e, "web", 1.0)
    assert r.panic
    assert picks(e, 1.0) == {"e0": 20, "e1": 20, "e2": 20}
    summary = e.services["web"].summary()
    assert (summary["panic"], summary["eligible"]) == (True, 1)


def test_config_reload_keeps_health_state():
    e, _ = engine(probe=ProbeConfig(fall=1), outlier=OUTLIER)
    e.probe_result("web", "e0", False, 1.0)
    for _ in range(5):
        e.report(1.0, ok=False, service="web", endpoint_id="e1")
    e.reconfigure(AgentConfig(services={"web": ServiceConfig(probe=ProbeConfig(fall=1), outlier=OUTLIER,
                                                             panic_threshold=0)}), 2.0)
    assert picks(e, 2.0) == {"e2": 60}
    assert e.tick(2.0)[1] == 31.0


def test_endpoints_view_carries_health_detail():
    e, _ = engine(probe=ProbeConfig(fall=1), panic_threshold=50)
    e.probe_result("web", "e0", False, 1.0, "HTTP 503")
    e.probe_result("web", "e1", False, 1.0, "HTTP 503")
    d = e.services["web"].describe(1.5)
    assert (d["panic"], d["panic_threshold"]) == (True, 50)
    e0 = d["endpoints"][0]
    assert (e0["eligible"], e0["served"]) == (False, True)
    assert e0["health"] == {
        "registry": "passing", "eligible": False, "probe": "down", "probe_streak": 1,
        "last_probe_ok": False, "last_probe_age": 0.5, "last_probe_detail": "HTTP 503",
        "ejected": False, "ejected_remaining": None, "ejections": 0, "ejection_level": 0,
        "consecutive_failures": 0,
    }
