"""Active health probes: one loop per (service, endpoint) the catalog lists, results to a callback.

Design
------
The prober owns no health state. It checks endpoints and hands each result to
`on_result(service, endpoint_id, ok, now, detail)`, which the agent wires to
`engine.probe_result`; the core's HealthTracker applies rise/fall. That keeps every threshold
decision pure and tested without sockets, and keeps this module a plain I/O loop.

What is probed is exactly what the catalog lists: the agent calls `set_service` with a
service's probe config and its current endpoints whenever either changes, and the prober
starts, keeps or cancels one loop per endpoint to match. A loop is replaced (not reused) when
the endpoint's address, port or the probe config changes, and every loop carries a generation
number; a result is delivered only if its loop is still the current one for that endpoint.
Cancelling a loop is not enough on its own: a probe whose answer arrived just before the
cancel resumes with that answer, and without the check it would report about an endpoint
that is gone or has moved (grpc-go's pickfirst drops updates from inactive SubConns alike).

Schedules never run in lockstep. Each loop starts at a random phase within its interval
(after `initial_delay`), so N agents restarted together by a deploy, or N endpoints added at
once, spread their probes evenly; each round also gets a small jitter. Rounds are anchored to
the loop's start rather than to the previous probe's end, so jitter never accumulates into
drift, and a round that overran (timeout longer than interval) skips the slots it missed
instead of firing a burst.

Probes run through one shared CapacityLimiter, so a service with thousands of endpoints (or a
Consul flap that adds them all at once) costs at most MAX_CONCURRENT_PROBES sockets at a time.
The timeout covers the probe itself, not the wait for a slot.

Error handling: any OSError (refused, unreachable, DNS failure), a connection broken
mid-request (trio.BrokenResourceError) and any timeout is a failed probe with a one-line detail for `softlb endpoints`. Everything else is a bug and
propagates, cancelling the agent's nursery.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, NoReturn, Sequence
from urllib.parse import quote

import trio

from softlb import Endpoint
from softlb import ProbeConfig
from softlb import format_duration

log = logging.getLogger("softlb.prober")

#: Enough to probe a large fleet within one interval (32 x a 1 s timeout is 32 probes per
#: second even when every endpoint hangs) while bounding sockets and file descriptors.
MAX_CONCURRENT_PROBES = 32

#: Each round moves by up to this fraction of the interval either way: enough to break up
#: accidental alignment, small enough that "interval x fall" stays an honest detection bound.
ROUND_JITTER = 0.05

#: The status line must fit in this many bytes; anything longer is not an HTTP server.
MAX_STATUS_LINE = 4096

USER_AGENT = "softlb-probe/1"

#: (service, endpoint_id, ok, now, detail)
ResultCallback = Callable[[str, str, bool, float, str], None]
#: (probe, address, port) -> (ok, detail); tests swap in fakes to control timing.
ProbeFunction = Callable[[ProbeConfig, str, int], Awaitable[tuple[bool, str]]]


def schedule(rng: random.Random, interval: float, initial_delay: float) -> Iterator[float]:
    """Offsets (seconds after the loop starts) at which to probe, forever.

    Round k is due at initial_delay + phase + k x interval + jitter_k, with the phase uniform
    in [0, interval) and each jitter uniform in +-ROUND_JITTER x interval. Never before
    initial_delay, never decreasing.
    """
    phase = rng.uniform(0.0, interval)
    j = ROUND_JITTER * interval
    last = initial_delay
    k = 0
    while True:
        due = initial_delay + phase + k * interval + rng.uniform(-j, j)
        last = max(last, due)
        yield last
        k += 1


async def probe_once(probe: ProbeConfig, address: str, port: int) -> tuple[bool, str]:
    """Run one probe; (ok, detail). See the module docstring for the error policy."""
    start = trio.current_time()
    try:
        with trio.fail_after(probe.timeout):
            stream = await trio.open_tcp_stream(address, port)
            try:
                if probe.kind == "tcp":
                    ok, detail = True, "connected"
                else:
                    ok, detail = await _http_get(stream, probe, address, port)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        return False, f"timeout after {format_duration(probe.timeout)}"
    except OSError as e:
        # Only connecting (or resolving) raises OSError; trio wraps errors on an open stream.
        return False, f"connect: {_describe(e)}"
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        return False, f"broken: {_describe(cause) if isinstance(cause, OSError) else e}"
    except (UnicodeError, ValueError) as e:
        # The name resolver refuses malformed host names ("db..internal", a label over
        # 63 characters) with these rather than OSError. The endpoint is unreachable.
        return False, f"bad address {address!r}: {e}"
    return ok, f"{detail} in {format_duration(trio.current_time() - start)}"


async def _http_get(
    stream: trio.SocketStream, probe: ProbeConfig, address: str, port: int
) -> tuple[bool, str]:
    host = probe.host
    if not host:
        host = f"[{address}]" if ":" in address else address
        if port != 80:
            host += f":{port}"
    # Operators write paths by hand; quote what HTTP cannot carry raw rather than send a
    # broken request line.
    path = quote(probe.path, safe="/%?=&:@!$'()*+,;~-._")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(request.encode("utf-8"))
    buf = b""
    while b"\r\n" not in buf and len(buf) < MAX_STATUS_LINE:
        chunk = await stream.receive_some(MAX_STATUS_LINE)
        if not chunk:
            break
        buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if not line:
        return False, "bad response: connection closed"
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, f"bad response: {line[:60].decode('latin-1')!r}"
    status = int(parts[1])
    return 200 <= status < 400, f"HTTP {status}"


def _describe(e: OSError) -> str:
    # trio.open_tcp_stream wraps per-address failures in a generic "all attempts failed";
    # the first underlying error ("Connection refused") is what an operator wants to see.
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        first = cause.exceptions[0]
        if isinstance(first, OSError):
            e = first
    # Positive errnos have the short standard text; resolver errors (negative) carry their own.
    text = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
    return text


def _schedule(p: ProbeConfig) -> tuple[object, ...]:
    """The settings that shape a probe and its timing; a change to any restarts the loop."""
    return (p.kind, p.path, p.host, p.interval, p.timeout, p.initial_delay)


@dataclass(eq=False)
class _Target:
    service: str
    endpoint_id: str
    address: str
    port: int
    probe: ProbeConfig
    generation: int
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Prober:
    """Probes every endpoint of every service that has a probe configured.

    Call `set_service`/`remove_service` (plain functions, from the trio thread) whenever the
    catalog or config changes, before or after `run` has started.
    """

    def __init__(
        self,
        on_result: ResultCallback,
        *,
        rng: random.Random,
        max_concurrent: int = MAX_CONCURRENT_PROBES,
        probe_fn: ProbeFunction | None = None,
    ) -> None:
        self._on_result = on_result
        self._probe_fn = probe_fn or probe_once
        self._rng = rng
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._services: dict[str, dict[str, _Target]] = {}
        self._nursery: trio.Nursery | None = None
        self._generation = 0

    def set_service(self, service: str, probe: ProbeConfig | None, endpoints: Sequence[Endpoint]) -> None:
        """Probe exactly these endpoints of `service` (none if `probe` is None)."""
        current = self._services.get(service, {})
        wanted = {ep.id: ep for ep in endpoints} if probe is not None else {}
        targets: dict[str, _Target] = {}
        for eid, t in current.items():
            ep = wanted.get(eid)
            if ep is not None and probe is not None and (t.address, t.port) == (ep.address, ep.port) \
                    and _schedule(t.probe) == _schedule(probe):
                t.probe = probe  # rise/fall are the health tracker's: no reason to restart
                targets[eid] = t
            else:
                t.cancel_scope.cancel()
        for eid, ep in wanted.items():
            if eid not in targets:
                assert probe is not None
                self._generation += 1
                t = _Target(service, eid, ep.address, ep.port, probe, self._generation)
                targets[eid] = t
                if self._nursery is not None:
                    self._nursery.start_soon(self._run_target, t)
        if targets:
            self._services[service] = targets
        else:
            self._services.pop(service, None)

    def remove_service(self, service: str) -> None:
        self.set_service(service, None, ())

    def targets(self) -> dict[str, tuple[str, ...]]:
        """service -> endpoint ids being probed (for status pages and tests)."""
        return {s: tuple(ts) for s, ts in self._services.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for targets in self._services.values():
                    for t in targets.values():
                        nursery.start_soon(self._run_target, t)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_target(self, t: _Target) -> None:
        with t.cancel_scope:
            interval = t.probe.interval
            start = trio.current_time()
            slots = schedule(self._rng, interval, t.probe.initial_delay)
            due = next(slots)
            while True:
                await trio.sleep_until(start + due)
                async with self._limiter:
                    try:
                        ok, detail = await self._probe_fn(t.probe, t.address, t.port)
                    except Exception as e:
                        # A probe failing in a way nobody foresaw is a failed probe of this
                        # endpoint, never the end of the agent.
                        log.exception("probe of %s %s:%d failed unexpectedly", t.service, t.address, t.port)
                        ok, detail = False, f"probe error: {type(e).__name__}: {e}"
                self._deliver(t, ok, detail)
                due = next(slots)
                # An overrun (slow probe, long wait for a slot) leaves at most one overdue
                # round to run at once; the others are skipped, never fired in a burst.
                elapsed = trio.current_time() - start
                while due + interval <= elapsed:
                    due = next(slots)

    def _deliver(self, t: _Target, ok: bool, detail: str) -> None:
        current = self._services.get(t.service, {}).get(t.endpoint_id)
        if current is None or current.generation != t.generation:
            return  # a stale result: see the module docstring
        self._on_result(t.service, t.endpoint_id, ok, trio.current_time(), detail)
