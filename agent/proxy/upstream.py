"""Opening a connection to a picked endpoint, trying others when a connect fails."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from dataclasses import dataclass

import trio

from ..runtime import Runtime
from .figures import ProxyFigures
from .picks import Held, NoEndpoint, finish, pick, pick_now, release

log = logging.getLogger("softlb.proxy")

#: Errors that are the agent's own trouble (out of fds or memory), not the endpoint's:
#: they are never reported against it.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


class UpstreamFailed(Exception):
    """Every try failed; the text lists them."""


@dataclass(frozen=True, slots=True)
class Try:
    connect_timeout: float
    retries: int


async def open_socket(address: str, port: int, timeout: float) -> trio.socket.SocketType:
    """A connected trio socket (http2's upstreams)."""
    return trio.socket.from_stdlib_socket(await open_raw(address, port, timeout))


#: What `_begin` says of a connect whose handshake is still running.
IN_PROGRESS = -1


def _begin(address: str, port: int) -> tuple[socket.socket, int]:
    """A non-blocking socket with its connect started: (socket, 0 when connected,
    IN_PROGRESS while the handshake runs, else the errno). Raises OSError when no socket
    could be made."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = raw.connect_ex((address, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            # On loopback the handshake is over by the time connect returns: one poll
            # says so, and spares a timeout scope and a trio wait (~60 µs here).
            p = select.poll()
            p.register(raw, select.POLLOUT)
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if p.poll(0) else IN_PROGRESS
    except BaseException:
        raw.close()
        raise
    return raw, err


async def open_raw(address: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking stdlib socket: connect_ex, and a wait with a deadline only
    when the connect is still in progress. Raises OSError or trio.TooSlowError."""
    raw, err = _begin(address, port)
    try:
        if err == IN_PROGRESS:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_writable(raw)
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        raw.close()
        raise
    return raw


def connect_now(address: str, port: int) -> tuple[socket.socket | None, int]:
    """`open_raw` for a connect that is over when `connect` returns (loopback): (the
    connected socket, 0), or (None, the errno, or IN_PROGRESS) with nothing kept; the
    caller then goes the way that can wait, retry and report."""
    try:
        raw, err = _begin(address, port)
    except OSError as e:
        return None, e.errno or IN_PROGRESS
    if err == 0:
        return raw, 0
    raw.close()
    return None, err


async def connect_picked(rt: Runtime, figures: ProxyFigures, service: str, how: Try, *,
                         source: str | None = None, key: str | None = None,
                         counts: object = None, tried: list[str] | None = None) -> tuple[Held, socket.socket]:
    """Pick an endpoint (held lease) and connect to it; on a failed connect, report the
    failure and try another, `how.retries` more times. `tried`: endpoints whose connect
    failed (and was reported) already, each one try of the budget. Raises NoEndpoint or
    UpstreamFailed."""
    tried = list(tried or ())
    lf = figures.listener(service)
    for attempt in range(len(tried), how.retries + 1):
        held = pick_now(rt, service, source=source, key=key)
        if held is None:  # a catalog source is still fetching the service
            held = await pick(rt, service, source=source, key=key)
        ep = held.endpoint
        if ep.id in tried and attempt:
            # Hashing policies answer the same key with the same endpoint: ask again with
            # the attempt in the key, which hashes elsewhere (other policies ignore it).
            release(rt, held)
            held = await pick(rt, service, key=f"{key or source or ''}#retry{attempt}")
            ep = held.endpoint
        if attempt:
            lf.retries += 1
            figures.endpoint(service, ep.id).retries += 1
        t0 = trio.current_time()
        try:
            sock = await open_raw(ep.address, ep.port, how.connect_timeout)
        except (OSError, trio.TooSlowError) as e:
            why = "connect timed out" if isinstance(e, trio.TooSlowError) else (e.strerror or str(e))
            tried.append(ep.id)
            if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
                release(rt, held)
                raise UpstreamFailed(f"{service}: cannot open a socket: {why}") from None
            finish(rt, held, ok=False, latency=trio.current_time() - t0)
            lf.failures += 1
            figures.endpoint(service, ep.id).failures += 1
            log.info("%s: connect to %s (%s:%d) failed: %s", service, ep.id, ep.address, ep.port, why)
            continue
        except BaseException:
            release(rt, held)
            raise
        held.started = t0
        figures.endpoint(service, ep.id).connections += 1
        return held, sock
    raise UpstreamFailed(f"{service}: no endpoint accepted a connection (tried {', '.join(tried)})")
