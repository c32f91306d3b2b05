"""Leases: one per resolve, so a later `report` can name the pick and policies can count
requests in flight (least_connections, sed, nq).

Leases all live for the same `ttl`, so insertion order is expiry order and expiring is a
walk from the front of a dict. `max_leases` bounds memory against callers that never report.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    id: int
    service: str
    endpoint_id: str
    started: float


class LeaseTable:
    def __init__(self, ttl: float, max_leases: int = 100_000) -> None:
        self.ttl = ttl
        self.max_leases = max_leases
        self._leases: dict[int, Lease] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._leases)

    def open(self, service: str, endpoint_id: str, now: float) -> tuple[Lease, list[Lease]]:
        """A new lease, plus any leases evicted to stay within `max_leases`."""
        lease = Lease(self._next_id, service, endpoint_id, now)
        self._next_id += 1
        self._leases[lease.id] = lease
        evicted = []
        while len(self._leases) > self.max_leases:
            evicted.append(self._leases.pop(next(iter(self._leases))))
        return lease, evicted

    def close(self, lease_id: int) -> Lease | None:
        return self._leases.pop(lease_id, None)

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

    def drop_service(self, service: str) -> None:
        self._leases = {k: v for k, v in self._leases.items() if v.service != service}
