"""Example-based tests of the health model: one behaviour per test, exact times."""

from __future__ import annotations

import pytest

from softlb import Endpoint, HealthTracker, ProbeState, RegistryHealth, ServiceConfig
from softlb._config import OutlierConfig, ProbeConfig
from softlb._health import PROBE_TRANSITIONS

R = RegistryHealth


def eps(n: int, **registry: RegistryHealth) -> list[Endpoint]:
    return [
        Endpoint(f"e{i}", "127.0.0.1", 9000 + i, registry=registry.get(f"e{i}", R.PASSING))
        for i in range(n)
    ]


def ids(endpoints) -> list[str]:
    return [e.id for e in endpoints]


def tracker(n=3, *, probe=None, outlier=None, panic=50, **registry) -> HealthTracker:
    t = HealthTracker(ServiceConfig(probe=probe, outlier=outlier, panic_threshold=panic))
    t.set_endpoints(eps(n, **registry), 0.0)
    return t


PROBE = ProbeConfig(kind="http", rise=2, fall=3)
OUTLIER = OutlierConfig(
    consecutive_failures=5, base_ejection_time=30, max_ejection_time=100, max_ejection_percent=50
)


def fail(t: HealthTracker, eid: str, n: int, now: float) -> None:
    for _ in range(n):
        t.report(eid, False, now)


# ------------------------------------------------------------------ probe table


def test_transition_table_covers_every_state_and_result():
    assert set(PROBE_TRANSITIONS) == {(s, ok) for s in ProbeState for ok in (True, False)}
    for (state, _), (target, threshold) in PROBE_TRANSITIONS.items():
        # Staying put never needs a threshold; DOWN->UP and *->DOWN always do.
        assert (threshold is None) == (target is state or state is ProbeState.UNKNOWN and target is ProbeState.UP)
        assert threshold in (None, "rise", "fall")


def test_unknown_is_eligible_until_fall_failures():
    t = tracker(probe=PROBE)
    t.probe_result("e0", False, 1)
    t.probe_result("e0", False, 2)
    assert "e0" in ids(t.eligible(2))
    assert t.probe_result("e0", False, 3) is True
    assert "e0" not in ids(t.eligible(3))
    assert t.snapshot(3).endpoints[0].probe is ProbeState.DOWN


def test_first_success_makes_unknown_up_and_down_needs_rise():
    t = tracker(probe=PROBE)
    t.probe_result("e0", True, 1)
    assert t.snapshot(1).endpoints[0].probe is ProbeState.UP
    for k in range(3):
        t.probe_result("e0", False, 2 + k)
    assert "e0" not in ids(t.eligible(5))
    assert t.probe_result("e0", True, 6) is False
    assert "e0" not in ids(t.eligible(6))
    assert t.probe_result("e0", True, 7) is True
    assert "e0" in ids(t.eligible(7))


def test_interrupted_streaks_start_over():
    t = tracker(probe=PROBE)
    for ok in (False, False, True, False, False):
        t.probe_result("e0", ok, 1)
    assert t.snapshot(1).endpoints[0].probe is ProbeState.UP
    t.probe_result("e0", False, 2)
    assert t.snapshot(2).endpoints[0].probe is ProbeState.DOWN
    for ok in (True, False, True):
        t.probe_result("e0", ok, 3)
    assert t.snapshot(3).endpoints[0].probe is ProbeState.DOWN


def test_last_probe_result_is_kept_for_display():
    t = tracker(probe=PROBE)
    t.probe_result("e1", False, 10.0, "HTTP 503")
    row = t.snapshot(12.5).endpoints[1]
    assert (row.last_probe_ok, row.last_probe_age, row.last_probe_detail) == (False, 2.5, "HTTP 503")
    assert row.probe_streak == 1
    assert t.snapshot(12.5).as_dict()["endpoints"][1]["probe"] == "unknown"


def test_probe_results_are_ignored_without_a_probe_or_for_unknown_endpoints():
    t = tracker(probe=None)
    for _ in range(10):
        assert t.probe_result("e0", False, 1) is False
    assert ids(t.eligible(1)) == ["e0", "e1", "e2"]
    t = tracker(probe=PROBE)
    assert t.probe_result("nope", False, 1) is False


# ------------------------------------------------------------------ registry


def test_registry_state_decides_eligibility_and_panic_candidacy():
    t = tracker(4, e1=R.WARNING, e2=R.CRITICAL, e3=R.MAINTENANCE, panic=0)
    assert ids(t.eligible(0)) == ["e0", "e1"]
    assert ids(t.candidates(0)) == ["e0", "e1", "e2"]


# ------------------------------------------------------------------ outlier ejection


def test_consecutive_failures_eject_exactly_at_the_threshold():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 4, 1)
    assert "e0" in ids(t.eligible(1))
    assert t.report("e0", False, 1) is True
    assert "e0" not in ids(t.eligible(1))
    assert t.next_deadline() == 31


