"""run_agent: the agent's root nursery and its start order.

Start order, each step `nursery.start`ed so "started" means ready:
  1. the catalog source (the first catalog must load, else the agent refuses to start),
  2. the IPC listeners (Unix socket, loopback port) and the admin HTTP port,
  3. the timer task and the signal handler.
SIGHUP reloads the config file and the catalog; SIGINT/SIGTERM stop the agent cleanly.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import socket
import stat
import tomllib
from typing import Callable

import trio

from softlb import AgentConfig, ConfigError, parse_agent_config
from softlb.policies import POLICIES
from .paths import default_socket_path

from . import admin
from .consul_catalog import ConsulCatalog
from .consul_http import consul_settings
from .consul_register import ProviderRegistrar
from .file_source import FileSource
from .ipc_server import serve_listener
from .runtime import Runtime

log = logging.getLogger("softlb.agent")

#: The timer task wakes at least this often (lease expiry, health timers).
MAX_TICK = 1.0


def load_config_file(path: str) -> AgentConfig:
    """Read and validate an agent config file; ConfigError names the file and key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_agent_config(data, frozenset(POLICIES))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def socket_path(config: AgentConfig) -> str:
    return config.socket or default_socket_path()


def bind_unix(path: str) -> socket.socket:
    """Bind the Unix socket with owner/group-only permissions.

    A leftover socket file from a crashed agent is removed; a live agent on the path is an
    error (two agents must never share a socket).
    """
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o750, exist_ok=True)
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise ConfigError(f"another agent is already serving {path}")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # no window where the socket is world-accessible
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    s.listen(1024)
    return s


def bind_tcp(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"{addr} is already in use") from None
        raise
    s.listen(1024)
    return s


async def _ticker(rt: Runtime) -> None:
    while True:
        now = trio.current_time()
        deadline = rt.engine.tick(now)
        delay = MAX_TICK if deadline is None else min(MAX_TICK, max(0.0, deadline - now))
        await trio.sleep(delay)


def reload_config(rt: Runtime, overrides: Callable[[AgentConfig], AgentConfig]) -> bool:
    """Re-read the config file; apply it, or keep the running one and say why."""
    if not rt.config_path:
        return True
    try:
        new = overrides(load_config_file(rt.config_path))
    except ConfigError as e:
        log.error("config reload refused, still running the previous config: %s", e)
        return False
    rt.config = new
    rt.engine.reconfigure(new, trio.current_time())
    log.info("config %s reloaded", rt.config_path)
    return True


async def run_agent(
    config: AgentConfig,
    *,
    config_path: str | None = None,
    overrides: Callable[[AgentConfig], AgentConfig] = lambda c: c,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGINT/SIGTERM or cancellation. Raises ConfigError for startup problems."""
    rt = Runtime(config, config_path, random.Random())
    source: FileSource | ConsulCatalog
    if config.source == "consul":
        source = ConsulCatalog(rt)
    elif not config.catalog_file:
        raise ConfigError("no catalog: give --catalog-file FILE, --consul URL, or catalog.source in the config")
    else:
        source = FileSource(rt, config.catalog_file)
    listeners: list[tuple[str, socket.socket]] = []
    try:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                path = socket_path(config)
                listeners.append((f"unix:{path}", bind_unix(path)))
                if config.listen:
                    listeners.append((f"tcp:{config.listen}", bind_tcp(config.listen)))
                for _, sock in listeners:
                    await nursery.start(serve_listener, rt, sock)
                if config.admin:
                    admin_sock = bind_tcp(config.admin)
                    listeners.append((f"admin:{config.admin}", admin_sock))
                    await nursery.start(admin.serve_admin, rt, admin_sock)
                nursery.start_soon(_ticker, rt)
                if config.provide:
                    # Registered once we serve; deregistered when this nursery is cancelled.
                    registrar = ProviderRegistrar(config.provide, consul_settings(config.consul))
                    await nursery.start(registrar.run)
                log.info(
                    "softlb agent ready: %s; listening on %s",
                    rt.source_status,
                    ", ".join(name for name, _ in listeners),
                )
                task_status.started(rt)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading")
                        reload_config(rt, overrides)
                        source.request_reload()
                    else:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
    finally:
        for name, sock in listeners:
            sock.close()
            if name.startswith("unix:"):
                try:
                    os.unlink(name[5:])
                except OSError:
                    pass
