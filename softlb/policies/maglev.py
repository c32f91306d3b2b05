"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Envoy implements it.

A lookup table of prime size M is filled by letting each endpoint, in turn, claim the next
free slot of its own permutation of the table, (offset + j * skip) mod M, where offset and
skip come from a hash of the endpoint id. A key then costs one hash and one index. Weights
are honoured by letting an endpoint take a turn only when its accumulated weight credit
reaches the largest weight, so turns are proportional to weight.

Compared with a ring: O(1) lookups and an even spread (each endpoint gets within a few
percent of its share of slots), at the price of slightly more than 1/N of keys moving when
one of N endpoints leaves (the paper measures a few percent extra). M must be prime, and
well above the endpoint count (100x is the paper's advice for an even spread).
"""

from __future__ import annotations

from typing import Any, Generator, Mapping

from .._errors import ConfigError
from .._types import Endpoint
from ._consistent import ConsistentHash
from ._hashing import hash128

#: Probes (a fill counts as one) between two yields of a deferred build: ~0.1 ms here, quiet
#: (the agent runs steps until its slice's time is up: agent/table_builds.py). At 4,096
#: (~1 ms quiet) a step took 2-10 ms of CPU under load, a bystander's wait in maglev flapping.
STEP_PROBES = 512
#: Building the table is O(M log M) in pure Python; above this it takes seconds.
_MAX_TABLE_SIZE = 5_000_011


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class Maglev(ConsistentHash):
    name = "maglev"
    OPTIONS = {"table_size": 65537}

    _table: list[Endpoint] = []

    @classmethod
    def check_options(cls, options: Mapping[str, object]) -> dict[str, Any]:
        merged = super().check_options(options)
        m = merged["table_size"]
        if m > _MAX_TABLE_SIZE or not _is_prime(m):
            raise ConfigError(f"options.table_size: must be a prime no larger than {_MAX_TABLE_SIZE}, got {m}")
        return merged

    def _build_steps(self, endpoints: list[Endpoint], weights: list[int]) -> Generator[None, None, list[Endpoint]]:
        if not endpoints:
            return []
        size = int(self.options["table_size"])
        n = len(endpoints)
        position: list[int] = []
        skip: list[int] = []
        for k, ep in enumerate(endpoints):
            h1, h2 = hash128(ep.id)
            position.append(h1 % size)
            skip.append(h2 % (size - 1) + 1)
            if k % 16 == 15:  # ~0.1 ms of hashing
                yield
        top = max(weights)
        credit = [0] * n
        slots = [-1] * size
        filled = 0
        # Work is counted in probes, not fills: a fill near the end of the table probes
        # ~size/empty slots, so the last 4,096 fills cost ~100x the first (a 60 ms step here).
        probes = 0
        next_yield = STEP_PROBES
        while True:
            for i in range(n):
                credit[i] += weights[i]
                if credit[i] < top:
                    continue
                credit[i] -= top
                c, s = position[i], skip[i]
                while slots[c] >= 0:
                    c += s
                    if c >= size:
                        c -= size
                    probes += 1
                slots[c] = i
                c += s
                position[i] = c - size if c >= size else c
                filled += 1
                if filled == size:
                    table: list[Endpoint] = []
                    for start in range(0, size, 2048):
                        yield
                        table.extend([endpoints[i] for i in slots[start:start + 2048]])
                    return table
                probes += 1
                if probes >= next_yield:
                    next_yield = probes + STEP_PROBES
                    yield

    def _install(self, table: list[Endpoint]) -> None:
        self._table = table

    def _lookup(self, h: int) -> Endpoint | None:
        t = self._table
        return t[h % len(t)] if t else None
