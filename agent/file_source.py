"""The "file" catalog source: load the TOML catalog, reload it on change or on request.

Changes are noticed by polling the file's (mtime, size, inode) every POLL_INTERVAL seconds:
stdlib-only, works on every filesystem, and catches editors that replace the file by rename.
A reload that fails to parse is logged and counted; the last good catalog keeps serving.

The file is not trusted (issue 10, item 6): it is opened non-blocking, so a FIFO put in its
place cannot block the agent in open(); anything but a regular file (a FIFO, a device such as
a symlink to /dev/zero) is refused, and so is a file over `catalog.max_bytes`, before it is
read. Reading and parsing a file over 32 KiB run in a worker thread, and over 1 MiB in a
child process (agent/catalog_parser.py: tomllib takes seconds for 100,000 endpoints here, and a
thread would share the GIL with the loop all that time), and the services are applied to the engine a slice at a time with a checkpoint
between, so a big catalog never holds the loop for long (item 9).
"""

from __future__ import annotations

import logging
import os
import stat

import trio

from softlb import ConfigError, EndpointSetBuild
from softlb import parse_catalog_text, plural

from .catalog_parser import CatalogFileError, parse_in_child
from .runtime import Runtime
from .table_builds import run_set_build

log = logging.getLogger("softlb.catalog")

POLL_INTERVAL = 0.5


def _fingerprint(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


#: Files up to this size are parsed in line (~5 ms here); bigger ones in a worker thread.
INLINE_PARSE_BYTES = 32 * 1024
#: Files over this size are parsed by a child process (~0.1 s to start; a 1 MiB file takes
#: ~0.3 s to parse here, and a thread would share the GIL with the loop all that time).
CHILD_PARSE_BYTES = 1 << 20
#: Endpoints applied to the engine between two checkpoints. Applying a service costs more than
#: its endpoints (health tracker, policy, counters): at 500, a slice of five 100-endpoint
#: services held the loop ~5 ms and the bystander's p99 during a 100,000-endpoint reload was
#: 5.9-7.7 ms; at 100, 2.7 ms (bench/bystander.py --only big_reload, same sitting).
APPLY_SLICE = 100


def read_catalog_file(path: str, max_bytes: int) -> bytes:
    """The file's bytes (parse_catalog_text decodes them: not UTF-8 is a ConfigError);
    CatalogFileError for a FIFO, a device, a directory or a file over `max_bytes`. Never
    blocks on a FIFO (O_NONBLOCK) and never reads more than max_bytes+1."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a directory" if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise CatalogFileError(f"is {kind}, not a regular file")
        if st.st_size > max_bytes:
            raise CatalogFileError(f"is {st.st_size} bytes, over catalog.max_bytes = {max_bytes}")
        chunks, n = [], 0
        while n <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:  # grew while being read
            raise CatalogFileError(f"is over catalog.max_bytes = {max_bytes}")
    finally:
        os.close(fd)
    return b"".join(chunks)


def _read_and_parse(path: str, max_bytes: int) -> dict:
    return parse_catalog_text(read_catalog_file(path, max_bytes))


async def apply_in_slices(rt: Runtime, services: dict, now: float) -> set[str]:
    """engine.replace_all, a few services at a time with a checkpoint between, so other
    clients are answered while a big catalog is applied; each slice's changes are
    dispatched before the checkpoint. A service of SET_STEP_MIN endpoints or more is itself
    applied in steps (agent/table_builds.py). Each service changes atomically; callers may
    see some services new and others old for a moment, as with any reload."""
    engine = rt.engine
    changed: set[str] = set()
    pending: set[str] = set()
    for name in [n for n in engine.services if n not in services]:
        pending |= engine.remove_service(name, now)
    done = 0
    for name, eps in services.items():
        update = engine.begin_set_service(name, eps, now)
        if isinstance(update, EndpointSetBuild):
            rt.dispatch(frozenset(pending))
            changed |= pending | await run_set_build(rt, update)
            pending, done = set(), 0
            continue
        pending |= update
        done += len(eps) + 1
        if done >= APPLY_SLICE:
            done = 0
            rt.dispatch(frozenset(pending))
            changed |= pending
            pending = set()
            await trio.lowlevel.checkpoint()
    rt.dispatch(frozenset(pending))
    return changed | pending


async def load_catalog(rt: Runtime, path: str) -> bool:
    """Parse and apply the catalog; on error keep the current one. True on success."""
    try:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0  # the read below reports it
        small = size <= INLINE_PARSE_BYTES
        if small:  # a few ms: cheaper in line than the GIL hand-overs of a worker thread
            services = _read_and_parse(path, rt.config.max_catalog_bytes)
        elif size > CHILD_PARSE_BYTES:  # seconds of parsing: no GIL to share (agent/catalog_parser.py)
            services = await parse_in_child(path, rt.config.max_catalog_bytes)
        else:
            services = await trio.to_thread.run_sync(_read_and_parse, path, rt.config.max_catalog_bytes)
    except CatalogFileError as e:
        rt.stats.catalog_refused += 1
        return _refused(rt, path, e)
    except (OSError, ConfigError) as e:
        if isinstance(e, OSError):  # unreadable: the source is down; a bad edit is a refused reload
            rt.source_state = "error"
        return _refused(rt, path, e)
    return await _apply(rt, path, services)


def _refused(rt: Runtime, path: str, e: Exception) -> bool:
    rt.stats.catalog_errors += 1
    rt.stats.last_catalog_error = f"{path}: {e}"
    rt.note_reload("catalog", rt.stats.last_catalog_error)
    if rt.catalog_ready.is_set():
        log.error("catalog %s not reloaded, still serving the last good one: %s", path, e)
    return False


async def _apply(rt: Runtime, path: str, services: dict) -> bool:
    if not services and rt.engine.services:
        # Truncate-then-write tools and half-finished edits produce exactly this; dropping
        # every service would fail every caller on the host. Removing a service one by one
        # still works, and a catalog that is meant to be empty can be served on restart.
        rt.stats.catalog_errors += 1
        rt.stats.last_catalog_error = f"{path}: the catalog is empty"
        rt.note_reload("catalog", rt.stats.last_catalog_error)
        log.error("catalog %s is empty: not reloaded, still serving the last good %d services", path, len(rt.engine.services))
        return False
    changed = await apply_in_slices(rt, services, trio.current_time())
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
        if not await load_catalog(self.rt, self.path):
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
                await load_catalog(self.rt, self.path)
            elif fp is not None and not self.rt.stats.last_catalog_error:
                self.rt.source_confirmed_at = trio.current_time()  # what we serve is what the file says
