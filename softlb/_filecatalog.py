"""The embedded "file" catalog: a TOML document of services and their endpoints.

    [[services.web.endpoints]]
    address = "127.0.0.1"
    port = 8001
    id = "web-1"            # optional; default "address:port"
    weight = 1              # optional, >= 0
    tags = ["v2"]           # optional
    meta = { version = "2" }
    node = "host-a"         # optional locality labels
    zone = "eu-1a"
    region = "eu-1"
    registry = "maintenance"   # optional: passing (default), warning, critical, maintenance
    rank = 0                # optional, >= 0: nearest first, for the "nearest:N" locality level

Parsing is all-or-nothing: one bad endpoint rejects the whole document, so the agent keeps
serving the last good catalog instead of a half-applied one.
"""

from __future__ import annotations

from typing import Any, Mapping

from ._address import address_problem
from ._config import _Table, toml_document
from ._errors import ConfigError
from ._types import Endpoint, RegistryHealth



def parse_catalog_text(text: bytes | str) -> dict[str, tuple[Endpoint, ...]]:
    """A catalog file's contents (bytes as read, or text); ConfigError for anything wrong."""
    return parse_catalog(toml_document(text, "catalog"))


def parse_catalog(data: Mapping[str, Any]) -> dict[str, tuple[Endpoint, ...]]:
    root = _Table(data, "", "catalog")
    services = root.table("services") or _Table({}, "services", "catalog")
    root.done()
    out: dict[str, tuple[Endpoint, ...]] = {}
    for name in services.data:
        svc = services.table(name)
        assert svc is not None
        if not name.strip():
            raise ConfigError("services: empty service name")
        raw = svc.raw("endpoints", [])
        svc.done()
        if not isinstance(raw, list):
            raise ConfigError(f"services.{name}.endpoints: expected an array of tables ([[services.{name}.endpoints]])")
        eps = [_endpoint(_Table(e, f"services.{name}.endpoints[{i}]", "catalog")) for i, e in enumerate(raw)]
        seen: set[str] = set()
        for i, ep in enumerate(eps):
            if ep.id in seen:
                raise ConfigError(f"services.{name}.endpoints[{i}]: duplicate endpoint id \"{ep.id}\"")
            seen.add(ep.id)
        out[name] = tuple(eps)
    return out


def _endpoint(t: _Table) -> Endpoint:
    address = t.str("address", "")
    if not address:
        raise ConfigError(f"{t.path}.address: required")
    problem = address_problem(address)
    if problem:
        raise ConfigError(f"{t.path}.address: \"{address[:100]}\": {problem}")
    if not t.has("port"):
        raise ConfigError(f"{t.path}.port: required")
    port = t.int("port", 0, 1, 65535)
    registry = t.str("registry", RegistryHealth.PASSING.value)
    try:
        state = RegistryHealth(registry)
    except ValueError:
        raise ConfigError(
            f"{t.path}.registry: \"{registry}\" is not one of {', '.join(h.value for h in RegistryHealth)}"
        ) from None
    ep = Endpoint(
        id=t.str("id", f"{address}:{port}") or f"{address}:{port}",
        address=address,
        port=port,
        weight=t.int("weight", 1, 0, 1_000_000),
        tags=t.strings("tags"),
        meta=t.str_map("meta"),
        node=t.str("node", ""),
        zone=t.str("zone", ""),
        region=t.str("region", ""),
        registry=state,
        rank=t.int("rank", 0, 0, 1_000_000) if t.has("rank") else None,
    )
    t.done()
    return ep
