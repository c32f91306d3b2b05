"""Per-endpoint health for one service: registry state, active probes, outlier ejection, panic.

Design
------
An endpoint is *eligible* for traffic only when all three independent signals allow it:

(a) the registry (Consul check status, or the file catalog) says PASSING or WARNING. A WARNING
    check still means "serving" in Consul's model, so it is not a reason to drop traffic.
(b) the agent's own active probe, if the service has one, is not DOWN. The probe is a small
    state machine stored as a table (PROBE_TRANSITIONS, h11's habit) driven by `rise`/`fall`.
(c) passive outlier detection, fed by callers' `report`s, has not ejected it.

Initial probe state: UNKNOWN, which counts as eligible. The catalog already vouches for a new
endpoint, and an SRE restarting the agent (or scaling a service out) expects traffic to keep
flowing rather than a blackout of `initial_delay + interval x rise` seconds on every restart.
UNKNOWN turns DOWN after `fall` consecutive failures, exactly as UP does, so a dead endpoint
that appears in the catalog is dropped as fast as one that dies later. The first success moves
UNKNOWN to UP at once (Envoy's "one success suffices for a host never yet checked"); it was
already eligible, so this changes only what `softlb endpoints` shows. Only DOWN -> UP waits for
`rise` successes, because that is the transition that puts a once-dead host back in rotation.

Outlier ejection follows Envoy's consecutive-failure detector: `consecutive_failures` failed
reports in a row eject an endpoint for `base_ejection_time x level`, capped at
`max_ejection_time`, where `level` counts recent ejections. The level decays by one for every
`base_ejection_time` the endpoint spends back in service, so a host that misbehaved last week
does not start at the cap (Envoy decays its multiplier on each sweep interval likewise).
An ejection happens only while `(ejected + 1) x 100 <= max_ejection_percent x candidates`
(Envoy's rule since it started counting the host about to be ejected): with 3 endpoints and 50%
one may be ejected, never two; with the default 10%, services under 10 endpoints eject none.
A blocked ejection keeps the failure streak, so the next failure ejects once room frees up.
Reports about an ejected endpoint (in-flight requests finishing late) are ignored, and it comes
back with a clean streak when its time is up.

Panic (Envoy's isHostSetInPanic): when fewer than `panic_threshold` percent of the candidates
are eligible, the service is in panic and traffic spreads over all candidates, ignoring probe
and ejection state, rather than crushing the few left. Candidates are every endpoint except
those in MAINTENANCE: maintenance is an operator's explicit "take it out", like Envoy's
excluded hosts, so it never counts and never receives panic traffic. A service with no
candidates is not in panic (there is nothing to spread over).

Every method that takes `now` first returns ejected endpoints whose time is up, so answers are
correct even if the driver calls `tick` late; `tick`/`next_deadline` exist so the driver can
notice the change (and rebuild its picker) on time. Mutators return True when the eligible or
candidate set changed (including expiries noticed on the way); `version` counts those changes.
"""

from __future__ import annotations

import itertools

import enum
import math
from dataclasses import dataclass
from typing import Generator, Iterable, Sequence

from ._config import ProbeConfig, ServiceConfig
from ._types import Endpoint, RegistryHealth


class ProbeState(enum.Enum):
    UNKNOWN = "unknown"  # probe configured, not yet conclusive; eligible
    UP = "up"
    DOWN = "down"


#: Every probe transition lives here. (state, probe succeeded) -> (target state, the
#: ProbeConfig field giving how many consecutive such results it takes, or None for "at once").
#: A result that agrees with the current state only extends the streak.
PROBE_TRANSITIONS: dict[tuple[ProbeState, bool], tuple[ProbeState, str | None]] = {
    (ProbeState.UNKNOWN, True): (ProbeState.UP, None),
    (ProbeState.UNKNOWN, False): (ProbeState.DOWN, "fall"),
    (ProbeState.UP, True): (ProbeState.UP, None),
    (ProbeState.UP, False): (ProbeState.DOWN, "fall"),
    (ProbeState.DOWN, True): (ProbeState.UP, "rise"),
    (ProbeState.DOWN, False): (ProbeState.DOWN, None),
}

#: Registry states in which the catalog says the endpoint serves.
REGISTRY_ELIGIBLE = frozenset({RegistryHealth.PASSING, RegistryHealth.WARNING})


