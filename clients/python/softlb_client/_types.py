from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Resolved:
    """One `resolve` answer: where to send this request, and the lease to report it under."""

    address: str
    port: int
    id: str
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    node: str = ""
    zone: str = ""
    region: str = ""
    lease: int | None = None
    panic: bool = False
    stale: bool = False
    age: float | None = None

    @classmethod
    def from_result(cls, r: Mapping[str, Any]) -> Resolved:
        return cls(
            address=r["address"],
            port=r["port"],
            id=r["id"],
            tags=tuple(r.get("tags") or ()),
            meta=dict(r.get("meta") or {}),
            weight=r.get("weight", 1),
            node=r.get("node", ""),
            zone=r.get("zone", ""),
            region=r.get("region", ""),
            lease=r.get("lease"),
            panic=bool(r.get("panic", False)),
            stale=bool(r.get("stale", False)),
            age=r.get("age"),
        )
