"""What Consul's response headers mean (pure): index, LastContact, Age, backends, ACL
filtering, Retry-After; hostile values never raise anything but ConsulDataError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb._consul import (
    AnswerMeta,
    ConsulDataError,
    answer_freshness,
    parse_answer_meta,
    parse_index,
    parse_retry_after,
)


@pytest.mark.parametrize("header", ["²", "١٢", "9" * 5000, "1" * 21, "+5", " -1"])
def test_hostile_index_is_a_data_error_not_a_value_error(header):
    with pytest.raises(ConsulDataError, match="X-Consul-Index"):
        parse_index(header)
    with pytest.raises(ConsulDataError):
        parse_answer_meta({"X-Consul-Index": header})


@pytest.mark.parametrize("value", ["²", "abc", "9" * 5000, "-3", "1.5", ""])
def test_malformed_last_contact_is_ignored_not_fatal(value):
    meta = parse_answer_meta({"X-Consul-Index": "7", "X-Consul-LastContact": value})
    assert meta.last_contact_ms is None and meta.index == "7"
    assert meta.ignored == ("x-consul-lastcontact",)


def test_headers_are_matched_case_insensitively_like_go_canonical_names():
    meta = parse_answer_meta({"X-Consul-Index": "9", "X-Consul-Knownleader": "true",
                              "X-Consul-Lastcontact": "12", "X-Consul-Query-Backend": "streaming",
                              "x-cache": "hit", "age": "3", "X-Consul-Results-Filtered-By-Acls": "true"})
    assert meta == AnswerMeta(index="9", known_leader=True, last_contact_ms=12, backend="streaming",
                              cache="HIT", age=3.0, filtered_by_acls=True)


def test_streaming_knownleader_false_is_not_stale():
    # The materialized view never sets KnownLeader (upstream #9776).
    streaming = parse_answer_meta({"X-Consul-Index": "5", "X-Consul-KnownLeader": "false",
                                   "X-Consul-LastContact": "0", "X-Consul-Query-Backend": "streaming"})
    assert not answer_freshness(streaming, 5.0).stale
    rpc = parse_answer_meta({"X-Consul-Index": "5", "X-Consul-KnownLeader": "false",
                             "X-Consul-Query-Backend": "blocking-query"})
    f = answer_freshness(rpc, 5.0)
    assert f.stale and "no leader" in f.reason


def test_last_contact_and_cache_age_against_max_stale():
    lc = parse_answer_meta({"X-Consul-Index": "5", "X-Consul-LastContact": "7000"})
    assert answer_freshness(lc, 5.0).stale and answer_freshness(lc, 5.0).lag == 7.0
    assert not answer_freshness(lc, 10.0).stale
    aged = parse_answer_meta({"X-Consul-Index": "5", "X-Cache": "HIT", "Age": "30"})
    f = answer_freshness(aged, 5.0)
    assert f.stale and f.lag == 30.0 and "30.0s old" in f.reason
    # Age only means something on a cache hit.
    assert not answer_freshness(parse_answer_meta({"X-Consul-Index": "5", "Age": "30"}), 5.0).stale


@pytest.mark.parametrize("value,expected", [("7", 7.0), ("0", 0.0), ("99999", 300.0), ("²", None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", None), (None, None)])
def test_retry_after(value, expected):
    assert parse_retry_after(value) == expected


@given(st.dictionaries(st.sampled_from(["X-Consul-Index", "X-Consul-KnownLeader", "X-Consul-LastContact",
                                        "Age", "X-Cache", "X-Consul-Query-Backend",
                                        "X-Consul-Results-Filtered-By-ACLs"]), st.text(max_size=30)))
def test_any_header_values_give_meta_or_a_data_error(headers):
    try:
        meta = parse_answer_meta(headers)
    except ConsulDataError:
        return
    answer_freshness(meta, 5.0)
