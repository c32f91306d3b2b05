"""Weighted least connections (IPVS wlc): fewest open leases per unit of weight."""

from __future__ import annotations

from ._least_loaded import LeastLoaded


class LeastConnections(LeastLoaded):
    name = "least_connections"

    @staticmethod
    def score(active: int, weight: float) -> float:
        return active / weight
