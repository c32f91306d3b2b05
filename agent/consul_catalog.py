"""The "consul" catalog source for the agent: ConsulSource wired to the Engine.

* Publishes each watched service's endpoints with `engine.begin_set_service(..., stale=,
  fetched_at=)` (a big set is applied in steps, agent/table_builds.py), and removes
  services that went idle.
* Configured services (`[services.<name>]`) are watched from the start; any other service
  is watched when a caller first resolves it: the engine answers `Pending`, and the front
  end's `Runtime.await_source` calls `_fetch` to start the watch and waits (bounded by `consul.first_answer_timeout`) for the first answer.
  A name that is not a Consul service name is answered BAD_ARGUMENT, a name Consul does
  not know UNKNOWN_SERVICE (then from a negative cache for `consul.negative_ttl`, counted
  in `softlb_consul_unknown_names_total`), and a new name past `consul.max_on_demand`
  UNAVAILABLE, without a watch.
* An on-demand service is in use while a caller resolves it or holds a `watch` stream on
  it (`Runtime.watchers`); it goes `idle_timeout` after the last of either.
* Loads the persisted snapshot before anything else and publishes it as stale, so an agent
  restarted while Consul is down answers at once; saves it as Consul changes.
* The agent is ready without Consul: startup waits at most `first_answer_timeout` for the
  configured services' first answers, then serves whatever it has.
"""

from __future__ import annotations

import logging
import random
import time
from functools import partial

import trio

from softlb import ErrorCode, RequestError
from softlb import Endpoint

from . import catalog_snapshot
from .consul_watch import ConsulSource, ConsulStatus, WatchRefused
from .paths import default_state_dir
from .runtime import Runtime

log = logging.getLogger("softlb.consul")


class ConsulCatalog:
    def __init__(self, rt: Runtime, rng: random.Random | None = None) -> None:
        self.rt = rt
        self.source = ConsulSource(rt.config, self, rng=rng or random.Random())
        self.source.last_used = self._last_used
        rt.fetch = self._fetch
        self.snapshot_path = catalog_snapshot.snapshot_path(rt.config.state_dir or default_state_dir())
        self._address = rt.config.consul.address or "(CONSUL_HTTP_ADDR or 127.0.0.1:8500)"
        rt.source_status = f"consul {self._address}: starting"
        rt.source_metrics = self._metrics  # type: ignore[attr-defined]
        rt.source_gave_up = lambda name: self.source.negative.knows(name, trio.current_time())

    def _metrics(self) -> list[tuple[str, str, str, list[tuple[str, float | int]]]]:
        """The Consul source's own counters for /metrics (agent/admin.py renders them)."""
        src = self.source
        return [
            ("softlb_consul_unknown_names_total", "counter",
             "Resolves of names Consul does not know, answered UNKNOWN_SERVICE without a watch.",
             [("", src.negative.refused)]),
            ("softlb_consul_negative_cache_entries", "gauge",
             "Names Consul said it does not know, refused for consul.negative_ttl.",
             [("", len(src.negative))]),
            ("softlb_consul_requests_total", "counter", "Requests sent to Consul, by kind.",
             [(f'{{kind="{k}"}}', n) for k, n in sorted(src.requests.items())]),
        ]

    def _fetch(self, service: str) -> None:
        try:
            self.source.want(service)
        except WatchRefused as e:
            if e.unknown:
                raise RequestError(ErrorCode.UNKNOWN_SERVICE, str(e)) from None
            if e.retryable:
                raise RequestError(ErrorCode.UNAVAILABLE,
                                   f"not watching \"{service[:100]}\" in Consul: {e}") from None
            raise RequestError(ErrorCode.BAD_ARGUMENT, str(e)) from None

    def _last_used(self, service: str) -> float | None:
        # An open watch stream uses the service now, even if nobody resolves it: idling it
        # out would tell the watcher "removed" while Consul still has it. The IPC server
        # records the time the last watcher left (`engine.mark_used`), so the idle clock
        # starts from then.
        if self.rt.watchers.get(service, 0) > 0:
            return trio.current_time()
        return self.rt.engine.last_used.get(service)

    # ------------------------------------------------------------------ CatalogListener

    def on_update(self, service: str, endpoints: tuple[Endpoint, ...], now: float, *,
                  stale: bool, fetched_at: float | None) -> None:
        # A big set is applied in steps by agent/table_builds.py (issue 10, item 9).
        self.rt.apply_soon(self.rt.engine.begin_set_service(service, endpoints, now, stale=stale, fetched_at=fetched_at))

    def on_remove(self, service: str, now: float) -> None:
        self.rt.dispatch(self.rt.engine.remove_service(service, now))

    def on_unknown(self, service: str) -> None:
        """Consul does not know `service`: wake whoever waits for it (Runtime.await_source
        then answers UNKNOWN_SERVICE at once)."""
        self.rt.wake(service)

    def on_status(self, status: ConsulStatus) -> None:
        detail = f" ({status.detail})" if status.detail else ""
        self.rt.source_status = f"consul {self._address}: {status.state}{detail}"
        self.rt.source_state = status.state

    # ------------------------------------------------------------------ the agent's source API

    def request_reload(self) -> None:
        self.source.reconfigure(self.rt.config)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        now = trio.current_time()
        loaded = catalog_snapshot.load(self.snapshot_path, now, time.time())
        # An empty set is not worth serving, and older snapshots saved every made-up name
        # a caller tried as one: restoring them would fill consul.max_on_demand again.
        loaded = {n: v for n, v in loaded.items() if v[0]}
        for name, (endpoints, fetched_at) in loaded.items():
            self.source.seed(name, endpoints, fetched_at, now)
        if loaded:
            log.info("consul: loaded %d services from snapshot %s (stale until Consul confirms)",
                     len(loaded), self.snapshot_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.source.run)
            await nursery.start(partial(catalog_snapshot.run_snapshot_writer, self.source,
                                        self.snapshot_path))
            timeout = self.rt.config.consul.first_answer_timeout
            with trio.move_on_after(timeout):
                for name in self.rt.config.services:
                    await self.source.wait_ready(name, timeout)
                    if name in self.rt.engine.set_builds:  # a big first set, applied in steps
                        await self.rt.wait_for_service(name, timeout)
            self.rt.catalog_ready.set()
            task_status.started()