def test_a_success_resets_the_consecutive_count():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 4, 1)
    t.report("e0", True, 1)
    fail(t, "e0", 4, 1)
    assert "e0" in ids(t.eligible(1))
    assert t.snapshot(1).endpoints[0].consecutive_failures == 4


def test_ejected_endpoint_returns_after_its_time_with_a_clean_count():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 5, 0)
    fail(t, "e0", 3, 10)  # late reports while ejected are ignored
    assert "e0" not in ids(t.eligible(29.999))
    assert t.tick(30) is True
    assert "e0" in ids(t.eligible(30))
    assert t.next_deadline() is None
    row = t.snapshot(30).endpoints[0]
    assert (row.ejected, row.consecutive_failures, row.ejections) == (False, 0, 1)
    fail(t, "e0", 4, 31)
    assert "e0" in ids(t.eligible(31))


def test_answers_are_right_even_if_tick_is_late():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 5, 0)
    assert "e0" in ids(t.eligible(45))


def test_ejection_time_grows_linearly_and_is_capped():
    t = tracker(outlier=OUTLIER)
    now, durations = 0.0, []
    for _ in range(6):
        fail(t, "e0", 5, now)
        until = t.next_deadline()
        durations.append(until - now)
        now = until  # fails again the moment it returns
    assert durations == [30, 60, 90, 100, 100, 100]


def test_ejection_level_decays_while_serving():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 5, 0)  # level 1, back at 30
    fail(t, "e0", 5, 30)  # level 2, back at 90
    assert t.snapshot(90 + 29).endpoints[0].ejection_level == 2
    assert t.snapshot(90 + 30).endpoints[0].ejection_level == 1
    fail(t, "e0", 5, 90 + 30)
    assert t.next_deadline() == 120 + 60  # level 2 again, not 3
    assert t.snapshot(120).endpoints[0].ejections == 3


@pytest.mark.parametrize(
    ("n", "pct", "max_ejected"), [(3, 50, 1), (4, 50, 2), (3, 10, 0), (10, 10, 1), (2, 100, 2), (3, 0, 0)]
)
def test_max_ejection_percent_rounds_down_like_envoy(n, pct, max_ejected):
    t = tracker(n, outlier=OutlierConfig(max_ejection_percent=pct), panic=0)
    for e in ids(t.eligible(0)):
        fail(t, e, 5, 1)
    assert n - len(t.eligible(1)) == max_ejected


def test_blocked_ejection_keeps_its_streak_until_there_is_room():
    t = tracker(outlier=OUTLIER)
    fail(t, "e0", 5, 0)
    fail(t, "e1", 7, 10)
    assert ids(t.eligible(10)) == ["e1", "e2"]
    t.tick(30)
    assert t.report("e1", False, 31) is True
    assert ids(t.eligible(31)) == ["e0", "e2"]


def test_shrinking_the_set_lifts_ejections_over_the_cap_soonest_first():
    t = tracker(4, outlier=OUTLIER)
    fail(t, "e0", 5, 0)
    fail(t, "e1", 5, 1)
    assert ids(t.eligible(1)) == ["e2", "e3"]
    assert t.set_endpoints(eps(4)[:3], 2) is True
    assert ids(t.eligible(2)) == ["e0", "e2"]
    assert t.next_deadline() == 31


def test_reports_for_maintenance_or_unknown_endpoints_are_ignored():
    t = tracker(4, outlier=OUTLIER, e3=R.MAINTENANCE)
    fail(t, "e3", 10, 0)
    fail(t, "gone", 10, 0)
    assert t.next_deadline() is None


# ------------------------------------------------------------------ panic


def test_panic_when_eligible_share_is_below_threshold():
    t = tracker(probe=ProbeConfig(fall=1), panic=50)
    t.probe_result("e0", False, 1)
    assert not t.in_panic(1)  # 2/3 eligible
    assert ids(t.serving(1)) == ["e1", "e2"]
    t.probe_result("e1", False, 1)
    assert t.in_panic(1)  # 1/3 < 50%
    assert ids(t.serving(1)) == ["e0", "e1", "e2"]
    assert t.snapshot(1).panic is True


def test_panic_exactly_at_threshold_is_not_panic():
    t = tracker(4, probe=ProbeConfig(fall=1), panic=50)
    t.probe_result("e0", False, 1)
    t.probe_result("e1", False, 1)
    assert not t.in_panic(1)


def test_panic_threshold_zero_never_panics_and_maintenance_gets_no_panic_traffic():
    t = tracker(3, probe=ProbeConfig(fall=1), panic=0)
    for e in ("e0", "e1", "e2"):
        t.probe_result(e, False, 1)
    assert not t.in_panic(1) and t.serving(1) == ()
    t = tracker(3, probe=ProbeConfig(fall=1), e2=R.MAINTENANCE, panic=100)
    t.probe_result("e0", False, 1)
    assert t.in_panic(1)
    assert ids(t.serving(1)) == ["e0", "e1"]


