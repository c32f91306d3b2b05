"""Generate tests/wire_vectors/vectors.json, the protocol's language-neutral test vectors.

    python tests/wire_vectors/generate.py          # rewrite the file
    python tests/wire_vectors/generate.py --check  # exit 1 if the file is out of date

Response frames are produced by the agent's own encoder (softlb._protocol), so the vectors
are what the agent really sends; request frames by plain msgpack with keys in listed order.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import msgpack

from softlb import Endpoint, ErrorCode
from softlb._protocol import error_frame, ok_frame, pack_endpoint_fields, resolve_frame

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "vectors.json")


def frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def decoded(frame_bytes: bytes) -> Any:
    return msgpack.unpackb(frame_bytes[4:], raw=False)


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def req(name: str, value: dict[str, Any]) -> None:
        out.append({"name": name, "kind": "request", "hex": frame(value).hex(), "value": value})

    def resp(name: str, data: bytes) -> None:
        out.append({"name": name, "kind": "response", "hex": data.hex(), "value": decoded(data)})

    def invalid(name: str, data: bytes, expect: str) -> None:
        out.append({"name": name, "kind": "invalid", "hex": data.hex(), "expect": expect})

    req("hello", {"id": 1, "op": "hello", "versions": [1], "client": "vectors/1"})
    req("resolve", {"id": 2, "op": "resolve", "service": "web"})
    req("resolve_key_tags", {"id": 3, "op": "resolve", "service": "cache", "key": "user:42", "tags": ["v2"]})
    req("resolve_no_lease", {"id": 4, "op": "resolve", "service": "web", "lease": False})
    req("report_lease", {"id": 5, "op": "report", "lease": 17, "ok": False, "latency": 0.25})
    req("report_endpoint", {"id": 6, "op": "report", "service": "web", "endpoint": "web-1", "ok": True})
    req("services", {"id": "s-1", "op": "services"})
    req("endpoints", {"id": 7, "op": "endpoints", "service": "web"})
    req("watch", {"id": 8, "op": "watch", "service": "web"})
    req("unwatch", {"id": 9, "op": "unwatch", "watch": 8})
    req("large_id", {"id": 4294967296, "op": "services"})

    ep = Endpoint(id="web-1", address="10.0.0.7", port=8080, tags=("v2",), meta={"version": "2"}, zone="eu-1a")
    packed = pack_endpoint_fields(ep)
    resp("resolve_result", resolve_frame(2, packed, 17, False, False, None))
    resp("resolve_stale_panic", resolve_frame(3, packed, None, True, True, 12.5))
    resp("hello_result", ok_frame(1, {"version": 1, "agent": "softlb/0.1.0", "ops": ["hello", "resolve"], "max_frame": 1048576}))
    resp("report_result", ok_frame(5, {}))
    resp("error_unknown_service", error_frame(2, ErrorCode.UNKNOWN_SERVICE, "unknown service \"nope\""))
    resp("error_bad_frame", error_frame(None, ErrorCode.BAD_FRAME, "frame body is not valid msgpack"))

    invalid("length_over_max", (0xFFFFFFFF).to_bytes(4, "big"), "FRAME_TOO_LARGE, connection closed")
    invalid("body_not_msgpack", b"\x00\x00\x00\x01\xc1", "BAD_FRAME, connection continues")
    invalid("body_not_a_map", frame([1, 2, 3]), "BAD_FRAME, connection continues")
    invalid("missing_id", frame({"op": "services"}), "BAD_ARGUMENT with id nil")
    invalid("unknown_op", frame({"id": 1, "op": "frobnicate"}), "UNKNOWN_OP with id 1")
    invalid("truncated", bytes.fromhex("0000001081a26964"), "no answer until the rest arrives")

    # Service addresses (issue 15): optional fields, appended so every vector above stays
    # byte for byte what older clients were tested against.
    vip = {"address": "127.77.0.5", "port": 8080}
    resp("services_result_vip", ok_frame("s-1", [
        {"name": "web", "policy": "round_robin", "endpoints": 2, "eligible": 2, "panic": False, "stale": False, "vip": vip},
        {"name": "db", "policy": "random", "endpoints": 1, "eligible": 1, "panic": False, "stale": False,
         "vip": {"address": "127.77.31.4", "port": 0}},
        {"name": "cache", "policy": "maglev", "endpoints": 1, "eligible": 0, "panic": True, "stale": False},
    ]))
    resp("endpoints_result_vip", ok_frame(7, {
        "service": "web", "policy": "round_robin", "version": 3, "panic": False, "panic_threshold": 50,
        "stale": False, "age": None,
        "endpoints": [dict(ep.as_dict(), eligible=True, served=True)], "vip": vip,
    }))
    resp("hello_result_vip_pool", ok_frame(1, {"version": 1, "agent": "softlb/0.1.0", "ops": ["hello", "resolve"],
                                               "max_frame": 1048576, "vip_pool": "127.77.0.0/16"}))
    return out


def render() -> str:
    return json.dumps(cases(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        with open(OUT, encoding="utf-8") as f:
            sys.exit(0 if f.read() == text else 1)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT}")
