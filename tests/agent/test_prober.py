"""The active prober against real loopback servers (in-process trio servers on 127.0.0.1)."""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

import pytest
import trio

from agentproc import refusing_port

from softlb import Endpoint
from softlb._config import ProbeConfig
from softlb_agent.prober import ROUND_JITTER, Prober, probe_once, schedule

FAST = dict(interval=0.05, timeout=0.5)
HTTP = ProbeConfig(kind="http", path="/healthz", **FAST)
TCP = ProbeConfig(kind="tcp", **FAST)


# ---------------------------------------------------------------- helpers


@dataclass
class Backend:
    """A tiny HTTP server. `reply` is the raw response; None means accept and never answer."""

    reply: bytes | None = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    reset: bool = False  # answer a request with a TCP reset
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    open_max: int = 0
    _scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            if self.reset:
                linger = struct.pack("ii", 1, 0)  # close with RST instead of FIN
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                return
            if self.reply is None:
                while await stream.receive_some(4096):  # until the prober gives up
                    pass
                return
            await stream.send_all(self.reply)
        except trio.BrokenResourceError:
            pass
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)


@dataclass
class Results:
    rows: list[tuple[str, str, bool, float, str]] = field(default_factory=list)

    def __call__(self, service, endpoint_id, ok, now, detail):
        self.rows.append((service, endpoint_id, ok, now, detail))

    def of(self, endpoint_id, since=0.0):
        return [r for r in self.rows if r[1] == endpoint_id and r[3] >= since]

    async def wait(self, pred: Callable[[], bool]) -> None:
        while not pred():
            await trio.sleep(0.01)


def ep(eid: str, port: int, address: str = "127.0.0.1") -> Endpoint:
    return Endpoint(eid, address, port)


# Bound, never listening, held for the run: connects there are refused.
closed_port = refusing_port


def run(fn, timeout: float = 10.0) -> None:
    async def main():
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


def probe_backend(backend: Backend, *probes: ProbeConfig) -> list[tuple[bool, str]]:
    """Start `backend`, run each probe against it once, stop it."""
    answers = []

    async def main():
        async with trio.open_nursery() as nursery:
            await backend.start(nursery)
            for p in probes:
                answers.append(await probe_once(p, "127.0.0.1", backend.port))
            nursery.cancel_scope.cancel()

    run(main)
    return answers


@asynccontextmanager
async def probing(results: Results, *backends: Backend, **prober_kw):
    """Running backends and a running prober; everything stops on exit."""
    async with trio.open_nursery() as nursery:
        for b in backends:
            await b.start(nursery)
        prober = Prober(results, rng=random.Random(7), **prober_kw)
        await nursery.start(prober.run)
        yield nursery, prober
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- single probes


