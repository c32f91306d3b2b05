"""The last good Consul catalog on disk, so an agent restarted during an outage still answers.

Format: one JSON document, `{"version": 1, "saved_at": <unix time>, "services": {name:
{"fetched_at": <unix time>, "endpoints": [Endpoint.as_dict(), ...]}}}`. Times are wall-clock
here because they must survive a restart; in memory they are monotonic, converted at the
edges. Writes are atomic (temp file, fsync, rename, fsync of the directory): a crash leaves
the old snapshot or the new one, never half of either. A snapshot that cannot be read is
reported and ignored: the agent then starts with nothing, as it would without one. That
includes JSON nested too deeply to parse and endpoints Consul's mapping would have refused
(weights out of range, malformed addresses). Duplicate endpoint ids in one service (never
written by `save`) keep the first and are logged: the Engine refuses duplicates outright.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import trio

from softlb import MAX_WEIGHT, address_problem
from softlb import Endpoint, RegistryHealth

log = logging.getLogger("softlb.snapshot")

FILENAME = "consul-catalog.json"
VERSION = 1
#: At most one write per this many seconds, however fast Consul changes.
SAVE_INTERVAL = 5.0


class SnapshotError(Exception):
    pass


def snapshot_path(state_dir: str) -> Path:
    return Path(state_dir) / FILENAME


def encode(services: Mapping[str, tuple[Sequence[Endpoint], float]], saved_at: float) -> bytes:
    doc = {"version": VERSION, "saved_at": saved_at, "services": {
        name: {"fetched_at": fetched_at, "endpoints": [e.as_dict() for e in eps]}
        for name, (eps, fetched_at) in sorted(services.items())}}
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def decode(data: bytes) -> dict[str, tuple[tuple[Endpoint, ...], float]]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"not JSON: {e}") from None
    except RecursionError:
        raise SnapshotError("not a snapshot: JSON nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise SnapshotError(f"not a version {VERSION} snapshot")
    services = doc.get("services")
    if not isinstance(services, dict):
        raise SnapshotError("services: expected an object")
    out = {}
    for name, svc in services.items():
        try:
            fetched_at = float(svc["fetched_at"])
            if not math.isfinite(fetched_at):
                raise ValueError(f"fetched_at is {fetched_at}")
            eps = [endpoint_from_dict(d) for d in svc["endpoints"]]
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: int(1e400)
            raise SnapshotError(f"services.{name}: {type(e).__name__}: {e}") from None
        out[name] = (_first_of_each_id(name, eps), fetched_at)
    return out


def _first_of_each_id(service: str, endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
    by_id: dict[str, Endpoint] = {}
    for ep in endpoints:
        by_id.setdefault(ep.id, ep)
    if len(by_id) < len(endpoints):
        log.warning("snapshot: services.%s lists %d endpoints under an id already used; "
                    "keeping the first of each", service, len(endpoints) - len(by_id))
    return tuple(by_id.values())


def endpoint_from_dict(d: Mapping[str, Any]) -> Endpoint:
    port = d["port"]
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"bad port {port!r}")
    weight = int(d.get("weight", 1))
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight {weight} is out of range (0..{MAX_WEIGHT})")
    address = str(d["address"])
    problem = address_problem(address)
    if problem:
        raise ValueError(f"address {address[:100]!r}: {problem}")
    rank = d.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise ValueError(f"bad rank {rank!r}")
    return Endpoint(
        id=str(d["id"]), address=address, port=port, weight=weight, rank=rank,
        tags=tuple(str(t) for t in d.get("tags", ())),
        meta={str(k): str(v) for k, v in dict(d.get("meta", {})).items()},
        node=str(d.get("node", "")), zone=str(d.get("zone", "")), region=str(d.get("region", "")),
        registry=RegistryHealth(d.get("registry", "passing")),
    )


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, published: Mapping[str, tuple[Sequence[Endpoint], float | None]],
         now_mono: float, now_wall: float) -> None:
    """Write the published sets; monotonic fetch times become wall-clock."""
    services = {name: (eps, now_wall - (now_mono - (fetched if fetched is not None else now_mono)))
                for name, (eps, fetched) in published.items()}
    write_atomic(path, encode(services, now_wall))


def remove_stale_temps(path: Path) -> int:
    """Delete temp files a killed writer left behind (`write_atomic` removes its own on any
    error it lives through, but not on SIGKILL or power loss). Only this file's temps,
    never our own pid's. Returns how many were removed."""
    removed = 0
    prefix, mine = f".{path.name}.", f".{path.name}.{os.getpid()}.tmp"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp") and name != mine:
            try:
                (path.parent / name).unlink()
                removed += 1
            except OSError as e:
                log.warning("cannot remove stale snapshot temp file %s: %s", path.parent / name, e.strerror)
    if removed:
        log.info("removed %d stale snapshot temp file(s) next to %s", removed, path)
    return removed


def load(path: Path, now_mono: float, now_wall: float) -> dict[str, tuple[tuple[Endpoint, ...], float]]:
    """The saved sets with monotonic fetch times; {} when there is no usable snapshot.
    Stale temp files of a writer killed mid-write are removed first."""
    remove_stale_temps(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("snapshot %s unreadable (%s); starting without it", path, e.strerror)
        return {}
    try:
        services = decode(data)
    except SnapshotError as e:
        log.warning("snapshot %s ignored: %s", path, e)
        return {}
    # A clock stepped backwards must not make data look newer than it is.
    return {n: (eps, now_mono - max(0.0, now_wall - wall)) for n, (eps, wall) in services.items()}


async def run_snapshot_writer(source: Any, path: Path, *, interval: float = SAVE_INTERVAL,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Save `source.published()` whenever `source.version` moved, at most every `interval`
    seconds, and once more on the way out (shutdown is a cancel)."""
    saved = -1

    async def save_now() -> None:
        nonlocal saved
        version = source.version
        if version == saved:
            return
        data = source.published()
        try:
            await trio.to_thread.run_sync(save, path, data, trio.current_time(), time.time())
            saved = version
        except OSError as e:
            log.warning("cannot save snapshot %s: %s", path, e)

    task_status.started()
    try:
        while True:
            await trio.sleep(interval)
            await save_now()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await save_now()
