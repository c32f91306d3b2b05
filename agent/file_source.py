"""The "file" catalog source: load the TOML catalog, reload it on change or on request.

Changes are noticed by polling the file's (mtime, size, inode) every POLL_INTERVAL seconds:
stdlib-only, works on every filesystem, and catches editors that replace the file by rename.
A reload that fails to parse is logged and counted; the last good catalog keeps serving.
"""

from __future__ import annotations

import logging
import os

import trio

from softlb import ConfigError
from softlb import parse_catalog_text, plural

from .runtime import Runtime

log = logging.getLogger("softlb.catalog")

POLL_INTERVAL = 0.5


def _fingerprint(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_catalog(rt: Runtime, path: str) -> bool:
    """Parse and apply the catalog; on error keep the current one. True on success."""
    try:
        with open(path, encoding="utf-8") as f:
            services = parse_catalog_text(f.read())
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        rt.stats.catalog_errors += 1
        rt.stats.last_catalog_error = f"{path}: {e}"
        rt.note_reload("catalog", rt.stats.last_catalog_error)
        if isinstance(e, OSError):  # unreadable: the source is down; a bad edit is a refused reload
            rt.source_state = "error"
        if rt.catalog_ready.is_set():
            log.error("catalog %s not reloaded, still serving the last good one: %s", path, e)
        return False
    if not services and rt.engine.services:
        # Truncate-then-write tools and half-finished edits produce exactly this; dropping
        # every service would fail every caller on the host. Removing a service one by one
        # still works, and a catalog that is meant to be empty can be served on restart.
        rt.stats.catalog_errors += 1
        rt.stats.last_catalog_error = f"{path}: the catalog is empty"
        rt.note_reload("catalog", rt.stats.last_catalog_error)
        log.error("catalog %s is empty: not reloaded, still serving the last good %d services", path, len(rt.engine.services))
        return False
    changed = rt.engine.replace_all(services, trio.current_time())
    rt.dispatch(changed)
    rt.stats.catalog_reloads += 1
    rt.stats.last_catalog_error = ""
    rt.note_reload("catalog", "")
    rt.source_state = "ok"
    rt.source_confirmed_at = trio.current_time()
    n_eps = sum(len(v) for v in services.values())
    rt.source_status = f"file {path}: {plural(len(services), 'service')}, {plural(n_eps, 'endpoint')}"
    if rt.catalog_ready.is_set():
        log.info("catalog %s reloaded: %d services, %d changed", path, len(services), len(changed))
    return True


class FileSource:
    def __init__(self, rt: Runtime, path: str) -> None:
        self.rt = rt
        self.path = path
        self._reload_now = trio.Event()

    def request_reload(self) -> None:
        self._reload_now.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        seen = _fingerprint(self.path)
        if not load_catalog(self.rt, self.path):
            raise ConfigError(self.rt.stats.last_catalog_error)
        self.rt.catalog_ready.set()
        task_status.started()
        while True:
            with trio.move_on_after(POLL_INTERVAL):
                await self._reload_now.wait()
            forced = self._reload_now.is_set()
            self._reload_now = trio.Event()
            fp = _fingerprint(self.path)
            if forced or (fp != seen and fp is not None):
                seen = fp
                load_catalog(self.rt, self.path)
            elif fp is not None and not self.rt.stats.last_catalog_error:
                self.rt.source_confirmed_at = trio.current_time()  # what we serve is what the file says
