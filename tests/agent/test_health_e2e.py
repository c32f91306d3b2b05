"""Health checking end to end: the real agent subprocess, real HTTP backend subprocesses
(examples/backend.py), the real client and CLI. These are the issue's "must show" checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from agentproc import endpoint_toml, free_port, wait_until

BACKEND = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "backend.py")
IDS = ("web-1", "web-2", "web-3")


class Backends:
    """Three demo HTTP backends, each stopped by pid in `stop_all` (the fixture's finally)."""

    def __init__(self) -> None:
        self.ports = {eid: free_port() for eid in IDS}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, eid: str) -> None:
        self.procs[eid] = subprocess.Popen(
            [sys.executable, BACKEND, "--name", eid, "--port", str(self.ports[eid])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def kill(self, eid: str) -> None:
        p = self.procs.pop(eid)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def stop_all(self) -> None:
        for eid in list(self.procs):
            self.kill(eid)

    def catalog(self) -> str:
        return "".join(endpoint_toml("web", "127.0.0.1", self.ports[e], id=e) for e in IDS)


@pytest.fixture
def backends():
    b = Backends()
    try:
        for eid in IDS:
            b.start(eid)
        yield b
    finally:
        b.stop_all()


def config(probe: str = "", outlier: str = "", panic: int = 50) -> str:
    text = f"[services.web]\npanic_threshold = {panic}\n"
    if probe:
        text += f"[services.web.probe]\n{probe}\n"
    if outlier:
        text += f"[services.web.outlier]\n{outlier}\n"
    return text


def health(client) -> dict[str, dict]:
    return {e["id"]: e for e in client.endpoints("web")["endpoints"]}


def resolves(client, n: int) -> list:
    return client.call_many([{"op": "resolve", "service": "web", "lease": False} for _ in range(n)], timeout=10)


PROBE_1S = 'kind = "http"\npath = "/healthz"\ninterval = "1s"\ntimeout = "500ms"\nfall = 2\nrise = 2'


def test_killed_backend_is_dropped_within_interval_x_fall_plus_interval_and_returns_after_rise(
    make_agent, backends
):
    agent = make_agent(backends.catalog(), config(PROBE_1S)).start()
    with agent.client(timeout=5) as c:
        wait_until(lambda: all(e["health"]["probe"] == "up" for e in health(c).values()), timeout=10)

        backends.kill("web-2")
        killed = time.monotonic()
        time.sleep(max(0.0, killed + 1.0 * 2 + 1.0 - time.monotonic()))
        picks = Counter(r["id"] for batch in range(6) for r in resolves(c, 100))
        assert picks["web-2"] == 0 and sum(picks.values()) == 600, picks
        assert set(picks) == {"web-1", "web-3"}
        h = health(c)["web-2"]
        assert (h["eligible"], h["health"]["probe"], h["health"]["last_probe_ok"]) == (False, "down", False)
        assert h["health"]["last_probe_detail"] == "connect: Connection refused"

        backends.start("web-2")
        seen = []

        def back():
            h = health(c)["web-2"]["health"]
            seen.append((h["probe"], h["last_probe_ok"], h["probe_streak"]))
            return h["probe"] == "up"
        wait_until(back, timeout=10, interval=0.05)
        # One success is not enough: it was observed down with a 1-long success streak.
        assert ("down", True, 1) in seen
        assert seen[-1][:2] == ("up", True) and seen[-1][2] >= 2
        assert "web-2" in {r["id"] for r in resolves(c, 30)}

    r = agent.cli("endpoints", "web")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("service web  policy round_robin  panic no (3/3 eligible, threshold 50%)")
    assert lines[1].split()[:7] == ["ID", "ADDRESS", "WEIGHT", "REGISTRY", "PROBE", "LAST", "PROBE"]
    assert "up (2x ok)" in next(line for line in lines if line.startswith("web-2"))


def outlier(base: str) -> str:
    return f'consecutive_failures = 5\nbase_ejection_time = "{base}"\nmax_ejection_time = "5m"\nmax_ejection_percent = 50'


def test_five_consecutive_failures_eject_and_at_most_half_is_ever_ejected(make_agent, backends):
    agent = make_agent(backends.catalog(), config(outlier=outlier("30s"))).start()
    with agent.client(timeout=5) as c:
        for _ in range(4):
            c.report(service="web", endpoint="web-1", ok=False)
        c.report(service="web", endpoint="web-1", ok=True)  # the streak starts over
        for _ in range(4):
            c.report(service="web", endpoint="web-1", ok=False)
        assert health(c)["web-1"]["eligible"] is True
        c.report(service="web", endpoint="web-1", ok=False)
        h = health(c)["web-1"]
        assert (h["eligible"], h["health"]["ejected"], h["health"]["ejections"]) == (False, True, 1)
        assert Counter(r["id"] for r in resolves(c, 300)) == {"web-2": 150, "web-3": 150}

        for eid in IDS:
            for _ in range(10):
                c.report(service="web", endpoint=eid, ok=False)
        ejected = [eid for eid, e in health(c).items() if e["health"]["ejected"]]
        assert ejected == ["web-1"]
        assert set(r["id"] for r in resolves(c, 300)) == {"web-2", "web-3"}

        r = agent.cli("endpoints", "web", "--json")
        assert [e["health"]["ejected"] for e in json.loads(r.stdout)["endpoints"]] == [True, False, False]
        assert "yes, " in agent.cli("endpoints", "web").stdout


def test_ejected_endpoint_returns_after_its_time(make_agent, backends):
    agent = make_agent(backends.catalog(), config(outlier=outlier("1s"))).start()
    with agent.client(timeout=5) as c:
        for _ in range(5):  # by lease this time, as a client reporting its own picks would
            r = c.resolve("web")
            while r.id != "web-3":
                c.report(lease=r.lease, ok=True)
                r = c.resolve("web")
            c.report(lease=r.lease, ok=False)
        assert health(c)["web-3"]["health"]["ejected"] is True
        wait_until(lambda: health(c)["web-3"]["eligible"], timeout=10)
        h = health(c)["web-3"]["health"]
        assert (h["ejected"], h["ejections"], h["consecutive_failures"]) == (False, 1, 0)


def test_two_of_three_down_is_panic_and_spreads_over_all(make_agent, backends):
    probe = 'kind = "http"\ninterval = "200ms"\ntimeout = "500ms"\nfall = 2\nrise = 2'
    agent = make_agent(backends.catalog(), config(probe, panic=50)).start()
    with agent.client(timeout=5) as c:
        wait_until(lambda: all(e["health"]["probe"] == "up" for e in health(c).values()), timeout=10)
        assert not any(r["panic"] for r in resolves(c, 30))
        backends.kill("web-1")
        backends.kill("web-2")
        wait_until(lambda: [e["health"]["probe"] for e in health(c).values()] == ["down", "down", "up"], timeout=10)
        answers = resolves(c, 300)
        assert all(r["panic"] is True for r in answers)
        assert Counter(r["id"] for r in answers) == {"web-1": 100, "web-2": 100, "web-3": 100}
        d = c.endpoints("web")
        assert d["panic"] is True
        assert [e["served"] for e in d["endpoints"]] == [True, True, True]
        assert [e["eligible"] for e in d["endpoints"]] == [False, False, True]
    assert "panic yes (1/3 eligible, threshold 50%)" in agent.cli("endpoints", "web").stdout
    assert "(panic)" in agent.cli("resolve", "web").stdout
