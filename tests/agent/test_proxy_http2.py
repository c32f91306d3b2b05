"""The http2 proxy (h2c, a pick per stream): grpcio clients and servers, and a raw h2
client for what grpcio hides."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from agentproc import endpoint_toml, free_port
from proxyhelp import GrpcBackend, refusing_port, wait_port
from test_proxy_tcp import proxy_config


@pytest.fixture
def grpcs():
    made: list[GrpcBackend] = []

    def make(n: int) -> list[GrpcBackend]:
        new = [GrpcBackend(f"g{len(made) + i + 1}") for i in range(n)]
        made.extend(new)
        return new

    yield make
    for b in made:
        b.close()


#: Each channel its own subchannels: grpcio shares them process-wide by address, and a port
#: an earlier test used (and stopped) would hand this test its stale failure and backoff.
LOCAL = ("grpc.use_local_subchannel_pool", 1)


def channel(port: int, *options: tuple[str, object]) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[LOCAL, *options])


def catalog(bs: list[GrpcBackend], service: str = "g") -> str:
    return "".join(endpoint_toml(service, "127.0.0.1", b.port, id=b.name) for b in bs)


def endpoints(agent, service: str = "g") -> dict[str, dict]:
    return {e["id"]: e for e in json.loads(agent.cli("endpoints", service, "--json").stdout)["endpoints"]}


def test_grpc_one_channel_300_calls_reach_every_backend(make_agent, grpcs):
    bs = grpcs(3)
    port = free_port()
    agent = make_agent(catalog(bs), proxy_config("g", port, "http2")).start()
    with channel(port) as ch:
        call = ch.unary_unary("/demo.Echo/Call")
        answers = [call(b"%d" % i, timeout=10) for i in range(300)]
    assert all(a.endswith(b":%d" % i) for i, a in enumerate(answers))
    by = {b.name: b.calls for b in bs}
    assert all(n >= 80 for n in by.values()), by  # round robin: ~100 each
    eps = endpoints(agent)
    assert sum(e["proxy"]["requests"] for e in eps.values()) == 300
    assert all(e["proxy"]["connections"] == 1 for e in eps.values())  # one pooled h2 connection each


def test_grpc_unavailable_is_a_failure_and_passes_through(make_agent, grpcs):
    (b,) = grpcs(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("g", port, "http2")
                       + "[services.g.outlier]\nconsecutive_failures = 1000\n").start()
    with channel(port) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/demo.Echo/Fail")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ch.unary_unary("/demo.Echo/Call")(b"ok", timeout=10) == b"g1:ok"
    fig = endpoints(agent)["g1"]["proxy"]
    assert fig["failures"] == 1 and fig["requests"] == 2


def test_grpc_connect_failure_retried(make_agent, grpcs):
    (b,) = grpcs(1)
    port = free_port()
    cat = catalog([b]) + endpoint_toml("g", "127.0.0.1", refusing_port(), id="dead")
    agent = make_agent(cat, proxy_config("g", port, "http2")
                       + "[services.g.outlier]\nconsecutive_failures = 1000\n").start()
    with channel(port) as ch:
        call = ch.unary_unary("/demo.Echo/Call")
        assert [call(b"x", timeout=10) for _ in range(10)] == [b"g1:x"] * 10
    assert endpoints(agent)["dead"]["proxy"]["failures"] >= 4


def test_grpc_no_endpoint_is_unavailable(make_agent):
    port = free_port()
    make_agent(config=proxy_config("nothing", port, "http2")).start()
    with channel(port) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/demo.Echo/Call")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


class RawH2:
    """A minimal h2c client: one request, the events of its answer."""

    def __init__(self, port: int, **config: object) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None,
                                                                         **config))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def call(self, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[dict, bytes, dict, float]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers)
        t0 = time.monotonic()
        head: dict = {}
        trailers: dict = {}
        data = b""
        pending: list = []
        while body:  # within the proxy's windows: wait for WINDOW_UPDATEs as a client must
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room == 0:
                self.sock.sendall(self.conn.data_to_send())
                pending += self.conn.receive_data(self.sock.recv(65536))
                continue
            self.conn.send_data(sid, body[:room], end_stream=len(body) <= room)
            body = body[room:]
        self.sock.sendall(self.conn.data_to_send())
        while True:
            if pending:
                events, pending = pending, []
            else:
                chunk = self.sock.recv(65536)
                assert chunk, "connection closed"
                events = self.conn.receive_data(chunk)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    head = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    trailers = dict(ev.headers)
                if getattr(ev, "stream_ended", None) is not None and ev.stream_id == sid \
                        or isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.sock.sendall(self.conn.data_to_send())
                    return head, data, trailers, time.monotonic() - t0
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


def grpc_frame(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def test_grpc_timeout_header_honoured(make_agent, grpcs):
    """The proxy itself ends a stream at its grpc-timeout (DEADLINE_EXCEEDED), even from
    a client that does not enforce its own deadline."""
    (b,) = grpcs(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    c = RawH2(port)
    try:
        head, _, trailers, took = c.call([
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Slow"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"grpc-timeout", b"300m")], grpc_frame(b"3"))
        status = head.get(b"grpc-status") or trailers.get(b"grpc-status")
        assert status == b"4" and took < 2.0
        # The connection stays usable for the next stream.
        head, data, trailers, _ = c.call([
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")], grpc_frame(b"hi"))
        assert trailers.get(b"grpc-status") == b"0" and data == grpc_frame(b"g1:hi")
    finally:
        c.close()


def test_http2_plain_request_and_large_bodies_flow_control(make_agent, grpcs):
    """A non-gRPC h2 request larger than every window crosses both connections."""
    (b,) = grpcs(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    c = RawH2(port)
    try:
        payload = b"p" * (3 << 20)  # 3 MiB: over the 1 MiB stream windows either way
        head, data, trailers, _ = c.call([
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")],
            grpc_frame(payload))
        assert trailers.get(b"grpc-status") == b"0", (head, trailers)
        assert data == grpc_frame(b"g1:" + payload)
    finally:
        c.close()
    fig = endpoints(agent)["g1"]["proxy"]  # body bytes, counted as they cross
    assert (fig["bytes_in"], fig["bytes_out"]) == (len(grpc_frame(payload)), len(grpc_frame(b"g1:" + payload)))


def test_grpc_kill_backend_mid_load(make_agent):
    """Kill a backend process under a loop of calls on one channel: calls keep succeeding
    on the others, and the dead one gets no further work. Only calls in flight on it as it
    dies may fail (UNAVAILABLE): they may have been processed, so they are not resent."""
    import subprocess
    import sys
    import threading

    from proxyhelp import ROOT, wait_port

    ports = [free_port() for _ in range(3)]
    code = ("import sys, time; sys.path.insert(0, %r); from proxyhelp import GrpcBackend; "
            "b = GrpcBackend(sys.argv[1]); print(b.port, flush=True); time.sleep(600)") % (ROOT + "/tests",)
    procs = [subprocess.Popen([sys.executable, "-c", code, f"g{i + 1}"], stdout=subprocess.PIPE) for i in range(3)]
    try:
        ports = [int(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        for p in ports:
            wait_port(p)
        port = free_port()
        cat = "".join(endpoint_toml("g", "127.0.0.1", p, id=f"g{i + 1}") for i, p in enumerate(ports))
        agent = make_agent(cat, proxy_config("g", port, "http2") + """
