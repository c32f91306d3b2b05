"""The systemd notify protocol: tell the service manager how the agent is doing.

systemd hands a `Type=notify` service the address of a datagram socket in `NOTIFY_SOCKET`
(a filesystem path, or `@name` for an abstract socket). Each datagram is newline-separated
`KEY=VALUE` lines; the ones softlb sends are:

- `READY=1` once the catalog is loaded (until then `systemctl start` waits and dependants
  are held back),
- `RELOADING=1` + `MONOTONIC_USEC=` when a SIGHUP reload starts, then `READY=1` when done,
- `STOPPING=1` when shutdown begins,
- `WATCHDOG=1` every half `WatchdogSec=`, from the trio loop itself,
- `STATUS=...` one human line shown by `systemctl status` (see docs/OPERATIONS.md).

Without `NOTIFY_SOCKET` (started by hand, in tests) every call is a no-op that returns False,
so callers never need to ask whether they run under systemd.

Error handling: a notification that cannot be delivered is logged once per kind and
reported as False, never raised: a missing status line must not take down a load balancer
that is otherwise serving. (If READY=1 is lost systemd times the start out and says so.)
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping, MutableMapping, NoReturn

import trio

log = logging.getLogger("softlb.systemd")

#: Environment variables that belong to the service manager's conversation with *this*
#: process; `unset_environment()` removes them so a child we spawn never speaks for us.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str | bytes:
    """`@name` is Linux's abstract namespace: the kernel name starts with a NUL byte."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        # systemd also accepts vsock:..., which no softlb host uses; refuse clearly.
        raise ValueError(f"NOTIFY_SOCKET={value!r}: expected an absolute path or @abstract name")
    return value


class Notifier:
    """One process's channel to the service manager.

    Build it with `Notifier.from_environ()`; the socket is opened lazily on first send and
    kept, because watchdog pings repeat for the life of the process.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        try:
            self._target = _socket_address(address) if address else None
        except ValueError as e:
            # A manager we cannot talk to (vsock:..., a relative path) must not stop the
            # agent from serving: notifications are off, and we say so once.
            log.warning("not notifying the service manager: %s", e)
            self._target = None
        self._sock: socket.socket | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; True if the manager got it."""
        if self._target is None:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a single KEY=VALUE line: {line!r}")
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # MSG_DONTWAIT, as libsystemd does: this runs on the event loop, and a manager
            # slow to read its queue (PID 1 busy in daemon-reload) must cost a dropped
            # STATUS or ping, never a frozen agent.
            self._sock.sendto(payload, socket.MSG_DONTWAIT, self._target)
        except OSError as e:
            kind = lines[0].split("=", 1)[0] if lines else "?"
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("cannot notify the service manager at %s (%s): %s", self.address, kind, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 (Type=notify-reload) insists on MONOTONIC_USEC to order the reload
        # against its own clock; older versions ignore it, so always send it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # STATUS is one line in `systemctl status`; fold anything multi-line instead of failing.
    return ("STATUS=" + " ".join(text.split()),)


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed for this process.

    The ping period is half of `WATCHDOG_USEC` (what sd_watchdog_enabled(3) recommends), so a
    single late ping never trips it. `WATCHDOG_PID`, when set, must name this process: the
    variables may have leaked from a parent that is the one being watched.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    return usec / 1e6 / 2


def unset_environment(environ: MutableMapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    for name in NOTIFY_ENV:
        env.pop(name, None)


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ping `WATCHDOG=1` every `interval` seconds for as long as the trio loop runs.

    The pings are sent from a trio task on purpose, not a thread: if the event loop wedges
    (a blocking call, a runaway CPU loop) the pings stop and systemd restarts the agent,
    which is the failure the watchdog exists to catch.
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval}")
    notifier.watchdog()
    task_status.started()
    while True:
        await trio.sleep(interval)
        notifier.watchdog()
