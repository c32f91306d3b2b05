import pytest

from softlb import ConfigError, Endpoint
from softlb._address import address_problem
from softlb._filecatalog import parse_catalog_text


def test_endpoints_with_defaults_and_labels():
    cat = parse_catalog_text("""
[[services.web.endpoints]]
address = "127.0.0.1"
port = 8001
[[services.web.endpoints]]
id = "b"
address = "10.0.0.2"
port = 8002
weight = 3
tags = ["v2"]
meta = { version = "2" }
node = "n1"
zone = "z1"
region = "r1"
[services.empty]
""")
    a, b = cat["web"]
    assert a == Endpoint(id="127.0.0.1:8001", address="127.0.0.1", port=8001)
    assert (b.id, b.weight, b.tags, dict(b.meta), b.node, b.zone, b.region) == ("b", 3, ("v2",), {"version": "2"}, "n1", "z1", "r1")
    assert cat["empty"] == ()


@pytest.mark.parametrize(
    "text, msg",
    [
        ("[[services.web.endpoints]]\nport = 1", "services.web.endpoints[0].address: required"),
        ("[[services.web.endpoints]]\naddress = \"h\"\nport = 70000", "port: 70000 is out of range"),
        ("[[services.web.endpoints]]\naddress = \"h\"\nport = 1\nwieght = 2", "wieght: unknown setting"),
        ("[[services.web.endpoints]]\naddress = \"a b\"\nport = 1", "not an IP address or host name"),
        ("[[services.w.endpoints]]\naddress = \"h\"\nport = 1\n[[services.w.endpoints]]\naddress = \"h\"\nport = 1",
         "duplicate endpoint id \"h:1\""),
        ("[services.web]\nendpoints = 3", "expected an array of tables"),
        ("services = [", "not valid TOML"),
        ("[[services.web.endpoints]]\naddress = \"h\"\nport = 1\nweight = -1", "weight: -1 is out of range"),
    ],
)
def test_bad_catalogs_are_rejected_whole(text, msg):
    with pytest.raises(ConfigError) as e:
        parse_catalog_text(text)
    assert msg in str(e.value)


@pytest.mark.parametrize("address", ["db..internal", "x" * 64 + ".example", "-a.example", "a b", "", ".", "h/x", "a" * 254])
def test_malformed_host_names_are_refused(address):
    assert address_problem(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "db.internal", "_svc._tcp.example.", "a-b.c", "x" * 63])
def test_good_addresses_pass(address):
    assert address_problem(address) == ""


def test_registry_state_can_drain_an_endpoint():
    from softlb import RegistryHealth

    cat = parse_catalog_text('[[services.w.endpoints]]\naddress = "h"\nport = 1\nregistry = "maintenance"\n')
    assert cat["w"][0].registry is RegistryHealth.MAINTENANCE
    with pytest.raises(ConfigError) as e:
        parse_catalog_text('[[services.w.endpoints]]\naddress = "h"\nport = 1\nregistry = "pasing"\n')
    assert 'registry: "pasing" is not one of passing, warning, critical, maintenance' in str(e.value)


def test_missing_port_says_required():
    with pytest.raises(ConfigError) as e:
        parse_catalog_text('[[services.w.endpoints]]\naddress = "h"\n')
    assert "services.w.endpoints[0].port: required" in str(e.value)


def test_rank_is_optional_and_checked():
    cat = parse_catalog_text("""
[[services.web.endpoints]]
address = "127.0.0.1"
port = 8001
rank = 2
[[services.web.endpoints]]
address = "127.0.0.1"
port = 8002
""")
    assert [e.rank for e in cat["web"]] == [2, None]
    assert cat["web"][0].as_dict()["rank"] == 2 and "rank" not in cat["web"][1].as_dict()
    for bad, msg in (("-1", "out of range"), ('"near"', "expected an integer"), ("true", "expected an integer")):
        with pytest.raises(ConfigError) as e:
            parse_catalog_text(f'[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = 1\nrank = {bad}\n')
        assert "services.web.endpoints[0].rank" in str(e.value) and msg in str(e.value)
