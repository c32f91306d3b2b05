"""The shared wire vectors (tests/wire_vectors/vectors.json) against this client's codec."""

import json
import pathlib

import pytest

from softlb_client._codec import Decoder, encode, result_of
from softlb_client._errors import ProtocolError, SoftLBError

VECTORS = json.loads((pathlib.Path(__file__).resolve().parents[3] / "tests" / "wire_vectors" / "vectors.json").read_text())


def by_kind(kind):
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] == kind]


@pytest.mark.parametrize("v", by_kind("request"))
def test_requests_encode_to_the_vector_bytes(v):
    assert encode(v["value"]).hex() == v["hex"]


@pytest.mark.parametrize("v", by_kind("response"))
def test_responses_decode_to_the_vector_value(v):
    d = Decoder()
    raw = bytes.fromhex(v["hex"])
    for i in range(len(raw)):  # byte by byte: framing must survive any split
        d.feed(raw[i:i + 1])
    msg = d.next()
    assert msg == v["value"]
    if "error" in msg:
        with pytest.raises(SoftLBError) as e:
            result_of(msg)
        assert e.value.code == msg["error"]["code"]
    else:
        assert result_of(msg) == v["value"]["result"]


def test_an_oversized_answer_is_a_protocol_error():
    d = Decoder()
    d.feed(bytes.fromhex([v for v in VECTORS if v["name"] == "length_over_max"][0]["hex"]))
    with pytest.raises(ProtocolError):
        d.next()


def test_truncated_frame_waits():
    d = Decoder()
    d.feed(bytes.fromhex([v for v in VECTORS if v["name"] == "truncated"][0]["hex"]))
    assert d.next() is None