@pytest.mark.parametrize(
    ("reply", "ok", "detail"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", True, "HTTP 200"),
        (b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n", True, "HTTP 302"),
        (b"HTTP/1.1 399 Odd\r\n\r\n", True, "HTTP 399"),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", False, "HTTP 404"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, "HTTP 503"),
        (b"HTTP/1.1 199 Early\r\n\r\n", False, "HTTP 199"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", False, "bad response: 'SSH-2.0-OpenSSH_9.6'"),
        (b"", False, "bad response: connection closed"),
    ],
)
def test_http_status_decides(reply, ok, detail):
    [(got_ok, got_detail)] = probe_backend(Backend(reply=reply), HTTP)
    assert got_ok is ok
    assert got_detail.startswith(detail)


def test_http_request_line_and_host_header():
    b = Backend()
    probe_backend(b, HTTP, ProbeConfig(kind="http", path="/a b?x=1", host="api.internal"))
    first, second = (r.split(b"\r\n") for r in b.requests)
    assert first[0] == b"GET /healthz HTTP/1.1"
    assert f"Host: 127.0.0.1:{b.port}".encode() in first
    assert second[0] == b"GET /a%20b?x=1 HTTP/1.1"
    assert b"Host: api.internal" in second


def test_connection_reset_fails():
    assert probe_backend(Backend(reset=True), HTTP) == [(False, "broken: Connection reset by peer")]


def test_server_that_never_answers_times_out():
    slow = ProbeConfig(kind="http", timeout=0.2)
    assert probe_backend(Backend(reply=None), slow) == [(False, "timeout after 200ms")]


def test_tcp_probe_open_and_closed_port():
    [(ok, detail)] = probe_backend(Backend(reply=None), TCP)
    assert ok and detail.startswith("connected")

    async def main():
        for probe in (TCP, HTTP):
            assert await probe_once(probe, "127.0.0.1", closed_port()) == (False, "connect: Connection refused")

    run(main)


def test_unresolvable_name_fails():
    async def main():
        # A resolver error is a failed probe, not an exception (a resolver without network
        # may be slow instead: then it is the timeout that answers).
        ok, detail = await probe_once(TCP, "no-such-host.invalid", 80)
        assert not ok and detail.startswith(("connect: ", "timeout after"))

    run(main)


@pytest.mark.parametrize("name", ["db..internal", "x" * 64 + ".example", ".leading"])
def test_malformed_host_name_is_a_failed_probe_not_a_crash(name):
    async def main():
        ok, detail = await probe_once(TCP, name, 80)
        assert not ok and detail.startswith(("bad address", "connect: ", "timeout after")), detail

    run(main)


def test_a_probe_raising_anything_is_a_failed_probe_and_the_loop_goes_on():
    calls = []

    async def exploding(probe, address, port):
        calls.append(address)
        raise RuntimeError("boom")

    async def main():
        results = Results()
        async with probing(results, probe_fn=exploding) as (_, prober):
            prober.set_service("web", TCP, [Endpoint(id="a", address="127.0.0.1", port=1)])
            with trio.fail_after(10):
                await results.wait(lambda: len(results.of("a")) >= 2)
        assert all(not ok and "RuntimeError: boom" in detail for _, _, ok, _, detail in results.of("a"))

    run(main)


# ---------------------------------------------------------------- the prober loop


def test_killed_backend_fails_and_recovers_after_restart():
    async def main():
        results, a, b = Results(), Backend(), Backend()
        async with probing(results, a, b) as (nursery, prober):
            prober.set_service("web", HTTP, [ep("a", a.port), ep("b", b.port)])
            await results.wait(lambda: len(results.of("a")) >= 2 and len(results.of("b")) >= 2)
            assert all(r[2] and r[0] == "web" for r in results.rows)

            a.stop()
            killed = trio.current_time()
            await results.wait(lambda: len(results.of("a", killed)) >= 3)
            assert not any(r[2] for r in results.of("a", killed)[1:])
            assert "Connection refused" in results.of("a", killed)[-1][4]

            await a.start(nursery)  # same port again
            restarted = trio.current_time()
            await results.wait(lambda: any(r[2] for r in results.of("a", restarted)))
            assert all(r[2] for r in results.of("b"))

    run(main)


def test_only_listed_endpoints_are_probed_and_changes_are_picked_up():
    async def main():
        results, a, b = Results(), Backend(), Backend()
        async with probing(results, a, b) as (_, prober):
            prober.set_service("web", TCP, [ep("a", a.port)])
            await results.wait(lambda: len(results.of("a")) >= 2)
            assert results.of("b") == []

            prober.set_service("web", TCP, [ep("b", b.port)])
            removed = trio.current_time()
            hits_on_a = len(results.of("a"))
            await results.wait(lambda: len(results.of("b")) >= 5)
            assert len(results.of("a")) == hits_on_a
            assert results.of("a", removed) == []
            assert prober.targets() == {"web": ("b",)}

            prober.set_service("web", None, [ep("b", b.port)])
            off = len(results.rows)
            assert prober.targets() == {}
            await trio.sleep(5 * FAST["interval"])
            assert len(results.rows) == off

    run(main)


def test_moved_endpoint_reports_only_about_its_new_address():
    async def main():
        results, old, new = Results(), Backend(reply=b"HTTP/1.1 503 Unavailable\r\n\r\n"), Backend()
        async with probing(results, old, new) as (_, prober):
            prober.set_service("web", HTTP, [ep("x", old.port)])
            await results.wait(lambda: len(results.of("x")) >= 1)
            prober.set_service("web", HTTP, [ep("x", new.port)])
            moved = len(results.rows)
            await results.wait(lambda: len(results.rows) >= moved + 5)
            assert all(ok for _, _, ok, _, _ in results.rows[moved:])

    run(main)


def test_result_of_a_probe_finishing_as_its_endpoint_is_removed_is_dropped():
    # The probe's answer is ready (its task rescheduled) when the endpoint moves; the cancel
    # comes too late to stop it, so only the generation check keeps it out.
    async def main():
        results, answered, started = Results(), trio.Event(), trio.Event()

        async def fake_probe(probe, address, port):
            started.set()
            await answered.wait()
            return False, f"answer from port {port}"

        async with probing(results, probe_fn=fake_probe) as (_, prober):
            prober.set_service("web", TCP, [ep("a", 1)])
            await started.wait()
            answered.set()
            prober.set_service("web", TCP, [ep("a", 2)])  # moved: a new target, new generation
            await results.wait(lambda: results.rows)  # the new target's first result
            assert [r[4] for r in results.rows] == ["answer from port 2"]

    run(main)


def test_targets_set_before_run_start_with_it_and_services_are_independent():
    async def main():
        results = Results()
        prober = Prober(results, rng=random.Random(1))
        async with trio.open_nursery() as nursery:
            a = Backend()
            await a.start(nursery)
            prober.set_service("web", TCP, [ep("a", a.port)])
            prober.set_service("api", HTTP, [ep("a", a.port)])
            await nursery.start(prober.run)
            await results.wait(lambda: {r[0] for r in results.rows} == {"web", "api"})
            prober.remove_service("web")
            assert prober.targets() == {"api": ("a",)}
            nursery.cancel_scope.cancel()

    run(main)


def test_initial_delay_holds_the_first_probe():
    async def main():
        results, a = Results(), Backend()
        async with probing(results, a) as (_, prober):
            added = trio.current_time()
            prober.set_service("web", ProbeConfig(kind="tcp", interval=0.05, initial_delay=0.3), [ep("a", a.port)])
            await results.wait(lambda: results.rows)
            assert results.rows[0][3] - added >= 0.3

    run(main)


def test_concurrency_is_bounded():
    async def main():
        results, hang = Results(), Backend(reply=None)
        async with probing(results, hang, max_concurrent=3) as (_, prober):
            probe = ProbeConfig(kind="http", interval=0.05, timeout=0.2)
            prober.set_service("web", probe, [ep(f"e{i}", hang.port) for i in range(12)])
            await results.wait(lambda: len({r[1] for r in results.rows}) == 12)
            assert all(r[4] == "timeout after 200ms" for r in results.rows)
            assert hang.open_max == 3

    run(main)


# ---------------------------------------------------------------- the schedule (pure)


def first(n, it):
    return [next(it) for _ in range(n)]


def test_schedule_phase_spreads_over_the_interval():
    rng = random.Random(42)
    starts = sorted(next(schedule(rng, 10.0, 2.0)) for _ in range(1000))
    assert 2.0 <= starts[0] and starts[-1] < 12.0 + ROUND_JITTER * 10.0
    # Every tenth of the interval gets about a tenth of the loops: no lockstep, no clumps.
    counts = Counter(min(int(s - 2.0), 9) for s in starts)
    assert sorted(counts) == list(range(10))
    assert min(counts.values()) > 50


def test_schedule_rounds_stay_anchored_within_jitter():
    interval = 10.0
    offsets = first(500, schedule(random.Random(3), interval, 0.0))
    phase = offsets[0]
    j = ROUND_JITTER * interval
    for k, due in enumerate(offsets):
        assert abs(due - (phase + k * interval)) <= 2 * j  # no drift, however many rounds
    assert offsets == sorted(offsets)
    gaps = {round(b - a, 6) for a, b in zip(offsets, offsets[1:])}
    assert len(gaps) > 100  # rounds really are jittered


# ---------------------------------------------------------------- wiring into the agent


def test_attach_prober_follows_the_engine_and_feeds_it():
    from softlb import AgentConfig, ServiceConfig
    from softlb_agent.app import attach_prober
    from softlb_agent.runtime import Runtime

    probed = AgentConfig(services={"web": ServiceConfig(probe=ProbeConfig(kind="tcp", interval=0.05, fall=1))})

    async def main():
        rt = Runtime(probed)
        notified = []
        rt.change_listeners.append(notified.append)
        prober = attach_prober(rt, random.Random(5))
        async with trio.open_nursery() as nursery:
            await nursery.start(prober.run)
            now = trio.current_time()
            rt.dispatch(rt.engine.replace_all({"web": [ep("a", closed_port()), ep("b", 1)], "api": [ep("c", 1)]}, now))
            assert prober.targets() == {"web": ("a", "b")}  # api has no probe
            assert "web" in notified  # every listener hears every dispatched change
            # A closed port and fall = 1: the engine stops serving "a" on its own.
            await Results().wait(lambda: rt.engine.services["web"].health.snapshot(now).eligible < 2)
            rt.dispatch(rt.engine.replace_all({"web": [ep("b", 1)]}, trio.current_time()))
            assert prober.targets() == {"web": ("b",)}
            rt.dispatch(rt.engine.reconfigure(AgentConfig(), trio.current_time()))  # probe removed by a reload
            assert prober.targets() == {}
            rt.dispatch(rt.engine.remove_service("web", trio.current_time()))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reload_changing_only_rise_or_fall_keeps_the_probe_schedule():
    async def main():
        results, a = Results(), Backend()
        async with probing(results, a) as (_, prober):
            prober.set_service("web", TCP, [ep("a", a.port)])
            await results.wait(lambda: len(results.of("a")) >= 1)
            (before,) = prober._services["web"].values()
            prober.set_service("web", ProbeConfig(kind="tcp", rise=5, fall=7, **FAST), [ep("a", a.port)])
            (after,) = prober._services["web"].values()
            assert after is before and after.probe.rise == 5  # same loop, new thresholds
            prober.set_service("web", ProbeConfig(kind="tcp", interval=0.07, timeout=0.5), [ep("a", a.port)])
            (moved,) = prober._services["web"].values()
            assert moved is not before  # a new interval does restart it

    run(main)