[services.g.probe]
interval = "200ms"
timeout = "200ms"
fall = 2
rise = 1
""").start()
        errors: list[tuple[float, str]] = []
        seen: list[tuple[float, bytes]] = []
        stop = threading.Event()

        def load() -> None:
            with channel(port) as ch:
                call = ch.unary_unary("/demo.Echo/Call")
                while not stop.is_set():
                    try:
                        seen.append((time.monotonic(), call(b"x", timeout=10).split(b":")[0]))
                    except grpc.RpcError as e:
                        errors.append((time.monotonic(), str(e.code())))

        t = threading.Thread(target=load)
        t.start()
        deadline = time.monotonic() + 20
        while len(seen) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = time.monotonic()
        procs[1].kill()
        procs[1].wait(5)
        time.sleep(2.0)
        stop.set()
        t.join(15)
        assert all(abs(at - killed) < 0.5 and code == "StatusCode.UNAVAILABLE" for at, code in errors), errors
        assert len(errors) <= 2, errors
        later = {n for at, n in seen if at > killed + 1.0}
        assert later == {b"g1", b"g3"}, later
        assert not endpoints(agent)["g2"]["eligible"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_http2_garbage_gets_goaway_and_the_listener_serves_on(make_agent, grpcs):
    (b,) = grpcs(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not the HTTP/2 preface
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    # Only the proxy's own opening frames (SETTINGS, WINDOW_UPDATE), perhaps a GOAWAY, then
    # the close: nothing of the garbage went anywhere.
    types = []
    while data:
        n = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + n:]
    assert set(types) <= {4, 8, 7}, types
    with channel(port) as ch:
        assert ch.unary_unary("/demo.Echo/Call")(b"still", timeout=10) == b"g1:still"


def test_http2_routes_by_authority(make_agent, grpcs):
    a, b = grpcs(2)
    port = free_port()
    cfg = proxy_config("g", port, "http2") + """
