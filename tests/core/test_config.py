import tomllib

import pytest

from softlb import ConfigError, parse_agent_config, parse_duration
from softlb._config import AgentConfig, with_overrides
from softlb._durations import format_duration
from softlb.policies import POLICIES

KNOWN = frozenset(POLICIES)


def parse(text):
    return parse_agent_config(tomllib.loads(text), KNOWN)


def test_defaults_are_a_working_config():
    cfg = parse("")
    assert cfg == AgentConfig()
    assert cfg.listen == "127.0.0.1:7070" and cfg.service("anything").policy == "round_robin"


def test_full_document():
    cfg = parse("""
[agent]
listen = "127.0.0.1:9000"
zone = "a"
busy_poll = "20us"
[catalog]
file = "cat.toml"
[services.web]
policy = "round_robin"
panic_threshold = 30
locality = ["zone", "*"]
slow_start = "30s"
[services.web.probe]
kind = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
fall = 2
[services.web.outlier]
consecutive_failures = 5
base_ejection_time = "10s"
max_ejection_percent = 50
""")
    web = cfg.service("web")
    assert cfg.listen == "127.0.0.1:9000" and cfg.busy_poll == pytest.approx(20e-6)
    assert web.probe.kind == "http" and web.probe.timeout == 0.5 and web.probe.fall == 2
    assert web.outlier.max_ejection_percent == 50 and web.slow_start == 30
    assert web.locality == ("zone", "*")


@pytest.mark.parametrize(
    "text, where",
    [
        ("[agent]\nlisten = 7070", "agent.listen: expected a string"),
        ("[agent]\nlsten = \"x\"", "agent.lsten: unknown setting"),
        ("[services.web]\npolicy = \"fastest\"", "services.web.policy: unknown policy \"fastest\""),
        ("[services.web.probe]\nkind = \"udp\"", "services.web.probe.kind"),
        ("[services.web.probe]\ninterval = \"1 sec\"", "services.web.probe.interval: not a duration"),
        ("[services.web.outlier]\nmax_ejection_percent = 150", "max_ejection_percent: 150 is out of range"),
        ("[services.web]\nlocality = [\"*\", \"zone\"]", "\"*\" must come last"),
        ("[services.web]\nlocality = [\"rack\"]", "unknown level \"rack\""),
        ("[agent]\nlisten = \"0.0.0.0:7070\"", "not a loopback address"),
        ("[agent]\nadmin = \"10.1.2.3:80\"", "agent.admin: 10.1.2.3 is not a loopback"),
        ("[catalog]\nsource = \"etcd\"", "catalog.source"),
        ("[[provide]]\nport = 80", "provide[0].name: required"),
    ],
)
def test_errors_name_the_key(text, where):
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert where in str(e.value)


def test_non_loopback_needs_explicit_permission():
    cfg = parse("[agent]\nlisten = \"0.0.0.0:7070\"\nallow_non_loopback = true")
    assert cfg.listen == "0.0.0.0:7070"
    with pytest.raises(ConfigError):
        with_overrides(AgentConfig(), listen="192.168.1.1:1")
    assert with_overrides(AgentConfig(), listen="[::1]:7070").listen == "[::1]:7070"
    assert with_overrides(AgentConfig(), listen="localhost:7070", admin="").admin == ""


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("1s", 1), ("1m30s", 90), ("2h", 7200), ("250us", 250e-6), (3, 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "1", "s", "1x", "-1s", True, -2])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration_round_trips_roughly():
    for s in (0.0002, 0.25, 3.0, 300.0, 7200.0):
        assert parse_duration(format_duration(s)) == pytest.approx(s, rel=0.01)


def test_consul_max_on_demand():
    assert AgentConfig().consul.max_on_demand == 256
    assert parse("[consul]\nmax_on_demand = 10").consul.max_on_demand == 10
    assert parse("[consul]\nmax_on_demand = 0").consul.max_on_demand == 0  # configured services only
    with pytest.raises(ConfigError, match="consul.max_on_demand: -1 is out of range"):
        parse("[consul]\nmax_on_demand = -1")


@pytest.mark.parametrize(
    "locality, message",
    [
        ('["nearest"]', 'services.web.locality: "nearest" is not a valid nearest level: write "nearest:N"'),
        ('["nearest:0", "*"]', '"nearest:0" is not a valid nearest level'),
        ('["nearest:two"]', '"nearest:two" is not a valid nearest level'),
        ('["near"]', '"near" is not a valid nearest level'),
        ('["nearest:1", "zone", "nearest:3"]', 'only one nearest:N level ("nearest:3" could never match'),
        ('["*", "nearest:2"]', '"*" must come last'),
        ('["rack"]', 'unknown level "rack" (one of: node, zone, region, nearest:N, *)'),
    ],
)
def test_nearest_locality_errors(locality, message):
    with pytest.raises(ConfigError) as e:
        parse(f"[services.web]\nlocality = {locality}")
    assert message in str(e.value)


def test_nearest_locality_with_consul_needs_near():
    ok = parse('[services.web]\nlocality = ["nearest:2", "*"]')  # the file source: ranks from the file
    assert ok.service("web").locality == ("nearest:2", "*")
    base = '[catalog]\nsource = "consul"\n[services.web]\nlocality = ["zone", "nearest:2", "*"]\n'
    with pytest.raises(ConfigError) as e:
        parse(base)
    assert ('services.web.locality: "nearest:2" ranks endpoints by Consul\'s network distance, but Consul is not '
            'asked for it: set consul.near = "_agent" (or consul.services.web.near)') in str(e.value)
    with pytest.raises(ConfigError):
        parse(base + '[consul]\n[consul.services.web]\nnear = ""\n[consul.services.db]\nnear = "_agent"\n')
    assert parse(base + '[consul]\nnear = "_agent"\n').consul.query_for("web").near == "_agent"
    assert parse(base + '[consul.services.web]\nnear = "node-7"\n').consul.query_for("web").near == "node-7"
