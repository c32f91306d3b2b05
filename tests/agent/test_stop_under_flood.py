"""A real agent stops promptly with many connections parked in the lot,
many queued in turns at the moment of the stop, and thousands of watches (some parked at
the gate), and logs no internal error doing it."""

from __future__ import annotations

import resource
import signal
import socket
import threading
import time

import pytest
from agentproc import THREE, AgentProcess
from helpers.frames import frame


def test_sigterm_with_parked_queued_and_watching_connections_is_prompt(tmp_path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
        except (ValueError, OSError):
            pytest.skip("fd limit too low")
    agent = AgentProcess(str(tmp_path), THREE).start()
    held: list[socket.socket] = []
    stop_reading = threading.Event()
    try:
        watchers, idle = 20, 880
        for i in range(watchers + idle):
            s = socket.socket(socket.AF_UNIX)
            s.connect(agent.socket)
            held.append(s)
        for s in held[:watchers]:
            s.sendall(b"".join(frame({"id": k, "op": "watch", "service": "web"}) for k in range(250)))
        stop_reading = threading.Event()
        reader = threading.Thread(target=_keep_reading, args=(held[:watchers], stop_reading), daemon=True)
        reader.start()  # the watchers read every update: no write stall holds the stop
        time.sleep(1.0)
        # Every idle connection sends a request at once (they queue for turns), and the
        # catalog changes (5,000 watches head for the gate); then the stop.
        req = frame({"id": 1, "op": "resolve", "service": "web"})
        for s in held[watchers:]:
            s.send(req)
        agent.write_catalog(THREE.replace("18003", "18004"))
        time.sleep(0.3)
        t0 = time.monotonic()
        agent.send(signal.SIGTERM)
        assert agent.proc is not None
        agent.proc.wait(timeout=30)
        took = time.monotonic() - t0
        log = agent.log()
        assert agent.proc.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]
        assert took < 3.0, f"stop took {took:.2f}s"
    finally:
        stop_reading.set()
        agent.stop()
        for s in held:
            s.close()


def _keep_reading(socks: list[socket.socket], stop: threading.Event) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    try:
        while not stop.is_set():
            for key, _ in sel.select(0.1):
                try:
                    if not key.fileobj.recv(1 << 20):
                        sel.unregister(key.fileobj)
                except (BlockingIOError, OSError):
                    pass
    finally:
        sel.close()
