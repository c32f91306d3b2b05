"""One set of scenarios run against every client through its conformance runner
(RUNNER.md), parametrized by language; a language whose runner or toolchain is missing
skips saying which. Real agents on a file catalog; a scripted agent only where today's
agent cannot play the part (a newer one, a v1-only one).

The table in docs/CLIENTS.md lists SCENARIOS (a test keeps it complete).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from typing import Any, Callable

import pytest

from agentproc import AgentProcess, endpoint_toml
from tests.conformance.fakeagent import FakeAgent, newer_agent, v1_only_agent
from tests.conformance.runners import LANGS, ROOT, Runner, RunnerError, Unavailable, runner_argv
from tests.conformance.wire import RawSocket

#: scenario name -> what it shows (docs/CLIENTS.md has one row per name).
SCENARIOS: dict[str, str] = {}


def scenario(text: str) -> Callable[[Any], Any]:
    def mark(fn: Any) -> Any:
        SCENARIOS[fn.__name__.removeprefix("test_")] = text
        return fn
    return mark


WEB = (endpoint_toml("web", "127.0.0.1", 18001, id="web-1", tags=["v1"])
       + endpoint_toml("web", "127.0.0.1", 18002, id="web-2", tags=["v2"])
       + endpoint_toml("web", "127.0.0.1", 18003, id="web-3", tags=["v2"]))
HASHED = "".join(endpoint_toml(svc, "127.0.0.1", base + i, id=f"{svc}-{i}")
                 for svc, base in (("cache", 18100), ("sess", 18200)) for i in range(1, 5))
FLAKY = "".join(endpoint_toml("flaky", "127.0.0.1", 18300 + i, id=f"flaky-{i}") for i in range(1, 5))
CATALOG = WEB + HASHED + FLAKY
CONFIG = """
[services.cache]
policy = "ring_hash"
[services.sess]
policy = "maglev"
[services.flaky.outlier]
consecutive_failures = 3
base_ejection_time = "60s"
max_ejection_percent = 50
"""
VECTORS = os.path.join(ROOT, "tests", "wire_vectors", "vectors.json")


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """One agent for the scenarios that change nothing in it."""
    a = AgentProcess(str(tmp_path_factory.mktemp("steady")), CATALOG, CONFIG).start()
    yield a
    a.stop()


def is_rotation(ids: list[str], members: set[str]) -> bool:
    """Round robin: one order of all members, repeated."""
    k = len(members)
    return set(ids[:k]) == members and len(ids[:k]) == k and all(ids[i] == ids[i % k] for i in range(len(ids)))


def error_code(fn: Callable[[], Any]) -> str:
    with pytest.raises(RunnerError) as e:
        fn()
    return e.value.code


@scenario("the shared wire vectors through the client's own codec")
def test_vectors(make_runner, steady):
    r = make_runner(steady.socket)
    out = r.cmd("vectors", path=VECTORS)
    assert out["failed"] == []
    assert out["passed"] == len(json.load(open(VECTORS)))


@scenario("hello: the agent answers version 1 to a client offering [1] or [1, 2]")
def test_hello(make_runner, steady):
    r = make_runner(steady.socket)
    assert r.cmd("hello", versions=[1])["version"] == 1
    h = r.cmd("hello", versions=[1, 2])
    assert h["version"] == 1 and "resolve" in h["ops"] and h["max_frame"] > 0


@scenario("resolve rotates round robin, continuing the agent's order seen by a raw socket")
def test_round_robin(make_runner, steady):
    r = make_runner(steady.socket)
    ids = [r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"] for _ in range(6)]
    assert is_rotation(ids, {"web-1", "web-2", "web-3"}), ids
    with RawSocket(steady.socket) as raw:
        assert raw.call(op="resolve", service="web", lease=False)["result"]["id"] == ids[0]
    res = r.cmd("resolve", service="web", key=None, tags=None, lease=True)
    assert isinstance(res["lease"], int) and res["port"] in (18001, 18002, 18003)
    assert {"address", "port", "id", "tags", "meta", "weight", "node", "zone", "region", "panic", "stale"} <= set(res)


@scenario("key affinity (ring_hash, maglev): a key maps where the raw socket says, every time")
def test_key_affinity(make_runner, steady):
    r = make_runner(steady.socket)
    keys = [f"user-{i}" for i in range(12)]
    with RawSocket(steady.socket) as raw:
        for svc in ("cache", "sess"):
            want = {k: raw.call(op="resolve", service=svc, key=k, lease=False)["result"]["id"] for k in keys}
            assert len(set(want.values())) > 1, "keys spread over endpoints"
            for _ in range(2):
                got = {k: r.cmd("resolve", service=svc, key=k, tags=None, lease=False)["id"] for k in keys}
                assert got == want, svc


@scenario("tags: only endpoints carrying every requested tag")
def test_tags(make_runner, steady):
    r = make_runner(steady.socket)
    ids = [r.cmd("resolve", service="web", key=None, tags=["v2"], lease=False)["id"] for _ in range(6)]
    assert set(ids) == {"web-2", "web-3"}
    assert {r.cmd("resolve", service="web", key=None, tags=["v1"], lease=False)["id"] for _ in range(3)} == {"web-1"}


@scenario("errors carry the protocol code; the connection goes on")
def test_errors(make_runner, steady):
    r = make_runner(steady.socket)
    assert error_code(lambda: r.cmd("resolve", service="nope", key=None, tags=None, lease=False)) == "UNKNOWN_SERVICE"
    assert error_code(lambda: r.cmd("resolve", service="web", key=None, tags=["absent"], lease=False)) == "NO_HEALTHY_ENDPOINT"
    assert error_code(lambda: r.cmd("report", lease=987654, ok=True, latency=0.01)) == "UNKNOWN_LEASE"
    assert error_code(lambda: r.cmd("report", service="web", endpoint="web-9", ok=False, latency=None)) == "BAD_ARGUMENT"
    assert r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"].startswith("web-")


@scenario("services and endpoints list the catalog")
def test_services_endpoints(make_runner, steady):
    r = make_runner(steady.socket)
    names = {s["name"] for s in r.cmd("services")}
    assert names == {"web", "cache", "sess", "flaky"}
    eps = r.cmd("endpoints", service="web")
    assert eps["service"] == "web" and [e["id"] for e in eps["endpoints"]] == ["web-1", "web-2", "web-3"]
    assert all(e["eligible"] for e in eps["endpoints"])


@scenario("loopback TCP serves the same as the Unix socket")
def test_tcp(make_runner, steady):
    r = make_runner(steady.addr)
    assert {s["name"] for s in r.cmd("services")} == {"web", "cache", "sess", "flaky"}
    assert r.cmd("resolve", service="web", key=None, tags=["v1"], lease=False)["id"] == "web-1"


@scenario("pipelined calls on one connection come back matched, in the policy's order")
def test_pipeline(make_runner, steady):
    r = make_runner(steady.socket)
    ids = r.cmd("pipeline", service="web", n=60)
    assert len(ids) == 60 and is_rotation(ids, {"web-1", "web-2", "web-3"}), ids


@scenario("no agent: UNAVAILABLE_AGENT within the timeout, not a hang")
def test_no_agent(make_runner, tmp_path):
    r = make_runner(str(tmp_path / "none.sock"), timeout=0.3)
    t0 = time.monotonic()
    assert error_code(lambda: r.cmd("resolve", service="web", key=None, tags=None, lease=False)) == "UNAVAILABLE_AGENT"
    assert time.monotonic() - t0 < 5


@scenario("failed reports eject the endpoint; resolves avoid it")
def test_report_ejection(make_runner, make_agent):
    agent = make_agent(CATALOG, CONFIG)
    r = make_runner(agent.socket)
    first = r.cmd("resolve", service="flaky", key=None, tags=None, lease=True)
    victim = first["id"]
    r.cmd("report", lease=first["lease"], ok=False, latency=0.05)
    for _ in range(2):
        r.cmd("report", service="flaky", endpoint=victim, ok=False, latency=None)
    state = {e["id"]: e["eligible"] for e in r.cmd("endpoints", service="flaky")["endpoints"]}
    assert state[victim] is False and sum(state.values()) == 3
    assert victim not in {r.cmd("resolve", service="flaky", key=None, tags=None, lease=False)["id"] for _ in range(9)}


@scenario("watch: first set, then an agent restart delivers nothing unchanged, then a change arrives")
def test_watch_restart(make_runner, make_agent):
    agent = make_agent(CATALOG, CONFIG)
    r = make_runner(agent.socket, timeout=2.0)
    assert r.cmd("watch", service="web", name="w") == {}
    ev = r.next_event(10)
    assert ev and ev["event"] == "watch" and ev["watch"] == "w"
    assert [e["id"] for e in ev["update"]["endpoints"]] == ["web-1", "web-2", "web-3"]
    agent.stop()
    agent.start()
    # Long enough for the watch to have reconnected (backoff caps at 1 s) and re-watched.
    assert r.next_event(2.5) is None, "an unchanged set was delivered again after the restart"
    agent.write_catalog(CATALOG + endpoint_toml("web", "127.0.0.1", 18004, id="web-4"))
    ev = r.next_event(15)
    assert ev is not None, "the change after the restart never arrived"
    assert [e["id"] for e in ev["update"]["endpoints"]] == ["web-1", "web-2", "web-3", "web-4"]
    assert r.next_event(0.5) is None
    assert r.cmd("unwatch", name="w") == {}
    agent.write_catalog(CATALOG)
    with RawSocket(agent.socket) as raw:
        deadline = time.monotonic() + 15
        while len(raw.call(op="endpoints", service="web")["result"]["endpoints"]) != 3:
            assert time.monotonic() < deadline, "the agent never reloaded the catalog"
            time.sleep(0.05)
    assert r.next_event(1.0) is None, "an update arrived after unwatch"


@scenario("a call to a stalled agent times out (TIMEOUT); the next call works and is not confused by the late answer")
def test_timeout_recovery(make_runner, make_agent):
    agent = make_agent(CATALOG, CONFIG)
    r = make_runner(agent.socket, timeout=2.0)
    assert r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"].startswith("web-")
    r.cmd("set_timeout", timeout=0.3)
    agent.send(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert error_code(lambda: r.cmd("resolve", service="web", key=None, tags=None, lease=False)) == "TIMEOUT"
        assert time.monotonic() - t0 < 5
    finally:
        agent.send(signal.SIGCONT)
    r.cmd("set_timeout", timeout=3.0)
    # A different service: the stalled call's late "web" answer must not be taken for this.
    assert r.cmd("resolve", service="cache", key="k", tags=None, lease=False)["id"].startswith("cache-")
    assert r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"].startswith("web-")


@scenario("agent killed (SIGKILL) and restarted between calls: the next call just works")
def test_restart_between_calls(make_runner, make_agent):
    agent = make_agent(CATALOG, CONFIG)
    r = make_runner(agent.socket, timeout=3.0)
    assert r.cmd("hello", versions=[1])["version"] == 1
    for sig in (signal.SIGKILL, signal.SIGTERM):
        agent.stop(sig)
        agent.start()
        assert r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"].startswith("web-")
        assert r.cmd("services")


@scenario("a newer agent (version 2, extra ops, unknown result fields and answer keys) is used gracefully")
def test_newer_agent(make_runner, tmp_path):
    fake = FakeAgent(str(tmp_path / "new.sock"), newer_agent)
    try:
        r = make_runner(fake.path)
        h = r.cmd("hello", versions=[1])
        assert h["version"] == 1 and "drain" in h["ops"]
        assert r.cmd("hello", versions=[1, 2])["version"] == 2
        res = r.cmd("resolve", service="web", key=None, tags=None, lease=True)
        assert (res["id"], res["port"], res["lease"]) == ("web-1", 18001, 7)
        assert r.cmd("report", lease=7, ok=True, latency=0.01) == {}
        assert r.cmd("services")[0]["name"] == "web"
        assert r.cmd("endpoints", service="web")["endpoints"][0]["id"] == "web-1"
        assert r.cmd("pipeline", service="web", n=5) == ["web-1"] * 5
        r.cmd("watch", service="web", name="w")
        ev = r.next_event(5)
        assert ev and ev["update"]["endpoints"][0]["id"] == "web-1"
    finally:
        fake.stop()


@scenario("a v1-only agent: a client offering [1, 2] gets version 1; offering [2] alone, UNSUPPORTED_VERSION")
def test_v1_only_agent(make_runner, tmp_path):
    fake = FakeAgent(str(tmp_path / "v1.sock"), v1_only_agent)
    try:
        r = make_runner(fake.path)
        assert r.cmd("hello", versions=[1, 2])["version"] == 1
        assert error_code(lambda: r.cmd("hello", versions=[2])) == "UNSUPPORTED_VERSION"
        offered = [q["versions"] for q in fake.requests if q.get("op") == "hello"]
        assert offered[-2:] == [[1, 2], [2]]  # (a client may also say hello on connecting)
    finally:
        fake.stop()


def test_one_rotation_through_every_client_and_http(steady, tmp_path):
    """The same resolve sequence through every client present and curl (the HTTP API):
    endpoints from the same set, in the policy's one round-robin order."""
    runners = []
    try:
        for lang in LANGS:
            try:
                r = Runner(lang, runner_argv(lang), str(tmp_path / f"{lang}.log"))
            except Unavailable:
                continue
            runners.append(r)
            r.cmd("connect", addr=steady.socket, timeout=5.0)
        assert runners, "no client runner at all"
        url = f"http://127.0.0.1:{steady.admin_port}/v1/resolve/web?lease=false"

        def http_id() -> str:
            if shutil.which("curl"):
                out = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, timeout=10)
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)["id"]
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())["id"]

        callers = [lambda r=r: r.cmd("resolve", service="web", key=None, tags=None, lease=False)["id"] for r in runners]
        callers.append(http_id)
        seq = [callers[i % len(callers)]() for i in range(3 * len(callers) * 2)]
        assert is_rotation(seq, {"web-1", "web-2", "web-3"}), seq
    finally:
        for r in runners:
            r.close()
