"""Which Consul services the agent watches, and how: blocking query or round-robin poll.

Design. Each blocking query holds one HTTP connection to the local Consul agent for up to
`wait` (5 min), and Consul allows 200 concurrent connections per client address, shared with
every other tool on the host. So at most `max_watches` services get a blocking query; the
rest are kept fresh by ONE poller that sends non-blocking `?cached` queries round robin.
`?cached` makes the local Consul agent answer from its cache, which it keeps current with
its own background blocking query to the servers (Consul's agent-cache "background
refresh"), so a poll costs a local cache hit, not a server RPC, and the servers see one
watch per service either way.

* Wanted services are the configured ones (never expire) plus on-demand ones (first
  resolved by a caller; dropped after `idle_timeout` without a resolve). At most
  `max_on_demand` on-demand services: every resolve of a made-up name would otherwise add
  a watch, and one client looping over typos could make the agent poll Consul for
  thousands of names nobody needs. Past the cap `touch` raises `OnDemandLimitError`.
* Ranking is configured services in config order, then on-demand services in the order
  they were first resolved. The first `max_watches` ranked services block, the rest are
  polled. The ranking is stable, so a service only moves between the two when membership
  changes (a configured or older service leaves and frees a slot), never on traffic.
* Polled services are refreshed every `poll_period` seconds each, but the poller never
  sends more than `max_poll_rate` requests a second: with many polled services the period
  stretches (1000 polled at 10/s = every 100 s). This is the price of the connection bound;
  put latency-sensitive services in the config so they get a blocking watch.

Pure: the agent calls `touch`/`configure`/`expire` and reads `blocking`, `polled` and
`poll_due`; it starts and cancels the actual queries. Every call is O(n) in the number of
wanted services (set lookups, no scans inside scans), and touching a new on-demand service
is O(1) apart from copying a tuple, because it can only join the end of the ranking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from ._errors import SoftLBError

#: Per-service refresh period of polled services when there are few of them: twice a
#: minute, gentler than the "every 15 s under churn" Consul suggests for busy watches.
DEFAULT_POLL_PERIOD = 30.0
#: Ceiling on the poller's request rate, whatever the number of polled services.
DEFAULT_MAX_POLL_RATE = 10.0


#: Unconfirmed names (first fetch out) watched at once, beyond max_on_demand.
DEFAULT_MAX_PROVISIONAL = 32


class OnDemandLimitError(SoftLBError):
    """A new on-demand service would exceed `max_on_demand`; it is not watched."""


@dataclass(frozen=True)
class PlanChange:
    """Differences after a planner call, for the agent to start/stop work."""

    start_blocking: tuple[str, ...] = ()
    stop_blocking: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.start_blocking or self.stop_blocking or self.added or self.removed)


class WatchPlanner:
    def __init__(
        self,
        *,
        max_watches: int,
        idle_timeout: float,
        poll_period: float = DEFAULT_POLL_PERIOD,
        max_poll_rate: float = DEFAULT_MAX_POLL_RATE,
        max_on_demand: int | None = None,
    ) -> None:
        if max_watches < 0 or idle_timeout <= 0 or poll_period <= 0 or max_poll_rate <= 0:
            raise ValueError("max_watches >= 0 and positive idle_timeout/poll_period/max_poll_rate")
        if max_on_demand is not None and max_on_demand < 0:
            raise ValueError("max_on_demand >= 0 (None: no limit)")
        self.max_watches = max_watches
        self.max_on_demand = max_on_demand
        self.idle_timeout = idle_timeout
        self.poll_period = poll_period
        self.max_poll_rate = max_poll_rate
        self._configured: tuple[str, ...] = ()
        self._configured_set: frozenset[str] = frozenset()
        #: on-demand services in first-resolve order -> last resolve time
        self._on_demand: dict[str, float] = {}
        #: on-demand services whose existence Consul has not confirmed yet (a first fetch
        #: is out): they do not count against max_on_demand, so made-up names cannot fill it.
        self._provisional: set[str] = set()
        self.max_provisional = DEFAULT_MAX_PROVISIONAL
        self._blocking: tuple[str, ...] = ()
        self._polled: tuple[str, ...] = ()
        self._cursor = 0
        self._next_poll_at = 0.0

    # ------------------------------------------------------------------ inputs

    def configure(self, services: Iterable[str], now: float) -> PlanChange:
        """Set the configured services. Ones dropped from config stay on-demand until idle."""
        new = tuple(dict.fromkeys(services))
        new_set = frozenset(new)
        for name in self._configured:
            if name not in new_set:
                # Even past max_on_demand: it is already watched, dropping it is `expire`'s job.
                self._on_demand.setdefault(name, now)
        for name in new:
            self._on_demand.pop(name, None)
        self._configured, self._configured_set = new, new_set
        return self._replan()

    def touch(self, service: str, now: float, *, provisional: bool = False) -> PlanChange:
        """A caller resolved `service`: watch it if new, and restart its idle clock.

        `provisional`: Consul has not said the service exists; it is watched until its
        first answer (then `confirm` or `forget`), outside `max_on_demand` but within
        `max_provisional`. Raises OnDemandLimitError (and changes nothing) past either.
        """
        if service in self._configured_set:
            return PlanChange()
        if service in self._on_demand:
            self._on_demand[service] = max(now, self._on_demand[service])
            return PlanChange()
        if provisional:
            if len(self._provisional) >= self.max_provisional:
                raise OnDemandLimitError(
                    f"already asking Consul about {len(self._provisional)} unconfirmed names")
            self._provisional.add(service)
        elif self.max_on_demand is not None and self.on_demand_count >= self.max_on_demand:
            raise OnDemandLimitError(
                f"already watching {self.on_demand_count} services on demand (consul.max_on_demand)")
        self._on_demand[service] = now
        # A new on-demand service ranks last: it takes a free blocking slot or joins the end
        # of the polled list, and nothing else moves (the round robin's cursor included).
        if len(self._blocking) < self.max_watches:
            self._blocking += (service,)
            return PlanChange(start_blocking=(service,), added=(service,))
        self._polled += (service,)
        return PlanChange(added=(service,))

    @property
    def on_demand_count(self) -> int:
        """Confirmed on-demand services (what max_on_demand bounds)."""
        return len(self._on_demand) - len(self._provisional)

    def is_provisional(self, service: str) -> bool:
        return service in self._provisional

    def confirm(self, service: str) -> None:
        """Consul answered with instances: a provisional service becomes a normal one (it
        may overshoot max_on_demand by at most max_provisional, once)."""
        self._provisional.discard(service)

    def forget(self, service: str) -> PlanChange:
        """Consul does not know a provisional service: stop watching it now."""
        if service not in self._on_demand:
            return PlanChange()
        del self._on_demand[service]
        self._provisional.discard(service)
        return self._replan()

    def expire(self, now: float) -> PlanChange:
        """Drop on-demand services idle for `idle_timeout`."""
        idle = [s for s, t in self._on_demand.items() if now - t >= self.idle_timeout]
        if not idle:
            return PlanChange()
        for s in idle:
            del self._on_demand[s]
            self._provisional.discard(s)
        return self._replan()

    # ------------------------------------------------------------------ outputs

    @property
    def wanted(self) -> tuple[str, ...]:
        return self._blocking + self._polled

    @property
    def blocking(self) -> tuple[str, ...]:
        return self._blocking

    @property
    def polled(self) -> tuple[str, ...]:
        return self._polled

    @property
    def on_demand(self) -> tuple[str, ...]:
        """Services watched because callers resolved them (they can go idle)."""
        return tuple(self._on_demand)

    def is_wanted(self, service: str) -> bool:
        return service in self._configured_set or service in self._on_demand

    def next_expiry(self) -> float | None:
        """When `expire` next has something to do (None: no on-demand services)."""
        if not self._on_demand:
            return None
        return min(self._on_demand.values()) + self.idle_timeout

    @property
    def poll_spacing(self) -> float:
        """Seconds between two consecutive polls (of different services)."""
        n = len(self._polled)
        if not n:
            return self.poll_period
        return max(self.poll_period / n, 1.0 / self.max_poll_rate)

    def set_pace(self, poll_period: float, max_poll_rate: float, now: float) -> None:
        """Change the round robin's pace. Speeding up takes effect now, not after the
        slower pace's next turn (which may be minutes away)."""
        if poll_period <= 0 or max_poll_rate <= 0:
            raise ValueError("positive poll_period/max_poll_rate")
        self.poll_period, self.max_poll_rate = poll_period, max_poll_rate
        self._next_poll_at = min(self._next_poll_at, now + self.poll_spacing)

    def poll_due(self, now: float) -> str | None:
        """The polled service to query now, or None if it is not yet time (see `next_poll_at`)."""
        if not self._polled or now < self._next_poll_at:
            return None
        if self._cursor >= len(self._polled):
            self._cursor = 0
        name = self._polled[self._cursor]
        self._cursor += 1
        # From `now`, not from the last deadline: a poller that fell behind (Consul slow)
        # must not fire a burst of catch-up queries.
        self._next_poll_at = now + self.poll_spacing
        return name

    @property
    def next_poll_at(self) -> float | None:
        return self._next_poll_at if self._polled else None

    # ------------------------------------------------------------------ internals

    def _replan(self) -> PlanChange:
        ranked = self._configured + tuple(self._on_demand)
        old_blocking, old_wanted = self._blocking, self._blocking + self._polled
        old_blocking_set, old_wanted_set = set(old_blocking), set(old_wanted)
        current = self._polled[self._cursor] if self._cursor < len(self._polled) else None
        self._blocking = ranked[: self.max_watches]
        self._polled = ranked[self.max_watches :]
        blocking_set, ranked_set = set(self._blocking), set(ranked)
        # Keep the round robin where it was, so a membership change does not restart it.
        self._cursor = self._polled.index(current) if current in ranked_set and current not in blocking_set else 0
        return PlanChange(
            start_blocking=tuple(s for s in self._blocking if s not in old_blocking_set),
            stop_blocking=tuple(s for s in old_blocking if s not in blocking_set),
            added=tuple(s for s in ranked if s not in old_wanted_set),
            removed=tuple(s for s in old_wanted if s not in ranked_set),
        )


