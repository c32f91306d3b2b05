"""The Consul catalog source: blocking-query watches per service, a poller for the overflow.

How it runs (docs/CONSUL.md has the long form):

* `WatchPlanner` (softlb._watchplan) decides which services are watched and which of them
  get a blocking query (at most `max_watches`); the rest are refreshed by one poller with
  non-blocking `?cached` queries.
* Each blocking watch loops on `/v1/health/service/<name>?index=N&wait=W` and applies
  Consul's rules through the pure helpers in softlb._consul: same index = no change, index
  backwards = reset to 0, missing/0 = 1, identical endpoint sets are not re-published,
  queries are spaced at least `min_query_interval` apart (plus jitter) however fast Consul
  answers, and errors back off exponentially with jitter (softlb._backoff).
* A failing service keeps its last good endpoints, re-published once as stale with the
  time of the last good answer; the first good answer clears it. Failures are logged once
  per change of the source's state (ok / degraded / acl_denied), not per retry. That holds
  for any exception while handling one service's answer, not just the expected Consul and
  data errors: an unexpected one is logged with its traceback (once per change) and handled
  like bad data, so one service's answer can never end the agent.
* A query's answer (or failure) that arrives after its service stopped being watched is
  dropped: publishing it would bring back a service nobody watches, frozen as "fresh".
* Callers cannot make the source watch names that are not Consul service names, nor more
  than `consul.max_on_demand` services on demand: `want` raises `WatchRefused`.
* Results go out through `CatalogListener`, so this module knows nothing of the Engine.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import trio

from softlb import Backoff, RetryPolicy
from softlb import AgentConfig
from softlb import (
    CheckFeed,
    ConsulDataError,
    EmptySetGuard,
    MappingOptions,
    acl_filtered_message,
    answer_freshness,
    catalog_service_names,
    decode_health_body,
    decode_json_body,
    endpoints_from_health,
    feed_filter,
    index_changed,
    next_index,
    parse_index,
    service_name_problem,
)
from softlb import Endpoint
from softlb import (
    DEFAULT_MAX_POLL_RATE,
    DEFAULT_POLL_PERIOD,
    NegativeCache,
    OnDemandLimitError,
    PlanChange,
    TokenBucket,
    WatchPlanner,
)

from .consul_http import (
    SPARE_CONNECTIONS,
    ConsulACLFiltered,
    ConsulAnswer,
    ConsulClient,
    ConsulError,
    ConsulHTTPError,
    consul_settings,
)

log = logging.getLogger("softlb.consul")

#: Up to this fraction of `min_query_interval` is added at random to each spacing, so
#: watches woken by one Consul write do not query again in lockstep.
SPACING_JITTER = 0.2
#: [consul] settings read once at start (client, planner). `wait`, `min_query_interval`
#: and `tagged_address` apply on reload; `keep_previous_on_empty` to newly watched services.
RESTART_ONLY = ("address", "datacenter", "token", "ca_file", "stale", "max_stale", "max_watches",
                "idle_timeout", "max_on_demand", "negative_ttl", "max_body", "max_fetch_rate",
                "change_feed", "startup_spread")
#: While the change feed is healthy, polled services are also re-read this often (a
#: safety net for what the feed cannot see), at most SAFETY_POLL_RATE requests a second.
SAFETY_POLL_PERIOD = 600.0
SAFETY_POLL_RATE = 1.0
#: The feed's answers list every check in the datacenter: never more often than this.
FEED_MIN_INTERVAL = 0.25
#: The catalog feed's blocking query must have been waiting this long (no registration
#: since) before a name missing from its list is refused without asking Consul.
CATALOG_SETTLE = 0.5
#: A feed-triggered fetch answered below the feed's index (a lagging follower) is retried
#: this many times.
FEED_FETCH_RETRIES = 3
#: The failure kind of an exception nobody expected while handling a service's answer.
INTERNAL_ERROR = "internal error"


class WatchRefused(Exception):
    """`want` will not watch this service. `retryable`: it may be watched later (the on-demand
    limit, once other services idle out); otherwise the name itself is unusable. `unknown`:
    Consul said recently that it has no such service (the negative cache)."""

    def __init__(self, message: str, *, retryable: bool, unknown: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.unknown = unknown


class CatalogListener(Protocol):
    """Where the source publishes. agent/consul_catalog.py wires these to the Engine
    (`set_service`, `remove_service`) and the agent's status line."""

    def on_update(self, service: str, endpoints: tuple[Endpoint, ...], now: float, *,
                  stale: bool, fetched_at: float | None) -> None:
        """A service's full endpoint set. `stale`: Consul could not confirm it recently;
        `fetched_at`: (monotonic) time of the last good answer it came from."""

    def on_remove(self, service: str, now: float) -> None:
        """The service is no longer watched (idle on-demand service)."""

    def on_status(self, status: ConsulStatus) -> None:
        """The source's overall state changed (called once per change, not per retry)."""