class ProbeMachine:
    """One endpoint's active-probe state, with the last result kept for display."""

    __slots__ = ("state", "streak", "last_ok", "last_at", "last_detail", "changed_at")

    def __init__(self) -> None:
        self.state = ProbeState.UNKNOWN
        #: How many results in a row equal `last_ok`.
        self.streak = 0
        self.last_ok: bool | None = None
        self.last_at: float | None = None
        self.last_detail = ""
        self.changed_at: float | None = None

    def feed(self, ok: bool, now: float, detail: str, cfg: ProbeConfig) -> bool:
        """Record one probe result; True when the state changed."""
        self.streak = self.streak + 1 if ok == self.last_ok else 1
        self.last_ok, self.last_at, self.last_detail = ok, now, detail
        target, threshold = PROBE_TRANSITIONS[(self.state, ok)]
        if target is self.state:
            return False
        if threshold is not None and self.streak < getattr(cfg, threshold):
            return False
        self.state = target
        self.changed_at = now
        return True


class OutlierState:
    """One endpoint's passive-ejection bookkeeping."""

    __slots__ = ("failures", "level", "ejected_until", "returned_at", "ejections")

    def __init__(self) -> None:
        self.failures = 0  # consecutive failed reports
        self.level = 0  # backoff multiplier before decay; see HealthTracker._level
        self.ejected_until: float | None = None
        self.returned_at: float | None = None
        self.ejections = 0  # total ever, for display


class _Entry:
    __slots__ = ("endpoint", "probe", "outlier")

    def __init__(self, endpoint: Endpoint, probing: bool) -> None:
        self.endpoint = endpoint
        self.probe = ProbeMachine() if probing else None
        self.outlier = OutlierState()

    @classmethod
    def sharing(cls, old: _Entry, endpoint: Endpoint, probing: bool) -> _Entry:
        """The entry `set_endpoints` would leave for `old` listed as `endpoint`, sharing its
        state objects: an endpoint whose address or port changed is a new probe target."""
        e = cls.__new__(cls)
        e.endpoint = endpoint
        moved = (old.endpoint.address, old.endpoint.port) != (endpoint.address, endpoint.port)
        e.probe = (ProbeMachine() if probing else None) if moved else old.probe
        e.outlier = old.outlier
        return e

    @property
    def candidate(self) -> bool:
        return self.endpoint.registry is not RegistryHealth.MAINTENANCE

    @property
    def eligible(self) -> bool:
        return (
            self.endpoint.registry in REGISTRY_ELIGIBLE
            and (self.probe is None or self.probe.state is not ProbeState.DOWN)
            and self.outlier.ejected_until is None
        )


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """One display row of `softlb endpoints`. Times are ages/remaining seconds at `now`."""

    id: str
    registry: RegistryHealth
    eligible: bool
    probe: ProbeState | None  # None: the service has no probe
    probe_streak: int
    last_probe_ok: bool | None
    last_probe_age: float | None
    last_probe_detail: str
    ejected: bool
    ejected_remaining: float | None
    ejections: int
    ejection_level: int
    consecutive_failures: int

    def as_dict(self, precision: int | None = None) -> dict[str, object]:
        """The health fields (not the endpoint's identity); times rounded if asked."""

        def t(v: float | None) -> float | None:
            return v if v is None or precision is None else round(v, precision)

        return {
            "registry": self.registry.value,
            "eligible": self.eligible,
            "probe": None if self.probe is None else self.probe.value,
            "probe_streak": self.probe_streak,
            "last_probe_ok": self.last_probe_ok,
            "last_probe_age": t(self.last_probe_age),
            "last_probe_detail": self.last_probe_detail,
            "ejected": self.ejected,
            "ejected_remaining": t(self.ejected_remaining),
            "ejections": self.ejections,
            "ejection_level": self.ejection_level,
            "consecutive_failures": self.consecutive_failures,
        }


@dataclass(frozen=True, slots=True)
class Derived:
    """A stepped build's eligibility, derived at `epoch` (HealthTracker.derive_steps)."""

    epoch: int
    eligible: tuple[Endpoint, ...]
    candidates: tuple[Endpoint, ...]
    next_expiry: float | None
    #: No more candidates are ejected than max_ejection_percent allows (else install
    #: returns some, at its `now`, in line).
    cap_holds: bool


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    panic: bool
    panic_threshold: int
    eligible: int
    candidates: int
    endpoints: tuple[EndpointHealth, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "panic": self.panic,
            "panic_threshold": self.panic_threshold,
            "eligible": self.eligible,
            "candidates": self.candidates,
            "endpoints": [dict(id=e.id, **e.as_dict()) for e in self.endpoints],
        }


