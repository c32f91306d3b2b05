"""The interface every balancing policy implements.

State and picking are separate concerns (grpc-go's balancer/picker split), but in one
single-threaded process a policy object can own both: the agent calls `update` whenever the
set of eligible endpoints changes, `pick` once per request, and the feedback hooks as
leases open and close. All calls come from one thread; none of them may block or do I/O.
Time arrives as `now` (seconds, monotonic); randomness only through the injected `rng`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Sequence

from .._types import Endpoint


class Policy(ABC):
    #: The stable public name used in config (`policy = "round_robin"`).
    name: ClassVar[str]

    def __init__(self, *, rng: random.Random, options: Mapping[str, object] | None = None) -> None:
        self.rng = rng
        self.options = dict(options or {})

    @abstractmethod
    def update(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Replace the endpoint set picks are made from (already filtered for eligibility)."""

    @abstractmethod
    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        """Choose one endpoint, or None when the set is empty.

        `key` is the caller's hash key (consistent-hash policies), `source` identifies the
        caller (uid/pid on the Unix socket, address through the proxy) for affinity policies.
        """

    # Feedback hooks: policies that do not use them inherit these no-ops.
    def on_start(self, endpoint_id: str, now: float) -> None:
        """A lease on this endpoint opened (a request or connection started)."""

    def on_finish(self, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        """A lease closed, or a client reported a result for this endpoint."""
