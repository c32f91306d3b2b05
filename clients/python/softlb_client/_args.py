"""Request arguments shared by the sync and trio clients (optional fields left out)."""

from __future__ import annotations

from typing import Any


def resolve_args(service: str, key: str | bytes | None, tags: list[str] | None, lease: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"service": service}
    if key is not None:
        args["key"] = key
    if tags:
        args["tags"] = list(tags)
    if not lease:
        args["lease"] = False
    return args


def report_args(lease: int | None, ok: bool, latency: float | None, service: str | None, endpoint: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"ok": ok}
    for k, v in (("lease", lease), ("latency", latency), ("service", service), ("endpoint", endpoint)):
        if v is not None:
            args[k] = v
    return args
