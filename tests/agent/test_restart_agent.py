"""Restarts no caller notices: the agent dies (SIGKILL) or stops (SIGTERM) and starts again on
sockets held the way systemd holds them, while clients resolve in a loop. Zero failed calls."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from agentproc import endpoint_toml, wait_until
from helpers.socket_holder import SocketHolder

from softlb_client import Client

CATALOG = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}") for i in range(1, 4))
#: Generous: a call may wait for a whole agent start (Python, imports, catalog) on a busy
#: 2-core machine. It bounds the test; it is not what a call normally takes.
CALL_TIMEOUT = 20.0


@dataclass
class Caller:
    """One client resolving in a loop on its own thread, counting what happened."""

    client: Client
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    slowest: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.client.resolve("web", lease=False)
            except Exception as e:
                self.failed.append(repr(e))
            else:
                self.ok += 1
            self.slowest = max(self.slowest, time.monotonic() - t0)


def test_clients_see_no_failure_across_sigkill_and_sigterm_restarts(tmp_path):
    (tmp_path / "catalog.toml").write_text(CATALOG)
    path = str(tmp_path / "softlb.sock")
    log = open(tmp_path / "agent.log", "ab")
    with SocketHolder.bind(unix_path=path, names=["softlb", "softlb"]) as holder:
        host, port = holder.tcp_address
        agent = [sys.executable, "-m", "softlb_agent", "agent", "--catalog-file", str(tmp_path / "catalog.toml"),
                 "--socket", path, "--listen", f"{host}:{port}", "--admin", ""]
        callers = [Caller(Client(socket_path=path, timeout=CALL_TIMEOUT)),
                   Caller(Client(addr=f"{host}:{port}", timeout=CALL_TIMEOUT))]
        threads = [threading.Thread(target=c.run, daemon=True) for c in callers]
        exits = []
        served_by_each: list[int] = []
        try:
            holder.start(agent, stdout=log, stderr=log)
            for t in threads:
                t.start()
            for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
                base = sum(c.ok for c in callers)
                wait_until(lambda: all(c.ok for c in callers) and sum(c.ok for c in callers) > base + 100,
                           timeout=CALL_TIMEOUT)
                exits.append(holder.kill(sig))
                # Calls made now are queued in the held sockets: no process is serving.
                at_death = sum(c.ok for c in callers)
                holder.start(agent, stdout=log, stderr=log)
                wait_until(lambda: sum(c.ok for c in callers) > at_death + 100, timeout=CALL_TIMEOUT)
                served_by_each.append(sum(c.ok for c in callers) - at_death)
        finally:
            for c in callers:
                c.stop.set()
            for t in threads:
                t.join(CALL_TIMEOUT + 5)
            for c in callers:
                c.client.close()
            log.close()
        agent_log = (tmp_path / "agent.log").read_text()
        assert [c.failed for c in callers] == [[], []], agent_log
        # The restarts really happened: four distinct agents, the first three ended by us.
        assert len(set(holder.pids)) == 4
        assert exits == [-signal.SIGKILL, 0, -signal.SIGKILL]
        assert all(n > 100 for n in served_by_each)
        print(f"\ncalls: {sum(c.ok for c in callers)} ok, 0 failed; slowest call across restarts: "
              f"{max(c.slowest for c in callers):.3f}s")