[[services.g.proxy.routes]]
host = "other.local"
service = "other"
"""
    make_agent(catalog([a]) + catalog([b], "other"), cfg).start()
    with channel(port) as ch:
        assert ch.unary_unary("/demo.Echo/Call")(b"x", timeout=10) == b"g1:x"
    with channel(port, ("grpc.default_authority", "other.local")) as ch:
        assert ch.unary_unary("/demo.Echo/Call")(b"x", timeout=10) == b"g2:x"


GRPC_CALL = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"), (b":authority", b"x"),
             (b"content-type", b"application/grpc"), (b"te", b"trailers")]


def test_http2_malformed_request_is_reset_and_the_connection_serves_on(make_agent, grpcs):
    """A request h2 would call malformed is the client's error: that stream is reset
    (PROTOCOL_ERROR), nothing reaches an endpoint, and the connection carries on."""
    (b,) = grpcs(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    c = RawH2(port, validate_outbound_headers=False, normalize_outbound_headers=False)
    try:
        for bad in ([*GRPC_CALL, (b"X-Upper", b"v")], [*GRPC_CALL, (b"connection", b"close")],
                    [h for h in GRPC_CALL if h[0] != b":path"]):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, bad)
            c.conn.send_data(sid, grpc_frame(b"bad"), end_stream=True)
            c.sock.sendall(c.conn.data_to_send())
            reset = None
            while reset is None:
                for ev in c.conn.receive_data(c.sock.recv(65536)):
                    if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        reset = ev.error_code
                c.sock.sendall(c.conn.data_to_send())
            assert reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
        _, data, trailers, _ = c.call(GRPC_CALL, grpc_frame(b"fine"))
        assert trailers.get(b"grpc-status") == b"0" and data == grpc_frame(b"g1:fine")
    finally:
        c.close()
    assert b.calls == 1
    assert endpoints(agent)["g1"]["proxy"]["failures"] == 0


class RefusingH2:
    """A raw h2c server that never processes a stream: it answers each request with
    RST_STREAM(REFUSED_STREAM) (`how="rst"`) or with GOAWAY(last stream id 0); or
    (`how="finish"`) it says GOAWAY up to that stream and then answers it."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        try:
            c.sendall(conn.data_to_send())
            while data := c.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.requests += 1
                        if self.how == "rst":
                            conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif self.how == "goaway":
                            conn.close_connection(last_stream_id=0)
                        else:  # GOAWAY saying this stream is processed, then (a frame later) its answer
                            frame = bytes([0, 0, 8, 7, 0, 0, 0, 0, 0]) + ev.stream_id.to_bytes(4, "big") + bytes(4)
                            c.sendall(conn.data_to_send() + frame)
                            time.sleep(0.05)
                            conn.send_headers(ev.stream_id, [(b":status", b"200"),
                                                             (b"content-type", b"application/grpc")])
                            conn.send_data(ev.stream_id, grpc_frame(b"r:finished"))
                            conn.send_headers(ev.stream_id, [(b"grpc-status", b"0")], end_stream=True)
                c.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["rst", "goaway"])
