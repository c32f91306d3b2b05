"""Fuzzing the parsers that take untrusted input (issue 10): the frame decoder, the agent
config, the file catalog and the Consul health answer. Each must answer anything with its own
documented error type, never another exception, and never hang or grow without bound.
Hypothesis explores; shapes that once broke a parser are pinned with @example. The same
parsers are fuzzed coverage-guided with atheris in tests/fuzz; its finds are pinned here too.
"""

from __future__ import annotations

import json
import string

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pytest

from softlb import ConfigError, parse_agent_config, parse_agent_config_text
from softlb._consul import ConsulDataError, decode_health_body, endpoints_from_health
from softlb._errors import RemoteProtocolError
from softlb._filecatalog import parse_catalog, parse_catalog_text
from softlb._wire import NEED_DATA, FrameDecoder, decode_body, encode_frame
from softlb.policies import POLICIES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOML-shaped values: what tomllib can hand the config and catalog parsers.
scalars = (st.none().map(lambda _: "") | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True) | st.text(max_size=12))
keys = st.sampled_from(["agent", "catalog", "consul", "services", "provide", "web", "endpoints", "probe",
                        "outlier", "address", "port", "id", "weight", "tags", "meta", "registry", "policy",
                        "listen", "admin", "socket", "max_frame", "busy_poll", "interval", "timeout", "rise",
                        "options", "table_size", "locality", "max_connections", "allow_uids", "socket_mode",
                        "idle_timeout", "file", "max_bytes", "name", "check"]) | st.text(max_size=6)
tomlish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                       max_leaves=30)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
@example(b"\xff\xff\xff\xff", [])
@example(b"\x00\x00\x00\x01\xc1", [])
def test_frame_decoder_takes_any_bytes_in_any_chunks(data, cuts):
    """Fed in arbitrary chunks, the decoder yields exactly the frames of a one-shot feed, or
    the same RemoteProtocolError; decode_body raises only RemoteProtocolError."""

    def run(chunks):
        dec, out = FrameDecoder(64), []
        try:
            for c in chunks:
                dec.feed(c)
                while (body := dec.next_body()) is not NEED_DATA:
                    out.append(body)
        except RemoteProtocolError as e:
            out.append(("error", e.code))
        return out

    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos:pos + c])
        pos += c
    chunks.append(data[pos:])
    assert run(chunks) == run([data])
    for body in run([data]):
        if isinstance(body, bytes):
            try:
                decode_body(body)
            except RemoteProtocolError:
                pass


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
                    | st.binary(max_size=5), lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=3), i, max_size=3),
                    max_leaves=10))
def test_any_msgpack_value_round_trips_through_a_frame(value):
    dec = FrameDecoder(1 << 20)
    dec.feed(encode_frame(value))
    assert dec.next_message() == msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)
    assert dec.next_message() is NEED_DATA


@FUZZ
@given(st.dictionaries(keys, tomlish, max_size=6))
@example({"agent": {"socket_mode": "7777"}})
@example({"agent": {"idle_timeout": []}})  # found by this test: AttributeError, not ConfigError
@example({"agent": {"busy_poll": float("nan")}})
@example({"agent": {"allow_uids": [True]}})
@example({"services": {"": {}}})
def test_config_parser_raises_only_config_error(doc):
    try:
        parse_agent_config(doc, frozenset(POLICIES))
    except ConfigError:
        pass


@FUZZ
@given(st.dictionaries(keys, tomlish, max_size=4)
       | st.fixed_dictionaries({"services": st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
           {"endpoints": st.lists(st.dictionaries(keys, tomlish, max_size=6), max_size=4)}), max_size=3)}))
@example({"services": {"web": {"endpoints": [{"address": "1.2.3.4", "port": 2**70}]}}})
def test_catalog_parser_raises_only_config_error(doc):
    try:
        parse_catalog(doc)
    except ConfigError:
        pass


@FUZZ
@given(st.text(alphabet=string.printable, max_size=200))
@example('[[services.web.endpoints]]\naddress = "1.2.3.4"\nport = 80\n[[services.web.endpoints]]\naddress = "1.2.3.4"\nport = 80\n')
def test_catalog_text_raises_only_config_error(text):
    try:
        parse_catalog_text(text)
    except ConfigError:
        pass


@FUZZ
@given(st.binary(max_size=200))
@example(b'[agent]\nzone = "\xff"\n')  # found by atheris: tomllib's UnicodeDecodeError escaped
@example(b"\xef\xbb\xbf[agent]\n")  # a UTF-8 BOM is not TOML either
def test_config_and_catalog_file_bytes_raise_only_config_error(data):
    """Both files are read as bytes: text that is not UTF-8 is a ConfigError like bad TOML."""
    for parse in (lambda b: parse_agent_config_text(b, frozenset(POLICIES)), parse_catalog_text):
        try:
            parse(data)
        except ConfigError:
            pass


@pytest.mark.parametrize("parse, what", [(parse_agent_config_text, "config"), (parse_catalog_text, "catalog")])
def test_a_file_that_is_not_utf8_names_the_byte_and_offset(parse, what):
    with pytest.raises(ConfigError, match=f"^{what} is not UTF-8 text: byte 0xff at offset 9$"):
        parse(b'zone = "a\xff"\n')


jsonish = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                       | st.text(max_size=8),
                       lambda i: st.lists(i, max_size=3) | st.dictionaries(
                           st.sampled_from(["Node", "Service", "Checks", "Address", "Port", "ID", "Tags", "Meta",
                                            "Status", "TaggedAddresses", "lan", "wan", "Weights", "Passing",
                                            "Datacenter", "ServiceID"]) | st.text(max_size=4), i, max_size=5),
                       max_leaves=30)


@FUZZ
@given(st.lists(jsonish, max_size=4))
def test_consul_health_answer_raises_only_consul_data_error(entries):
    try:
        endpoints_from_health(decode_health_body(json.dumps(entries)))
    except ConsulDataError:
        pass


@FUZZ
@given(st.binary(max_size=200))
@example(b"[" * 100_000)
def test_consul_health_body_bytes_raise_only_consul_data_error(body):
    try:
        endpoints_from_health(decode_health_body(body))
    except ConsulDataError:
        pass
