"""Answering a typed protocol request with the engine: the one place every front end that
speaks the protocol's ops (the socket server, the admin HTTP API) turns a request into an
engine call. Streaming ops (`Watch`, `Unwatch`) belong to the front end's connection.

`respond` returns, by op:
- `Resolve`: the engine's `Pick`, or `Pending` (the front end awaits the source, then calls
  `respond` again);
- `Report`: `Reported(changes)` (result `{}`; the changes go to the agent's dispatcher);
- `Hello`, `Services`, `Endpoints`: the result value (plain maps and lists);
and raises `RequestError` for requests that cannot be answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._engine import Changes, Engine, Pending, Pick
from ._errors import ErrorCode, RequestError
from ._leases import LeaseScope
from ._protocol import Endpoints, Hello, Report, Request, Resolve, Services


@dataclass(frozen=True, slots=True)
class Reported:
    changes: Changes


def respond(engine: Engine, req: Request, now: float, source: str | None) -> Pick | Pending | Reported | Any:
    t = type(req)
    if t is Resolve:
        return engine.pick(req.service, now, key=req.key, tags=req.tags, source=source,  # type: ignore[union-attr]
                           scope=LeaseScope.REQUEST if req.lease else LeaseScope.NONE)  # type: ignore[union-attr]
    if t is Report:
        r: Report = req  # type: ignore[assignment]
        return Reported(engine.report(now, r.ok, r.latency, lease=r.lease, service=r.service, endpoint_id=r.endpoint))
    if t is Services:
        return engine.services_summary()
    if t is Endpoints:
        return engine.describe(req.service, now)  # type: ignore[union-attr]
    if t is Hello:
        return engine.hello(req.versions)  # type: ignore[union-attr]
    raise RequestError(ErrorCode.UNKNOWN_OP, f"{t.__name__} is a streaming op: the connection answers it")
