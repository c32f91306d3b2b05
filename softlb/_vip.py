"""Service addresses (VIPs): a loopback address (and optionally a port) standing for a service.

A program that cannot be changed connects to the VIP; the connect-time shim (or anything
else that knows the mapping) turns that into a pick. Two ways to get one:

- explicit, `[services.NAME] vip = "127.77.0.5:8080"` (that port only) or `"127.77.0.5"`
  (every port on the address), validated and unique across services;
- from `agent.vip_pool` (a subnet of 127.0.0.0/8) for every other service, chosen by
  hashing the name, so a restart hands out the same address without keeping state.

Collisions in the pool probe onward (the i-th candidate hashes `name` with `i`). Whoever
asks first keeps an address for as long as the service exists; the file source hands the
whole catalog over at once and the engine assigns it in name order, so only names that
collide AND arrive one by one (Consul) can swap addresses across a restart. An explicit
`vip` pins an address for good.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
#: Pool probing gives up after this many taken candidates (the pool is nearly full); the
#: service then has no VIP rather than the agent spinning.
MAX_PROBES = 64


@dataclass(frozen=True, slots=True)
class Vip:
    address: str
    #: 0: every port on `address`.
    port: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"address": self.address, "port": self.port}

    def __str__(self) -> str:
        return f"{self.address}:{self.port}" if self.port else self.address

    def matches(self, address: str, port: int) -> bool:
        return address == self.address and (self.port == 0 or port == self.port)


def parse_vip(text: str) -> Vip:
    """`"127.77.0.5:8080"` or `"127.77.0.5"`; ValueError saying what is wrong."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = text, ""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"expected IPv4 ADDRESS[:PORT] in 127.0.0.0/8, got \"{text}\"") from None
    if ip not in LOOPBACK:
        raise ValueError(f"{ip} is not a loopback address (a VIP must lie in 127.0.0.0/8)")
    port = 0
    if sep:
        if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise ValueError(f"port must be 1-65535, got \"{port_s}\"")
        port = int(port_s)
    return Vip(str(ip), port)


def parse_pool(text: str) -> ipaddress.IPv4Network:
    """`"127.77.0.0/16"`: a subnet of 127.0.0.0/8 with room for at least two VIPs."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"expected a subnet such as \"127.77.0.0/16\", got \"{text}\" ({e})") from None
    if not net.subnet_of(LOOPBACK):
        raise ValueError(f"{net} is not inside 127.0.0.0/8")
    if net.prefixlen > 30:
        raise ValueError(f"{net} is too small (at most /30)")
    return net


def check_unique(vips: Mapping[str, Vip]) -> str:
    """Why the explicit VIPs clash ("" if they do not): same address and port, or an
    address claimed whole (port 0) by one service and used by another."""
    seen: dict[tuple[str, int], str] = {}
    for name in sorted(vips):
        v = vips[name]
        for (addr, port), other in seen.items():
            if addr == v.address and (port == v.port or port == 0 or v.port == 0):
                return f"services {other} and {name} both claim {v}" if port == v.port else (
                    f"services {other} ({Vip(addr, port)}) and {name} ({v}) overlap: an address without a port claims every port")
        seen[(v.address, v.port)] = name
    return ""


def _candidate(net: ipaddress.IPv4Network, name: str, i: int) -> str:
    # First and last addresses left out: a .0 or .255 address surprises people, and some
    # tools refuse them even on loopback.
    usable = net.num_addresses - 2
    h = int.from_bytes(hashlib.blake2b(f"{i}:{name}".encode(), digest_size=8).digest(), "big")
    return str(net.network_address + 1 + h % usable)


class VipTable:
    """Which service has which VIP. Explicit ones come from the config; pool ones are
    handed out as services appear (`assign`) and returned when they go (`release`)."""

    def __init__(self, explicit: Mapping[str, Vip], pool: ipaddress.IPv4Network | None) -> None:
        self.explicit = dict(explicit)
        self.pool = pool
        self.assigned: dict[str, Vip] = {}
        #: Addresses taken (explicit ones, whole or per port, and pool ones): pool
        #: candidates skip them.
        self._taken: dict[str, str] = {v.address: n for n, v in self.explicit.items()}
        #: (name, candidates skipped, got one) for the agent to log, drained by the caller.
        self.collisions: list[tuple[str, int, bool]] = []

    def get(self, name: str) -> Vip | None:
        return self.explicit.get(name) or self.assigned.get(name)

    def assign(self, names: Iterable[str]) -> None:
        """Give each of `names` its VIP if it has none yet (in name order, see the module doc)."""
        if self.pool is None:
            return
        for name in sorted(names):
            if name in self.explicit or name in self.assigned:
                continue
            for i in range(MAX_PROBES):
                addr = _candidate(self.pool, name, i)
                if addr not in self._taken:
                    self._taken[addr] = name
                    self.assigned[name] = Vip(addr, 0)
                    if i:
                        self.collisions.append((name, i, True))
                    break
            else:
                self.collisions.append((name, MAX_PROBES, False))

    def release(self, name: str) -> None:
        v = self.assigned.pop(name, None)
        if v is not None:
            self._taken.pop(v.address, None)

    def rebuilt(self, explicit: Mapping[str, Vip], pool: ipaddress.IPv4Network | None, names: Iterable[str]) -> VipTable:
        """The table for a reloaded config: pool VIPs that are still valid stay where they
        are (no reshuffle on reload); the rest are assigned afresh."""
        t = VipTable(explicit, pool)
        names = set(names)
        if pool is not None:
            for name in sorted(self.assigned.keys() & names):
                v = self.assigned[name]
                if name not in explicit and ipaddress.IPv4Address(v.address) in pool and v.address not in t._taken:
                    t._taken[v.address] = name
                    t.assigned[name] = v
        t.assign(names)
        return t
