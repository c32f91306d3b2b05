"""The agent's side of running as a systemd service: sockets in, readiness and status out.

One object, made first thing in `run_agent`, so every step of the agent's life is told to the
service manager in one vocabulary (docs/OPERATIONS.md, "What `systemctl status` says"):

    starting: loading catalog (file PATH)           before the first catalog
    READY=1   serving N services, M endpoints; catalog: file (fresh)
    RELOADING=1 reloading PATH  ->  READY=1 serving ...[; reload refused: WHY]
    STOPPING=1 stopping: draining N connections (up to Ds)

Without systemd all of it is silent and the agent binds its own sockets.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Mapping, MutableMapping, NoReturn

import trio

from softlb import ConfigError
from softlb import ServiceBalancer
from softlb import check_listen
from softlb import format_duration, plural

from . import sd_notify
from .listen_fds import InheritedListeners, ListenFdsError
from .sd_notify import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("softlb.agent")

#: How often the STATUS line is recomputed; it is sent only when its text changed.
STATUS_INTERVAL = 1.0
#: Error text in a STATUS line is cut here: `systemctl status` shows one terminal line.
MAX_REASON = 160


class ServiceManager:
    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.notifier = Notifier.from_environ(env)
        self.watchdog_interval = watchdog_interval(env)
        # Read once, then removed, so nothing the agent spawns speaks for it to systemd.
        sd_notify.unset_environment(env)
        try:
            self.inherited = InheritedListeners.from_environ(env)
        except ListenFdsError as e:  # a unit passing the wrong kind of socket: say so, exit 2
            raise ConfigError(f"sockets passed by the service manager: {e}") from None
        self.reload_error = ""
        self._status = ""

    # ------------------------------------------------------------------ sockets

    def listener(
        self, role: str, address: str, bind: Callable[[str], socket.socket], *, sole_unix: bool = False,
        allow_non_loopback: bool = False,
    ) -> tuple[socket.socket, str, bool]:
        """(socket, address, inherited?) for one configured listener: systemd's if it passed
        one for this role or address, else `bind(address)`.

        An inherited TCP socket obeys the loopback rule a bound one does (agent.listen,
        agent.admin): one bound to 0.0.0.0 or a LAN address is refused (ConfigError, exit 2)
        unless allow_non_loopback is set, whatever its name."""
        got = self.inherited.claim(role, address, sole_unix=sole_unix)
        if got is None:
            return bind(address), address, False
        if not got.is_unix:
            try:
                check_listen(got.address, f"{role}: the socket passed by the service manager ({got.describe()})",
                             allow_non_loopback)
            except ConfigError:
                got.sock.close()
                raise
        log.info("%s: using the socket passed by the service manager, %s", role, got.describe())
        return got.sock, got.address, True

    def close_unclaimed(self) -> None:
        self.inherited.close_unclaimed()

    # ------------------------------------------------------------------ notifications

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    def ready(self, text: str) -> None:
        self._status = text
        self.notifier.ready(text)

    def reloading(self, path: str | None) -> None:
        self._status = f"reloading {path or '(no config file)'}"
        self.notifier.reloading(self._status)

    def reloaded(self, error: str | None, text: Callable[[str], str]) -> None:
        """Back to READY after a reload; `error` is why it was refused (None: applied)."""
        self.reload_error = _cut(error or "")
        self.ready(text(self.reload_error))

    def stopping(self, connections: int, bound: float) -> None:
        self._status = f"stopping: draining {connections} connections (up to {format_duration(bound)})"
        self.notifier.stopping(self._status)

    async def run(
        self, text: Callable[[str], str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Watchdog pings and STATUS refreshes, from the trio loop, for the agent's life."""
        async with trio.open_nursery() as nursery:
            if self.watchdog_interval is not None:
                await nursery.start(run_watchdog, self.notifier, self.watchdog_interval)
            task_status.started()
            while True:
                await trio.sleep(STATUS_INTERVAL)
                self.status(text(self.reload_error))
        raise AssertionError("unreachable")


def status_line(
    services: Mapping[str, ServiceBalancer],
    source: str,
    now: float,
    *,
    catalog_error: str = "",
    reload_error: str = "",
) -> str:
    """The one-line STATUS= for a serving agent (grammar in docs/OPERATIONS.md)."""
    endpoints = sum(len(b.endpoints) for b in services.values())
    ejected = sum(len(b.endpoints) - b.eligible_count for b in services.values())
    parts = [f"serving {plural(len(services), 'service')}, {plural(endpoints, 'endpoint')}" + (f", {ejected} ejected" if ejected else "")]
    panic = sorted(name for name, b in services.items() if b.panic)
    if panic:
        parts.append("panic: " + ", ".join(panic))
    stale = [now - b.fetched_at for b in services.values() if b.stale and b.fetched_at is not None]
    if catalog_error:
        freshness = f"last reload failed: {_cut(catalog_error)}"
    elif stale:
        freshness = f"stale {format_duration(max(stale))}"
    elif any(b.stale for b in services.values()):
        freshness = "stale"
    else:
        freshness = "fresh"
    parts.append(f"catalog: {source} ({freshness})")
    if reload_error:
        parts.append(f"reload refused: {reload_error}")
    return "; ".join(parts)


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


# ---------------------------------------------------------------------------- logging


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`: journald reads the `<N>` as the syslog priority (so
    `journalctl -p warning` works) and stamps the time itself."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        # Each line of a traceback is its own journal entry; give every one the priority.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode for the stream it connected to journald; a
    redirect by the operator changes the inode, which is why both are compared."""
    env = os.environ if environ is None else environ
    want = env.get("JOURNAL_STREAM")
    if not want:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"
