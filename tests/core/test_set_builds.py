"""A big endpoint set applied in steps (Engine.begin_set_service, softlb/_set_build.py; issue
10 item 9): the old set serves until the build is installed, and what install leaves is
exactly what an in-line `set_service` at install time leaves, whatever probe results,
reports, leases and clock ticks arrive between the steps; a newer update supersedes it."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import softlb._engine
import softlb._set_build
from softlb import (AgentConfig, Endpoint, EndpointSetBuild, Engine, LeaseScope, ProbeConfig, RegistryHealth,
                    RequestError, ServiceConfig)
from softlb._config import OutlierConfig

IDS = [f"e{i}" for i in range(10)]
#: Builds start at this many endpoints in the machine (the agent's threshold is 1,000).
STEP_MIN = 3


def endpoint(eid: str, moved: bool, weight: int, registry: RegistryHealth, tagged: bool, zone: str) -> Endpoint:
    return Endpoint(id=eid, address="127.0.0.1", port=9000 + IDS.index(eid) + (100 if moved else 0), weight=weight,
                    registry=registry, tags=("a",) if tagged else (), zone=zone)


endpoints = st.lists(
    st.builds(endpoint, st.sampled_from(IDS), st.booleans(), st.sampled_from([0, 1, 3]),
              st.sampled_from([RegistryHealth.PASSING, RegistryHealth.PASSING, RegistryHealth.CRITICAL,
                               RegistryHealth.MAINTENANCE]),
              st.booleans(), st.sampled_from(["z1", "z2"])),
    max_size=12)


def config(policy: str, tags: tuple[str, ...], locality: tuple[str, ...]) -> AgentConfig:
    svc = ServiceConfig(policy=policy, probe=ProbeConfig(rise=1, fall=1), tags=tags, locality=locality,
                        outlier=OutlierConfig(consecutive_failures=2, base_ejection_time=5.0, max_ejection_percent=50))
    return AgentConfig(zone="z1", services={"web": svc})


def state(e: Engine, now: float) -> object:
    b = e.services.get("web")
    if b is None:
        return None
    return (b.describe(now), [x.id for x in b.served], b.packed, b.weights, b.all_zero, b.next_deadline(),
            b.health.snapshot(now).as_dict(), sorted(b.load.active.items()),
            {k: (c.picks, c.reports_ok, c.reports_failed) for k, c in b.counters.endpoints.items()})


class SteppedEqualsInline(RuleBasedStateMachine):
    """Two engines fed the same inputs: `stepped` applies each big update in steps,
    `inline` applies it with set_service at the moment `stepped` installs it."""

    @initialize(policy=st.sampled_from(["round_robin", "random", "least_request", "weighted_round_robin"]),
                tags=st.sampled_from([(), ("a",)]), locality=st.sampled_from([(), ("zone", "*")]))
    def start(self, policy, tags, locality):
        self._saved = softlb._engine.SET_STEP_MIN, softlb._set_build.CHUNK
        # Builds of a few endpoints, a step per endpoint: results land between any two steps.
        softlb._engine.SET_STEP_MIN, softlb._set_build.CHUNK = STEP_MIN, 1
        cfg = config(policy, tags, locality)
        self.stepped = Engine(cfg, random.Random(7), defer_builds=True)
        self.inline = Engine(cfg, random.Random(7), defer_builds=True)
        every = [endpoint(i, False, 1, RegistryHealth.PASSING, True, "z1") for i in IDS]
        self.stepped.set_service("web", every, 0.0)
        self.inline.set_service("web", every, 0.0)
        self.now = 0.0
        self.build: EndpointSetBuild | None = None
        self.pending: list[Endpoint] = []
        self.leases: list[int] = []

    def teardown(self):
        if hasattr(self, "_saved"):
            softlb._engine.SET_STEP_MIN, softlb._set_build.CHUNK = self._saved

    @rule(eps=endpoints, stale=st.booleans())
    def update(self, eps, stale):
        r = self.stepped.begin_set_service("web", eps, self.now, stale=stale)
        if isinstance(r, EndpointSetBuild):
            assert len(eps) >= STEP_MIN
            self.build, self.pending, self.stale = r, eps, stale  # supersedes any unfinished one
        else:
            self.build = None
            assert r == self.inline.set_service("web", eps, self.now, stale=stale)

    @precondition(lambda self: self.build is not None)
    @rule(budget=st.integers(1, 25))
    def step(self, budget):
        assert self.build is not None
        if self.build.step(budget):
            changes = self.stepped.install_set(self.build, self.now)
            assert changes == self.inline.set_service("web", self.pending, self.now, stale=self.stale)
            self.build = None

    @rule(eid=st.sampled_from(IDS), ok=st.booleans())
    def probe(self, eid, ok):
        assert self.stepped.probe_result("web", eid, ok, self.now) == self.inline.probe_result("web", eid, ok, self.now)

    @rule(eid=st.sampled_from(IDS), ok=st.booleans())
    def report(self, eid, ok):
        def one(e: Engine):
            try:
                return e.report(self.now, ok, service="web", endpoint_id=eid)
            except RequestError as err:
                return err.code
        assert one(self.stepped) == one(self.inline)

    @rule(lease=st.booleans())
    def pick(self, lease):
        def one(e: Engine):
            try:
                p = e.pick("web", self.now, scope=LeaseScope.REQUEST if lease else LeaseScope.NONE)
            except RequestError as err:
                return err.code, None
            return p.endpoint.id, p.lease
        a, b = one(self.stepped), one(self.inline)
        assert a == b
        if a[1] is not None:
            self.leases.append(a[1])

    @precondition(lambda self: self.leases)
    @rule(ok=st.booleans(), data=st.data())
    def finish(self, ok, data):
        lease = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        def one(e: Engine):
            try:
                return e.finish(lease, self.now, ok=ok, latency=0.01)
            except RequestError as err:
                return err.code
        assert one(self.stepped) == one(self.inline)

    @rule(dt=st.sampled_from([0.5, 3.0, 6.0]))
    def advance(self, dt):
        self.now += dt
        assert self.stepped.tick(self.now)[0] == self.inline.tick(self.now)[0]

    @invariant()
    def same_state(self):
        if hasattr(self, "stepped"):
            assert state(self.stepped, self.now) == state(self.inline, self.now)


SteppedEqualsInline.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_stepped_set_equals_inline = SteppedEqualsInline.TestCase


@pytest.mark.parametrize("event", ["probe", "report", "expiry"])
def test_a_result_after_eligibility_was_derived_is_not_lost(event):
    """The build derived eligibility, then a result moved it before install: install must
    not serve the stale derivation (the health tracker's epoch tells it to re-derive)."""
    cfg = config("round_robin", (), ())
    every = [endpoint(i, False, 1, RegistryHealth.PASSING, True, "z1") for i in IDS]
    engines = []
    for _ in range(2):
        e = Engine(cfg, random.Random(7), defer_builds=True)
        e.set_service("web", every, 0.0)
        engines.append(e)
    stepped, inline = engines
    if event == "expiry":  # e1 ejected until 5.0; the install comes after that
        for e in engines:
            e.report(0.0, False, service="web", endpoint_id="e1")
            e.report(0.0, False, service="web", endpoint_id="e1")
        assert "e1" not in [x.id for x in stepped.services["web"].served]
    build = stepped.begin_set_service("web", every[:5] * 300, 0.0)  # 1,500 given, 5 distinct
    assert isinstance(build, EndpointSetBuild)
    while build.derived is None:
        build.step(64)
    for e in engines:
        if event == "probe":
            e.probe_result("web", "e1", False, 1.0)
        elif event == "report":
            e.report(1.0, False, service="web", endpoint_id="e2")
            e.report(1.0, False, service="web", endpoint_id="e2")
    build.run()
    at = 6.0 if event == "expiry" else 1.0
    assert stepped.install_set(build, at) == inline.set_service("web", every[:5] * 300, at)
    assert state(stepped, at) == state(inline, at)


def test_the_ejection_cap_holds_after_a_stepped_shrink():
    """5 of 10 ejected (the 50% cap); the new set keeps them and one other: the cap returns
    the two due back soonest, as set_endpoints does, at install time."""
    cfg = config("round_robin", (), ())
    every = [endpoint(i, False, 1, RegistryHealth.PASSING, True, "z1") for i in IDS]
    engines = []
    for _ in range(2):
        e = Engine(cfg, random.Random(7), defer_builds=True)
        e.set_service("web", every, 0.0)
        for k, eid in enumerate(IDS[:5]):
            e.report(k * 0.1, False, service="web", endpoint_id=eid)
            e.report(k * 0.1, False, service="web", endpoint_id=eid)
        engines.append(e)
    stepped, inline = engines
    assert stepped.services["web"].eligible_count == 5
    build = stepped.begin_set_service("web", every[:6] * 250, 1.0)
    assert isinstance(build, EndpointSetBuild)
    build.run()
    assert stepped.install_set(build, 1.0) == inline.set_service("web", every[:6] * 250, 1.0)
    assert state(stepped, 1.0) == state(inline, 1.0)
    assert stepped.services["web"].eligible_count == 3  # e0 and e1 returned


def eps(n: int, port: int = 8000) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address="127.0.0.1", port=port + i) for i in range(n)]


