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

from softlb import AgentConfig, ConfigError, ProxyConfig

from ..runtime import Runtime
from .figures import ProxyFigures
from .listener import Handler, ListenerState, ProxyListener

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


class ProxyManager:
    def __init__(self, rt: Runtime, bind: Bind) -> None:
        self.rt = rt
        self.bind = bind
        self.figures = ProxyFigures()
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

    async def _open(self, service: str, cfg: ProxyConfig) -> None:
        assert self._nursery is not None
        sock, where = self.bind(service, cfg.listen)
        state = ListenerState(self.rt, service, cfg, self.figures)
        lst = ProxyListener(state, sock, handler_for(cfg.mode), where)
        self.listeners[service] = lst
        await self._nursery.start(lst.run)
        log.info("proxy %s: %s listening on %s", service, cfg.mode, where)

    def reconcile(self, config: AgentConfig) -> None:
        """Apply a reloaded config. A listener that cannot open is logged; the others are
        unaffected by it."""
        assert self._nursery is not None
        want = {n: s.proxy for n, s in config.services.items() if s.proxy is not None}
        for name, lst in list(self.listeners.items()):
            new = want.get(name)
            old = lst.state.config
            if new is not None and new.listen == old.listen and new.mode == old.mode:
                if new != old:
                    lst.update(new)
                    log.info("proxy %s: settings reloaded", name)
                continue
            del self.listeners[name]
            log.info("proxy %s: closing %s listener on %s%s", name, old.mode, lst.where,
                     " (moved)" if new else "")
            lst.stop_accepting()
            self._nursery.start_soon(lst.retire)
        for name, cfg in sorted(want.items()):
            if name in self.listeners:
                continue
            self._nursery.start_soon(self._open_later, name, cfg)

    async def _open_later(self, name: str, cfg: ProxyConfig) -> None:
        # Retired listeners closed their sockets above, so a mode change in place or two
        # services swapping ports can bind here.
        try:
            await self._open(name, cfg)
        except (ConfigError, OSError) as e:
            log.error("proxy %s: cannot listen on %s: %s", name, cfg.listen, e)

    async def stop(self) -> None:
        """Agent stop: every listener stops accepting and drains, all at once."""
        async with trio.open_nursery() as n:
            for lst in self.listeners.values():
                n.start_soon(lst.retire)

    @property
    def active(self) -> int:
        return sum(f.active for f in self.figures.listeners.values())
