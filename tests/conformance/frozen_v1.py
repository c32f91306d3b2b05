"""A frozen protocol-v1 client: the requests of tests/conformance/v1_exchange.json, recorded
once from the agent of the time, replayed byte for byte against today's agent.

    python -m tests.conformance.frozen_v1 --record   # only for a NEW recording, never to "fix" a failure

What an answer must keep (docs/PROTOCOL.md, Compatibility): the same id, a result where
there was a result, the same error code where there was an error; every recorded key,
recursively, with an equal value — except values that differ by nature (leases, versions,
ages, the agent's name, messages), which keep their type. Newer agents may add keys and ops.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from typing import Any

from tests.conformance.wire import decode, frame, read_frame

HERE = os.path.dirname(os.path.abspath(__file__))
EXCHANGE = os.path.join(HERE, "v1_exchange.json")

#: Differ between runs by nature: compared by type only.
VOLATILE = {"lease", "version", "age", "agent", "message", "consecutive_failures"}
#: Lists that newer agents may extend.
GROWING = {"ops"}

CATALOG = """
[[services.web.endpoints]]
address = "127.0.0.1"
port = 18001
id = "web-1"
tags = ["v1"]
[[services.web.endpoints]]
address = "127.0.0.1"
port = 18002
id = "web-2"
tags = ["v2"]
[[services.cache.endpoints]]
address = "127.0.0.1"
port = 18101
id = "cache-1"
[[services.cache.endpoints]]
address = "127.0.0.1"
port = 18102
id = "cache-2"
[[services.cache.endpoints]]
address = "127.0.0.1"
port = 18103
id = "cache-3"
"""
CONFIG = '[services.cache]\npolicy = "ring_hash"\n'

#: What the frozen client sends, in order, on one connection (raw hex where the point is a
#: bad frame). Deterministic answers only: a one-endpoint tag, a hash key.
REQUESTS: list[dict[str, Any] | str] = [
    {"id": 1, "op": "hello", "versions": [1], "client": "frozen-v1/1"},
    {"id": 2, "op": "services"},
    {"id": 3, "op": "endpoints", "service": "web"},
    {"id": 4, "op": "resolve", "service": "web", "tags": ["v1"], "lease": False},
    {"id": 5, "op": "resolve", "service": "web", "tags": ["v2"]},
    {"id": 6, "op": "resolve", "service": "cache", "key": "user:42", "lease": False},
    {"id": 7, "op": "resolve", "service": "cache", "key": b"\x00\x01bin-key", "lease": False},
    {"id": 8, "op": "report", "service": "web", "endpoint": "web-1", "ok": True, "latency": 0.01},
    {"id": 9, "op": "report", "lease": 999999, "ok": False},
    {"id": 10, "op": "resolve", "service": "nope"},
    {"id": 11, "op": "resolve", "service": "web", "tags": ["absent"]},
    {"id": 12, "op": "frobnicate"},
    {"id": 13, "op": "hello", "versions": [2]},
    "00000001c1",  # not msgpack: BAD_FRAME, id nil, the connection goes on
    {"op": "services"},  # no id: BAD_ARGUMENT, id nil
    {"id": "s-1", "op": "resolve", "service": "web", "tags": ["v1"], "lease": False, "future_arg": 1},
    {"id": 14, "op": "watch", "service": "web"},
    {"id": 15, "op": "unwatch", "watch": 14},
]


def request_bytes(req: dict[str, Any] | str) -> bytes:
    return bytes.fromhex(req) if isinstance(req, str) else frame(req)


def replay(sock_path: str, requests_hex: list[str], timeout: float = 5.0) -> list[str]:
    """Send each recorded request and read one answer frame; the raw answers, as hex."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        out = []
        for h in requests_hex:
            s.sendall(bytes.fromhex(h))
            out.append(read_frame(s).hex())
        return out
    finally:
        s.close()


def differences(recorded: Any, live: Any, path: str = "") -> list[str]:
    """Where `live` breaks what a v1 client relied on in `recorded` (empty: compatible)."""
    key = path.rsplit(".", 1)[-1]
    if key in VOLATILE:
        same_type = type(recorded) is type(live) or (isinstance(recorded, (int, float)) and isinstance(live, (int, float))) \
            or recorded is None or live is None
        return [] if same_type else [f"{path}: {type(recorded).__name__} became {type(live).__name__}"]
    if isinstance(recorded, dict):
        if not isinstance(live, dict):
            return [f"{path}: a map became {live!r}"]
        out = []
        for k, v in recorded.items():
            if k not in live:
                out.append(f"{path}.{k}: missing")
            else:
                out += differences(v, live[k], f"{path}.{k}")
        return out
    if isinstance(recorded, list):
        if not isinstance(live, list):
            return [f"{path}: a list became {live!r}"]
        if key in GROWING:
            return [f"{path}: lost {x!r}" for x in recorded if x not in live]
        if len(recorded) != len(live):
            return [f"{path}: {len(recorded)} items became {len(live)}"]
        return [d for i, (a, b) in enumerate(zip(recorded, live)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if recorded == live else [f"{path}: {recorded!r} became {live!r}"]


def record(agent_cmd_tmp: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE)))
    from agentproc import AgentProcess

    agent = AgentProcess(agent_cmd_tmp, CATALOG, CONFIG).start()
    try:
        reqs = [request_bytes(r).hex() for r in REQUESTS]
        answers = replay(agent.socket, reqs)
    finally:
        agent.stop()
    data = {"about": "Recorded once from the agent of the time; replayed by tests/conformance/test_compat.py. "
                     "Do not re-record to make a failing test pass: that failure is a broken promise.",
            "catalog": CATALOG, "config": CONFIG,
            "exchange": [{"request": q, "answer": a, "decoded": _jsonable(decode(bytes.fromhex(a)))}
                         for q, a in zip(reqs, answers)]}
    with open(EXCHANGE, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="record a new exchange from this tree's agent")
    a = p.parse_args()
    if not a.record:
        p.error("nothing to do: the replay is tests/conformance/test_compat.py")
    with tempfile.TemporaryDirectory() as d:
        record(d)
    print(f"wrote {EXCHANGE}", file=sys.stderr)
