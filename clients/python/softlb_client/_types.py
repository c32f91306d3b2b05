from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping


@dataclass(slots=True)
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

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_result(cls, r: Mapping[str, Any]) -> Resolved:
        # Positional and unchecked beyond what the protocol promises: this runs once per call.
        g = r.get
        return cls(r["address"], r["port"], r["id"], tuple(g("tags") or ()), g("meta") or {}, g("weight", 1),
                   g("node", ""), g("zone", ""), g("region", ""), g("lease"), bool(g("panic")), bool(g("stale")),
                   g("age"))
