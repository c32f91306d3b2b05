"""Network coordinates and Consul's `?near=` sort, as the servers do it.

Read from hashicorp/consul agent/consul/rtt.go (`sortNodesByDistanceFrom`,
`newCheckServiceNodeSorter`), lib/rtt.go (`ComputeDistance`, `CoordinateSet.Intersect`,
`GenerateCoordinate`), agent/http.go (`parseSource`: `_agent` is the agent's node name) and
hashicorp/serf coordinate/coordinate.go (`DistanceTo`, `rawDistanceTo`):

* no source node, or a source node without a coordinate: the answer keeps its order;
* otherwise each entry's node is at `ComputeDistance(source, node)` seconds: the Euclidean
  distance of the Vivaldi vectors plus both heights, plus both adjustments when that sum is
  positive, truncated to whole nanoseconds (a Go `time.Duration`); a node without a
  coordinate is at +Inf;
* `sort.Stable` by that distance: ties (and every node without a coordinate, at the end)
  keep the state store's order.

Coordinates live in their own table: writing one moves no service index, so a blocking
health query is not woken by a new RTT estimate (its next answer carries the new order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

#: serf coordinate.DefaultConfig().Dimensionality
DIMENSIONS = 8


@dataclass(frozen=True)
class Coordinate:
    vec: tuple[float, ...] = field(default_factory=lambda: (0.0,) * DIMENSIONS)
    height: float = 0.0
    adjustment: float = 0.0
    error: float = 1.5  # serf's VivaldiErrorMax; carried, not used by the distance

    @classmethod
    def at_rtt(cls, seconds: float) -> Coordinate:
        """lib.GenerateCoordinate: `seconds` from the origin along the first axis, no height."""
        return cls(vec=(seconds,) + (0.0,) * (DIMENSIONS - 1))

    def distance_to(self, other: Coordinate) -> float:
        """serf's DistanceTo, in seconds, truncated to nanoseconds as a time.Duration is."""
        if len(self.vec) != len(other.vec):
            raise ValueError("coordinate dimensionality conflict")
        dist = math.dist(self.vec, other.vec) + self.height + other.height
        adjusted = dist + self.adjustment + other.adjustment
        if adjusted > 0.0:
            dist = adjusted
        return math.trunc(dist * 1e9) / 1e9

    def as_json(self) -> dict[str, Any]:
        return {"Vec": list(self.vec), "Error": self.error, "Adjustment": self.adjustment, "Height": self.height}


def compute_distance(a: Coordinate | None, b: Coordinate | None) -> float:
    """lib.ComputeDistance: +Inf when either side has no coordinate."""
    if a is None or b is None:
        return math.inf
    return a.distance_to(b)


def sort_near(entries: Sequence[dict[str, Any]], source: str, coords: Mapping[str, Coordinate]) -> list[dict[str, Any]]:
    """Health entries (`{"Node": {"Node": ...}, ...}`) nearest first from `source` (a node
    name, already resolved from `_agent`), as sortNodesByDistanceFrom does."""
    mine = coords.get(source) if source else None
    if mine is None:
        return list(entries)
    # sorted() is stable, like sort.Stable.
    return sorted(entries, key=lambda e: compute_distance(mine, coords.get(e["Node"]["Node"])))
