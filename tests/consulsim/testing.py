"""Helpers for tests of Consul clients: a recording CatalogListener, waits, configs."""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio

from softlb import RetryPolicy
from softlb import AgentConfig, ConsulConfig, ServiceConfig
from softlb import Endpoint
from softlb_agent.consul_watch import ConsulSource


@dataclass
class Recorder:
    """A CatalogListener that remembers everything it was told."""

    current: dict[str, tuple[tuple[Endpoint, ...], bool, float | None]] = field(default_factory=dict)
    updates: list[tuple[str, tuple[Endpoint, ...], bool]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)

    def on_update(self, service, endpoints, now, *, stale, fetched_at):
        self.current[service] = (endpoints, stale, fetched_at)
        self.updates.append((service, endpoints, stale))

    def on_remove(self, service, now):
        self.removed.append(service)
        self.current.pop(service, None)

    def on_status(self, status):
        self.statuses.append(status)

    def eps(self, service: str) -> tuple[Endpoint, ...]:
        return self.current.get(service, ((), False, None))[0]

    def stale(self, service: str) -> bool:
        return self.current.get(service, ((), False, None))[1]


async def until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait for `pred()`; fail the test after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


def agent_config(url: str, services=("web",), **consul: Any) -> AgentConfig:
    consul.setdefault("wait", 1.0)
    consul.setdefault("min_query_interval", 0.02)
    return AgentConfig(source="consul", consul=ConsulConfig(address=url, **consul),
                       services={s: ServiceConfig() for s in services})


def run(fn: Callable[..., Any], *args: Any, timeout: float = 20) -> None:
    """`trio.run(fn, *args)` bounded by `timeout` seconds."""
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn(*args)
    trio.run(main)


@asynccontextmanager
async def watching(cfg: AgentConfig, rec: Recorder | None = None,
                   **kw: Any) -> AsyncIterator[tuple[ConsulSource, Recorder]]:
    """A running ConsulSource (fast retries) and its Recorder (a new one unless given);
    cancelled on exit."""
    kw.setdefault("retry", RetryPolicy(base=0.05, cap=0.2))
    kw.setdefault("rng", random.Random(7))
    rec = Recorder() if rec is None else rec
    async with trio.open_nursery() as n:
        src = ConsulSource(cfg, rec, **kw)
        await n.start(src.run)
        yield src, rec
        n.cancel_scope.cancel()
