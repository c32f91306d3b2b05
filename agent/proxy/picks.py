"""The proxy's one door into the core: pick an endpoint with a held lease, finish it.

Every proxied connection (tcp) or request (http, http2) is one pick whose lease stays open
until the work ends, so load-aware policies see it as in flight however long it lasts, and
its outcome feeds outlier detection (a failed connect, a reset, a 5xx).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from softlb import ErrorCode
from softlb._errors import RequestError
from softlb._types import Endpoint

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
    """A pick with a lease held until `finish`/`release`; waits (bounded) for a service a
    catalog source is still fetching. Raises NoEndpoint."""
    engine = rt.engine
    for attempt in (0, 1):
        now = trio.current_time()
        try:
            r = engine.resolve(service, now, key=key, source=source, lease=True)
        except RequestError as e:
            if attempt == 0 and e.code == ErrorCode.UNKNOWN_SERVICE and engine.on_unknown_service is not None \
                    and engine.on_unknown_service(service) and await rt.wait_for_service(service):
                continue
            raise NoEndpoint(e.code.value, e.message) from None
        return Held(service, r.endpoint, r.lease, now)
    raise NoEndpoint(ErrorCode.UNAVAILABLE.value, f"service \"{service}\" is not known yet")


def finish(rt: Runtime, held: Held, ok: bool, latency: float | None = None) -> None:
    """End a held pick with a verdict (feeds least_request latency and outlier detection)."""
    if held.lease is None:
        return
    lease, held.lease = held.lease, None
    try:
        rt.engine.report(trio.current_time(), ok, latency, lease=lease)
    except RequestError:
        pass  # the lease expired or its service went away meanwhile: nothing left to count


def release(rt: Runtime, held: Held) -> None:
    """End a held pick with no verdict (a client that went away says nothing about the
    endpoint)."""
    if held.lease is None:
        return
    lease, held.lease = held.lease, None
    engine = rt.engine
    le = engine.leases.close(lease)
    if le is not None and (b := engine.services.get(le.service)) is not None:
        b.on_finish(le.endpoint_id, True, None, trio.current_time())


def serving(rt: Runtime, service: str, endpoint_id: str) -> bool:
    """Whether `endpoint_id` may still get new work (for draining what it has)."""
    b = rt.engine.services.get(service)
    return b is not None and any(e.id == endpoint_id for e in b.served)
