"""Locality preference, like Kubernetes' topologyKeys: serve from the nearest level that can.

The service's `locality` is an ordered list drawn from "node", "zone", "region",
"nearest:N" and "*". Levels are tried in order; the first one with any eligible endpoint is
the whole candidate set. "node"/"zone"/"region" match endpoints sharing the agent's own label
at that level; "nearest:N" is the N eligible endpoints nearest by the source's `rank` (see
below). "*" means "any endpoint" and is the only fallback: without it, a service whose
preferred levels are all empty has no candidates (the caller gets NO_HEALTHY_ENDPOINT),
which is what an operator asking for node-local traffic only wants. An empty list means no
preference at all.

A level where the agent itself has no label (say it was started without --zone) matches
nothing: an empty zone is "unknown", not a zone shared with every unlabelled endpoint. In
the same spirit "nearest:N" matches nothing when no eligible endpoint has a rank (the
source gave no order: Consul without `near`, a file catalog without `rank`), rather than
serving N endpoints chosen by name. When some have a rank, the unranked ones sort after
every ranked one (by id), so they only fill places the ranked ones leave.

Being chosen from the eligible set, "nearest:N" moves on by itself: when one of the N
nearest fails its checks, the next nearest takes its place, as Envoy's and Ribbon's
zone-aware balancers spill to the next zone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ._types import Endpoint

LEVELS = ("node", "zone", "region", "*")
NEAREST = "nearest:"
#: Enough for any real service; keeps a typo such as "nearest:20000" out.
MAX_NEAREST = 10_000


@dataclass(frozen=True)
class Locality:
    """Where this agent runs (its --node, --zone and --region)."""

    node: str = ""
    zone: str = ""
    region: str = ""


@dataclass(frozen=True)
class LocalChoice:
    #: The level that supplied the candidates: "node", "zone", "region", "nearest:N", "*",
    #: or "" when there is no preference (all endpoints) or nothing matched (no endpoints).
    level: str
    endpoints: tuple[Endpoint, ...]


def nearest_count(level: str) -> int | None:
    """N of a valid "nearest:N" level; None for any other string."""
    if not level.startswith(NEAREST):
        return None
    digits = level[len(NEAREST):]
    if not digits.isascii() or not digits.isdigit():
        return None
    n = int(digits)
    return n if 1 <= n <= MAX_NEAREST else None


def level_problem(level: str) -> str:
    """Why `level` is not a locality level ("" when it is one)."""
    if level in LEVELS or nearest_count(level) is not None:
        return ""
    if level == "nearest" or level == "near" or level.startswith(NEAREST):
        return (f"\"{level}\" is not a valid nearest level: write \"nearest:N\" with N from 1 to "
                f"{MAX_NEAREST} (the N nearest eligible endpoints)")
    return f"unknown level \"{level}\" (one of: node, zone, region, nearest:N, *)"


def rank_key(ep: Endpoint) -> tuple[bool, int, str]:
    """Nearest first; endpoints without a rank after every ranked one, by id."""
    return (ep.rank is None, 0 if ep.rank is None else ep.rank, ep.id)


def nearest(endpoints: Sequence[Endpoint], n: int) -> tuple[Endpoint, ...]:
    """The `n` endpoints with the lowest rank_key, in their input order; none when no endpoint
    has a rank (see the module docstring)."""
    if not any(e.rank is not None for e in endpoints):
        return ()
    if len(endpoints) <= n:
        return tuple(endpoints)
    keep = {e.id for e in sorted(endpoints, key=rank_key)[:n]}
    return tuple(e for e in endpoints if e.id in keep)


def within(pool: Sequence[Endpoint], chosen: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Every endpoint of `pool` at least as near as the farthest of `chosen` (panic's reach
    for a "nearest:N" level: the candidates inside the radius the eligible ones span)."""
    if not chosen:
        return ()
    edge = max(rank_key(e) for e in chosen)
    return tuple(e for e in pool if rank_key(e) <= edge)


def prefer_local(endpoints: Sequence[Endpoint], preference: Sequence[str], here: Locality) -> LocalChoice:
    """The endpoints of the first preferred level that has any (see the module docstring)."""
    if not preference:
        return LocalChoice("", tuple(endpoints))
    for level in preference:
        if level == "*":
            return LocalChoice("*", tuple(endpoints))
        n = nearest_count(level)
        if n is not None:
            chosen = nearest(endpoints, n)
            if chosen:
                return LocalChoice(level, chosen)
            continue
        if level not in LEVELS:
            raise ValueError(f"unknown locality level {level!r} (one of: node, zone, region, nearest:N, *)")
        mine = getattr(here, level)
        if not mine:
            continue
        chosen = tuple(ep for ep in endpoints if getattr(ep, level) == mine)
        if chosen:
            return LocalChoice(level, chosen)
    return LocalChoice("", ())
