"""Benchmark: the HTTP/2 work of one proxied unary gRPC call, the core's H2Connection
against the h2 library, in one process (no sockets, no trio: the protocol layer alone).

    .venv/bin/python bench/h2conn.py [--calls 20000] [--rounds 5]

Each call is what the http2 proxy's two connections do for a grpcio unary call (the byte
sequences seen on the wire with strace): the client-facing side reads the request (HEADERS
of dynamic-table references, a stream WINDOW_UPDATE, DATA with END_STREAM, a connection
WINDOW_UPDATE), the upstream side sends it on; the upstream side reads the answer (HEADERS,
DATA, trailers, WINDOW_UPDATE) and the client-facing side sends it on. h2 is configured as
the proxy had it (no header validation or normalization, the static-table encoder, no
frame repr for trace logs). Rounds
alternate A/B/A/B; prints the best and median µs per call of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
from hpack import Encoder  # noqa: E402

from softlb import H2Connection  # noqa: E402
from softlb._h2frames import (DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, frame, settings_frame,  # noqa: E402
                              window_update_frame)
from softlb._hpack_static import StaticEncoder  # noqa: E402

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"),
           (b":authority", b"127.0.0.1:1234"), (b"te", b"trailers"), (b"content-type", b"application/grpc"),
           (b"user-agent", b"grpc-python/1.60 grpc-c/37.0.0 (linux; chttp2)"),
           (b"grpc-accept-encoding", b"identity, deflate, gzip")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-accept-encoding", b"identity, deflate, gzip")]
TRAILERS = [(b"grpc-status", b"0")]


class Wire:
    """The peers' bytes for call n: a gRPC peer's blocks are the same after the first."""

    def __init__(self) -> None:
        c, u = Encoder(), Encoder()
        self.req = [c.encode(REQUEST), c.encode(REQUEST)]
        self.resp = [u.encode(RESPONSE), u.encode(RESPONSE)]
        self.trl = [u.encode(TRAILERS), u.encode(TRAILERS)]

    def request(self, n: int, sid: int) -> bytes:
        return (frame(HEADERS, END_HEADERS, sid, self.req[min(n, 1)]) + window_update_frame(sid, 5)
                + frame(DATA, END_STREAM, sid, b"\0\0\0\0\1x") + window_update_frame(0, 6))

    def prebuilt(self, calls: int) -> tuple[list[bytes], list[bytes], bytes]:
        """Every call's request and answer, built before the clock starts (stream ids 1, 3, ...
        on both connections), and the client's WINDOW_UPDATE for the answer's DATA."""
        return ([self.request(n, 1 + 2 * n) for n in range(calls)], [self.answer(n, 1 + 2 * n) for n in range(calls)],
                window_update_frame(0, 9))

    def answer(self, n: int, sid: int) -> bytes:
        return (frame(HEADERS, END_HEADERS, sid, self.resp[min(n, 1)]) + frame(DATA, 0, sid, b"\0\0\0\0\4ok:x")
                + frame(HEADERS, END_HEADERS | END_STREAM, sid, self.trl[min(n, 1)]) + window_update_frame(0, 6))


def settled(client_facing: Any, upstream: Any, calls: int) -> tuple[list[bytes], list[bytes], bytes]:
    """Both connections past their peers' SETTINGS; the calls' bytes, built."""
    client_facing.receive_data(PREFACE + settings_frame({}))
    upstream.receive_data(settings_frame({}))
    client_facing.data_to_send(), upstream.data_to_send()
    return Wire().prebuilt(calls)


def ours(calls: int) -> float:
    client_facing = H2Connection(False, initial_window=1 << 20, connection_window=16 << 20)
    upstream = H2Connection(True, initial_window=1 << 20, connection_window=16 << 20)
    client_facing.initiate()
    upstream.initiate()
    requests, answers, wu = settled(client_facing, upstream, calls)
    t0 = time.perf_counter()
    for n in range(calls):
        sid = 1 + 2 * n
        req, _wu, data, _cwu = client_facing.receive_data(requests[n])
        usid = upstream.next_stream_id
        upstream.send_headers(usid, req.headers + [(b"x-forwarded-for", b"127.0.0.1")])
        upstream.send_data(usid, data.data, end_stream=True)
        client_facing.ack_data(sid, data.flow_controlled_length)
        upstream.data_to_send(), client_facing.data_to_send()
        head, body, trailers, _ = upstream.receive_data(answers[n])
        client_facing.receive_data(wu)  # the client's, for what it got
        client_facing.send_headers(sid, head.headers)
        client_facing.send_data(sid, body.data)
        upstream.ack_data(usid, body.flow_controlled_length)
        client_facing.send_headers(sid, trailers.headers, end_stream=True)
        client_facing.data_to_send(), upstream.data_to_send()
    return (time.perf_counter() - t0) / calls


def theirs(calls: int) -> float:
    # As the proxy on h2 did: h2 formats every frame it receives for a trace log line.
    h2.connection.repr = lambda obj: type(obj).__name__  # type: ignore[attr-defined]
    opts = dict(header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False,
                validate_inbound_headers=False, normalize_inbound_headers=False)
    client_facing = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, **opts))
    upstream = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **opts))
    for c in (client_facing, upstream):
        c.encoder = StaticEncoder()  # type: ignore[assignment]  (what the proxy on h2 did)
        c.initiate_connection()
        c.increment_flow_control_window((16 << 20) - 65535)
    requests, answers, wu = settled(client_facing, upstream, calls)
    t0 = time.perf_counter()
    for n in range(calls):
        sid = 1 + 2 * n
        events = client_facing.receive_data(requests[n])
        req = next(e for e in events if isinstance(e, h2.events.RequestReceived))
        data = next(e for e in events if isinstance(e, h2.events.DataReceived))
        usid = upstream.get_next_available_stream_id()
        upstream.send_headers(usid, req.headers + [(b"x-forwarded-for", b"127.0.0.1")])
        upstream.send_data(usid, data.data, end_stream=True)
        client_facing.acknowledge_received_data(data.flow_controlled_length, sid)
        upstream.data_to_send(), client_facing.data_to_send()
        events = upstream.receive_data(answers[n])
        head = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
        body = next(e for e in events if isinstance(e, h2.events.DataReceived))
        trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived))
        client_facing.receive_data(wu)
        client_facing.send_headers(sid, head.headers)
        client_facing.send_data(sid, body.data)
        upstream.acknowledge_received_data(body.flow_controlled_length, usid)
        client_facing.send_headers(sid, trailers.headers, end_stream=True)
        client_facing.data_to_send(), upstream.data_to_send()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"H2Connection": [], "h2": []}
    for _ in range(args.rounds):
        runs["H2Connection"].append(ours(args.calls))
        runs["h2"].append(theirs(args.calls))
    print(f"{args.rounds} rounds of {args.calls} calls, load {os.getloadavg()[0]:.1f}")
    for name, v in runs.items():
        print(f"  {name:13} best {min(v) * 1e6:6.1f} µs/call, median {statistics.median(v) * 1e6:6.1f}")
    print(f"  ratio (medians): {statistics.median(runs['H2Connection']) / statistics.median(runs['h2']):.2f}")


if __name__ == "__main__":
    main()
