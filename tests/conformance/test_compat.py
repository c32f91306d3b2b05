"""The compatibility promise (docs/PROTOCOL.md, Compatibility), kept by tests:
- a frozen v1 client: the shared vectors and a recorded v1 exchange, replayed byte for byte
  against today's agent, still get answers a v1 client understands;
- a client offering [1, 2] gets version 1 from an agent that speaks only 1 (today's agent,
  and the scripted v1-only agent for every client in test_scenarios.py);
- an agent ignores request arguments it does not know (a newer client's optional fields).
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from agentproc import AgentProcess
from tests.conformance.frozen_v1 import EXCHANGE, differences, replay
from tests.conformance.runners import ROOT
from tests.conformance.wire import RawSocket, decode, frame, read_frame

RECORDED = json.load(open(EXCHANGE))
VECTORS = json.load(open(os.path.join(ROOT, "tests", "wire_vectors", "vectors.json")))

#: The vectors' catalog: web-1 with tag v2 (the resolve_result vector), a "cache" service.
VECTOR_CATALOG = """
[[services.web.endpoints]]
address = "10.0.0.7"
port = 8080
id = "web-1"
tags = ["v2"]
[[services.cache.endpoints]]
address = "10.0.0.8"
port = 8080
id = "cache-1"
tags = ["v2"]
"""


@pytest.fixture
def recorded_agent(tmp_path):
    a = AgentProcess(str(tmp_path), RECORDED["catalog"], RECORDED["config"]).start()
    yield a
    a.stop()


@pytest.fixture
def vector_agent(tmp_path):
    a = AgentProcess(str(tmp_path), VECTOR_CATALOG).start()
    yield a
    a.stop()


def test_the_recorded_v1_exchange_still_holds(recorded_agent):
    steps = RECORDED["exchange"]
    assert len(steps) >= 15
    live = replay(recorded_agent.socket, [s["request"] for s in steps])
    broken = []
    for step, answer in zip(steps, live):
        got = decode(bytes.fromhex(answer))
        want = decode(bytes.fromhex(step["answer"]))
        for d in differences(want, got):
            broken.append(f"request {decode(bytes.fromhex(step['request'])) if step['request'] != '00000001c1' else 'c1'}: {d}")
    assert not broken, "today's agent breaks what a v1 client relied on:\n" + "\n".join(broken)


def test_differences_catches_what_a_v1_client_would_trip_on():
    # The comparison itself: a removed key, a renamed code, a changed type, a lost op.
    rec = {"id": 1, "result": {"port": 80, "ops": ["hello"], "lease": 3, "tags": ["a"]}}
    assert differences(rec, {"id": 1, "result": {"port": 80, "ops": ["hello", "new"], "lease": 9, "tags": ["a"], "x": 1}}) == []
    assert differences(rec, {"id": 1, "result": {"ops": ["hello"], "lease": 3, "tags": ["a"]}}) == [".result.port: missing"]
    assert differences(rec, {"id": 1, "result": {"port": "80", "ops": [], "lease": "3", "tags": ["a"]}}) == [
        ".result.port: 80 became '80'", ".result.ops: lost 'hello'", ".result.lease: int became str"]
    assert differences({"error": {"code": "UNKNOWN_OP"}}, {"error": {"code": "BAD_OP"}})


#: What today's agent answers each request vector (on VECTOR_CATALOG): a result, or a code.
VECTOR_ANSWERS = {"report_lease": "UNKNOWN_LEASE"}


def test_every_request_vector_is_understood_by_todays_agent(vector_agent):
    with RawSocket(vector_agent.socket) as raw:
        for v in (v for v in VECTORS if v["kind"] == "request"):
            ans = decode(raw.exchange(bytes.fromhex(v["hex"])))
            while ans["id"] != v["value"]["id"]:  # a watch update may come between
                ans = decode(read_frame(raw.sock))
            want = VECTOR_ANSWERS.get(v["name"])
            if want:
                assert ans["error"]["code"] == want, v["name"]
            else:
                assert "result" in ans, (v["name"], ans)
            if v["name"] == "resolve_key_tags":
                assert ans["result"]["id"] == "cache-1"


@pytest.mark.parametrize("name, code, goes_on", [
    ("body_not_msgpack", "BAD_FRAME", True),
    ("body_not_a_map", "BAD_FRAME", True),
    ("missing_id", "BAD_ARGUMENT", True),
    ("unknown_op", "UNKNOWN_OP", True),
    ("length_over_max", "FRAME_TOO_LARGE", False),
])
def test_every_invalid_vector_is_refused_as_it_says(vector_agent, name, code, goes_on):
    v = next(v for v in VECTORS if v["name"] == name)
    with RawSocket(vector_agent.socket) as raw:
        ans = decode(raw.exchange(bytes.fromhex(v["hex"])))
        assert ans["error"]["code"] == code
        assert ans["id"] == (1 if name == "unknown_op" else None)
        if goes_on:
            assert raw.call(id=2, op="services")["id"] == 2
        else:
            raw.sock.settimeout(5)
            assert raw.sock.recv(1) == b"", "the agent closes the connection"


def test_a_truncated_frame_gets_no_answer_until_the_rest_arrives(vector_agent):
    v = next(v for v in VECTORS if v["name"] == "truncated")
    with RawSocket(vector_agent.socket) as raw:
        raw.sock.sendall(bytes.fromhex(v["hex"]))
        raw.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            raw.sock.recv(1)
        # The other 12 of the announced 16 bytes: {"id": "hello-world"}, which has no op.
        raw.sock.settimeout(5)
        raw.sock.sendall(b"\xab" + b"hello-world")
        ans = decode(read_frame(raw.sock))
        assert (ans["id"], ans["error"]["code"]) == ("hello-world", "BAD_ARGUMENT")


def test_offering_1_and_2_to_todays_v1_agent_gets_version_1(vector_agent):
    with RawSocket(vector_agent.socket) as raw:
        assert raw.call(op="hello", versions=[1, 2], client="future/2")["result"]["version"] == 1
        assert raw.call(op="hello", versions=[2, 3])["error"]["code"] == "UNSUPPORTED_VERSION"
        # A newer client's optional arguments are ignored, not refused.
        ans = decode(raw.exchange(frame({"id": 5, "op": "resolve", "service": "web", "lease": False,
                                         "deadline_ms": 50, "trace": {"span": 1}})))
        assert ans["result"]["id"] == "web-1"
