"""The interface every balancing policy implements.

State and picking are separate concerns (grpc-go's balancer/picker split), but in one
single-threaded process a policy object can own both: the agent calls `update` whenever the
set of eligible endpoints changes, `pick` once per request, and the feedback hooks as
leases open and close. All calls come from one thread; none of them may block or do I/O.
Time arrives as `now` (seconds, monotonic); randomness only through the injected `rng`.

Cost model: `update` may be O(n log n) (or O(table size) for Maglev) and precomputes
everything; `pick`, `on_start` and `on_finish` are O(1) or O(log n).

Weights: `Endpoint.weight` is the catalog's weight. The balancer may pass `weights`, a map
of endpoint id to an effective (possibly fractional) weight, to ramp endpoints in slow start;
policies that do not balance by weight ignore it. A weight of 0 means "never picked". The
balancer drops weight-0 endpoints before a policy sees them, unless the service's whole
catalog has weight 0 (surely not meant as "serve nothing"): then it passes weights of 1.
The rule is decided on the whole catalog, never on a subset left by health or a tag filter,
where it would send traffic to drained endpoints. `effective_weights` keeps the all-zero
fallback for policies used on their own.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from bisect import bisect_right
from itertools import accumulate
from typing import Any, ClassVar, Generator, Mapping, Sequence

from .._errors import ConfigError
from .._types import Endpoint
from ._load import LoadBoard


class Policy(ABC):
    #: The stable public name used in config (`policy = "round_robin"`).
    name: ClassVar[str]
    #: Whether effective weights from slow start change this policy's picks. Consistent-hash
    #: policies say no: ramping a weight there would move keys twice (in, then back).
    ramps_weights: ClassVar[bool] = False
    #: Settings accepted in `[services.NAME.options]`, with their defaults.
    OPTIONS: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, *, rng: random.Random, options: Mapping[str, object] | None = None,
                 load: LoadBoard | None = None) -> None:
        self.rng = rng
        self.options = self.check_options(options or {})
        #: The service's per-endpoint feedback, shared with every other view of the service
        #: (see _load). A policy built alone (tests, benchmarks) gets a board of its own.
        self.load = load if load is not None else LoadBoard()

    @classmethod
    def check_options(cls, options: Mapping[str, object]) -> dict[str, Any]:
        """The policy's options with defaults filled in; ConfigError names a bad one.

        Unknown keys are errors: an option meant for another policy would otherwise be
        silently ignored after a policy switch.
        """
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ConfigError(f"options.{unknown[0]}: not an option of policy \"{cls.name}\" (known: {known})")
        merged = {**cls.OPTIONS, **options}
        for k, default in cls.OPTIONS.items():
            v = merged[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(default, int) and not isinstance(v, int)):
                raise ConfigError(f"options.{k}: expected {'an integer' if isinstance(default, int) else 'a number'}, got {v!r}")
            if v <= 0:
                raise ConfigError(f"options.{k}: must be positive, got {v!r}")
        return merged

    @abstractmethod
    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        """Replace the endpoint set picks are made from (already filtered for eligibility).

        Per-endpoint feedback state (open leases, latency history) survives an update for
        endpoints that stay, so leases opened before the update still close correctly.
        """

    def prepare_steps(
        self, endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None, chunk: int
    ) -> Generator[int, None, Any]:
        """The part of `update(endpoints, ...)` that reads no state of the policy, done on
        private data, yielding the endpoints of work done every `chunk` (a stepped set build,
        softlb/_set_build.py); its result goes to `update_prepared`. By default there is none:
        `update_prepared` does the whole update."""
        return None
        yield 0  # a generator

    def update_prepared(
        self, prepared: Any, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        """`update(endpoints, now, weights)`, given what `prepare_steps` returned for them."""
        self.update(endpoints, now, weights)

    @abstractmethod
    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        """Choose one endpoint, or None when the set is empty.

        `key` is the caller's hash key (consistent-hash policies), `source` identifies the
        caller (uid/pid on the Unix socket, address through the proxy) for affinity policies.
        """

    # Feedback: a lease opened or closed on an endpoint. The state lives on the shared
    # board, so every view of the service sees it whichever view the pick came from.
    def on_start(self, endpoint_id: str, now: float) -> None:
        self.load.start(endpoint_id)

    def on_finish(self, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        self.load.finish(endpoint_id, latency, now)


def effective_weights(
    endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None = None
) -> list[tuple[Endpoint, float]]:
    """The endpoints that may be picked, with the weight to pick them by.

    Zero (or negative) weights drop out, unless every weight is zero: then all count as 1.
    `weights` overrides the catalog weight per endpoint id (slow start's ramped weights).
    """
    if weights:
        pairs = [(ep, float(weights.get(ep.id, ep.weight))) for ep in endpoints]
    else:
        pairs = [(ep, float(ep.weight)) for ep in endpoints]
    kept = [(ep, w) for ep, w in pairs if w > 0]
    if kept or not pairs:
        return kept
    return [(ep, 1.0) for ep, _ in pairs]


def effective_weights_steps(
    endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None, chunk: int
) -> Generator[int, None, list[tuple[Endpoint, float]]]:
    """`effective_weights`, a chunk of endpoints per step (stepped set builds)."""
    kept: list[tuple[Endpoint, float]] = []
    for i in range(0, len(endpoints), chunk):
        part = endpoints[i : i + chunk]
        if weights:
            kept += [(ep, w) for ep in part if (w := float(weights.get(ep.id, ep.weight))) > 0]
        else:
            kept += [(ep, w) for ep in part if (w := float(ep.weight)) > 0]
        yield len(part)
    if kept or not endpoints:
        return kept
    return [(ep, 1.0) for ep in endpoints]  # every weight zero: all count as 1


class WeightedSampler:
    """Draws an endpoint with probability proportional to its weight, O(log n) per draw.

    Equal weights (the common case: Consul's default weight is 1) take an O(1) fast path.
    """

    __slots__ = ("endpoints", "_cumulative", "_total")

    def __init__(self, pairs: Sequence[tuple[Endpoint, float]]) -> None:
        self.endpoints = tuple(ep for ep, _ in pairs)
        ws = [w for _, w in pairs]
        if ws and min(ws) == max(ws):
            self._cumulative: list[float] | None = None
        else:
            self._cumulative = list(accumulate(ws))
        self._total = self._cumulative[-1] if self._cumulative else 0.0

    def __len__(self) -> int:
        return len(self.endpoints)

    def index(self, rng: random.Random) -> int:
        if self._cumulative is None:
            return rng.randrange(len(self.endpoints))
        i = bisect_right(self._cumulative, rng.random() * self._total)
        # random() < 1, but float rounding of the product can land exactly on the total.
        return min(i, len(self.endpoints) - 1)

    def sample(self, rng: random.Random) -> Endpoint | None:
        if not self.endpoints:
            return None
        return self.endpoints[self.index(rng)]


class SampledPolicy(Policy):
    """A policy that draws from a WeightedSampler of the effective weights, rebuilt on each
    update; a big set's sampler is prepared in steps (`prepare_steps`)."""

    _sampler = WeightedSampler(())

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._sampler = WeightedSampler(effective_weights(endpoints, weights))

    def prepare_steps(
        self, endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None, chunk: int
    ) -> Generator[int, None, Any]:
        pairs = yield from effective_weights_steps(endpoints, weights, chunk)
        return WeightedSampler(pairs)

    def update_prepared(
        self, prepared: Any, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._sampler = prepared
