"""Plain data shared by every part of the core: endpoints and their registry state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping


class RegistryHealth(enum.Enum):
    """What the catalog source says about an endpoint (Consul check states, or the file)."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend instance of a service, as the catalog describes it.

    `id` is unique within a service and is what health, leases and reports key on.
    `weight` is already resolved for the registry state (Consul Weights.Passing or
    Weights.Warning); a weight of 0 means "listed but never picked by weight-aware policies".
    `rank` is the endpoint's place in the source's nearest-first order (0 = nearest; Consul's
    `?near=` answer, or the file catalog's `rank`), None when the source gives no order. Only
    the "nearest:N" locality level reads it; resolve answers do not carry it, and the
    `endpoints` view (as_dict) has a "rank" key only when it is set.
    """

    id: str
    address: str
    port: int
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    node: str = ""
    zone: str = ""
    region: str = ""
    registry: RegistryHealth = RegistryHealth.PASSING
    rank: int | None = None

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "id": self.id,
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "node": self.node,
            "zone": self.zone,
            "region": self.region,
            "registry": self.registry.value,
        }
        if self.rank is not None:  # optional: older readers of `endpoints` never see it
            d["rank"] = self.rank
        return d
