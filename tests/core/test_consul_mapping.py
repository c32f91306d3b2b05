"""Mapping Consul health entries to endpoints: addresses, weights, health, tags, locality."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb import Endpoint, RegistryHealth
from softlb._consul import (
    MAX_WEIGHT,
    ConsulDataError,
    MappingOptions,
    address_problem,
    aggregate_health,
    decode_health_body,
    endpoints_from_health,
    service_name_problem,
)


def entry(
    sid="web-1", node="n1", node_addr="10.0.0.1", addr="10.1.0.1", port=8080, tags=("a",),
    checks=(("serfHealth", "passing", ""), ("service:web-1", "passing", "web-1")),
    weights=None, meta=None, node_meta=None, svc_tagged=None, node_tagged=None,
):
    e = {
        "Node": {"ID": "x", "Node": node, "Address": node_addr, "Datacenter": "dc1",
                 "TaggedAddresses": node_tagged, "Meta": node_meta},
        "Service": {"ID": sid, "Service": "web", "Tags": list(tags), "Address": addr,
                    "TaggedAddresses": svc_tagged, "Meta": meta, "Port": port},
        "Checks": [{"Node": node, "CheckID": cid, "Name": cid, "Status": st_, "ServiceID": svc,
                    "Output": ""} for cid, st_, svc in checks],
    }
    if weights is not None:
        e["Service"]["Weights"] = weights
    return e


def test_documented_sample_entry():
    # The entry shape from Consul's health.mdx sample.
    sample = {
        "Node": {"ID": "40e4a748", "Node": "foobar", "Address": "10.1.10.12", "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
                 "Meta": {"instance_type": "t2.medium"}},
        "Service": {"ID": "redis", "Service": "redis", "Tags": ["primary"], "Address": "10.1.10.12",
                    "TaggedAddresses": {"lan": {"address": "10.1.10.12", "port": 8000},
                                        "wan": {"address": "198.18.1.2", "port": 80}},
                    "Meta": {"redis_version": "4.0"}, "Port": 8000,
                    "Weights": {"Passing": 10, "Warning": 1}, "Namespace": "default"},
        "Checks": [
            {"Node": "foobar", "CheckID": "service:redis", "Name": "Service 'redis' check",
             "Status": "passing", "Notes": "", "Output": "", "ServiceID": "redis",
             "ServiceName": "redis", "ServiceTags": ["primary"], "Namespace": "default"},
            {"Node": "foobar", "CheckID": "serfHealth", "Name": "Serf Health Status",
             "Status": "passing", "Notes": "", "Output": "", "ServiceID": "", "ServiceName": "",
             "ServiceTags": [], "Namespace": "default"},
        ],
    }
    (ep,) = endpoints_from_health([sample])
    assert ep == Endpoint(id="redis@foobar", address="10.1.10.12", port=8000, weight=10,
                          tags=("primary",), meta={"redis_version": "4.0"}, node="foobar",
                          registry=RegistryHealth.PASSING)
    (wan,) = endpoints_from_health([sample], MappingOptions(tagged_address="wan"))
    assert (wan.address, wan.port) == ("198.18.1.2", 80)


def test_empty_service_address_falls_back_to_node_address():
    (ep,) = endpoints_from_health([entry(addr="")])
    assert ep.address == "10.0.0.1"


def test_missing_both_addresses_is_a_data_error():
    with pytest.raises(ConsulDataError, match=r"entry\[0\]: neither Service.Address nor Node.Address"):
        endpoints_from_health([entry(addr="", node_addr="")])


@pytest.mark.parametrize("key_case", [str, str.lower])
def test_tagged_service_address_either_key_case(key_case):
    tagged = {"lan": {key_case("Address"): "192.168.0.5", key_case("Port"): 9000}}
    (ep,) = endpoints_from_health([entry(svc_tagged=tagged)], MappingOptions(tagged_address="lan"))
    assert (ep.address, ep.port) == ("192.168.0.5", 9000)


def test_tagged_address_falls_back_to_node_then_plain():
    e = entry(node_tagged={"wan": "203.0.113.9"})
    (ep,) = endpoints_from_health([e], MappingOptions(tagged_address="wan"))
    assert (ep.address, ep.port) == ("203.0.113.9", 8080)
    (ep,) = endpoints_from_health([entry()], MappingOptions(tagged_address="wan"))
    assert ep.address == "10.1.0.1"


def test_weights_follow_aggregate_state():
    w = {"Passing": 7, "Warning": 2}
    ok = entry(weights=w)
    warn = entry(weights=w, checks=(("serfHealth", "passing", ""), ("c", "warning", "web-1")))
    crit = entry(weights=w, checks=(("serfHealth", "passing", ""), ("c", "critical", "web-1")))
    assert [endpoints_from_health([e])[0].weight for e in (ok, warn, crit)] == [7, 2, 0]
    assert endpoints_from_health([warn])[0].registry is RegistryHealth.WARNING
    assert endpoints_from_health([entry(weights=None)])[0].weight == 1


def test_node_level_critical_excludes_the_instance():
    e = entry(checks=(("serfHealth", "critical", ""), ("service:web-1", "passing", "web-1")))
    assert endpoints_from_health([e])[0].registry is RegistryHealth.CRITICAL


@pytest.mark.parametrize("cid", ["_service_maintenance:web-1", "_node_maintenance"])
def test_maintenance_checks(cid):
    e = entry(checks=(("serfHealth", "passing", ""), (cid, "critical", "")))
    ep = endpoints_from_health([e])[0]
    assert (ep.registry, ep.weight) == (RegistryHealth.MAINTENANCE, 0)


def test_unknown_check_status_is_treated_as_critical():
    assert aggregate_health([{"Status": "exploded"}]) is RegistryHealth.CRITICAL


def test_tag_filter_requires_all_tags():
    eps = endpoints_from_health(
        [entry(sid="a", tags=("x", "y")), entry(sid="b", tags=("x",)), entry(sid="c", tags=())],
        MappingOptions(tags=("x", "y")),
    )
    assert [e.id for e in eps] == ["a@n1"]


def test_locality_from_node_meta_and_kubernetes_keys():
    (ep,) = endpoints_from_health([entry(node_meta={"zone": "z1", "region": "r1"})])
    assert (ep.zone, ep.region) == ("z1", "r1")
    k8s = {"topology.kubernetes.io/zone": "z2", "topology.kubernetes.io/region": "r2"}
    (ep,) = endpoints_from_health([entry(node_meta=k8s)])
    assert (ep.zone, ep.region) == ("z2", "r2")


def test_nulls_where_consul_allows_them():
    e = entry(meta=None, node_meta=None)
    e["Service"]["Tags"] = None
    e["Checks"] = None
    (ep,) = endpoints_from_health([e])
    assert (ep.tags, dict(ep.meta), ep.registry) == ((), {}, RegistryHealth.PASSING)


def test_ids_are_unique_and_sorted():
    eps = endpoints_from_health([entry(sid="b", node="n2"), entry(sid="a"), entry(sid="b", node="n2")])
    assert [e.id for e in eps] == ["a@n1", "b@n2"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.pop("Service"), r"entry\[0\].Service: missing"),
        (lambda e: e["Service"].update(Port="80"), r"entry\[0\].Service.Port: expected an integer, got a string"),
        (lambda e: e["Service"].update(Port=70000), r"entry\[0\].Service.Port: 70000 is out of range"),
        (lambda e: e["Service"].update(Tags="a"), r"entry\[0\].Service.Tags: expected a list of strings"),
        (lambda e: e["Service"].update(Meta={"k": 1}), r"entry\[0\].Service.Meta: expected an object of strings"),
        (lambda e: e["Service"].update(Weights={"Passing": -1}), r"Weights.Passing: -1 is out of range"),
        # Unbounded weights used to pass here and raise OverflowError when packed for the wire.
        (lambda e: e["Service"].update(Weights={"Passing": 2**70}),
         r"entry\[0\].Service.Weights.Passing: 1180591620717411303424 is out of range"),
        (lambda e: e["Service"].update(Weights={"Passing": MAX_WEIGHT + 1}), r"Weights.Passing: 1000001 is out"),
        (lambda e: e["Service"].update(Address="db..internal"), r"entry\[0\]: address 'db..internal': not an IP"),
        (lambda e: e["Service"].update(Address="x" * 64 + ".internal"), r"entry\[0\]: address 'xxx"),
        (lambda e: e["Service"].update(Address="", TaggedAddresses=None)
         or e["Node"].update(Address="bad host"), r"address 'bad host'"),
        (lambda e: e["Node"].update(Node=None), r"entry\[0\]: empty Node.Node or Service.ID"),
        (lambda e: e.update(Checks={}), r"entry\[0\].Checks: expected a list, got an object"),
        (lambda e: e["Checks"][0].pop("Status"), r"entry\[0\].Checks\[0\].Status: missing"),
        (lambda e: e.update(Node=[]), r"entry\[0\].Node: expected an object, got an array"),
    ],
)
def test_garbage_names_what_is_wrong(mutate, message):
    e = entry()
    mutate(e)
    with pytest.raises(ConsulDataError, match=message):
        endpoints_from_health([e])


@pytest.mark.parametrize("body, message", [
    (b"<html>oops", "not JSON"), (b'{"a": 1}', "expected a JSON array, got an object"),
    (b"null", "got null"), (b"\xff\xfe", "not JSON"),
    (b"[" * 200000, "nested too deeply"),  # was a RecursionError out of json.loads
])
def test_decode_body_errors(body, message):
    with pytest.raises(ConsulDataError, match=message):
        decode_health_body(body)


# Arbitrary JSON must produce endpoints or ConsulDataError, never another exception.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["Node", "Service", "Checks", "ID", "Address", "Port", "Tags", "Meta",
                         "Status", "CheckID", "Weights", "Passing", "TaggedAddresses", "lan"]),
        inner, max_size=6),
    max_leaves=25,
)


@given(json_values)
def test_arbitrary_json_never_crashes(value):
    try:
        eps = endpoints_from_health(value, MappingOptions(tagged_address="lan"))
    except ConsulDataError:
        return
    assert all(isinstance(e, Endpoint) for e in eps)


@given(st.lists(st.sampled_from(["passing", "warning", "critical"]), max_size=6))
def test_mutating_one_valid_entry_field_keeps_others(statuses):
    checks = tuple((f"c{i}", s, "web-1") for i, s in enumerate(statuses))
    (ep,) = endpoints_from_health(json.loads(json.dumps([entry(checks=checks)])))
    if "critical" in statuses:
        assert ep.registry is RegistryHealth.CRITICAL
    elif "warning" in statuses:
        assert ep.registry is RegistryHealth.WARNING
    else:
        assert ep.registry is RegistryHealth.PASSING


def test_input_is_not_modified():
    entries = [entry()]
    before = copy.deepcopy(entries)
    endpoints_from_health(entries)
    assert entries == before


def test_weight_bounds_are_inclusive():
    for w in (0, MAX_WEIGHT):
        (ep,) = endpoints_from_health([entry(weights={"Passing": w, "Warning": 1})])
        assert ep.weight == w


@pytest.mark.parametrize("addr", [
    "10.0.0.1", "::1", "fe80::1%eth0", "db.internal", "db.internal.", "ip-10-0-0-1.ec2.internal",
    "_srv.x", "a" * 63 + ".b", ".".join(["a" * 63] * 3) + "." + "a" * 61,
])
def test_well_formed_addresses_pass(addr):
    assert address_problem(addr) == ""
    (ep,) = endpoints_from_health([entry(addr=addr)])
    assert ep.address == addr


@pytest.mark.parametrize("addr", [
    "db..internal", ".db", "a" * 64, "a" * 64 + ".b", "db internal", "db/x", "db:80", "d\u00e9.fr",
    ".", "..", ".".join(["a" * 63] * 4),
])
def test_malformed_host_names_are_refused(addr):
    assert address_problem(addr)
    with pytest.raises(ConsulDataError, match="address"):
        endpoints_from_health([entry(addr=addr)])


def test_service_name_rules():
    for ok in ("web", "Web-2", "a_b.c", "9lives", "x" * 255):
        assert service_name_problem(ok) == ""
    for bad in ("", "web?dc=other", "web#frag", "x/../web", "..", ".web", "-web", "web x",
                "w%2Fb", "web\n", "x" * 256, "caf\u00e9"):
        assert "not a Consul service name" in service_name_problem(bad), bad


def test_tag_filter_is_case_insensitive_like_consul():
    # Consul's ?tag= uses strings.EqualFold; a [services.x] tags filter must agree with it.
    eps = endpoints_from_health([entry(sid="a", tags=("Primary", "EU")), entry(sid="b", tags=("eu",))],
                                MappingOptions(tags=("primary", "eu")))
    assert [e.id for e in eps] == ["a@n1"]
    assert eps[0].tags == ("Primary", "EU")  # shown as registered


def test_only_passing_treats_warning_as_critical():
    warn = entry(weights={"Passing": 3, "Warning": 2},
                 checks=(("serfHealth", "passing", ""), ("c", "warning", "web-1")))
    ep = endpoints_from_health([warn], MappingOptions(only_passing=True))[0]
    assert (ep.registry, ep.weight) == (RegistryHealth.CRITICAL, 0)
    assert endpoints_from_health([entry()], MappingOptions(only_passing=True))[0].weight == 1


def test_ranked_answers_stamp_each_endpoint_with_its_place():
    # ?near= answers come nearest first; the endpoints come out sorted by id either way.
    entries = [entry(sid="web-3", node="n3"), entry(sid="web-1", node="n1", tags=("b",)),
               entry(sid="web-2", node="n2")]
    plain = endpoints_from_health(entries)
    assert [(e.id, e.rank) for e in plain] == [("web-1@n1", None), ("web-2@n2", None), ("web-3@n3", None)]
    near = endpoints_from_health(entries, MappingOptions(ranked=True))
    assert [(e.id, e.rank) for e in near] == [("web-1@n1", 1), ("web-2@n2", 2), ("web-3@n3", 0)]
    # Ranks count the instances kept: a tag filter leaves no gaps.
    tagged = endpoints_from_health(entries, MappingOptions(ranked=True, tags=("a",)))
    assert [(e.id, e.rank) for e in tagged] == [("web-2@n2", 1), ("web-3@n3", 0)]
    # A re-sorted answer is a different endpoint set (so it is published).
    again = endpoints_from_health(entries[::-1], MappingOptions(ranked=True))
    assert again != near and [e.id for e in again] == [e.id for e in near]
