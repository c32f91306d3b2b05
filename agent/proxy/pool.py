"""Idle upstream connections kept for reuse, per endpoint (Envoy's and HAProxy's pools).

A connection goes back only after a complete exchange that both sides left open; one idle
longer than `idle_timeout` is closed instead of reused, and at most MAX_IDLE wait per
endpoint. A pooled connection the server closed meanwhile shows up as an error before any
answer on its first reuse; http1.py retries that on a fresh connection without counting it
against the endpoint.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Generic, TypeVar

import trio

MAX_IDLE = 64
T = TypeVar("T")


class Pool(Generic[T]):
    def __init__(self, close: Callable[[T], Any]) -> None:
        self._idle: dict[tuple[str, int], collections.deque[tuple[float, T]]] = {}
        self._close = close

    def get(self, key: tuple[str, int], idle_timeout: float) -> T | None:
        got = self.take(key, idle_timeout)
        return None if got is None else got[0]

    def take(self, key: tuple[str, int], idle_timeout: float, now: float | None = None) -> tuple[T, float] | None:
        """The most recently used idle connection to `key` (the warmest, least likely
        closed) and how long it sat idle, or None. `now`: a clock read the caller has."""
        q = self._idle.get(key)
        if not q:
            return None
        if now is None:
            now = trio.current_time()
        while q:
            since, conn = q.pop()
            if now - since < idle_timeout:
                return conn, now - since
            self._close(conn)
        return None

    def put(self, key: tuple[str, int], conn: T, now: float | None = None) -> None:
        q = self._idle.get(key)
        if q is None:
            q = self._idle[key] = collections.deque()
        elif len(q) >= MAX_IDLE:
            _, old = q.popleft()
            self._close(old)
        q.append((trio.current_time() if now is None else now, conn))

    def drop(self, key: tuple[str, int]) -> None:
        for _, conn in self._idle.pop(key, ()):
            self._close(conn)

    def keys(self) -> list[tuple[str, int]]:
        return list(self._idle)

    def close_all(self) -> None:
        for key in list(self._idle):
            self.drop(key)
