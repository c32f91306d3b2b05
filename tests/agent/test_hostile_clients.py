"""Bad input on the wire: each case gets an error or a closed connection, and a second
client connected at the same time is answered normally throughout."""

import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentproc import wait_until
from helpers.frames import frame, read_frames
from softlb_client import Client


def raw(agent) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(agent.socket)
    return s


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


class Bystander:
    """A well-behaved client resolving in a loop while the hostile one does its worst."""

    def __init__(self, agent):
        self.client = agent.client(timeout=2)
        self.ok = 0
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                assert self.client.resolve("web", lease=False).port in (18001, 18002, 18003)
                self.ok += 1
            except Exception as e:
                self.errors.append(e)
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        wait_until(lambda: self.ok > 0 or self.errors, timeout=10)  # answered before the attack
        return self

    def __exit__(self, *exc):
        before = self.ok
        try:
            # ...and answered after it: the agent kept serving this client throughout.
            wait_until(lambda: self.ok > before or self.errors, timeout=10)
        finally:
            self._stop.set()
            self._t.join(timeout=10)
            self.client.close()
        assert not self.errors, self.errors[:3]
        assert self.ok > before > 0


def test_garbage_body_gets_bad_frame_and_connection_continues(agent):
    with Bystander(agent):
        s = raw(agent)
        s.sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1" + frame({"id": 2, "op": "services"}))
        err, ok = read_frames(s, 2)
        assert err["error"]["code"] == "BAD_FRAME" and err["id"] is None
        assert ok["id"] == 2 and ok["result"][0]["name"] == "web"
        s.close()


def test_huge_length_prefix_is_refused_and_closed(agent):
    with Bystander(agent):
        s = raw(agent)
        s.sendall(b"\xff\xff\xff\xff" + b"x" * 100)
        (err,) = read_frames(s, 1)
        assert err["error"]["code"] == "FRAME_TOO_LARGE"
        assert closed(s)
        s.close()


def test_truncated_frame_then_disconnect(agent):
    with Bystander(agent):
        for _ in range(20):
            s = raw(agent)
            s.sendall(frame({"id": 1, "op": "resolve", "service": "web"})[:-3])
            s.close()


def test_truncated_frame_is_answered_once_completed(agent):
    s = raw(agent)
    f = frame({"id": 7, "op": "resolve", "service": "web"})
    s.sendall(f[:5])
    s.settimeout(0.3)
    with pytest.raises(socket.timeout):
        s.recv(1)
    s.settimeout(5)
    s.sendall(f[5:])
    assert read_frames(s, 1)[0]["id"] == 7
    s.close()


def test_unknown_ops_and_bad_requests_are_answered(agent):
    with Bystander(agent):
        s = raw(agent)
        s.sendall(frame({"id": 1, "op": "frobnicate"}) + frame([1, 2]) + frame({"op": "resolve"})
                  + frame({"id": 4, "op": "resolve", "service": ["x"]}) + frame({"id": 5, "op": "hello"}))
        answers = read_frames(s, 5)
        assert [a.get("error", {}).get("code") for a in answers] == ["UNKNOWN_OP", "BAD_FRAME", "BAD_ARGUMENT", "BAD_ARGUMENT", None]
        assert answers[4]["result"]["version"] == 1
        s.close()


def test_slow_reader_does_not_stall_others(agent):
    """A client that pipelines thousands of requests and never reads fills its socket
    buffers; the agent must park that connection, not the whole process."""
    with Bystander(agent):
        s = raw(agent)
        s.setblocking(False)
        batch = frame({"id": 1, "op": "endpoints", "service": "web"}) * 2000
        sent = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                sent += s.send(batch[sent % len(batch):])
            except BlockingIOError:
                break
        time.sleep(0.3)
        s.close()


def test_pipelined_requests_answer_in_order(agent):
    s = raw(agent)
    s.sendall(b"".join(frame({"id": i, "op": "resolve", "service": "web", "lease": False}) for i in range(500)))
    answers = read_frames(s, 500)
    assert [a["id"] for a in answers] == list(range(500))
    s.close()


ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
requests = st.fixed_dictionaries(
    {},
    optional={
        "id": ints | st.text(max_size=5) | st.none() | st.booleans() | st.floats(),
        "op": st.sampled_from(["resolve", "report", "services", "endpoints", "hello", "watch", "unwatch", "x"]) | ints,
        "service": st.sampled_from(["web", "nope", ""]) | ints | st.lists(st.text(max_size=3), max_size=2),
        "key": st.text(max_size=5) | st.binary(max_size=5) | ints,
        "tags": st.lists(st.text(max_size=3), max_size=3) | st.text(max_size=3),
        "lease": ints | st.booleans() | st.none(),
        "ok": st.booleans() | ints,
        "latency": st.floats(allow_nan=True) | ints,
        "versions": st.lists(ints, max_size=3) | st.text(max_size=2),
        "watch": ints | st.text(max_size=3) | st.lists(ints, max_size=2) | st.none() | st.booleans(),
    },
)
hostile = st.one_of(
    requests.map(frame),
    st.binary(max_size=40).map(lambda b: len(b).to_bytes(4, "big") + b),
    st.binary(min_size=4, max_size=40),
)


def test_hypothesis_frames_never_hurt_another_client(agent):
    """Hypothesis-generated hostile byte streams, one connection each, while a bystander
    resolves throughout; after each, a fresh client is answered too."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(hostile, min_size=1, max_size=6))
    def one(frames):
        s = raw(agent)
        try:
            s.sendall(b"".join(frames))
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.close()
        with Client(socket_path=agent.socket, timeout=2) as c:
            assert c.resolve("web", lease=False).port in (18001, 18002, 18003)

    with Bystander(agent):
        one()
