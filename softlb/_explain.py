"""Why each endpoint is, or is not, served: the answer to "resolve web fails on this host".

A pure function of state the balancer already has (the catalog's endpoints before the tag
filter, the service config, the agent's locality, the health rows, the served set, panic and
slow-start weights). Nothing here runs per request: `softlb endpoints`, the admin API and a
failed resolve's error message call it.

The reasons follow the pipeline in _balancer's docstring, first match wins, so each
endpoint gets the one reason that stops it earliest:

    tag_filter   the service's `tags` setting drops it before anything else sees it
    registry     the catalog says critical or maintenance
    probe        the agent's active probe holds it down
    ejected      passive outlier detection ejected it (until when)
    weight_zero  weight 0: drained, never picked (unless every weight is 0)
    locality     eligible, but a nearer locality level has endpoints (or none matches)
    tag_request  (for one resolve) lacks a tag the caller asked for

Served endpoints carry a note instead: `panic` (served though not eligible, because too few
are), or `slow_start` (share of its weight now).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from ._config import ServiceConfig
from ._health import REGISTRY_ELIGIBLE, EndpointHealth, ProbeState
from ._locality import Locality, nearest_count
from ._types import Endpoint

#: Reason codes, in pipeline order (stable: they appear in JSON and metrics docs).
REASONS = ("tag_filter", "registry", "probe", "ejected", "weight_zero", "locality", "tag_request")


@dataclass(frozen=True, slots=True)
class Why:
    id: str
    served: bool
    #: "" for an endpoint served normally; a code from REASONS, or "panic"/"slow_start".
    reason: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"served": self.served, "reason": self.reason or None, "detail": self.detail}


def _tags(tags: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{t}"' for t in tags) + "]"


def _locality_detail(name: str, ep: Endpoint, cfg: ServiceConfig, here: Locality, level: str) -> str:
    order = ", ".join(f'"{x}"' for x in cfg.locality)
    if level in ("node", "zone", "region"):
        return (f"locality: serving {level} {getattr(here, level)!r} (the first level of services.{name}.locality = [{order}] with eligible "
                f"endpoints); this endpoint's {level} is {getattr(ep, level) or '(none)'!r}")
    n = nearest_count(level)
    if n is not None:
        return (f"locality: serving the {n} nearest eligible endpoint{'s' if n != 1 else ''} by rank (level \"{level}\" of "
                f"services.{name}.locality = [{order}]); this endpoint's {_rank(ep)}")
    labels = [lv for lv in cfg.locality if lv in ("node", "zone", "region")]
    mine = [f"{lv} {getattr(here, lv)!r}" if getattr(here, lv) else f"{lv} unset" for lv in labels]
    theirs = [f"{lv} {getattr(ep, lv) or '(none)'!r}" for lv in labels]
    if any(nearest_count(lv) is not None for lv in cfg.locality):
        mine.append("nearest: no eligible endpoint has a rank")
        theirs.append(_rank(ep))
    return (f"locality: no eligible endpoint matches the agent at any level of services.{name}.locality = [{order}] "
            f"(agent: {', '.join(mine)}; endpoint: {', '.join(theirs)}); add \"*\" to fall back to any")


def _rank(ep: Endpoint) -> str:
    return "rank is none (the source gave no order)" if ep.rank is None else f"rank is {ep.rank} (0 = nearest)"


def explain(
    name: str,
    catalog: Sequence[Endpoint],
    cfg: ServiceConfig,
    here: Locality,
    health: Mapping[str, EndpointHealth],
    served: Collection[str],
    panic: bool,
    weights: Mapping[str, float] | None,
    level: str,
    now: float,
    request_tags: Sequence[str] = (),
) -> list[Why]:
    """One Why per catalog endpoint, in catalog order (see the module docstring).

    `health` has rows for the endpoints past the tag filter; `served` is the set picks are
    made from now; `level` the locality level that supplied it; `weights` slow start's
    effective weights (None: catalog weights).
    """
    need = set(cfg.tags)
    asked = set(request_tags)
    # The weight-0 rule is decided on the set past the tag filter (as the balancer does):
    # if every weight there is 0 they all count as 1, else weight 0 is never picked.
    listed = [e.weight for e in catalog if e.id in health]
    all_zero = bool(listed) and all(w <= 0 for w in listed)
    out = []
    for ep in catalog:
        h = health.get(ep.id)
        if need and not need.issubset(ep.tags) or h is None:
            have = _tags(ep.tags) if ep.tags else "no tags"
            out.append(Why(ep.id, False, "tag_filter",
                           f"tag filter: services.{name}.tags = {_tags(cfg.tags)}; this endpoint has {have}"))
            continue
        is_served = ep.id in served
        why = _health_reason(ep, h, now)
        if is_served and why is not None:
            out.append(Why(ep.id, True, "panic", f"served in panic (too few eligible endpoints); otherwise {why[1]}"))
            continue
        if why is not None:
            out.append(Why(ep.id, False, *why))
            continue
        if ep.weight <= 0 and not all_zero:
            out.append(Why(ep.id, False, "weight_zero", "weight 0: drained, never picked (not even when "
                                                        "nothing else is left)"))
            continue
        if not is_served:
            out.append(Why(ep.id, False, "locality", _locality_detail(name, ep, cfg, here, level)))
            continue
        if asked and not asked.issubset(ep.tags):
            out.append(Why(ep.id, False, "tag_request",
                           f"lacks the requested tags {_tags(sorted(asked - set(ep.tags)))}"))
            continue
        w = None if weights is None else weights.get(ep.id)
        if w is not None and ep.weight:
            out.append(Why(ep.id, True, "slow_start", f"slow start: {w / ep.weight:.0%} of its weight now"))
            continue
        out.append(Why(ep.id, True, "", "served"))
    return out


def _health_reason(ep: Endpoint, h: EndpointHealth, now: float) -> tuple[str, str] | None:
    if ep.registry not in REGISTRY_ELIGIBLE:
        return "registry", f"registry: {ep.registry.value}"
    if h.probe is ProbeState.DOWN:
        last = f": {h.last_probe_detail}" if h.last_probe_detail else ""
        return "probe", f"probe down{last}"
    if h.ejected:
        left = h.ejected_remaining or 0.0
        return "ejected", f"ejected by outlier detection for {left:.0f}s more (ejection #{h.ejections})"
    return None


def explain_empty(name: str, whys: Sequence[Why], cfg: ServiceConfig) -> str:
    """The message of a resolve that found nothing to serve: which reasons emptied the set,
    the first (earliest in the pipeline) named in full, with what to look at."""
    if not whys:
        return f"service \"{name}\" has no endpoints in the catalog"
    counts: dict[str, int] = {}
    first: dict[str, Why] = {}
    for w in whys:
        if not w.served:
            counts[w.reason] = counts.get(w.reason, 0) + 1
            first.setdefault(w.reason, w)
    order = [r for r in REASONS if r in counts]
    parts = ", ".join(f"{counts[r]} {r.replace('_', ' ')}" for r in order)
    lead = first[order[0]] if order else None
    msg = f"no endpoint of \"{name}\" can be served: {len(whys)} in the catalog; not served: {parts}"
    if lead is not None:
        msg += f" (first: {lead.id}: {lead.detail})"
    if order and order[0] == "tag_filter" and counts["tag_filter"] == len(whys):
        msg += f"; check services.{name}.tags"
    return msg
