"""The proxy's one door into the core: pick an endpoint with a held lease, finish it.

Every proxied connection (tcp) or request (http, http2) is one pick whose lease is HELD
until the work ends, so load-aware policies count it as in flight however long it lasts,
and its outcome feeds outlier detection (a failed connect, a reset, a 5xx).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from softlb import Endpoint, LeaseScope, Pending, PickError, RequestError

from ..runtime import Runtime


class NoEndpoint(Exception):
    """No endpoint could be picked: the text says why (for logs and 503 bodies)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Held:
    service: str
    endpoint: Endpoint
    lease: int | None
    started: float


async def pick(rt: Runtime, service: str, *, source: str | None = None, key: str | None = None) -> Held:
    """A pick with a lease held until `finish`/`release`; waits (bounded, in the runtime's
    one place) for a service a catalog source is still fetching. Raises NoEndpoint."""
    try:
        p = await rt.pick(service, key=key, source=source, scope=LeaseScope.HELD)
    except (PickError, RequestError) as e:
        raise NoEndpoint(e.code.value, e.message) from None
    return Held(service, p.endpoint, p.lease, trio.current_time())


def finish(rt: Runtime, held: Held, ok: bool, latency: float | None = None, now: float | None = None) -> None:
    """End a held pick with a verdict (feeds least_request latency and outlier detection).
    `now`, when the caller has just read the clock, spares reading it again."""
    if held.lease is None:
        return
    lease, held.lease = held.lease, None
    try:
        changes = rt.engine.finish(lease, trio.current_time() if now is None else now, ok=ok, latency=latency)
    except (PickError, RequestError):
        return  # its service went away meanwhile: nothing left to count
    if changes or rt.engine.table_builds:  # almost always neither: skip the dispatch
        rt.dispatch(changes)


def release(rt: Runtime, held: Held) -> None:
    """End a held pick with no verdict (a client that went away says nothing about the
    endpoint)."""
    if held.lease is None:
        return
    lease, held.lease = held.lease, None
    rt.release(lease)


def serving(rt: Runtime, service: str, endpoint_id: str) -> bool:
    """Whether `endpoint_id` may still get new work (for draining what it has)."""
    b = rt.engine.services.get(service)
    return b is not None and any(e.id == endpoint_id for e in b.served)


def pick_now(rt: Runtime, service: str, *, source: str | None = None, key: str | None = None,
             now: float | None = None) -> Held | None:
    """`pick` without a task switch, for per-request hot paths: None when the service's
    catalog source has not answered yet (then `await pick(...)`). Raises NoEndpoint.
    `now`, when the caller has just read the clock, spares reading it again."""
    if now is None:
        now = trio.current_time()
    engine = rt.engine
    try:
        p = engine.pick_held(service, now, key=key, source=source)
    except (PickError, RequestError) as e:
        raise NoEndpoint(e.code.value, e.message) from None
    if type(p) is Pending:
        return None
    rt.flush()
    return Held(service, p[0], p[1], now)