def test_the_old_set_serves_until_install_and_a_newer_update_supersedes():
    e = Engine(AgentConfig(), random.Random(1), defer_builds=True)
    e.set_service("web", eps(1500), 0.0)
    build = e.begin_set_service("web", eps(1200, port=9000), 1.0)
    assert isinstance(build, EndpointSetBuild)
    steps = 0
    while not build.step(256):
        steps += 1
        assert e.pick("web", 1.0).endpoint.port < 9000  # the old set answers meanwhile
    assert steps > 10
    newer = e.begin_set_service("web", eps(1100, port=10000), 2.0)
    assert isinstance(newer, EndpointSetBuild)
    assert e.install_set(build, 2.0) == frozenset()  # superseded: refused
    assert len(e.services["web"].endpoints) == 1500
    newer.run()
    assert e.install_set(newer, 3.0) == {"web"}
    assert len(e.services["web"].endpoints) == 1100 and e.pick("web", 3.0).endpoint.port >= 10000


def test_a_new_big_service_appears_only_when_installed_and_small_sets_stay_in_line():
    e = Engine(AgentConfig(), random.Random(1), defer_builds=True)
    assert e.begin_set_service("small", eps(999), 0.0) == {"small"}  # in line
    build = e.begin_set_service("big", eps(1000), 0.0)
    assert isinstance(build, EndpointSetBuild) and "big" not in e.services
    build.run()
    assert e.install_set(build, 0.0) == {"big"} and len(e.services["big"].served) == 1000
    assert e.services["big"].vip == e.vips.get("big")
    # Without deferred builds (or with slow start) everything is in line.
    plain = Engine(AgentConfig(), random.Random(1))
    assert plain.begin_set_service("big", eps(1000), 0.0) == {"big"}


@pytest.mark.parametrize("change", ["remove", "set", "reconfigure"])
def test_other_updates_of_the_service_supersede_a_build(change):
    e = Engine(AgentConfig(), random.Random(1), defer_builds=True)
    e.set_service("web", eps(1500), 0.0)
    build = e.begin_set_service("web", eps(1200), 1.0)
    assert isinstance(build, EndpointSetBuild)
    build.step(300)
    if change == "remove":
        e.remove_service("web", 1.0)
    elif change == "set":
        e.set_service("web", eps(10), 1.0)
    else:  # the pending set is applied in line under the new settings, not lost
        e.reconfigure(AgentConfig(services={"web": ServiceConfig(policy="random")}), 1.0)
        assert len(e.services["web"].endpoints) == 1200
    build.run()
    assert e.install_set(build, 2.0) == frozenset()
