"""Locality preference, like Kubernetes' topologyKeys: serve from the nearest level that can.

The service's `locality` is an ordered list drawn from "node", "zone", "region" and "*".
Levels are tried in order; the first one with any eligible endpoint sharing the agent's own
label at that level is the whole candidate set. "*" means "any endpoint" and is the only
fallback: without it, a service whose preferred levels are all empty has no candidates
(the caller gets NO_HEALTHY_ENDPOINT), which is what an operator asking for node-local
traffic only wants. An empty list means no preference at all.

A level where the agent itself has no label (say it was started without --zone) matches
nothing: an empty zone is "unknown", not a zone shared with every unlabelled endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ._types import Endpoint

LEVELS = ("node", "zone", "region", "*")


@dataclass(frozen=True)
class Locality:
    """Where this agent runs (its --node, --zone and --region)."""

    node: str = ""
    zone: str = ""
    region: str = ""


@dataclass(frozen=True)
class LocalChoice:
    #: The level that supplied the candidates: "node", "zone", "region", "*", or "" when
    #: there is no preference (all endpoints) or nothing matched (no endpoints).
    level: str
    endpoints: tuple[Endpoint, ...]


def prefer_local(endpoints: Sequence[Endpoint], preference: Sequence[str], here: Locality) -> LocalChoice:
    """The endpoints of the first preferred level that has any (see the module docstring)."""
    if not preference:
        return LocalChoice("", tuple(endpoints))
    for level in preference:
        if level == "*":
            return LocalChoice("*", tuple(endpoints))
        if level not in LEVELS:
            raise ValueError(f"unknown locality level {level!r} (one of: {', '.join(LEVELS)})")
        mine = getattr(here, level)
        if not mine:
            continue
        chosen = tuple(ep for ep in endpoints if getattr(ep, level) == mine)
        if chosen:
            return LocalChoice(level, chosen)
    return LocalChoice("", ())