def test_empty_service_is_not_in_panic():
    t = tracker(0)
    assert not t.in_panic(0) and t.serving(0) == ()


# ------------------------------------------------------------------ endpoint set and config


def test_set_endpoints_keeps_state_for_survivors_and_forgets_the_rest():
    t = tracker(3, probe=ProbeConfig(fall=1))
    t.probe_result("e0", False, 1)
    t.probe_result("e1", False, 1)
    t.set_endpoints(eps(3)[:1], 2)
    assert t.eligible(2) == ()
    assert t.probe_result("e1", True, 3) is False  # late result for a removed endpoint
    t.set_endpoints(eps(3), 4)
    assert ids(t.eligible(4)) == ["e1", "e2"]  # e1 came back fresh (UNKNOWN)


def test_an_endpoint_that_moved_is_probed_afresh():
    t = tracker(1, probe=ProbeConfig(fall=1))
    t.probe_result("e0", False, 1)
    moved = Endpoint("e0", "127.0.0.2", 9000)
    assert t.set_endpoints([moved], 2) is True
    assert t.eligible(2) == (moved,)


def test_registry_change_is_picked_up():
    t = tracker(2)
    assert t.set_endpoints(eps(2, e1=R.CRITICAL), 1) is True
    assert ids(t.eligible(1)) == ["e0"]
    assert t.set_endpoints(eps(2, e1=R.CRITICAL), 2) is False


def test_duplicate_endpoint_ids_are_rejected_and_state_kept():
    t = tracker(2)
    with pytest.raises(ValueError, match="duplicate endpoint id 'e0'"):
        t.set_endpoints(eps(2) + eps(1), 1)
    assert ids(t.eligible(1)) == ["e0", "e1"]


def test_reconfigure_without_probe_or_outlier_forgets_their_state():
    cfg = ServiceConfig(probe=ProbeConfig(fall=1), outlier=OUTLIER)
    t = HealthTracker(cfg)
    t.set_endpoints(eps(4), 0)
    t.probe_result("e0", False, 1)
    fail(t, "e1", 5, 1)
    assert ids(t.eligible(1)) == ["e2", "e3"]
    assert t.reconfigure(ServiceConfig(probe=None, outlier=OUTLIER), 2) is True
    assert ids(t.eligible(2)) == ["e0", "e2", "e3"]
    assert t.reconfigure(ServiceConfig(probe=None, outlier=None), 3) is True
    assert ids(t.eligible(3)) == ["e0", "e1", "e2", "e3"]
    assert t.next_deadline() is None
    assert t.snapshot(3).endpoints[0].probe is None


def test_reconfigure_keeps_probe_state_and_applies_new_thresholds():
    t = tracker(1, probe=ProbeConfig(rise=5, fall=1))
    t.probe_result("e0", False, 1)
    t.probe_result("e0", True, 2)
    t.reconfigure(ServiceConfig(probe=ProbeConfig(rise=2, fall=1)), 3)
    assert t.eligible(3) == ()
    t.probe_result("e0", True, 4)
    assert ids(t.eligible(4)) == ["e0"]


def test_lowering_max_ejection_percent_lifts_ejections():
    t = tracker(4, outlier=OUTLIER)
    fail(t, "e0", 5, 0)
    t.reconfigure(ServiceConfig(outlier=OutlierConfig(max_ejection_percent=10)), 1)
    assert len(t.eligible(1)) == 4


def test_only_real_changes_are_reported():
    t = tracker(3, probe=ProbeConfig(fall=2))
    assert t.probe_result("e0", False, 1) is False  # one failure of two: nothing changed
    assert t.probe_result("e0", False, 2) is True  # down: the eligible set changed
    assert t.probe_result("e0", False, 3) is False


def test_ejection_level_stops_at_the_cap_so_decay_still_works():
    cfg = ServiceConfig(outlier=OutlierConfig(consecutive_failures=1, base_ejection_time=1.0,
                                              max_ejection_time=2.0, max_ejection_percent=100))
    h = HealthTracker(cfg)
    h.set_endpoints([Endpoint("a", "127.0.0.1", 1), Endpoint("b", "127.0.0.1", 2)], 0.0)
    now = 0.0
    for _ in range(20):  # a flapping host, ejected 20 times back to back
        assert h.report("a", False, now)
        now = h.next_deadline()
        h.tick(now)
    now += 5.0  # then five base times in service: the level decays to zero
    h.report("a", False, now)
    row = next(r for r in h.snapshot(now).endpoints if r.id == "a")
    assert row.ejected_remaining <= 1.0 + 1e-9, (row.ejection_level, row.ejected_remaining)