@dataclass(frozen=True)
class ConsulStatus:
    state: str  # "starting", "ok", "degraded" (some queries failing), "acl_denied"
    detail: str = ""
    since: float = 0.0
    failing: int = 0  # services whose latest query failed


class _ServiceState:
    """What the source knows about one watched service."""

    def __init__(self, name: str, hold: float, backoff: Backoff) -> None:
        self.name = name
        self.index = 0
        self.fresh: tuple[Endpoint, ...] = ()  # Consul's latest answer, mapped
        self.published: tuple[Endpoint, ...] | None = None
        self.stale = False
        self.fetched_at: float | None = None
        self.have_data = False  # Consul answered at least once (a snapshot seed does not count)
        self.guard = EmptySetGuard(hold)
        self.hold_until: float | None = None
        self.backoff = backoff
        self.answered = trio.Event()  # the first query finished, well or badly


class _StatusTracker:
    """Aggregates per-service failures into one source state; logs when it changes."""

    def __init__(self, listener: CatalogListener) -> None:
        self.listener = listener
        self.failing: dict[str, tuple[str, str]] = {}
        self.status = ConsulStatus("starting")
        self._key: tuple[str, str] = ("starting", "")

    def failed(self, service: str, err: Exception, now: float) -> None:
        if isinstance(err, ConsulError):
            kind = err.kind
        elif isinstance(err, ConsulDataError):
            kind = "bad data"
        else:
            kind = INTERNAL_ERROR
        prev = self.failing.get(service)
        self.failing[service] = (kind, str(err) or type(err).__name__)
        if prev is None or prev[0] != kind:
            if kind == INTERNAL_ERROR:
                # A bug, or data our checks missed: worth a traceback, but once per change.
                log.error("consul: %s: unexpected %s while handling Consul's answer; serving the "
                          "last known endpoints, marked stale, and retrying with backoff",
                          service, type(err).__name__, exc_info=err)
            else:
                log.debug("consul: %s: %s", service, err)
        self._update(now)

    def ok(self, service: str, now: float) -> None:
        if self.failing.pop(service, None) is not None:
            log.debug("consul: %s: answering again", service)
        self._update(now)

    def _update(self, now: float) -> None:
        if not self.failing:
            state, kind, detail = "ok", "", ""
        else:
            kinds = Counter(k for k, _ in self.failing.values())
            kind = "acl denied" if "acl denied" in kinds else kinds.most_common(1)[0][0]
            state = "acl_denied" if kind == "acl denied" else "degraded"
            example = next((s, d) for s, (k, d) in self.failing.items() if k == kind)
            detail = f"{kind}: {example[1]} (service {example[0]})"
        since = self.status.since if (state, kind) == self._key else now
        self.status = ConsulStatus(state, detail, since, len(self.failing))
        if (state, kind) == self._key:
            return
        previous, self._key = self._key, (state, kind)
        if state == "ok":
            if previous[0] != "starting":
                log.info("consul: all watches answering again")
        elif state == "acl_denied":
            log.error("consul: the ACL token was refused (%s). Set consul.token, CONSUL_HTTP_TOKEN "
                      "or CONSUL_HTTP_TOKEN_FILE to a token with service:read and node:read; "
                      "serving the last known endpoints meanwhile", detail)
        else:
            log.warning("consul: queries failing (%s); serving the last known endpoints, marked "
                        "stale, and retrying with backoff", detail)
        self.listener.on_status(self.status)


