"""IPVS nq, never queue: an idle endpoint if there is one, else shortest expected delay.

Idle endpoints all score 0 and share picks in proportion to weight; busy ones score
(open leases + 1) / weight, which is always above 0.
"""

from __future__ import annotations

from ._least_loaded import LeastLoaded


class NeverQueue(LeastLoaded):
    name = "nq"

    @staticmethod
    def score(active: int, weight: float) -> float:
        return 0.0 if active == 0 else (active + 1) / weight
