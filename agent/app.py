"""run_agent: the agent's root nursery and its start order.

Start order, each step `nursery.start`ed so "started" means ready:
  0. the active prober (idle until the catalog lists endpoints of a service with a probe),
  1. the catalog source (the first catalog must load, else the agent refuses to start),
  2. the admin HTTP port, the proxy listeners, the DNS front end, then the IPC listeners
     (Unix socket, loopback port) last, so a caller who can say hello finds all bound,
  3. the timer task and the signal handler; then READY=1 to systemd.
SIGHUP reloads the config file and the catalog; SIGINT/SIGTERM stop the agent cleanly: stop
accepting, answer what is in flight, close connections as they go idle, exit.
Under systemd the listening sockets are the ones it passes (service_manager.py).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import socket
import stat
import sys
from dataclasses import replace
from functools import partial
from typing import Callable

import trio

from softlb import AgentConfig, ConfigError, check_listen, parse_agent_config_text
from softlb.policies import POLICIES
from .paths import default_socket_path

from . import admin
from .consul_catalog import ConsulCatalog
from .dns import DnsServer, bind_dns
from .consul_http import consul_settings
from .consul_register import ProviderRegistrar
from .gc_pauses import run_full_collections
from .file_source import FileSource
from .ipc_server import serve_listener
from .listeners import ConnectionBudget, ConnectionLimits
from .prober import Prober
from .proxy.manager import ProxyManager
from .runtime import Runtime
from .service_manager import ServiceManager, status_line
from .table_builds import run_table_builds
from .lot import Lot
from .turns import Turns

log = logging.getLogger("softlb.agent")

#: The timer task wakes at least this often (lease expiry, health timers).
MAX_TICK = 1.0
#: How long a stop waits for in-flight requests before closing what is left; well inside
#: the unit's TimeoutStopSec=30s so systemd never has to SIGKILL.
DRAIN_TIMEOUT = 10.0
#: Where the listeners are; a reload cannot move them (systemd owns the sockets).
LISTENER_SETTINGS = ("socket", "listen", "admin", "dns")


#: Socket directories this process created, removed at exit when empty.
CREATED_DIRS: set[str] = set()

#: Config settings that are file system paths.
PATH_SETTINGS = ("catalog_file", "socket", "state_dir")


def load_config_file(path: str) -> AgentConfig:
    """Read and validate an agent config file; ConfigError names the file and key."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        cfg = parse_agent_config_text(text, frozenset(POLICIES))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    # Relative paths in a config file mean "beside this file", whatever the working
    # directory (under systemd it is /). Paths given as flags stay relative to the caller.
    base = os.path.dirname(os.path.abspath(path))
    return replace(cfg, **{k: os.path.join(base, v) for k in PATH_SETTINGS if (v := getattr(cfg, k)) and not os.path.isabs(v)})


def socket_path(config: AgentConfig) -> str:
    return config.socket or default_socket_path()


def bind_unix(path: str, mode: int = 0o660, group: str = "") -> socket.socket:
    """Bind the Unix socket with owner/group-only permissions (`agent.socket_mode`), owned
    by `agent.socket_group` when set.

    A leftover socket file from a crashed agent is removed; a live agent on the path is an
    error (two agents must never share a socket).
    """
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        CREATED_DIRS.add(parent)  # removed again at exit if empty (no empty /run/softlb left)
    os.makedirs(parent, mode=0o750, exist_ok=True)
    st = os.stat(parent)
    if os.geteuid() != 0 and st.st_uid != os.geteuid() and st.st_mode & 0o022:
        # Someone else can replace our socket in a directory they own and others can
        # write to (a squatted /tmp/softlb-<uid>): callers would talk to their impostor.
        raise ConfigError(f"socket directory {parent} is writable by others and not ours; remove it or pick --socket")
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
    try:
        if group:
            os.chown(path, -1, _gid(group))
        os.chmod(path, mode)
    except (OSError, ConfigError):
        s.close()
        os.unlink(path)
        raise
    s.listen(1024)
    return s


def _gid(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"agent.socket_group: no group named \"{group}\"") from None


#: Listener role -> (flag, config key), for errors about it.
ROLE_SETTINGS = {"listen": ("--listen", "agent.listen"), "admin": ("--admin", "agent.admin")}


def bind_tcp(addr: str, role: str = "listen") -> socket.socket:
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
            raise ConfigError(_in_use(addr, int(port), role)) from None
        raise
    s.listen(1024)
    return s


def _in_use(addr: str, port: int, role: str) -> str:
    from .port_holder import port_holder

    flag, key = ROLE_SETTINGS.get(role, ("--listen", "agent.listen"))
    holder = port_holder(port)
    who = f" by pid {holder[0]} ({holder[1]})" if holder else ""
    return (f"{addr} ({key}) is already in use{who}: stop that process, or choose another port with "
            f"{flag} HOST:PORT or {key} in the config (\"\" turns it off)")


