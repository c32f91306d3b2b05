"""The set of proxy listeners, kept in step with the config across reloads.

A reload adds, changes and removes listeners one by one: a listener whose address and mode
are unchanged only takes the new settings (its connections carry on); one that moves or
changes mode is retired (stops accepting, drains) and a new one opens; the rest are left
alone.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

import trio

from softlb import AgentConfig, ConfigError, ProxyConfig, plan_proxies

from ..runtime import Runtime
from .fds import FdRoom
from .figures import ProxyFigures
from .listener import Handler, ListenerState, ProxyListener, Starter

log = logging.getLogger("softlb.proxy")

#: How often figures of endpoints gone from the catalog are dropped.
PRUNE_INTERVAL = 30.0

#: (service, address) -> (listening socket, where it is, inherited from systemd?)
Bind = Callable[[str, str], tuple[socket.socket, str]]


def handler_for(mode: str) -> Handler:
    if mode == "tcp":
        from .tcp import serve_tcp
        return serve_tcp
    if mode == "http":
        from .http1 import serve_http1
        return serve_http1
    from .http2 import serve_http2
    return serve_http2


def starter_for(mode: str) -> Starter | None:
    if mode == "tcp":
        from .tcp import start_tcp
        return start_tcp
    return None


class ProxyManager:
    def __init__(self, rt: Runtime, bind: Bind) -> None:
        self.rt = rt
        self.bind = bind
        self.figures = ProxyFigures()
        self.fd_room = FdRoom(lambda: rt.config.fd_reserve)
        self.listeners: dict[str, ProxyListener] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the configured listeners (errors at startup are fatal: ConfigError), then
        keep them until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, svc in sorted(self.rt.config.services.items()):
                if svc.proxy is not None:
                    await self._open(name, svc.proxy)
            task_status.started()
            while True:
                await trio.sleep(PRUNE_INTERVAL)
                self.figures.prune(self.rt.engine.services)

    def _listener(self, service: str, cfg: ProxyConfig) -> ProxyListener:
        """Bind (or take systemd's socket) and register; the socket queues connections
        from here on, before the accept loop runs."""
        sock, where = self.bind(service, cfg.listen)
        lst = ProxyListener(ListenerState(self.rt, service, cfg, self.figures, self.fd_room), sock, handler_for(cfg.mode), where,
                            starter_for(cfg.mode))
        self.listeners[service] = lst
        return lst

    async def _open(self, service: str, cfg: ProxyConfig) -> None:
        assert self._nursery is not None
        lst = self._listener(service, cfg)
        await self._nursery.start(lst.run)
        log.info("proxy %s: %s listening on %s", service, cfg.mode, lst.where)

    def reconcile(self, config: AgentConfig) -> None:
        """Apply a reloaded config (softlb.plan_proxies says what to close, update, open).
        A listener that cannot open is logged and tried again at the next reload; the
        others are unaffected by it."""
        assert self._nursery is not None
        want = {n: s.proxy for n, s in config.services.items() if s.proxy is not None}
        plan = plan_proxies({n: lst.state.config for n, lst in self.listeners.items()}, want)
        for name in plan.close:
            lst = self.listeners.pop(name)
            log.info("proxy %s: closing %s listener on %s", name, lst.state.config.mode, lst.where)
            lst.stop_accepting()  # now, so a successor can bind the same port below
            self._nursery.start_soon(lst.retire)
        for name in plan.update:
            self.listeners[name].update(want[name])
            log.info("proxy %s: settings reloaded", name)
        for name in plan.open:
            cfg = want[name]
            try:
                lst = self._listener(name, cfg)
            except (ConfigError, OSError) as e:
                log.error("proxy %s: cannot listen on %s: %s", name, cfg.listen, e)
                continue
            self._nursery.start_soon(lst.run)
            log.info("proxy %s: %s listening on %s", name, cfg.mode, lst.where)

    async def stop(self) -> None:
        """Agent stop: every listener stops accepting and drains, all at once."""
        async with trio.open_nursery() as n:
            for lst in self.listeners.values():
                n.start_soon(lst.retire)

    @property
    def active(self) -> int:
        return sum(f.active for f in self.figures.listeners.values())