def in_panic(eligible: int, candidates: int, threshold: int) -> bool:
    """Fewer than `threshold` percent of the candidates are eligible."""
    return candidates > 0 and eligible * 100 < threshold * candidates


class HealthTracker:
    """Health of one service's endpoints. Single-threaded; never blocks; time passed in."""

    def __init__(self, service_cfg: ServiceConfig) -> None:
        self._cfg = service_cfg
        self._entries: dict[str, _Entry] = {}
        self._next_expiry: float | None = None
        # Kept current by _changed() after every mutation, so answers are O(1).
        self._eligible: tuple[Endpoint, ...] = ()
        self._candidates: tuple[Endpoint, ...] = ()
        #: Bumped whenever eligibility or ejections may have moved (every `_changed`): a
        #: stepped build derived at an older epoch is re-derived when installed.
        self.epoch = 0

    # ------------------------------------------------------------------ inputs

    def reconfigure(self, service_cfg: ServiceConfig, now: float) -> bool:
        """Apply a new service config. Probe state is kept while a probe stays configured
        (the new rise/fall apply from the next result); removing the probe or the outlier
        detector forgets its state, and stale results arriving later are ignored."""
        expired = self._expire(now)
        old, self._cfg = self._cfg, service_cfg
        if (old.probe is None) != (service_cfg.probe is None):
            for e in self._entries.values():
                e.probe = ProbeMachine() if service_cfg.probe is not None else None
        if service_cfg.outlier is None:
            for e in self._entries.values():
                e.outlier = OutlierState()
        self._enforce_ejection_cap(now)
        return self._changed() or expired

    def set_endpoints(self, endpoints: Iterable[Endpoint], now: float) -> bool:
        """Replace the endpoint set (catalog order is kept). Endpoints that remain keep their
        state; removed ones are forgotten, so their late probe results and reports are ignored.
        An endpoint whose address or port changed is a new target: its probe starts over."""
        expired = self._expire(now)
        probing = self._cfg.probe is not None
        entries: dict[str, _Entry] = {}
        for ep in endpoints:
            if ep.id in entries:
                raise ValueError(f"duplicate endpoint id {ep.id!r}")
            e = self._entries.get(ep.id)
            if e is None:
                e = _Entry(ep, probing)
            elif (e.endpoint.address, e.endpoint.port) != (ep.address, ep.port):
                e.endpoint = ep
                e.probe = ProbeMachine() if probing else None
            else:
                e.endpoint = ep
            entries[ep.id] = e
        self._entries = entries
        self._enforce_ejection_cap(now)
        return self._changed() or expired

    def probe_result(self, endpoint_id: str, ok: bool, now: float, detail: str = "") -> bool:
        """One active probe result. Unknown endpoints (removed since) and services without a
        probe ignore it."""
        expired = self._expire(now)
        e = self._entries.get(endpoint_id)
        cfg = self._cfg.probe
        if e is None or e.probe is None or cfg is None:
            return expired
        if e.probe.feed(ok, now, detail, cfg):
            return self._changed() or expired
        return expired

    def report(self, endpoint_id: str, ok: bool, now: float) -> bool:
        """One caller-observed request outcome, for outlier detection."""
        expired = self._expire(now)
        e = self._entries.get(endpoint_id)
        cfg = self._cfg.outlier
        if e is None or cfg is None or e.outlier.ejected_until is not None or not e.candidate:
            return expired
        o = e.outlier
        if ok:
            o.failures = 0
            return expired
        o.failures += 1
        if o.failures < cfg.consecutive_failures or not self._room_to_eject():
            return expired
        # The level stops growing at the cap (as Envoy's multiplier does): beyond it a
        # long-flapping host would stay at the cap long after it recovered, defeating decay.
        level = min(self._level(o, now) + 1, max(1, math.ceil(cfg.max_ejection_time / cfg.base_ejection_time)))
        o.level = level
        o.ejected_until = now + min(cfg.base_ejection_time * level, cfg.max_ejection_time)
        o.returned_at = None
        o.ejections += 1
        self._reschedule()
        return self._changed() or expired

    def tick(self, now: float) -> bool:
        """Return endpoints whose ejection has expired; True if the eligible set changed."""
        return self._expire(now)

    # ------------------------------------------------------------------ stepped set builds

    def entries_steps(self, endpoints: Sequence[Endpoint], chunk: int) -> Generator[int, None, dict[str, _Entry]]:
        """The table `set_endpoints(endpoints)` would make, built on private data, yielding
        the work done every `chunk` endpoints (softlb/_set_build.py). An endpoint that stays
        shares its probe and outlier state objects with the live table, so results arriving
        meanwhile carry over; nothing live is written. Ids must be unique."""
        probing = self._cfg.probe is not None
        live = self._entries
        entries: dict[str, _Entry] = {}
        for i, ep in enumerate(endpoints):
            old = live.get(ep.id)
            e = _Entry(ep, probing) if old is None else _Entry.sharing(old, ep, probing)
            entries[ep.id] = e
            if i % chunk == chunk - 1:
                yield chunk
        return entries

    def derive_steps(self, entries: dict[str, _Entry], chunk: int) -> Generator[int, None, Derived]:
        """What `_changed` and `_enforce_ejection_cap` would compute over `entries`, at the
        current epoch (compare it with `epoch` before use)."""
        epoch = self.epoch
        eligible: list[Endpoint] = []
        candidates: list[Endpoint] = []
        ejected_candidates = 0
        next_expiry: float | None = None
        for i, e in enumerate(entries.values()):
            until = e.outlier.ejected_until
            if e.eligible:
                eligible.append(e.endpoint)
            if e.candidate:
                candidates.append(e.endpoint)
                ejected_candidates += until is not None
            if until is not None and (next_expiry is None or until < next_expiry):
                next_expiry = until
            if i % chunk == chunk - 1:
                yield chunk
        cfg = self._cfg.outlier
        room = (0 if cfg is None else cfg.max_ejection_percent) * len(candidates) // 100
        return Derived(epoch, tuple(eligible), tuple(candidates), next_expiry, ejected_candidates <= room)

    def install(self, entries: dict[str, _Entry], derived: Derived | None, now: float) -> bool:
        """Make a stepped build's table the live one, leaving what `set_endpoints` at `now`
        would. Cheap when `derived` is still current; when a result moved eligibility since
        (or the ejection cap must return some endpoints), it is recomputed in line. True
        when it was recomputed (the caller's own derivations are stale too)."""
        self._expire(now)
        fresh = derived is not None and derived.epoch == self.epoch and derived.cap_holds
        self._entries = entries
        if not fresh:
            self._enforce_ejection_cap(now)
            self._changed()
            return True
        assert derived is not None
        self._next_expiry = derived.next_expiry
        self._eligible, self._candidates = derived.eligible, derived.candidates
        self.epoch += 1
        return False

    # ------------------------------------------------------------------ answers

    def eligible(self, now: float) -> tuple[Endpoint, ...]:
        """Endpoints that pass all three checks, in catalog order."""
        self._expire(now)
        return self._eligible

    def candidates(self, now: float) -> tuple[Endpoint, ...]:
        """Endpoints that may take traffic in panic: all but those in maintenance."""
        self.eligible(now)
        return self._candidates

    def in_panic(self, now: float) -> bool:
        return in_panic(len(self.eligible(now)), len(self._candidates), self._cfg.panic_threshold)

    def serving(self, now: float) -> tuple[Endpoint, ...]:
        """What picks are made from: the eligible endpoints, or every candidate in panic."""
        return self.candidates(now) if self.in_panic(now) else self.eligible(now)

    def next_deadline(self) -> float | None:
        """When the next ejection expires, or None if nothing is ejected."""
        return self._next_expiry

    def __len__(self) -> int:
        return len(self._entries)

    def tally(self) -> tuple[int, int, int]:
        """(ejected now, ejections ever, probe-down) over every endpoint, without building a
        row per endpoint (metrics read it for services of any size)."""
        ejected = ejections = down = 0
        for e in self._entries.values():
            o, p = e.outlier, e.probe
            ejected += o.ejected_until is not None
            ejections += o.ejections
            down += p is not None and p.state is ProbeState.DOWN
        return ejected, ejections, down

    def snapshot(self, now: float, limit: int | None = None) -> ServiceHealth:
        """Every endpoint's row (the first `limit` ones, in catalog order, if given)."""
        eligible = self.eligible(now)
        entries = self._entries.values()
        rows = tuple(self._row(e, now) for e in (entries if limit is None else itertools.islice(entries, limit)))
        return ServiceHealth(
            panic=self.in_panic(now),
            panic_threshold=self._cfg.panic_threshold,
            eligible=len(eligible),
            candidates=len(self._candidates),
            endpoints=rows,
        )

    def ids(self) -> frozenset[str]:
        return frozenset(self._entries)

    def rows(self, ids: Iterable[str], now: float) -> dict[str, EndpointHealth]:
        """The rows of just these endpoints (those still listed)."""
        return {i: self._row(self._entries[i], now) for i in ids if i in self._entries}

    def _row(self, e: _Entry, now: float) -> EndpointHealth:
        p, o, ep = e.probe, e.outlier, e.endpoint
        return EndpointHealth(
            id=ep.id,
            registry=ep.registry,
            eligible=e.eligible,
            probe=None if p is None else p.state,
            probe_streak=0 if p is None else p.streak,
            last_probe_ok=None if p is None else p.last_ok,
            last_probe_age=None if p is None or p.last_at is None else now - p.last_at,
            last_probe_detail="" if p is None else p.last_detail,
            ejected=o.ejected_until is not None,
            ejected_remaining=None if o.ejected_until is None else o.ejected_until - now,
            ejections=o.ejections,
            ejection_level=self._level(o, now),
            consecutive_failures=o.failures,
        )

    # ------------------------------------------------------------------ internals

    def _level(self, o: OutlierState, now: float) -> int:
        """The ejection backoff level after decay: one step per base_ejection_time served."""
        cfg = self._cfg.outlier
        if o.returned_at is None or cfg is None or cfg.base_ejection_time <= 0:
            return o.level
        served = max(0.0, now - o.returned_at)
        return max(0, o.level - int(served // cfg.base_ejection_time))

    def _ejected_candidates(self) -> list[_Entry]:
        return [
            e for e in self._entries.values() if e.candidate and e.outlier.ejected_until is not None
        ]

    def _max_ejected(self) -> int:
        """How many candidates may be ejected at once. Envoy ejects while
        (ejected + 1) / candidates <= max_ejection_percent, i.e. it rounds down."""
        cfg = self._cfg.outlier
        pct = 0 if cfg is None else cfg.max_ejection_percent
        return pct * sum(1 for e in self._entries.values() if e.candidate) // 100

    def _room_to_eject(self) -> bool:
        return len(self._ejected_candidates()) < self._max_ejected()

    def _enforce_ejection_cap(self, now: float) -> None:
        """Keep `max_ejection_percent` true after the set shrank or the limit dropped: the
        endpoints due back soonest return first."""
        ejected = self._ejected_candidates()
        ejected.sort(key=lambda e: e.outlier.ejected_until)  # type: ignore[arg-type,return-value]
        for e in ejected[: max(0, len(ejected) - self._max_ejected())]:
            self._unejected(e.outlier, now)
        self._reschedule()

    def _unejected(self, o: OutlierState, at: float) -> None:
        o.ejected_until = None
        o.returned_at = at
        o.failures = 0

    def _expire(self, now: float) -> bool:
        if self._next_expiry is None or now < self._next_expiry:
            return False
        for e in self._entries.values():
            until = e.outlier.ejected_until
            if until is not None and until <= now:
                # Returned "at" its scheduled time, not when noticed, so decay is exact.
                self._unejected(e.outlier, until)
        self._reschedule()
        return self._changed()

    def _reschedule(self) -> None:
        untils = [
            e.outlier.ejected_until
            for e in self._entries.values()
            if e.outlier.ejected_until is not None
        ]
        self._next_expiry = min(untils) if untils else None

    def _changed(self) -> bool:
        """Recompute the cached sets; True when either actually differs."""
        self.epoch += 1
        eligible = tuple(e.endpoint for e in self._entries.values() if e.eligible)
        candidates = tuple(e.endpoint for e in self._entries.values() if e.candidate)
        if (eligible, candidates) == (self._eligible, self._candidates):
            return False
        self._eligible, self._candidates = eligible, candidates
        return True
