"""The trio client: the same API as `Client`, async. Import it as `softlb_client.trio_client`
(it needs trio; the sync client does not).

Calls on one client are serialised on one reused connection; the same retry-once and
connect-backoff rules as the sync client apply, bounded by the per-call timeout.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from ._args import report_args, resolve_args
from ._codec import RECV_SIZE, Decoder, encode, result_of
from ._errors import AgentUnavailable, Timeout
from ._paths import default_socket_path, parse_addr
from ._types import Resolved


class _ConnectionClosed(Exception):
    pass


class AsyncClient:
    def __init__(self, socket_path: str | None = None, addr: str | None = None, timeout: float = 1.0) -> None:
        self._addr = parse_addr(addr) if addr else None
        self._path = None if addr else (socket_path or default_socket_path())
        self.timeout = timeout
        self._stream: trio.abc.Stream | None = None
        self._dec = Decoder()
        self._next_id = 0
        self._lock = trio.Lock()

    async def _connect(self) -> trio.abc.Stream:
        delay = 0.005
        while True:
            try:
                if self._addr:
                    return await trio.open_tcp_stream(*self._addr)
                return await trio.open_unix_socket(self._path)  # type: ignore[arg-type]
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if trio.current_effective_deadline() <= trio.current_time() + delay:
                    raise AgentUnavailable(f"cannot connect to the softlb agent: {e}") from None
                await trio.sleep(delay)
                delay = min(delay * 2, 0.2)
            except OSError as e:
                raise AgentUnavailable(f"cannot connect to the softlb agent: {e}") from None

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
            self._stream = None
        self._dec = Decoder()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _exchange(self, frame: bytes, rid: int) -> dict[str, Any]:
        assert self._stream is not None
        try:
            await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ConnectionClosed() from None
        while True:
            msg = self._dec.next()
            if msg is None:
                try:
                    data = await self._stream.receive_some(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    raise _ConnectionClosed()
                self._dec.feed(data)
                continue
            if msg.get("id") == rid:
                return msg
            if msg.get("id") is None and "error" in msg:
                result_of(msg)

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        t = self.timeout if timeout is None else timeout
        try:
            # The timeout covers the wait for the shared connection too: a call queued
            # behind a slow one must still give up on time.
            with trio.fail_after(t if t is not None else math.inf):
                async with self._lock:
                    self._next_id = (self._next_id + 1) & 0x7FFFFFFF
                    rid = self._next_id
                    frame = encode(dict(args, op=op, id=rid))
                    try:
                        for attempt in (0, 1):
                            if self._stream is None:
                                self._stream = await self._connect()
                            try:
                                return result_of(await self._exchange(frame, rid))
                            except _ConnectionClosed:
                                await self._drop()
                                if attempt:
                                    raise AgentUnavailable("the agent closed the connection") from None
                    except BaseException:
                        # Only the call holding the lock owns the stream: a half-read
                        # answer must not be read by the next call.
                        await self._drop()
                        raise
        except trio.TooSlowError:
            raise Timeout(f"no answer from the agent within {t}s") from None
        raise AssertionError("unreachable")

    async def hello(self) -> dict[str, Any]:
        return await self.call("hello", versions=[1], client="softlb-python-trio/0.1")

    async def resolve(self, service: str, key: str | bytes | None = None, tags: list[str] | None = None,
                      lease: bool = True, timeout: float | None = None) -> Resolved:
        args = resolve_args(service, key, tags, lease)
        return Resolved.from_result(await self.call("resolve", timeout, **args))

    async def report(self, lease: int | None = None, ok: bool = True, latency: float | None = None,
                     service: str | None = None, endpoint: str | None = None) -> None:
        args = report_args(lease, ok, latency, service, endpoint)
        await self.call("report", **args)

    async def services(self) -> list[dict[str, Any]]:
        return await self.call("services")

    async def endpoints(self, service: str) -> dict[str, Any]:
        return await self.call("endpoints", service=service)
