"""softlb/_explain.py: every endpoint the source knows gets the reason it is (not) served,
and a resolve that finds nothing says which reason emptied the set."""

import random

import pytest

from softlb import AgentConfig, Endpoint, LeaseScope, RegistryHealth, ServiceConfig
from softlb._config import OutlierConfig, ProbeConfig
from softlb._engine import Engine
from softlb._errors import ErrorCode, RequestError


def ep(i, **kw):
    return Endpoint(id=f"e{i}", address="127.0.0.1", port=8000 + i, **kw)


def engine(svc=ServiceConfig(), eps=(), **agent):
    e = Engine(AgentConfig(services={"web": svc}, **agent), random.Random(1))
    e.replace_all({"web": list(eps)}, 0.0)
    return e


def whys(e, now=0.0):
    return {w.id: (w.served, w.reason, w.detail) for w in e.services["web"].explain(now)}


def no_healthy(e, now=0.0, tags=()):
    with pytest.raises(RequestError) as ei:
        e.pick("web", now, tags=tags)
    assert ei.value.code is ErrorCode.NO_HEALTHY_ENDPOINT
    return ei.value.message


def test_tag_filter_matching_nothing_is_named_with_its_key():
    e = engine(ServiceConfig(tags=("V2",)), [ep(1, tags=("v2",)), ep(2, tags=("v2",))])
    w = whys(e)
    assert w["e1"][:2] == (False, "tag_filter")
    assert 'services.web.tags = ["V2"]' in w["e1"][2] and '["v2"]' in w["e1"][2]
    msg = no_healthy(e)
    assert "2 tag filter" in msg and "check services.web.tags" in msg
    # and `endpoints` lists the filtered ones, marked
    d = e.services["web"].describe(0.0)
    assert [x["filtered"] for x in d["endpoints"]] == [True, True]
    assert d["tags"] == ["V2"]


def test_locality_mistake_names_both_zones_and_the_order():
    e = engine(ServiceConfig(locality=("zone",)), [ep(1, zone="zone-a"), ep(2, zone="zone-b")], zone="zone-c")
    served, reason, detail = whys(e)["e1"]
    assert (served, reason) == (False, "locality")
    assert "'zone-c'" in detail and "'zone-a'" in detail and 'services.web.locality = ["zone"]' in detail
    assert 'add "*"' in detail
    assert "2 locality" in no_healthy(e)


def test_locality_level_served_and_other_zone_explained():
    e = engine(ServiceConfig(locality=("zone", "*")), [ep(1, zone="a"), ep(2, zone="b")], zone="a")
    w = whys(e)
    assert w["e1"][:2] == (True, "")
    assert w["e2"][:2] == (False, "locality") and "serving zone 'a'" in w["e2"][2]


def test_registry_probe_ejection_weight_each_named():
    svc = ServiceConfig(probe=ProbeConfig(fall=1), outlier=OutlierConfig(consecutive_failures=1, max_ejection_percent=100),
                        panic_threshold=0)
    e = engine(svc, [ep(1, registry=RegistryHealth.CRITICAL), ep(2), ep(3), ep(4, weight=0), ep(5)])
    e.probe_result("web", "e2", False, 0.0, "connection refused")
    e.report(0.0, ok=False, service="web", endpoint_id="e3")
    w = whys(e, 1.0)
    assert w["e1"][:2] == (False, "registry") and "critical" in w["e1"][2]
    assert w["e2"][:2] == (False, "probe") and "connection refused" in w["e2"][2]
    assert w["e3"][:2] == (False, "ejected") and "29s more" in w["e3"][2]
    assert w["e4"][:2] == (False, "weight_zero")
    assert w["e5"][:2] == (True, "")


def test_panic_serves_the_ineligible_and_says_so():
    svc = ServiceConfig(probe=ProbeConfig(fall=1), panic_threshold=80)
    e = engine(svc, [ep(1), ep(2)])
    e.probe_result("web", "e1", False, 0.0, "refused")
    w = whys(e)
    assert w["e1"][:2] == (True, "panic") and "probe down" in w["e1"][2]