def attach_prober(rt: Runtime, rng: random.Random) -> Prober:
    """A prober whose results feed the engine and whose targets follow it: whenever a
    service changes (catalog, config reload, health), its probe targets are re-synced, so
    exactly the endpoints the catalog lists are probed, with the current probe config."""
    engine = rt.engine

    def verdict(service: str, endpoint_id: str, ok: bool, now: float, detail: str = "") -> None:
        rt.dispatch(engine.probe_result(service, endpoint_id, ok, now, detail))

    def local_failure() -> None:
        rt.stats.probe_local_failures += 1

    prober = Prober(verdict, rng=rng, on_local_failure=local_failure)

    def follow(name: str) -> None:
        b = engine.services.get(name)
        if b is None:
            prober.remove_service(name)
        else:
            prober.set_service(name, b.config.probe, b.endpoints)

    rt.change_listeners.append(follow)
    return prober


async def _ticker(rt: Runtime) -> None:
    while True:
        now = trio.current_time()
        changes, deadline = rt.engine.tick(now)
        rt.dispatch(changes)
        rt.sample(now)
        delay = MAX_TICK if deadline is None else min(MAX_TICK, max(0.0, deadline - now))
        await trio.sleep(delay)


def reload_config(rt: Runtime, overrides: Callable[[AgentConfig], AgentConfig]) -> str | None:
    """Re-read the config file; apply it, or keep the running one. Returns why it was
    refused, None when applied."""
    if not rt.config_path:
        return None
    try:
        new = overrides(load_config_file(rt.config_path))
    except ConfigError as e:
        log.error("config reload refused, still running the previous config: %s", e)
        rt.stats.config_reload_errors += 1
        rt.note_reload("config", str(e))
        return str(e)
    for key in LISTENER_SETTINGS:
        if getattr(new, key) != getattr(rt.config, key):
            log.warning("agent.%s changed to %r: listeners move only on restart", key, getattr(new, key))
    if new.source != rt.config.source:
        log.warning("catalog.source changed to %r: the catalog source changes only on restart", new.source)
    rt.config = new
    rt.dispatch(rt.engine.reconfigure(new, trio.current_time()))
    rt.stats.config_reloads += 1
    rt.note_reload("config", "")
    log.info("config %s reloaded", rt.config_path)
    return None


def _status(rt: Runtime) -> Callable[[str], str]:
    def text(reload_error: str) -> str:
        return status_line(rt.engine.services, rt.config.source, trio.current_time(),
                           catalog_error=rt.stats.last_catalog_error, reload_error=reload_error)
    return text


async def _drain(rt: Runtime, draining: trio.Event) -> None:
    draining.set()
    with trio.move_on_after(DRAIN_TIMEOUT):
        # Poll rather than wait on an event: connections close from many tasks, and a stop
        # happens once per process life.
        while True:
            await trio.sleep(0.005)
            if not rt.stats.connections_open and not rt.stats.admin_connections_open:
                return
    log.warning("%d connections still open after %.0fs; closing them", rt.stats.connections_open, DRAIN_TIMEOUT)


def _proxy_socket(sm: ServiceManager, config: AgentConfig, service: str, address: str) -> tuple[socket.socket, str]:
    sock, where, inherited = sm.listener(f"proxy-{service}", address, bind_tcp)
    if inherited and sock.family != socket.AF_UNIX:
        # An inherited socket obeys the same loopback rule as one bound from the config.
        try:
            check_listen(where, f"socket proxy-{service} passed by the service manager", config.allow_non_loopback)
        except ConfigError:
            sock.close()
            raise
    return sock, where