class ConsulSource:
    """Watches Consul for the services the agent needs and publishes their endpoints."""

    def __init__(
        self,
        config: AgentConfig,
        listener: CatalogListener,
        *,
        rng: random.Random,
        client: ConsulClient | None = None,
        retry: RetryPolicy = RetryPolicy(),
        poll_period: float = DEFAULT_POLL_PERIOD,
        max_poll_rate: float = DEFAULT_MAX_POLL_RATE,
    ) -> None:
        self._config = config
        self._listener = listener
        self._poll_period, self._max_poll_rate = poll_period, max_poll_rate
        self._rng = rng
        self._client = client
        self._own_client = client is None
        self._retry = retry
        c = config.consul
        self.planner = WatchPlanner(max_watches=c.max_watches, idle_timeout=c.idle_timeout,
                                    poll_period=poll_period, max_poll_rate=max_poll_rate,
                                    max_on_demand=c.max_on_demand)
        self.planner.configure(config.services, 0.0)
        self._states: dict[str, _ServiceState] = {}
        for name in self.planner.wanted:
            self._state(name)
        self._scopes: dict[str, trio.CancelScope] = {}
        self._urgent: deque[str] = deque()
        self._wakeup = trio.Event()
        self._poll_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._tracker = _StatusTracker(listener)
        self._negative = NegativeCache(c.negative_ttl)
        self._fetch_bucket = TokenBucket(c.max_fetch_rate, c.max_fetch_rate)
        self._urgent_set: set[str] = set()
        #: feed-triggered fetches: the index the answer must reach, and retries left
        self._feed_min: dict[str, tuple[int, int]] = {}
        self._feed = CheckFeed()
        self._catalog_names: frozenset[str] | None = None
        self._feed_wakeup = trio.Event()
        self._feed_scopes: dict[str, trio.CancelScope] = {}
        self._inflight: dict[str, bool] = {}
        self._quiet_since: dict[str, float] = {}
        self._urgent_wake_at: float | None = None
        #: Consul request counters by kind (for /metrics and the benchmark).
        self.requests: Counter[str] = Counter()
        #: When set, `last_used(service)` is the last time a caller used it (the agent reads
        #: it from the engine so that resolves need not call into the source each time).
        self.last_used: Callable[[str], float | None] | None = None
        #: Bumped on every publish, so the snapshot writer knows when to save.
        self.version = 0

    # ------------------------------------------------------------------ public API

    @property
    def status(self) -> ConsulStatus:
        return self._tracker.status

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._client is None:
            self._client = ConsulClient(
                consul_settings(self._config.consul),
                max_connections=self._config.consul.max_watches + SPARE_CONNECTIONS)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # Spread the first queries over startup_spread: an agent fleet restarted
                # together must not hit Consul with every watch in the same instant.
                spread = self._config.consul.startup_spread
                for name in self.planner.blocking:
                    nursery.start_soon(self._run_watch, name, self._rng.uniform(0, spread))
                for name in self.planner.polled:
                    if not self._states[name].have_data:
                        self._urge(name)
                nursery.start_soon(self._run_poller)
                feed = self._config.consul.change_feed
                if feed != "off":
                    nursery.start_soon(self._run_feed)
                if feed == "catalog_health":
                    nursery.start_soon(self._run_catalog)
                task_status.started()
                await self._supervise()
        finally:
            self._nursery = None
            if self._own_client:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()

    def want(self, service: str) -> None:
        """A caller resolved `service`: watch it if new, and keep it from going idle.

        Raises WatchRefused for a name that is not a Consul service name, and for a new
        service past `consul.max_on_demand`; nothing is watched then.
        """
        now = trio.current_time()
        provisional = False
        if not self.planner.is_wanted(service):
            problem = service_name_problem(service)
            if problem:
                raise WatchRefused(problem, retryable=False)
            if self._negative.hit(service, now):
                raise WatchRefused(
                    f"Consul does not know service \"{service[:100]}\" (asked less than "
                    f"{self._config.consul.negative_ttl:g}s ago; consul.negative_ttl)",
                    retryable=True, unknown=True)
            known = self._known(service)
            if known is False:
                # The full catalog is known and lacks it: no need to ask Consul. Not cached
                # either: the list itself is the cache, and a service registered a moment ago
                # is served as soon as the feed's next answer lists it (milliseconds), not
                # after negative_ttl.
                self._negative.refused += 1
                raise WatchRefused(f"Consul does not know service \"{service[:100]}\"",
                                   retryable=True, unknown=True)
            provisional = known is None
        try:
            self._apply(self.planner.touch(service, now, provisional=provisional), now)
        except OnDemandLimitError as e:
            raise WatchRefused(str(e), retryable=True) from None

    def _known(self, service: str) -> bool | None:
        """Does Consul have `service`? True/False when a feed says; None: ask Consul.

        The catalog feed's "no" is only trusted once its blocking query has been waiting for
        CATALOG_SETTLE: a service registered a moment ago may not be in the list we hold yet
        (the feed is between answers), and must not be refused for negative_ttl."""
        if self._catalog_names is not None:
            if service in self._catalog_names:
                return True
            # Trusted while a blocking query is waiting (nothing changed since it was sent)
            # and the list last changed CATALOG_SETTLE ago or more.
            quiet = self._quiet_since.get("catalog")
            if self._inflight.get("catalog") and quiet is not None and \
                    trio.current_time() - quiet >= CATALOG_SETTLE:
                return False
            return None
        if self._feed.primed and service in self._feed.names:
            return True
        return None  # the check feed does not list services without checks: ask

    @property
    def negative(self) -> NegativeCache:
        return self._negative

    async def wait_ready(self, service: str, timeout: float) -> bool:
        """`want(service)`, then wait (bounded) for its first Consul answer if nothing is
        known yet. True if endpoints (possibly stale) are now published."""
        self.want(service)
        st = self._states.get(service)
        if st is None:
            return False
        if st.published is None:
            with trio.move_on_after(timeout):
                await st.answered.wait()
        return st.published is not None

    def seed(self, service: str, endpoints: Sequence[Endpoint], fetched_at: float, now: float) -> None:
        """Serve a set from the persisted snapshot, stale, until Consul answers."""
        try:
            self._apply(self.planner.touch(service, now), now)
        except OnDemandLimitError as e:
            log.warning("consul: snapshot service %s not restored: %s", service, e)
            return
        self._negative.discard(service)
        st = self._state(service)
        if st.have_data:
            return
        eps = tuple(endpoints)
        st.fresh, st.fetched_at = eps, fetched_at
        st.guard.seed(eps)
        self._publish(st, eps, True, now)

    def reconfigure(self, config: AgentConfig) -> None:
        """New services/tags. Changes to the [consul] table itself need a new source."""
        # A change of tags, only_passing or any query option (filter, node_meta, ...) must
        # fetch afresh, not wait out a blocking query made with the old ones.
        old = {s: (self._mapping(s), self._config.consul.query_for(s)) for s in self._states}
        if any(getattr(config.consul, k) != getattr(self._config.consul, k) for k in RESTART_ONLY):
            log.warning("consul: changes to the [consul] connection settings or watch limits "
                        "take effect at the next agent restart")
        self._config = config
        now = trio.current_time()
        self._apply(self.planner.configure(config.services, now), now)
        for name, st in self._states.items():
            if name in old and (self._mapping(name), self._config.consul.query_for(name)) != old[name]:
                st.index = 0  # forces a fresh, fully mapped answer
                self._restart(name)

    def published(self) -> dict[str, tuple[tuple[Endpoint, ...], float | None]]:
        """Current sets and their fetch times, for the snapshot."""
        return {n: (st.published, st.fetched_at) for n, st in self._states.items()
                if st.published is not None}

    # ------------------------------------------------------------------ planning

    def _state(self, name: str) -> _ServiceState:
        st = self._states.get(name)
        if st is None:
            st = self._states[name] = _ServiceState(
                name, self._config.consul.keep_previous_on_empty, Backoff(self._retry, self._rng))
        return st

    def _mapping(self, service: str) -> MappingOptions:
        query = self._config.consul.query_for(service)
        return MappingOptions(tags=self._config.service(service).tags,
                              tagged_address=self._config.consul.tagged_address,
                              only_passing=query.only_passing, ranked=bool(query.near))

    def _apply(self, change: PlanChange, now: float) -> None:
        if not change:
            return
        for name in change.added:
            self._state(name)
        for name in change.removed:
            st = self._states.pop(name, None)
            self._feed_min.pop(name, None)
            self._tracker.ok(name, now)
            if st is not None and st.published is not None:
                self._listener.on_remove(name, now)
        for name in change.stop_blocking:
            scope = self._scopes.pop(name, None)
            if scope is not None:
                scope.cancel()
        polled = set(self.planner.polled)
        for name in change.added + change.stop_blocking:
            if name in polled and not self._states[name].have_data:
                self._urge(name)
        if self._nursery is not None:
            for name in change.start_blocking:
                self._nursery.start_soon(self._run_watch, name)
        self._poll_wakeup.set()
        self._feed_wakeup.set()
        self._wakeup.set()
        if (change.added or change.removed or change.start_blocking) and \
                self._config.consul.change_feed == "catalog_health":
            scope = self._feed_scopes.get("feed")
            if scope is not None:
                scope.cancel()  # the feed's filter names the polled services: re-ask

    def _urge(self, name: str) -> None:
        """Fetch polled service `name` ahead of its round-robin turn (within the fetch rate)."""
        if name not in self._urgent_set:
            self._urgent_set.add(name)
            self._urgent.append(name)
            self._poll_wakeup.set()

    def _restart(self, name: str) -> None:
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
            if self._nursery is not None:
                self._nursery.start_soon(self._run_watch, name)
        elif name in self.planner.polled:
            self._urge(name)

    async def _supervise(self) -> None:
        while True:
            now = trio.current_time()
            if self.last_used is not None:
                for name in self.planner.on_demand:
                    used = self.last_used(name)
                    if used is not None:
                        self.planner.touch(name, used)
            self._apply(self.planner.expire(now), now)
            self._wakeup = trio.Event()
            deadline = self.planner.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wakeup.wait()

    # ------------------------------------------------------------------ queries

    def _spacing(self) -> float:
        m = self._config.consul.min_query_interval
        return m * (1 + SPACING_JITTER * self._rng.random())

    async def _run_watch(self, name: str, delay: float = 0.0) -> None:
        with trio.CancelScope() as scope:
            self._scopes[name] = scope
            try:
                await trio.sleep(delay)
                await self._watch_loop(name)
            finally:
                if self._scopes.get(name) is scope:
                    del self._scopes[name]

    def _current(self, st: _ServiceState) -> bool:
        """False once `st`'s service stopped being watched (it may be watched again since,
        with a new state): an answer to a query made for `st` then belongs to nobody."""
        return self._states.get(st.name) is st

    async def _watch_loop(self, name: str) -> None:
        assert self._client is not None
        st = self._states.get(name)
        while st is not None and self._current(st):
            started = trio.current_time()
            wait = self._config.consul.wait
            if st.hold_until is not None:
                # Wake when the empty-set hold ends, to publish the empty set then.
                wait = max(1.0, min(wait, st.hold_until - started))
            try:
                self.requests["watch"] += 1
                ans = await self._client.health_service(name, index=st.index, wait=wait,
                                                        query=self._config.consul.query_for(name))
                if not self._current(st):
                    return
                self._accept(st, ans)
            except Exception as e:  # ConsulError, ConsulDataError, and the last resort: anything
                if not self._current(st):
                    return
                await trio.sleep(self._failed(st, e))
                continue
            await trio.sleep_until(started + self._spacing())

    async def _run_poller(self) -> None:
        assert self._client is not None
        backoff = Backoff(self._retry, self._rng)
        while True:
            name = self._next_poll(trio.current_time())
            if name is None:
                self._poll_wakeup = trio.Event()
                at = self.planner.next_poll_at
                at = math.inf if at is None else at
                if self._urgent_wake_at is not None:
                    at = min(at, self._urgent_wake_at)
                with trio.move_on_at(at):
                    await self._poll_wakeup.wait()
                continue
            st = self._states[name]
            urgent = name in self._urgent_set
            self._urgent_set.discard(name)
            from_feed = name in self._feed_min
            try:
                # A fetch the feed asked for goes past the agent cache, which may not have
                # caught up yet; first fetches and round-robin refreshes use the cache.
                self.requests["fetch" if urgent else "poll"] += 1
                ans = await self._client.health_service(name, cached=not from_feed,
                                                        query=self._config.consul.query_for(name))
                backoff.success()
                if self._current(st):
                    self._accept(st, ans)
                    self._check_feed_index(name, ans)
            except ConsulError as e:
                if self._current(st):
                    self._failed(st, e)
                # Consul itself is failing: slow the whole poller down, not just this service.
                await trio.sleep(max(backoff.failure(), getattr(e, "retry_after", None) or 0.0))
            except Exception as e:  # ConsulDataError, and the last resort: anything
                # One service's bad answer must not slow the others; it is retried at its
                # next turn, which is the poller's backoff for it.
                if self._current(st):
                    self._failed(st, e)

    def _next_poll(self, now: float) -> str | None:
        polled = set(self.planner.polled) if self._urgent else ()
        while self._urgent:
            delay = self._fetch_bucket.delay(now)
            if delay > 0:
                # First fetches and feed-triggered fetches share one rate cap: an agent
                # restarted with 1,000 services must not send 1,000 queries at once.
                self._urgent_wake_at = now + delay
                return self.planner.poll_due(now)
            name = self._urgent[0]
            if name in polled and name in self._states:
                self._fetch_bucket.take(now)
                self._urgent.popleft()
                return name
            self._urgent.popleft()
            self._urgent_set.discard(name)
        self._urgent_wake_at = None
        return self.planner.poll_due(now)

    def _check_feed_index(self, name: str, ans: ConsulAnswer) -> None:
        """A feed-triggered fetch answered from before the change (a follower that lags the
        one that served the feed) is fetched again, a few times at most."""
        want = self._feed_min.pop(name, None)
        if want is None:
            return
        got = parse_index(ans.index) or 0
        if got < want[0] and want[1] > 0 and name in self.planner.polled:
            self._feed_min[name] = (want[0], want[1] - 1)
            self._urge(name)

    # ------------------------------------------------------------------ results

    def _accept(self, st: _ServiceState, ans: ConsulAnswer) -> None:
        now = trio.current_time()
        meta = ans.meta
        if meta.filtered_by_acls:
            # A partial answer (often `[]`): never taken for the service's instances.
            raise ConsulACLFiltered(acl_filtered_message(st.name))
        new_index = next_index(st.index, ans.index)
        if index_changed(st.index, new_index) or not st.have_data:
            entries = decode_health_body(ans.body)
            st.fresh = endpoints_from_health(entries, self._mapping(st.name))
            if self.planner.is_provisional(st.name):
                if not entries and st.name not in self._feed.names:
                    self._unknown(st, now)
                    return
                self.planner.confirm(st.name)
        fresh = answer_freshness(meta, self._config.consul.max_stale)
        if fresh.stale and not st.stale:
            log.debug("consul: %s: answer marked stale: %s", st.name, fresh.reason)
        decision = st.guard.decide(st.fresh, now)
        if decision.holding:
            if st.hold_until is None:
                log.warning("consul: %s suddenly has no instances; serving the previous %d for "
                            "up to %.0fs (consul.keep_previous_on_empty)", st.name,
                            len(decision.endpoints), st.guard.hold)
            st.hold_until = decision.hold_until
            # A held set is not what Consul says: it is stale, as of the last non-empty answer.
            self._publish(st, decision.endpoints, True, now)
        else:
            if st.hold_until is not None and not decision.endpoints:
                log.warning("consul: %s still has no instances after %.0fs; serving none",
                            st.name, st.guard.hold)
            st.hold_until = None
            # Stale by Consul's own account: LastContact or the cache's Age over max_stale,
            # or a server that knows no leader (not under streaming, which never says).
            self._publish(st, decision.endpoints, fresh.stale, now,
                          fetched_at=now - min(fresh.lag, 86400.0))
        # Only once published: an answer the listener refused must count as a failure (it
        # raised), be fetched again at the old index, and not flip the status to ok between
        # retries (which would log the failure again on every one).
        st.index = new_index
        st.have_data = True
        st.backoff.success()
        self._tracker.ok(st.name, now)
        st.answered.set()

    def _unknown(self, st: _ServiceState, now: float) -> None:
        """Consul has no instance of a name a caller made up (or mistyped): forget it, and
        refuse it for consul.negative_ttl without asking again. Never published, so never
        in the snapshot, and it never held an on-demand slot."""
        self._negative.add(st.name, now)
        log.debug("consul: %s: Consul does not know it; refused for %gs", st.name,
                  self._config.consul.negative_ttl)
        self._tracker.ok(st.name, now)
        st.answered.set()
        self._apply(self.planner.forget(st.name), now)
        self._listener_unknown(st.name)

    def _listener_unknown(self, name: str) -> None:
        fn = getattr(self._listener, "on_unknown", None)
        if fn is not None:
            fn(name)

    def _failed(self, st: _ServiceState, err: Exception) -> float:
        now = trio.current_time()
        self._tracker.failed(st.name, err, now)
        st.answered.set()
        if st.published is not None:
            self._publish(st, st.published, True, now)
        # A 429's Retry-After is a floor: Consul said when it will take more.
        return max(st.backoff.failure(), getattr(err, "retry_after", None) or 0.0)

    # ------------------------------------------------------------------ the change feed

    def _feed_needed(self) -> bool:
        # Blocking watches see their own changes; the feed is for the polled rest. Alone
        # (health_state), it is also the list of names Consul knows, so it always runs.
        return self._config.consul.change_feed == "health_state" or bool(self.planner.polled)

    def _set_safety_poll(self, feed_ok: bool) -> None:
        pace = (SAFETY_POLL_PERIOD, SAFETY_POLL_RATE) if feed_ok else (self._poll_period, self._max_poll_rate)
        if (self.planner.poll_period, self.planner.max_poll_rate) != pace:
            self.planner.set_pace(*pace, trio.current_time())
            self._poll_wakeup.set()

    async def _feed_loop(self, kind: str, fetch: Callable[..., object],
                         on_answer: Callable[[ConsulAnswer, bool], None], on_reset: Callable[[], None],
                         needed: Callable[[], bool]) -> None:
        assert self._client is not None
        backoff = Backoff(self._retry, self._rng)
        index = 0
        failing = False
        while True:
            if not needed():
                on_reset()
                index = 0
                self._feed_wakeup = trio.Event()
                await self._feed_wakeup.wait()
                continue
            started = trio.current_time()
            try:
                self.requests[kind] += 1
                with trio.CancelScope() as scope:
                    self._feed_scopes[kind] = scope
                    # Only a blocking query in flight means "nothing changed since".
                    self._inflight[kind] = index > 0
                    try:
                        ans = await fetch(index=index, wait=self._config.consul.wait)  # type: ignore[operator]
                    finally:
                        self._inflight[kind] = False
                if scope.cancelled_caught:
                    continue  # what it must ask changed (the polled set): ask again at once
                if ans.meta.filtered_by_acls:  # type: ignore[attr-defined]
                    raise ConsulACLFiltered(f"{kind}: Consul filtered the answer by ACL; the feed "
                                            "needs node:read and service:read on every service")
                new_index = next_index(index, ans.index)  # type: ignore[attr-defined]
                changed = index_changed(index, new_index) or index == 0
                on_answer(ans, changed)  # type: ignore[arg-type]
                if changed:
                    self._quiet_since[kind] = trio.current_time()
                index = new_index
                backoff.success()
                if failing:
                    log.info("consul: change feed %s answering again", kind)
                    failing = False
            except Exception as e:  # ConsulError, ConsulDataError, anything: the feed is optional
                self._quiet_since.pop(kind, None)
                on_reset()
                index = 0
                if not failing:
                    log.warning("consul: change feed %s failing (%s: %s); polled services are "
                                "refreshed round robin meanwhile", kind, type(e).__name__, e)
                    failing = True
                await trio.sleep(max(backoff.failure(), getattr(e, "retry_after", None) or 0.0))
                continue
            spacing = max(FEED_MIN_INTERVAL, self._config.consul.min_query_interval)
            await trio.sleep_until(started + spacing * (1 + SPACING_JITTER * self._rng.random()))

    async def _run_feed(self) -> None:
        assert self._client is not None

        def on_answer(ans: ConsulAnswer, changed_index: bool) -> None:
            if not changed_index and self._feed.primed:
                return
            before = self._feed.names
            changed = self._feed.update(decode_json_body(ans.body))
            self._set_safety_poll(True)
            for name in self._feed.names - before:
                self._negative.discard(name)  # it exists now: stop refusing it
            if changed:
                at = parse_index(ans.index) or 0
                polled = set(self.planner.polled)
                for name in changed:
                    if name in polled:
                        self._feed_min[name] = (at, FEED_FETCH_RETRIES)
                        self._urge(name)

        def on_reset() -> None:
            self._feed.reset()
            self._set_safety_poll(False)

        client = self._client
        asked = [""]

        async def fetch(*, index: int, wait: float) -> ConsulAnswer:
            if self._config.consul.change_feed != "catalog_health":
                # Alone, the feed is also the list of known names: it must see them all.
                return await client.health_state_any(index=index, wait=wait)
            # Beside the catalog feed, only the polled services' checks (and node checks)
            # are needed; Consul filters, and each answer shrinks to what we watch.
            expr = feed_filter(self.planner.polled)
            if expr != asked[0]:
                asked[0], index = expr, 0  # a new question: answer at once, then block
            return await client.health_state_any(index=index, wait=wait, filter=expr)

        await self._feed_loop("feed", fetch, on_answer, on_reset, self._feed_needed)

    async def _run_catalog(self) -> None:
        assert self._client is not None
        tags: dict[str, tuple[str, ...]] | None = None

        def on_answer(ans: ConsulAnswer, changed_index: bool) -> None:
            nonlocal tags
            if not changed_index and tags is not None:
                return
            new = catalog_service_names(decode_json_body(ans.body))
            polled = set(self.planner.polled)
            if tags is not None:
                for name in new.keys() | tags.keys():
                    if new.get(name) != tags.get(name) and name in polled:
                        self._urge(name)
            for name in new.keys() - (tags or {}).keys():
                self._negative.discard(name)  # it exists now: stop refusing it
            tags = new
            self._catalog_names = frozenset(new)

        def on_reset() -> None:
            nonlocal tags
            tags = None
            self._catalog_names = None

        # The name list serves on-demand resolves at any time: always running.
        await self._feed_loop("catalog", self._client.catalog_services, on_answer, on_reset,
                              lambda: True)

    def _publish(self, st: _ServiceState, endpoints: tuple[Endpoint, ...], stale: bool, now: float,
                 *, fetched_at: float | None = None) -> None:
        """Tell the listener, unless it already has this. `fetched_at`: a good answer's time."""
        fetched = st.fetched_at if fetched_at is None else fetched_at
        if st.published == endpoints and st.stale == stale:
            st.fetched_at = fetched
            return
        # Listener first: if it rejects the set, `published` and `fetched_at` stay what it
        # last took, which is what the failure path re-publishes as stale.
        self._listener.on_update(st.name, endpoints, now, stale=stale, fetched_at=fetched)
        st.published, st.stale, st.fetched_at = endpoints, stale, fetched
        self.version += 1