def test_slow_start_share():
    svc = ServiceConfig(policy="random", slow_start=10.0, probe=ProbeConfig(fall=1, rise=1))
    e = engine(svc, [ep(1, weight=10), ep(2, weight=10)])
    e.probe_result("web", "e1", False, 0.0)
    e.probe_result("web", "e1", True, 0.0)
    e.tick(5.0)
    served, reason, detail = whys(e, 5.0)["e1"]
    assert (served, reason) == (True, "slow_start") and "% of its weight now" in detail


def test_request_tags_that_match_nothing():
    e = engine(eps=[ep(1, tags=("a",)), ep(2)])
    msg = no_healthy(e, tags=("b",))
    assert "2 tag request" in msg


def test_empty_service():
    assert "no endpoints in the catalog" in no_healthy(engine())


# ------------------------------------------------------------------ errors that say what to do

from softlb import ConfigError, parse_agent_config  # noqa: E402
from softlb._filecatalog import parse_catalog_text  # noqa: E402


def config_error(data):
    with pytest.raises(ConfigError) as ei:
        parse_agent_config(data)
    return str(ei.value)


def test_unknown_key_gets_did_you_mean():
    assert 'agent.lisen: unknown setting (did you mean "listen"?)' in config_error({"agent": {"lisen": "x"}})
    assert '(did you mean "panic_threshold"?)' in config_error({"services": {"web": {"panic_treshold": 5}}})
    assert "did you mean" not in config_error({"agent": {"zzzzzz": 1}})


def test_a_catalog_passed_as_config_says_so():
    msg = config_error({"services": {"web": {"endpoints": [{"address": "127.0.0.1", "port": 1}]}}})
    assert "this looks like a catalog, pass it as --catalog-file FILE" in msg


def test_a_config_passed_as_catalog_says_so():
    for text in ('[agent]\nzone = "a"\n', '[services.web]\npolicy = "round_robin"\n'):
        with pytest.raises(ConfigError) as ei:
            parse_catalog_text(text)
        assert "this looks like an agent config, not a catalog" in str(ei.value) and "--config FILE" in str(ei.value)


# ------------------------------------------------------------------ properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

from softlb_agent.cli_views import changes  # noqa: E402

ZONES = ("a", "b", "")
TAGS = ("t1", "t2")


@st.composite
def endpoints(draw):
    n = draw(st.integers(0, 6))
    return [ep(i, zone=draw(st.sampled_from(ZONES)), weight=draw(st.sampled_from((0, 1, 3))),
               tags=tuple(draw(st.sets(st.sampled_from(TAGS)))),
               registry=draw(st.sampled_from(list(RegistryHealth))),
               rank=draw(st.sampled_from((None, 0, 1, 2)))) for i in range(n)]


