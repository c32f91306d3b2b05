"""The Go client (clients/go): its own `go test` suite against a real agent, and its
conformance runner driven over JSON lines (a smoke test, skipped once tests/conformance/
is present to run the runner through every scenario).

Needs Debian's golang-go and golang-github-vmihailenco-msgpack.v5-dev (.ci/apt-packages;
`scripts/ensure-packages` installs them); the tests skip saying which is missing. The build
is offline: the module replaces msgpack with Debian's sources, and GOPROXY=off proves it.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from agentproc import THREE, AgentProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]
GO_DIR = ROOT / "clients" / "go"
MSGPACK_SRC = pathlib.Path("/usr/share/gocode/src/github.com/vmihailenco/msgpack/v5")
TAGPARSER_SRC = pathlib.Path("/usr/share/gocode/src/github.com/vmihailenco/tagparser/v2")


def go_env(tmp: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOPROXY="off", GOFLAGS="-mod=mod", GOSUMDB="off", GOTOOLCHAIN="local")
    if not env.get("HOME"):  # CI may have no HOME, where Go keeps its caches
        env.setdefault("GOCACHE", str(tmp / "gocache"))
        env.setdefault("GOPATH", str(tmp / "gopath"))
    return env


@pytest.fixture(scope="module")
def go(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain: install Debian's golang-go (.ci/apt-packages)")
    for src, pkg in ((MSGPACK_SRC, "golang-github-vmihailenco-msgpack.v5-dev"),
                     (TAGPARSER_SRC, "golang-github-vmihailenco-tagparser.v2-dev")):
        if not src.is_dir():
            pytest.skip(f"no {src}: install Debian's {pkg} (.ci/apt-packages)")
    return go_env(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="module")
def runner(go, tmp_path_factory):
    out = tmp_path_factory.mktemp("go-runner") / "runner"
    p = subprocess.run(["go", "build", "-o", str(out), "./cmd/softlb-conformance"], cwd=GO_DIR, env=go,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.slow
def test_go_module_tests_pass_against_a_real_agent(go):
    env = dict(go, SOFTLB_TEST_AGENT=f"{sys.executable} -m softlb_agent agent")
    # The race detector checks the pipelining under many goroutines; it needs cgo (a C compiler).
    race = ["-race"] if shutil.which("cc") or shutil.which("gcc") else []
    p = subprocess.run(["go", "test", "-count=1", *race, "./..."], cwd=GO_DIR, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FAIL" not in p.stdout


@pytest.mark.slow
def test_go_vet_is_clean(go):
    p = subprocess.run(["go", "vet", "./..."], cwd=GO_DIR, env=go, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr


class Runner:
    """The runner subprocess: send a command, read its reply (events are kept apart)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.proc = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        # A reader thread, not select() on the pipe: a reply and an event often arrive in
        # one read, and the second would sit in the file's buffer, invisible to select().
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.events: list[dict] = []
        self.seq = 0

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _line(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the runner within {timeout}s") from None
        assert line, "the runner closed its stdout"
        return json.loads(line)

    def __call__(self, cmd: str, wait: float = 20.0, **args) -> dict:
        self.seq += 1
        self.proc.stdin.write(json.dumps({"cmd": cmd, "seq": self.seq, **args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + wait
        while True:
            msg = self._line(max(0.01, deadline - time.monotonic()))
            if "event" in msg:
                self.events.append(msg)
                continue
            assert msg["seq"] == self.seq, msg
            return msg

    def event(self, timeout: float = 20.0) -> dict:
        if self.events:
            return self.events.pop(0)
        msg = self._line(timeout)
        assert "event" in msg, msg
        return msg

    def close(self) -> int:
        try:
            self.proc.stdin.close()
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def agent(tmp_path):
    a = AgentProcess(str(tmp_path), THREE, admin=False).start()
    yield a
    a.stop()


@pytest.fixture
def run(runner):
    if (ROOT / "tests" / "conformance" / "test_scenarios.py").is_file():
        pytest.skip("the conformance driver (tests/conformance/) runs the Go runner through every scenario")
    r = Runner(runner)
    yield r
    r.close()


WEB = {"web-1", "web-2", "web-3"}


@pytest.mark.slow
def test_runner_calls(agent, run):
    v = run("vectors", path=str(ROOT / "tests" / "wire_vectors" / "vectors.json"))
    # Every vector in the file, however many there are (issue 15 appended three).
    count = len(json.loads((ROOT / "tests" / "wire_vectors" / "vectors.json").read_text()))
    assert v["ok"] and v["result"]["failed"] == [] and v["result"]["passed"] == count
    assert run("connect", addr=agent.socket, timeout=5.0) == {"seq": 2, "ok": True, "result": {}}
    assert run("hello", versions=[1, 2])["result"]["version"] == 1
    r = run("resolve", service="web", key=None, tags=None, lease=True)["result"]
    assert r["id"] in WEB and isinstance(r["lease"], int) and r["tags"] == [] and "age" not in r
    assert run("report", lease=r["lease"], ok=False, latency=0.01)["ok"]
    assert run("report", lease=r["lease"], ok=True)["error"]["code"] == "UNKNOWN_LEASE"
    assert run("report", service="web", endpoint="web-1", ok=True)["ok"]
    assert run("resolve", service="nope", key=None, tags=None, lease=True)["error"]["code"] == "UNKNOWN_SERVICE"
    assert run("resolve", service="web", key="k", tags=["nope"], lease=False)["error"]["code"] == "NO_HEALTHY_ENDPOINT"
    assert [s["name"] for s in run("services")["result"]] == ["web"]
    assert {e["id"] for e in run("endpoints", service="web")["result"]["endpoints"]} == WEB
    ids = run("pipeline", service="web", n=51)["result"]
    assert len(ids) == 51 and all(ids.count(i) == 17 for i in WEB)
    # Written in order on one connection: the round robin's cycle, in issue order.
    assert ids[3:6] == ids[:3] and len(set(ids[:3])) == 3
    assert run("bench", service="web", n=20)["result"]["seconds"] > 0
    assert run("close")["ok"] and run("exit")["ok"]
    assert run.proc.wait(timeout=10) == 0


@pytest.mark.slow
def test_runner_watch_across_a_restart(agent, run):
    run("connect", addr=agent.socket, timeout=5.0)
    assert run("watch", service="web", name="w1")["ok"]
    first = run.event()
    assert first["watch"] == "w1" and {e["id"] for e in first["update"]["endpoints"]} == WEB
    agent.stop()
    agent.start()  # waits until it answers
    assert run("resolve", service="web", key=None, tags=None, lease=False)["ok"]  # one transparent retry
    time.sleep(1.5)  # the watch's reconnect backoff tops out at 1 s
    agent.write_catalog(THREE + '[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = 18004\nid = "web-4"\n')
    nxt = run.event()
    assert {e["id"] for e in nxt["update"]["endpoints"]} == WEB | {"web-4"}, "a duplicate update after the restart?"
    assert run("unwatch", name="w1")["ok"]


@pytest.mark.slow
def test_runner_error_codes(agent, run, tmp_path):
    run("connect", addr=str(tmp_path / "missing.sock"), timeout=0.3)
    assert run("services")["error"]["code"] == "UNAVAILABLE_AGENT"
    run("connect", addr=agent.addr, timeout=5.0)  # loopback TCP
    assert run("services")["ok"]
    st = run("set_timeout", timeout=0.3)
    assert st["ok"], st
    agent.send(signal.SIGSTOP)
    try:
        assert run("resolve", service="web", key=None, tags=None, lease=False)["error"]["code"] == "TIMEOUT"
    finally:
        agent.send(signal.SIGCONT)
    run("set_timeout", timeout=5.0)
    assert run("resolve", service="web", key=None, tags=None, lease=False)["ok"]  # recovered
    assert run("frobnicate")["error"]["code"] == "CLIENT"
