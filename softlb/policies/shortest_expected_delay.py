"""IPVS sed, shortest expected delay: (open leases + 1) / weight.

Unlike least connections it counts the request being placed, so an idle low-weight
endpoint does not beat a lightly loaded high-weight one (1/1 > 2/10).
"""

from __future__ import annotations

from ._least_loaded import LeastLoaded


class ShortestExpectedDelay(LeastLoaded):
    name = "sed"

    @staticmethod
    def score(active: int, weight: float) -> float:
        return (active + 1) / weight
