"""Property tests of the health model: random histories against the spec, step by step.

The machine below keeps its own minimal record (probe results, consecutive failure counts,
ejection times) and after every step checks the tracker against the rules in
softlb/_health.py's docstring: thresholds honoured exactly, no flip faster than allowed,
ejection times grow and are capped, max_ejection_percent never exceeded, eligible is a subset
of the endpoints, panic iff the eligible share is below the threshold.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from softlb import Endpoint, HealthTracker, ProbeState, RegistryHealth, ServiceConfig
from softlb._config import OutlierConfig, ProbeConfig

POOL = [f"e{i}" for i in range(6)]
REGISTRY = st.sampled_from(
    [RegistryHealth.PASSING] * 4 + [RegistryHealth.WARNING, RegistryHealth.CRITICAL, RegistryHealth.MAINTENANCE]
)
#: Half-second steps keep every time exactly representable, so floor() in the spec is exact.
STEP = st.integers(0, 40).map(lambda k: k / 2)


class HealthMachine(RuleBasedStateMachine):
    @initialize(
        rise=st.integers(1, 4),
        fall=st.integers(1, 4),
        failures=st.integers(1, 4),
        base=st.integers(1, 10),
        cap_factor=st.integers(1, 5),
        pct=st.integers(0, 100),
        panic=st.integers(0, 100),
        n=st.integers(1, 6),
    )
    def setup(self, rise, fall, failures, base, cap_factor, pct, panic, n):
        self.probe = ProbeConfig(kind="tcp", rise=rise, fall=fall)
        self.outlier = OutlierConfig(
            consecutive_failures=failures,
            base_ejection_time=float(base),
            max_ejection_time=float(base * cap_factor),
            max_ejection_percent=pct,
        )
        self.t = HealthTracker(
            ServiceConfig(probe=self.probe, outlier=self.outlier, panic_threshold=panic)
        )
        self.panic = panic
        self.now = 0.0
        self.endpoints: dict[str, Endpoint] = {}
        self.history: dict[str, list[bool]] = {}
        self.state: dict[str, ProbeState] = {}
        self.cf: dict[str, int] = {}  # consecutive failures since last success/return/add
        self.until: dict[str, float] = {}  # current ejection end
        self.last: dict[str, tuple[float, float, float]] = {}  # (ejected at, duration, returned)
        self._publish({eid: RegistryHealth.PASSING for eid in POOL[:n]})

    # -------------------------------------------------------------- helpers

    def _publish(self, registry: dict[str, RegistryHealth]) -> None:
        eps = [Endpoint(eid, "127.0.0.1", 9000 + int(eid[1:]), registry=r) for eid, r in registry.items()]
        for eid in list(self.endpoints):
            if eid not in registry:
                for d in (self.endpoints, self.history, self.state, self.cf, self.until, self.last):
                    d.pop(eid, None)
        for ep in eps:
            if ep.id not in self.endpoints:
                self.history[ep.id], self.state[ep.id], self.cf[ep.id] = [], ProbeState.UNKNOWN, 0
            self.endpoints[ep.id] = ep
        before = dict(self.until)
        self.t.set_endpoints(eps, self.now)
        # The only ejections that may end early are those over the cap, soonest due first.
        lifted = {e for e in before if e in self.endpoints and not self._row(e).ejected}
        over = len([e for e in before if e in self.endpoints and self._candidate(e)]) - self._cap()
        assert len([e for e in lifted if self._candidate(e)]) == max(0, over)
        if lifted:
            kept = [before[e] for e in before if e not in lifted and e in self.endpoints]
            assert all(before[e] <= k for e in lifted for k in kept)
        for e in lifted:
            self._returned(e, self.now)

    def _row(self, eid: str):
        (row,) = [r for r in self.t.snapshot(self.now).endpoints if r.id == eid]
        return row

    def _candidate(self, eid: str) -> bool:
        return self.endpoints[eid].registry is not RegistryHealth.MAINTENANCE

    def _cap(self) -> int:
        n = sum(1 for e in self.endpoints if self._candidate(e))
        return self.outlier.max_ejection_percent * n // 100

    def _returned(self, eid: str, at: float) -> None:
        del self.until[eid]
        at0, dur, _ = self.last[eid]
        self.last[eid] = (at0, dur, at)
        self.cf[eid] = 0

    def _advance(self, dt: float) -> None:
        self.now += dt
        for eid, until in list(self.until.items()):
            if until <= self.now:
                self._returned(eid, until)

    # -------------------------------------------------------------- rules

    @rule(dt=STEP)
    def wait(self, dt):
        self._advance(dt)
        self.t.tick(self.now)

    @precondition(lambda self: self.endpoints)
    @rule(data=st.data(), ok=st.booleans(), dt=STEP)
    def probe_result(self, data, ok, dt):
        eid = data.draw(st.sampled_from(sorted(self.endpoints)))
        self._advance(dt)
        before = self.state[eid]
        self.t.probe_result(eid, ok, self.now, "detail")
        h = self.history[eid]
        h.append(ok)
        after = self._row(eid).probe
        rise, fall = self.probe.rise, self.probe.fall
        # Exactly at the threshold: fall failures in a row is DOWN, rise successes after DOWN is UP.
        if len(h) >= fall and not any(h[-fall:]):
            assert after is ProbeState.DOWN
        if before is ProbeState.DOWN and len(h) >= rise and all(h[-rise:]):
            assert after is ProbeState.UP
        # Never faster than the threshold.
        if after is ProbeState.DOWN and before is not ProbeState.DOWN:
            assert len(h) >= fall and not any(h[-fall:])
        if after is ProbeState.UP and before is ProbeState.DOWN:
            assert len(h) >= rise and all(h[-rise:])
        if after is not before:
            assert after is (ProbeState.UP if ok else ProbeState.DOWN)
        assert after is not ProbeState.UNKNOWN or not any(h)
        self.state[eid] = after
        row = self._row(eid)
        assert (row.last_probe_ok, row.last_probe_age, row.last_probe_detail) == (ok, 0.0, "detail")

    @rule(data=st.data(), dt=STEP, ok=st.booleans(), burst=st.integers(1, 6))
    def report(self, data, dt, ok, burst):
        if not self.endpoints:
            return
        eid = data.draw(st.sampled_from(sorted(self.endpoints)))
        self._advance(dt)
        for _ in range(burst):
            was_ejected = eid in self.until
            room = len([e for e in self.until if self._candidate(e)]) < self._cap()
            self.t.report(eid, ok, self.now)
            row = self._row(eid)
            if was_ejected or not self._candidate(eid):
                assert row.ejected == was_ejected
                continue
            self.cf[eid] = 0 if ok else self.cf[eid] + 1
            should = not ok and self.cf[eid] >= self.outlier.consecutive_failures and room
            assert row.ejected == should, (self.cf[eid], room)
            if should:
                self._ejected(eid, row.ejected_remaining)

    def _ejected(self, eid: str, duration: float) -> None:
        base, cap = self.outlier.base_ejection_time, self.outlier.max_ejection_time
        assert base <= duration <= cap or duration == cap
        prev = self.last.get(eid)
        if prev is not None:
            _, prev_dur, returned = prev
            if self.now - returned < base:
                # Back-to-back ejections grow until the cap.
                assert duration == cap or duration > prev_dur
        self.until[eid] = self.now + duration
        self.last[eid] = (self.now, duration, float("nan"))

    @rule(keep=st.lists(st.booleans(), min_size=len(POOL), max_size=len(POOL)), data=st.data(), dt=STEP)
    def republish(self, keep, data, dt):
        self._advance(dt)
        self._publish({eid: data.draw(REGISTRY) for eid, k in zip(POOL, keep) if k})

    # -------------------------------------------------------------- invariants

    @invariant()
    def sets_are_consistent(self):
        t, now = self.t, self.now
        eligible = t.eligible(now)
        cands = t.candidates(now)
        assert set(eligible) <= set(cands) <= set(self.endpoints.values())
        expected = [
            ep for eid, ep in self.endpoints.items()
            if ep.registry in (RegistryHealth.PASSING, RegistryHealth.WARNING)
            and self.state[eid] is not ProbeState.DOWN
            and eid not in self.until
        ]
        assert set(eligible) == set(expected)
        ejected = [e for e in self.until if self._candidate(e)]
        assert len(ejected) <= self._cap()
        panic = bool(cands) and len(eligible) * 100 < self.panic * len(cands)
        assert t.in_panic(now) == panic
        assert t.serving(now) == (cands if panic else eligible)
        assert t.snapshot(now).panic == panic
        assert t.next_deadline() == (min(self.until.values()) if self.until else None)


TestHealthMachine = HealthMachine.TestCase
TestHealthMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