def test_http2_streams_an_upstream_refused_are_sent_elsewhere(make_agent, grpcs, how):
    (b,) = grpcs(1)
    refuser = RefusingH2(how)
    try:
        port = free_port()
        cat = catalog([b]) + endpoint_toml("g", "127.0.0.1", refuser.port, id="r")
        agent = make_agent(cat, proxy_config("g", port, "http2")
                           + "[services.g.outlier]\nconsecutive_failures = 1000\n").start()
        with channel(port) as ch:
            call = ch.unary_unary("/demo.Echo/Call")
            assert [call(b"%d" % i, timeout=10) for i in range(10)] == [b"g1:%d" % i for i in range(10)]
        assert refuser.requests >= 3  # round robin sent it its share; each went on to g1
        r = endpoints(agent)["r"]["proxy"]
        assert r["failures"] == 0 and r["retries"] == refuser.requests
    finally:
        refuser.close()


def test_http2_a_client_not_reading_stalls_only_itself(make_agent, grpcs):
    """A client that asks for big answers and stops reading them: what the kernel does not
    take waits in the proxy (bounded by the windows it grants the endpoint, which are not
    reopened meanwhile), while other clients' calls over the same upstream connection go on."""
    (b,) = grpcs(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
    conn.increment_flow_control_window((1 << 31) - 1 - 65535)
    payload = b"p" * (3 << 20)
    sids = []
    pending: list = []
    for _ in range(3):
        sid = conn.get_next_available_stream_id()
        sids.append(sid)
        conn.send_headers(sid, GRPC_CALL)
        body = grpc_frame(payload)
        while body:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room == 0:
                s.sendall(conn.data_to_send())
                pending += conn.receive_data(s.recv(65536))
                continue
            conn.send_data(sid, body[:room], end_stream=len(body) <= room)
            body = body[room:]
    s.sendall(conn.data_to_send())
    time.sleep(1.0)  # the answers (9 MiB) pile up: this client reads nothing
    t0 = time.monotonic()
    with channel(port) as ch:
        call = ch.unary_unary("/demo.Echo/Call")
        assert [call(b"%d" % i, timeout=5) for i in range(20)] == [b"g1:%d" % i for i in range(20)]
    assert time.monotonic() - t0 < 5
    got = {sid: b"" for sid in sids}
    ended: set[int] = set()
    events = pending
    while True:
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                got[ev.stream_id] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                assert dict(ev.headers)[b"grpc-status"] == b"0"
                ended.add(ev.stream_id)
        if len(ended) == 3:
            break
        s.sendall(conn.data_to_send())
        events = conn.receive_data(s.recv(1 << 20))
    s.close()
    assert all(v == grpc_frame(b"g1:" + payload) for v in got.values())


def test_http2_listener_removed_by_reload_lets_open_streams_finish(make_agent, grpcs):
    """Draining a listener: its port closes at once, a stream in flight finishes (beyond
    the HTTP/1.1 keep-alive grace of 0.5 s), within drain_timeout."""
    (b,) = grpcs(1)
    port, other = free_port(), free_port()
    agent = make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    result: list = []
    with channel(port) as ch:
        slow = ch.unary_unary("/demo.Echo/Slow")
        t = threading.Thread(target=lambda: result.append(slow(b"2", timeout=10)))
        t.start()
        time.sleep(0.5)
        agent.write_config(proxy_config("g", other, "http2"))
        agent.send(signal.SIGHUP)
        wait_port(other)
        t.join(10)
    assert result == [b"late"]


def test_http2_streams_below_an_upstream_goaway_finish(make_agent):
    """An upstream GOAWAY lets the streams it processed finish (h2 alone would refuse every
    frame after it), and the next stream goes on a new connection."""
    finisher = RefusingH2("finish")
    try:
        port = free_port()
        agent = make_agent(endpoint_toml("g", "127.0.0.1", finisher.port, id="r"), proxy_config("g", port, "http2")).start()
        with channel(port) as ch:
            call = ch.unary_unary("/demo.Echo/Call")
            assert [call(b"x", timeout=10) for _ in range(3)] == [b"r:finished"] * 3
        r = endpoints(agent)["r"]["proxy"]
        assert r["failures"] == 0 and r["requests"] == 3 and r["connections"] == 3
    finally:
        finisher.close()


def test_grpc_timeout_ends_the_streams_lease(make_agent, grpcs):
    """A stream cut at its grpc-timeout no longer counts as open on its endpoint: with
    least_connections, a leaked lease would send every later call to the other one."""
    a, b = grpcs(2)
    port = free_port()
    make_agent(catalog([a, b]), proxy_config("g", port, "http2") + """
[services.g]
policy = "least_connections"
[services.g.outlier]
consecutive_failures = 1000
""").start()
    c = RawH2(port)
    try:
        head, _, trailers, _ = c.call([*GRPC_CALL[:2], (b":path", b"/demo.Echo/Slow"), *GRPC_CALL[3:],
                                       (b"grpc-timeout", b"200m")], grpc_frame(b"3"))
        assert (head.get(b"grpc-status") or trailers.get(b"grpc-status")) == b"4"
    finally:
        c.close()
    with channel(port) as ch:
        call = ch.unary_unary("/demo.Echo/Call")
        answers = {call(b"x", timeout=10) for _ in range(20)}
    assert answers == {b"g1:x", b"g2:x"}


def test_http2_streams_reset_with_answers_waiting_do_not_shrink_the_upstream_window(make_agent, grpcs):
    """A client that resets streams while their answers wait in the proxy (its window is
    closed): what waited is acknowledged to the endpoint, so the pooled upstream
    connection's 16 MiB window does not shrink by it. 24 such streams of 1 MiB answers
    would exhaust it otherwise, and the next call would hang."""
    (b,) = grpcs(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    payload = b"p" * (1 << 20)
    c = RawH2(port)
    try:
        for _ in range(24):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, GRPC_CALL)
            body = grpc_frame(payload)
            answer = 0
            while body or answer < 65535:  # the client's whole stream window
                room = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
                if body and room:
                    c.conn.send_data(sid, body[:room], end_stream=len(body) <= room)
                    body = body[room:]
                    continue
                c.sock.sendall(c.conn.data_to_send())
                for ev in c.conn.receive_data(c.sock.recv(65536)):
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                        answer += len(ev.data)  # the stream window stays shut; the connection's reopens
                        c.conn.increment_flow_control_window(ev.flow_controlled_length)
            time.sleep(0.2)  # the endpoint fills its stream window (1 MiB) meanwhile
            c.conn.reset_stream(sid)
            c.sock.sendall(c.conn.data_to_send())
    finally:
        c.close()
    with channel(port) as ch:
        assert ch.unary_unary("/demo.Echo/Call")(b"after", timeout=5) == b"g1:after"


def test_grpc_many_concurrent_calls_on_one_channel(make_agent, grpcs):
    """300 calls in flight at once on one channel (one client connection, many streams at
    a time on each pooled upstream): every answer right, every backend used, and nothing
    left open in the figures afterwards."""
    bs = grpcs(3)
    port = free_port()
    agent = make_agent(catalog(bs), proxy_config("g", port, "http2")).start()
    with channel(port) as ch:
        call = ch.unary_unary("/demo.Echo/Call")
        futures = [call.future(b"%d" % i + b"." * (i * 97 % 40000), timeout=20) for i in range(300)]
        answers = [f.result() for f in futures]
    assert all(a.split(b":", 1)[1] == b"%d" % i + b"." * (i * 97 % 40000) for i, a in enumerate(answers))
    assert all(b.calls >= 50 for b in bs), [b.calls for b in bs]
    eps = endpoints(agent)
    assert sum(e["proxy"]["requests"] for e in eps.values()) == 300
    assert all(e["proxy"]["active"] == 0 and e["proxy"]["failures"] == 0 for e in eps.values())


def _goaway_code(s: socket.socket) -> int | None:
    """Read until the proxy closes: the code of its GOAWAY, if it sent one."""
    from softlb._h2frames import GOAWAY, decode_frames, parse_goaway
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with the attack's bytes unread: a reset after what was sent
    frames, _ = decode_frames(data)
    codes = [parse_goaway(p)[1] for t, _, _, p in frames if t == GOAWAY]
    return codes[-1] if codes else None


@pytest.mark.parametrize("attack", ["rapid reset", "continuation flood"])
def test_http2_floods_get_enhance_your_calm_and_the_listener_serves_on(make_agent, grpcs, attack):
    """CVE-2023-44487 (streams opened and reset at once, over and over) and a header block
    that never ends: the connection is closed with ENHANCE_YOUR_CALM; other clients are
    served meanwhile and after."""
    from hpack import Encoder

    from softlb import H2ErrorCode
    from softlb._h2connection import RESET_CREDIT
    from softlb._h2frames import CONTINUATION, HEADERS, PREFACE, frame, rst_stream_frame, settings_frame

    (b,) = grpcs(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("g", port, "http2")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    enc = Encoder()
    s.sendall(PREFACE + settings_frame({}))
    try:
        if attack == "rapid reset":
            for i in range(RESET_CREDIT + 50):
                sid = 1 + 2 * i
                s.sendall(frame(HEADERS, 0x4, sid, enc.encode(GRPC_CALL)) + rst_stream_frame(sid, 8))
        else:
            s.sendall(frame(HEADERS, 0, 1, enc.encode(GRPC_CALL)))
            for _ in range(1000):
                s.sendall(frame(CONTINUATION, 0, 1, b""))
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed on us mid-attack: the GOAWAY was sent before
    try:
        assert _goaway_code(s) == H2ErrorCode.ENHANCE_YOUR_CALM
    finally:
        s.close()
    with channel(port) as ch:
        assert ch.unary_unary("/demo.Echo/Call")(b"after", timeout=10) == b"g1:after"
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'softlb_proxy_http2_protocol_errors_total{code="ENHANCE_YOUR_CALM",peer="client"} 1.0' in text


def test_http2_a_repeated_head_is_routed_anew_after_a_reload(make_agent, grpcs):
    """A client connection remembers what its repeated request heads mean (their check,
    route and forwarded form): a reload that adds a route applies to the very same head on
    the same connection."""
    a, b = grpcs(2)
    port = free_port()
    agent = make_agent(catalog([a]) + catalog([b], "other"), proxy_config("g", port, "http2")).start()
    head = [(h, b"other.local" if h == b":authority" else v) for h, v in GRPC_CALL]
    c = RawH2(port)
    try:
        for _ in range(3):
            _, data, _, _ = c.call(head, grpc_frame(b"x"))
            assert data == grpc_frame(b"g1:x")
        agent.write_config(proxy_config("g", port, "http2")
                           + '[[services.g.proxy.routes]]\nhost = "other.local"\nservice = "other"\n')
        agent.send(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            _, data, _, _ = c.call(head, grpc_frame(b"x"))
            if data == grpc_frame(b"g2:x"):
                break
            assert time.monotonic() < deadline, "the route never applied to the remembered head"
            time.sleep(0.1)
        _, data, _, _ = c.call(GRPC_CALL, grpc_frame(b"y"))  # another authority: no route
        assert data == grpc_frame(b"g1:y")
    finally:
        c.close()


def test_http2_stream_on_a_leaving_endpoint_ends_at_drain_timeout(make_agent, grpcs):
    """An endpoint that leaves the catalog gets no new streams; a stream it is still
    answering is given drain_timeout, then answered UNAVAILABLE by the proxy."""
    from agentproc import wait_until

    a, b = grpcs(2)
    port = free_port()
    agent = make_agent(catalog([a, b]), proxy_config("g", port, "http2", drain_timeout="1s")).start()
    results: dict[str, object] = {}
    with channel(port) as ch:
        slow = ch.unary_unary("/demo.Echo/Slow")

        def call(name: str) -> None:
            try:
                results[name] = slow(b"5", timeout=10)
            except grpc.RpcError as e:
                results[name] = (e.code(), time.monotonic())

        threads = [threading.Thread(target=call, args=(n,)) for n in ("c1", "c2")]
        for t in threads:  # round robin: one slow call on each endpoint
            t.start()
            time.sleep(0.2)
        agent.write_catalog(catalog([b]))  # g1 leaves mid-answer
        t0 = time.monotonic()
        wait_until(lambda: "g1" not in agent.cli("endpoints", "g").stdout)
        assert ch.unary_unary("/demo.Echo/Call")(b"n", timeout=10) == b"g2:n"  # new work: g2 only
        for t in threads:
            t.join(15)
    ended = [r for r in results.values() if isinstance(r, tuple)]
    assert len(ended) == 1 and ended[0][0] == grpc.StatusCode.UNAVAILABLE, results
    assert ended[0][1] - t0 < 3.5  # drain_timeout (1 s) and the sweeps, not the 5 s call
    assert b"late" in results.values()  # the staying endpoint's slow call finished
