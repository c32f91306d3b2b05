"""Leases: a pick's handle, so a later verdict can name it and load-aware policies can count
what is in flight.

A lease has a scope (grpc-go's `PickResult.Done`, Envoy's active-request counters):

- `REQUEST`: a resolve caller's lease. The caller may never report, so it expires after
  `lease_ttl` with no verdict. All request leases live for the same ttl, so insertion order
  is expiry order and expiring is a walk from the front of a dict; `max_leases` bounds the
  memory callers who never report can make us hold (the oldest go first).
- `HELD`: a lease the agent itself holds for something whose life it sees end — a proxied
  connection or request. It counts as in flight until it is finished, however long that is;
  it never expires and is never evicted (the proxy's own connection caps bound them).
- `NONE`: no lease at all (`"lease": false`, DNS answers).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LeaseScope(enum.Enum):
    NONE = "none"
    REQUEST = "request"
    HELD = "held"


@dataclass(slots=True)
class Lease:
    id: int
    service: str
    endpoint_id: str
    started: float
    scope: LeaseScope = LeaseScope.REQUEST


class LeaseTable:
    def __init__(self, ttl: float, max_leases: int = 100_000) -> None:
        self.ttl = ttl
        self.max_leases = max_leases
        self._leases: dict[int, Lease] = {}  # REQUEST scope, in expiry order
        self._held: dict[int, Lease] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._leases) + len(self._held)

    @property
    def held(self) -> int:
        return len(self._held)

    def open(self, service: str, endpoint_id: str, now: float,
             scope: LeaseScope = LeaseScope.REQUEST) -> tuple[Lease, list[Lease]]:
        """A new lease, plus any request leases evicted to stay within `max_leases`."""
        lease = Lease(self._next_id, service, endpoint_id, now, scope)
        self._next_id += 1
        if scope is LeaseScope.HELD:
            self._held[lease.id] = lease
            return lease, []
        self._leases[lease.id] = lease
        evicted = []
        while len(self._leases) > self.max_leases:
            evicted.append(self._leases.pop(next(iter(self._leases))))
        return lease, evicted

    def open_held(self, service: str, endpoint_id: str, now: float) -> int:
        """`open(..., LeaseScope.HELD)`, answering the new lease's id only."""
        lease_id = self._next_id
        self._next_id = lease_id + 1
        self._held[lease_id] = Lease(lease_id, service, endpoint_id, now, LeaseScope.HELD)
        return lease_id

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id) or self._held.get(lease_id)

    def close(self, lease_id: int) -> Lease | None:
        le = self._leases.pop(lease_id, None)
        return le if le is not None else self._held.pop(lease_id, None)

    def expire(self, now: float) -> list[Lease]:
        out = []
        cutoff = now - self.ttl
        for lease in self._leases.values():
            if lease.started > cutoff:
                break
            out.append(lease)
        for lease in out:
            del self._leases[lease.id]
        return out

    def next_deadline(self) -> float | None:
        for lease in self._leases.values():
            return lease.started + self.ttl
        return None

    def drop_service(self, service: str) -> list[Lease]:
        """Forget the service's leases (it left the catalog); returns them."""
        gone = [le for le in (*self._leases.values(), *self._held.values()) if le.service == service]
        for le in gone:
            self._leases.pop(le.id, None)
            self._held.pop(le.id, None)
        return gone
