"""[consul] settings added for current Consul: defaults, per-service query options, limits."""

from __future__ import annotations

import pytest

from softlb._config import ConsulQuery, parse_agent_config
from softlb._errors import ConfigError


def consul(**kw):
    return parse_agent_config({"consul": kw}).consul


def test_defaults_and_per_service_options_inherit_the_global_ones():
    c = consul(only_passing=True, namespace="ns1", node_meta={"rack": "r1"},
               services={"web": {"near": "_agent"}, "db": {"only_passing": False, "peer": "east"}})
    assert c.stale and c.change_feed == "catalog_health" and c.max_body == 64 << 20
    assert c.query_for("other") == ConsulQuery(only_passing=True, namespace="ns1", node_meta={"rack": "r1"})
    assert c.query_for("web") == ConsulQuery(only_passing=True, namespace="ns1", node_meta={"rack": "r1"},
                                             near="_agent")
    db = c.query_for("db")
    assert (db.only_passing, db.peer, db.namespace) == (False, "east", "ns1")


@pytest.mark.parametrize("kw,msg", [
    ({"change_feed": "sometimes"}, "change_feed"),
    ({"max_body": 10}, "max_body"),
    ({"max_stale": "0s"}, "max_stale"),
    ({"services": {"web": {"bogus": 1}}}, "consul.services.web.bogus"),
    ({"node_meta": {"a:b": "c"}}, "node_meta"),
    ({"negative_ttl": "soon"}, "negative_ttl"),
])
def test_bad_values_are_refused_with_the_key_named(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        consul(**kw)


def test_provide_weights_and_deregister_after():
    cfg = parse_agent_config({"provide": [{"name": "api", "port": 80, "weight": 3, "deregister_after": "2m"}]})
    p = cfg.provide[0]
    assert (p.weight, p.warning_weight, p.deregister_after) == (3, 1, 120.0)
    with pytest.raises(ConfigError, match="deregister_after"):
        parse_agent_config({"provide": [{"name": "api", "port": 80, "deregister_after": "30s"}]})