# --------------------------------------------------------------------------- rate and names


class TokenBucket:
    """At most `rate` events a second on average, bursts of `burst`. Pure: the caller
    passes the time and sleeps for what `delay` says."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now if self._at is None else max(self._at, now)

    def delay(self, now: float) -> float:
        """Seconds to wait before the next event may go (0: now)."""
        self._refill(now)
        # The epsilon: a float shortfall of 1e-16 token would ask for a sleep too short to
        # move the clock, and the caller would spin.
        return 0.0 if self._tokens >= 1 - 1e-9 else (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1


class NegativeCache:
    """Service names Consul said it does not know, refused for `ttl` seconds without
    asking again. Bounded: past `max_entries` the oldest entry goes (a flood of made-up
    names then costs at most one rate-capped query per name, never unbounded memory)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._until: OrderedDict[str, float] = OrderedDict()
        self.refused = 0  # resolves refused as unknown (a metric; the source counts its own too)
        self.added = 0  # names Consul said it does not know (a metric)

    def add(self, name: str, now: float) -> None:
        if self.ttl <= 0:
            return
        self._until.pop(name, None)
        self._until[name] = now + self.ttl
        self.added += 1
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def discard(self, name: str) -> None:
        self._until.pop(name, None)

    def knows(self, name: str, now: float) -> bool:
        """Is `name` cached as unknown (without counting a refusal)?"""
        until = self._until.get(name)
        return until is not None and now < until

    def hit(self, name: str, now: float) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if now >= until:
            del self._until[name]
            return False
        self.refused += 1
        return True

    def __len__(self) -> int:
        return len(self._until)