async def run_agent(
    config: AgentConfig,
    *,
    config_path: str | None = None,
    overrides: Callable[[AgentConfig], AgentConfig] = lambda c: c,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGINT/SIGTERM or cancellation. Raises ConfigError for startup problems."""
    sm = ServiceManager()
    # Worker threads (catalog parsing) hand the GIL back to the loop within this, not the
    # default 5 ms. The loop gives the GIL up at every socket call and waits up to this long
    # to get it back while a worker parses, several times per request: at 0.5 ms a
    # bystander's p99 during catalog rewrites was 8-50 ms here, at 0.1 ms 3.7-12 ms
    # (bench/bystander.py, watch_flood and maglev_flap). With no worker running it costs nothing.
    sys.setswitchinterval(0.0001)
    rt = Runtime(config, config_path, random.Random())
    source: FileSource | ConsulCatalog
    if config.source == "consul":
        source = ConsulCatalog(rt)
    elif not config.catalog_file:
        raise ConfigError("no catalog: give --catalog-file FILE, --consul URL, or catalog.source in the config")
    else:
        source = FileSource(rt, config.catalog_file)
    listeners: list[tuple[str, socket.socket]] = []
    systemds: set[socket.socket] = set()  # inherited: closed, but their paths are systemd's
    draining = trio.Event()

    def listen(kind: str, role: str, address: str, bind: Callable[[str], socket.socket]) -> socket.socket:
        sock, where, inherited = sm.listener(role, address, bind, sole_unix=kind == "unix" and not config.socket,
                                             allow_non_loopback=config.allow_non_loopback)
        listeners.append((f"{kind}:{where}", sock))
        if inherited:
            systemds.add(sock)
        return sock

    status = _status(rt)
    # The receiver below catches INT/TERM while we run. When it closes it restores the
    # handlers it found and re-delivers signals still queued in it, such as the TERM a
    # supervisor sends right after a Ctrl-C, or a HUP unread while draining. Let it find
    # SIG_IGN, so that a second signal
    # cannot kill the cleanup half way (leaving the socket file); the caller's handlers
    # come back at the very end. SIGKILL still works.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)}
    try:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(attach_prober(rt, random.Random()).run)
                await nursery.start(run_table_builds, rt)
                what = rt.source_status if config.source == "consul" else f"file {config.catalog_file}"
                sm.status(f"starting: loading catalog ({what})")
                await nursery.start(source.run)
                bind_sock = partial(bind_unix, mode=config.socket_mode, group=config.socket_group)
                ipc = [listen("unix", "socket", socket_path(config), bind_sock)]
                if config.listen:
                    ipc.append(listen("tcp", "listen", config.listen, partial(bind_tcp, role="listen")))
                # One budget: the connection caps span the socket and the port together.
                budget = ConnectionBudget(ConnectionLimits.from_config(config), rt.stats)
                if config.admin:
                    await nursery.start(partial(admin.serve_admin, draining=draining), rt,
                                        listen("admin", "admin", config.admin, partial(bind_tcp, role="admin")))
                # The pass budget first: proxy listeners take turns in it too (agent/turns.py).
                rt.turns = Turns()
                await nursery.start(rt.turns.run)
                # Proxy listeners: systemd's socket named proxy-<service> if it passed one.
                proxies = ProxyManager(rt, lambda service, address: _proxy_socket(sm, config, service, address))
                rt.proxy_figures = proxies.figures
                await nursery.start(proxies.run)
                if config.dns:  # bound here, not by systemd: a .socket unit's UDP fd is not supported (docs/DNS.md)
                    udp, tcp = bind_dns(config.dns)
                    where = "%s:%d" % udp.getsockname()[:2]
                    listeners += [(f"dns-udp:{where}", udp), (f"dns-tcp:{where}", tcp)]
                    await nursery.start(partial(DnsServer(rt).serve, draining=draining), udp, tcp)
                rt.lot = Lot(rt.turns)
                await nursery.start(rt.lot.run)
                # The protocol port is served last: a caller that can say hello finds every
                # other listener (admin, proxies, DNS) bound too.
                for sock in ipc:
                    await nursery.start(partial(serve_listener, draining=draining, budget=budget,
                                                name="socket" if sock.family == socket.AF_UNIX else "listen"), rt, sock)
                sm.close_unclaimed()
                nursery.start_soon(_ticker, rt)
                if config.provide:
                    # Registered once we serve; deregistered when this nursery is cancelled.
                    registrar = ProviderRegistrar(config.provide, consul_settings(config.consul))
                    await nursery.start(registrar.run)
                await nursery.start(sm.run, status)
                log.info(
                    "softlb agent ready: %s; listening on %s",
                    rt.source_status,
                    ", ".join(name for name, _ in listeners),
                )
                # Last: what start-up built is frozen out of the collector's walks.
                await nursery.start(run_full_collections, rt)
                task_status.started(rt)
                sm.ready(status(""))
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading")
                        sm.reloading(rt.config_path)
                        error = reload_config(rt, overrides)
                        proxies.reconcile(rt.config)
                        if isinstance(source, FileSource) and rt.config.source == "file":
                            source.path = rt.config.catalog_file  # a new catalog.file applies now
                        source.request_reload()
                        sm.reloaded(error, status)
                    else:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        sm.stopping(rt.stats.connections_open, DRAIN_TIMEOUT)
                        async with trio.open_nursery() as stopping:
                            stopping.start_soon(proxies.stop)
                            stopping.start_soon(_drain, rt, draining)
                        nursery.cancel_scope.cancel()
                        break
    finally:
        for name, sock in listeners:
            sock.close()
            if name.startswith("unix:") and sock not in systemds:
                try:
                    os.unlink(name[5:])
                    parent = os.path.dirname(name[5:])
                    if parent in CREATED_DIRS:
                        os.rmdir(parent)  # only if empty: OSError otherwise
                        CREATED_DIRS.discard(parent)
                except OSError:
                    pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)
