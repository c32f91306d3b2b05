"""The agent's shared state: the Engine plus what the trio tasks need around it.

Every engine input returns what changed (`Changes`); `Runtime.dispatch` is the one place
those changes fan out: watch streams and on-demand waiters wake, health changes are logged,
and the listeners other shell modules registered (the prober re-syncing its targets) run.
`Runtime.pick` is the one place a front end waits for an on-demand catalog source.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection

import trio

if TYPE_CHECKING:
    from .lot import Lot
    from .turns import Turns

from softlb import (AgentConfig, Changes, EndpointHealth, EndpointSetBuild, Engine, ErrorCode, LeaseScope, Pending, Pick,
                    PickError)


@dataclass
class Stats:
    """Counters for the admin API and metrics; plain ints bumped on the hot path."""

    requests: int = 0
    busy_poll_hits: int = 0  # a spin after answering found the next request
    busy_poll_misses: int = 0  # a spin ran out and the reader parked in epoll
    connections_open: int = 0
    #: The admin port's connections, apart: they are operators and scrapers, not callers.
    admin_connections_open: int = 0
    admin_connections_total: int = 0
    #: The DNS front end's TCP connections (agent/dns.py), apart too.
    dns_connections_open: int = 0
    dns_connections_total: int = 0
    connections_total: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    catalog_reloads: int = 0
    catalog_errors: int = 0
    config_reload_errors: int = 0
    config_reloads: int = 0
    last_catalog_error: str = ""
    #: Why the last config reload was refused ("" when it applied, or none happened).
    last_config_error: str = ""
    #: The last reload attempt of either kind: (wall time, "config"/"catalog", error or "").
    last_reload: tuple[float, str, str] | None = None
    started: float = 0.0
    # -- isolation: a bound was hit (docs/RELIABILITY.md)
    connections_refused: collections.Counter[str] = field(default_factory=collections.Counter)  # by reason
    connections_idle_closed: int = 0
    accept_capacity_errors: int = 0  # accept() failed with EMFILE/ENFILE/ENOBUFS/ENOMEM
    turns_yielded: int = 0  # a connection used its turn and yielded with requests still buffered
    watches_refused: int = 0
    deferred_refused: int = 0
    catalog_refused: int = 0  # a catalog file of the wrong type or size
    table_builds: int = 0  # consistent-hash tables rebuilt in steps off the engine call
    table_builds_superseded: int = 0
    set_builds: int = 0  # big endpoint sets applied in steps (agent/table_builds.py)
    set_builds_superseded: int = 0
    probe_local_failures: int = 0  # probes not run for the agent's own lack of fds/memory
    gc_full_collections: int = 0  # agent/gc_pauses.py: timed full collections
    gc_full_seconds_max: float = 0.0
    gc_full_skipped: int = 0  # timer ticks that found too little growth to collect
    started_wall: float = 0.0
    #: DNS front end: "udp:NOERROR", "tcp:NXDOMAIN", "udp:dropped", "tcp:refused"...
    dns: collections.Counter[str] = field(default_factory=collections.Counter)


health_log = logging.getLogger("softlb.health")
vip_log = logging.getLogger("softlb.vip")
catalog_log = logging.getLogger("softlb.catalog")
#: Above this many endpoints joining and leaving at once, one summary line is logged.
MAX_MEMBERSHIP_LINES = 20

#: `softlb status` shows errors answered over about this many seconds.
RECENT_WINDOW = 300.0
SAMPLE_EVERY = 10.0


def _why(r: EndpointHealth) -> str:
    if r.registry.value not in ("passing", "warning"):
        return f"registry: {r.registry.value}"
    if r.ejected:
        return f"ejected by outlier detection for {r.ejected_remaining or 0:.0f}s (ejection #{r.ejections})"
    if r.probe is not None and r.probe.value == "down":
        return f"probe down: {r.last_probe_detail}"
    return "unhealthy"


class Runtime:
    def __init__(self, config: AgentConfig, config_path: str | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # Consistent-hash rebuilds run in steps in agent/table_builds.py, not inside the
        # engine call that caused them (issue 10, item 9).
        self.engine = Engine(config, rng or random.Random(), on_demand=config.source == "consul", defer_builds=True)
        #: Set when the engine has table builds waiting (agent/table_builds.py).
        self.builds_waiting = trio.Event()
        #: Big endpoint sets a source handed over to be applied in steps (`apply_soon`).
        self.set_build_queue: list[EndpointSetBuild] = []
        self.stats = Stats(started=trio.current_time(), started_wall=time.time())
        #: `now` when the catalog source last confirmed the data it serves (the file
        #: source: the last poll that found the file unchanged or loaded it).
        self.source_confirmed_at: float | None = None
        self._error_history: collections.deque[tuple[float, int]] = collections.deque()
        self._events: dict[str, trio.Event] = {}
        #: Shell modules that follow changes (the prober), called by `dispatch`.
        self.change_listeners: list[Callable[[str], None]] = []
        #: Asks the catalog source to fetch a service it was not watching (Consul's on-demand
        #: watches); raises PickError when it refuses the name. None: nothing is on demand.
        self.fetch: Callable[[str], None] | None = None
        #: True once the catalog source has decided it will not have `name` (Consul said it
        #: does not know it): a wait for it then ends at once, not at first_answer_timeout.
        self.source_gave_up: Callable[[str], bool] | None = None
        #: Open `watch` streams per service (kept by the IPC server): a watched service is in
        #: use even when nobody picks it, so on-demand sources must not idle it out.
        self.watchers: collections.Counter[str] = collections.Counter()
        #: Set once the first catalog has been loaded (readiness).
        self.catalog_ready = trio.Event()
        #: Per service, as last logged: (endpoint ids, eligible ids, panic).
        self._health_seen: dict[str, tuple[frozenset[str], frozenset[str], bool]] = {}
        #: A human line about the catalog source ("file examples/catalog.toml (fresh)").
        self.source_status = "starting"
        #: The source's state word: "ok" while it answers; "starting", "error" (file
        #: unreadable or invalid), or Consul's "degraded"/"acl_denied" otherwise.
        self.source_state = "starting"
        #: The loopback proxy's counters (agent/proxy/figures.py), set when it starts.
        self.proxy_figures: Any = None
        #: Round-robin turns between peers (agent/turns.py), set when the agent runs them.
        self.turns: Turns | None = None
        #: Where idle IPC connections wait, woken by turns (agent/lot.py); with `turns`.
        self.lot: Lot | None = None

    def dispatch(self, changes: Changes) -> None:
        if self.engine.table_builds:
            self.builds_waiting.set()
        for name in changes:
            ev = self._events.pop(name, None)
            if ev is not None:
                ev.set()
            self._log_health(name)
            for listener in self.change_listeners:
                listener(name)
        self._log_vip_collisions()

    def apply_soon(self, update: EndpointSetBuild | Changes) -> None:
        """What `engine.begin_set_service` returned, from a caller that cannot wait: changes
        are dispatched now; a build is run in steps by agent/table_builds.py."""
        if isinstance(update, EndpointSetBuild):
            self.set_build_queue.append(update)
            self.builds_waiting.set()
        else:
            self.dispatch(update)

    def _log_vip_collisions(self) -> None:
        collisions = self.engine.vips.collisions
        for service, skipped, assigned in collisions:
            if not assigned:
                vip_log.error("%s: no free address in agent.vip_pool after %d tries; the service has no VIP", service, skipped)
            else:
                vip_log.warning("%s: its pool VIP collided with another service's; took candidate #%d "
                                "(set services.%s.vip to pin it)", service, skipped, service)
        collisions.clear()

    def flush(self) -> None:
        """Dispatch changes picks made on their own (an ejection timer run by a pick)."""
        changes = self.engine.take_changes()
        if changes:
            self.dispatch(changes)

    async def pick(self, service: str, *, key: str | None = None, tags: tuple[str, ...] = (),
                   source: str | None = None, scope: LeaseScope = LeaseScope.REQUEST) -> Pick:
        """A pick through the typed core API, waiting (bounded) for an on-demand source to
        fetch a service it did not have. Raises PickError."""
        r = self.engine.pick(service, trio.current_time(), key=key, tags=tags, source=source, scope=scope)
        if type(r) is Pending:
            await self.await_source(service)
            r = self.engine.pick(service, trio.current_time(), key=key, tags=tags, source=source, scope=scope)
            if type(r) is Pending:
                raise PickError(ErrorCode.UNAVAILABLE, f"no answer for \"{service}\" from the catalog source yet")
        self.flush()
        return r  # type: ignore[return-value]

    async def await_source(self, service: str) -> bool:
        """Ask the source for `service` and wait, bounded by `first_answer_timeout`, until it
        exists. Raises PickError when the source refuses the name. The one place every front
        end waits for a catalog source."""
        if service in self.engine.services:
            return True
        if self.fetch is None:  # nothing is fetched on demand: unknown is unknown
            return False
        self.fetch(service)
        found = await self.wait_for_service(service)
        if not found and self.source_gave_up is not None and self.source_gave_up(service):
            self.fetch(service)  # the source now refuses it: raises PickError (UNKNOWN_SERVICE)
        return found

    def finish(self, lease: int, *, ok: bool = True, latency: float | None = None) -> None:
        """End a lease with a verdict. Raises PickError(UNKNOWN_LEASE)."""
        self.dispatch(self.engine.finish(lease, trio.current_time(), ok=ok, latency=latency))

    def release(self, lease: int) -> None:
        """End a lease with no verdict (the connection or request it counted went away)."""
        self.engine.release(lease, trio.current_time())

    def _log_health(self, name: str) -> None:
        """One log line per state change, with the reason: an endpoint joining or leaving,
        one that stops or starts being eligible, panic starting or ending. What an operator
        greps for after an incident; never a line per request."""
        b = self.engine.services.get(name)
        before = self._health_seen.pop(name, None)
        if b is None:
            if before is not None:
                catalog_log.info("%s: service removed", name, extra={"service": name, "event": "removed"})
            return
        # Ids only (no row per endpoint): this runs on every change of a service of any size.
        now = trio.current_time()
        ids = b.health.ids()
        eligible = frozenset(e.id for e in b.health.eligible(now))
        self._health_seen[name] = (ids, eligible, b.panic)
        if before is None:
            return
        known, was_eligible, was_panic = before
        self._log_membership(name, known, ids)
        lost = sorted((was_eligible - eligible) & ids)
        rows = b.health.rows(lost, now)
        whys = {w.id: w for w in b.explain(now)} if lost else {}
        for eid in lost:
            why = whys[eid].detail if eid in whys else _why(rows[eid])
            health_log.warning("%s: endpoint %s is no longer eligible (%s)", name, eid, _why(rows[eid]),
                               extra={"service": name, "endpoint": eid, "reason": why, "event": "ineligible"})
        for eid in sorted((eligible - was_eligible) & known):
            health_log.info("%s: endpoint %s is eligible again", name, eid,
                            extra={"service": name, "endpoint": eid, "event": "eligible"})
        if b.panic and not was_panic:
            health_log.warning("%s: panic: %d of %d endpoints eligible, below %d%%: balancing over all of them",
                               name, len(eligible), len(ids), b.config.panic_threshold,
                               extra={"service": name, "event": "panic", "reason": "too few eligible endpoints"})
        elif was_panic and not b.panic:
            health_log.info("%s: panic over: %d of %d endpoints eligible", name, len(eligible), len(ids),
                            extra={"service": name, "event": "panic_over"})

    def _log_membership(self, name: str, known: frozenset[str], now_ids: Collection[str]) -> None:
        """A line per endpoint joining or leaving the service (past its tag filter); a big
        catalog change gets one summary line instead of thousands."""
        joined = sorted(set(now_ids) - known)
        left = sorted(known - set(now_ids))
        if len(joined) + len(left) > MAX_MEMBERSHIP_LINES:
            catalog_log.info("%s: %d endpoints joined, %d left", name, len(joined), len(left),
                             extra={"service": name, "event": "membership"})
            return
        for eid in joined:
            catalog_log.info("%s: endpoint %s joined", name, eid, extra={"service": name, "endpoint": eid,
                                                                        "event": "joined"})
        for eid in left:
            catalog_log.info("%s: endpoint %s left", name, eid, extra={"service": name, "endpoint": eid,
                                                                      "event": "left"})

    def wake(self, name: str) -> None:
        """Wake whoever waits for `name` to change (a source that gave up on it)."""
        ev = self._events.pop(name, None)
        if ev is not None:
            ev.set()

    def change_event(self, name: str) -> trio.Event:
        """An event set at the next change of `name` (get it before reading the state)."""
        ev = self._events.get(name)
        if ev is None:
            ev = self._events[name] = trio.Event()
        return ev

    async def wait_for_service(self, name: str, timeout: float | None = None) -> bool:
        """Wait (bounded) until `name` exists in the engine; True if it does."""
        if timeout is None:
            timeout = self.config.consul.first_answer_timeout
        try:
            with trio.move_on_after(timeout):
                while name not in self.engine.services:
                    if self.source_gave_up is not None and self.source_gave_up(name):
                        break
                    await self.change_event(name).wait()
        finally:  # timed out, or the caller went away (its connection closed)
            self._forget_event(name)
        return name in self.engine.services

    def _forget_event(self, name: str) -> None:
        """Drop `name`'s event if nobody waits on it any more. Without this every distinct
        unknown name resolved while the source cannot answer (Consul down) leaves an event
        behind for good. It is set as it goes: a task that fetched it but is not waiting
        yet (a watch stream between `change_event` and `wait`) wakes and looks again,
        instead of waiting on an event nothing would ever set."""
        ev = self._events.get(name)
        if ev is not None and ev.statistics().tasks_waiting == 0:
            del self._events[name]
            ev.set()

    def now(self) -> float:
        return trio.current_time()

    def sample(self, now: float) -> None:
        """Called by the timer task: keep error totals every SAMPLE_EVERY seconds for the
        last RECENT_WINDOW, so status can say how many errors happened lately."""
        hist = self._error_history
        if hist and now - hist[-1][0] < SAMPLE_EVERY:
            return
        hist.append((now, self._error_total()))
        while len(hist) > 1 and now - hist[1][0] >= RECENT_WINDOW:
            hist.popleft()

    def _error_total(self) -> int:
        return sum(self.stats.errors.values())

    def recent_errors(self) -> dict[str, float]:
        """Error answers in (about) the last RECENT_WINDOW seconds."""
        now = self.now()
        hist = self._error_history
        since, base = hist[0] if hist else (self.stats.started, 0)
        return {"count": self._error_total() - base, "seconds": round(now - since, 1)}

    def note_reload(self, what: str, error: str) -> None:
        """Record a config or catalog (re)load's result for status, readyz and metrics."""
        self.stats.last_reload = (time.time(), what, error)
        if what == "config":
            self.stats.last_config_error = error

    def reload_problem(self) -> str:
        """Why the agent is not serving what its files say ("" if it is)."""
        s = self.stats
        problems = []
        if s.last_config_error:
            problems.append(f"config reload refused: {s.last_config_error}")
        if s.last_catalog_error:
            problems.append(f"catalog reload refused: {s.last_catalog_error}")
        return "; ".join(problems)

    def source_up(self) -> bool:
        return self.source_state == "ok"