class ExplainMachine(RuleBasedStateMachine):
    """Random catalogs, reloads, probe results and reports: every catalog endpoint gets one
    Why, and it agrees with what the balancer serves."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.e = engine(ServiceConfig(probe=ProbeConfig(fall=1, rise=1)), [ep(1)], zone="a")

    @rule(eps=endpoints())
    def catalog(self, eps):
        self.e.set_service("web", eps, self.now)

    @rule(tags=st.sets(st.sampled_from(TAGS)), loc=st.sampled_from([(), ("zone",), ("zone", "*"), ("nearest:2", "*"), ("nearest:1",)]),
          panic=st.sampled_from([0, 50, 100]))
    def reload(self, tags, loc, panic):
        svc = ServiceConfig(tags=tuple(sorted(tags)), locality=loc, panic_threshold=panic,
                            probe=ProbeConfig(fall=1, rise=1))
        self.e.reconfigure(AgentConfig(services={"web": svc}, zone="a"), self.now)

    @rule(i=st.integers(0, 5), ok=st.booleans())
    def probe(self, i, ok):
        self.e.probe_result("web", f"e{i}", ok, self.now)

    @rule(i=st.integers(0, 5))
    def fail(self, i):
        b = self.e.services["web"]
        if f"e{i}" in b.by_id:
            self.e.report(self.now, ok=False, service="web", endpoint_id=f"e{i}")

    @rule(dt=st.floats(0, 100))
    def later(self, dt):
        self.now += dt
        self.e.tick(self.now)

    @invariant()
    def whys_agree_with_the_balancer(self):
        b = self.e.services["web"]
        whys = b.explain(self.now)
        assert [w.id for w in whys] == [x.id for x in b.catalog_endpoints]
        served = {x.id for x in b.served}
        for w in whys:
            assert w.served == (w.id in served), (w, served)
            assert w.detail
        if not any(w.served for w in whys):
            try:
                self.e.pick("web", self.now, scope=LeaseScope.NONE)
            except RequestError as err:
                assert err.code is ErrorCode.NO_HEALTHY_ENDPOINT and "web" in err.message
            else:
                raise AssertionError("a pick although every endpoint was explained as not served")


TestExplainMachine = ExplainMachine.TestCase
TestExplainMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def _view(ids_served):
    return {"endpoints": [{"id": i, "address": "127.0.0.1", "port": 1, "served": s,
                           "why": {"reason": None if s else "probe", "detail": "" if s else "probe down"}}
                          for i, s in ids_served.items()]}


@given(st.dictionaries(st.sampled_from("abcdef"), st.booleans()), st.dictionaries(st.sampled_from("abcdef"), st.booleans()))
def test_watch_changes_name_exactly_what_changed(before, after):
    cs = changes(_view(before), _view(after))
    joined = {c["endpoint"] for c in cs if c["kind"] == "joined"}
    left = {c["endpoint"] for c in cs if c["kind"] == "left"}
    changed = {c["endpoint"] for c in cs if c["kind"] == "changed"}
    assert joined == after.keys() - before.keys() and left == before.keys() - after.keys()
    assert changed == {i for i in before.keys() & after.keys() if before[i] != after[i]}


def test_reload_to_a_tag_filter_matching_nothing_names_it():
    """Issue 9's reload case, found by ExplainMachine: `tags = ["v2"]` reloaded as `["V2"]`."""
    e = engine(ServiceConfig(tags=("v2",)), [ep(1, tags=("v2",)), ep(2, tags=("v2",))])
    e.reconfigure(AgentConfig(services={"web": ServiceConfig(tags=("V2",))}), 1.0)
    assert e.services["web"].summary()["eligible"] == 0
    assert "check services.web.tags" in no_healthy(e, 1.0)


def test_nearest_level_explained_with_ranks():
    eps = [ep(1, rank=2), ep(2, rank=0), ep(3, rank=1), ep(4)]
    e = engine(ServiceConfig(locality=("nearest:2", "*")), eps)
    w = whys(e)
    assert w["e2"][:2] == (True, "") and w["e3"][:2] == (True, "")
    assert w["e1"][:2] == (False, "locality")
    assert ('serving the 2 nearest eligible endpoints by rank (level "nearest:2" of services.web.locality = '
            '["nearest:2", "*"]); this endpoint\'s rank is 2 (0 = nearest)') in w["e1"][2]
    assert "rank is none (the source gave no order)" in w["e4"][2]
    d = e.services["web"].describe(0.0)
    assert d["locality_level"] == "nearest:2"
    assert [x.get("rank") for x in d["endpoints"]] == [2, 0, 1, None]


def test_nearest_without_ranks_and_no_fallback_says_so():
    e = engine(ServiceConfig(locality=("zone", "nearest:1")), [ep(1, zone="b"), ep(2, zone="c")], zone="a")
    served, reason, detail = whys(e)["e1"]
    assert (served, reason) == (False, "locality")
    assert "agent: zone 'a', nearest: no eligible endpoint has a rank" in detail
    assert "endpoint: zone 'b', rank is none (the source gave no order)" in detail
    assert "2 locality" in no_healthy(e)


def test_endpoints_view_shows_rank_only_when_the_source_gives_one():
    from softlb_agent.cli_views import format_endpoints

    e = engine(ServiceConfig(locality=("nearest:1", "*")), [ep(1, rank=1), ep(2, rank=0), ep(3)])
    text = format_endpoints(e.services["web"].describe(0.0))
    assert "locality nearest:1,* (agent: no labels; serving: nearest:1)" in text
    head, *rows = text.splitlines()[2:]
    assert "RANK" in head.split() and [r.split()[0] for r in rows] == ["e1", "e2", "e3"]
    plain = format_endpoints(engine(ServiceConfig(), [ep(1), ep(2)]).services["web"].describe(0.0))
    assert "RANK" not in plain
