"""Shorthands the core tests use over the engine's typed API: a resolve as the socket
protocol makes it, and one request answered the way the IPC server answers it (bytes)."""

from __future__ import annotations

from typing import Any

from softlb import (
    Engine,
    LeaseScope,
    Pending,
    Pick,
    Rejected,
    Reported,
    RequestError,
    ServerConnection,
    Watch,
    Unwatch,
    parse_request,
    respond,
)


def resolve(engine: Engine, service: str, now: float, key: str | None = None, tags: tuple[str, ...] = (),
            source: str | None = None, lease: bool = True) -> Pick:
    r = engine.pick(service, now, key=key, tags=tags, source=source,
                    scope=LeaseScope.REQUEST if lease else LeaseScope.NONE)
    assert type(r) is Pick, r
    return r


def handle(engine: Engine, msg: Any, now: float, source: str | None = None) -> bytes | None:
    """One decoded message answered as a frame; None where the connection takes over
    (streaming ops, and resolves a source is still fetching)."""
    req = parse_request(msg)
    if type(req) is Rejected:
        return ServerConnection.send_error(req.id, req.code, req.message)
    if type(req) in (Watch, Unwatch):
        return None
    try:
        r = respond(engine, req, now, source)
    except RequestError as e:
        return ServerConnection.send_error(req.id, e.code, e.message)
    if type(r) is Pending:
        return None
    if type(r) is Pick:
        return ServerConnection.send_pick(req.id, r)
    if type(r) is Reported:
        return ServerConnection.send_result(req.id, {})
    return ServerConnection.send_result(req.id, r)


class RecordingEngine(Engine):
    """An engine that keeps every change its inputs return, in order, as the agent's
    dispatcher would receive them (`changed`: service names)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: list[str] = []

    def _keep(self, changes: Any) -> Any:
        self.changed.extend(sorted(changes))
        return changes

    def set_service(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().set_service(*a, **k))

    def remove_service(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().remove_service(*a, **k))

    def reconfigure(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().reconfigure(*a, **k))

    def report(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().report(*a, **k))

    def finish(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().finish(*a, **k))

    def probe_result(self, *a: Any, **k: Any) -> Any:
        return self._keep(super().probe_result(*a, **k))

    def tick(self, now: float) -> Any:
        changes, deadline = super().tick(now)
        self._keep(changes)
        return changes, deadline
