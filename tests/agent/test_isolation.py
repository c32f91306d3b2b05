"""Issue 10: no local caller can stall, starve or blind the others. Each test is one defect
the issue found, run against a real agent subprocess over real sockets (each fails on the
code before agent/listeners.py: no caps, no idle timeout, no fair turns, no fd reserve)."""

import os
import socket
import threading
import time
import urllib.request

import msgpack
import pytest

from agentproc import THREE, endpoint_toml, wait_until
from helpers.frames import frame, read_frames


def raw(agent, timeout=5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(agent.socket)
    return s


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


def metric(agent, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class Flood:
    """Item 1: one client writing thousands of pipelined resolves per send from one thread
    and reading the answers in another, as fast as it can."""

    def __init__(self, agent, per_send=4000):
        self.s = raw(agent, timeout=10)
        self.batch = b"".join(frame({"id": i, "op": "resolve", "service": "web", "lease": False}) for i in range(per_send))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, daemon=True), threading.Thread(target=self._read, daemon=True)]

    def _write(self):
        try:
            while not self.stop.is_set():
                self.s.sendall(self.batch)
        except OSError:
            pass

    def _read(self):
        try:
            while not self.stop.is_set() and self.s.recv(1 << 20):
                pass
        except OSError:
            pass

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(timeout=10)
        self.s.close()


def test_a_pipelining_client_does_not_freeze_the_others(agent):
    with agent.client(timeout=2) as c:
        c.resolve("web", lease=False)
        with Flood(agent):
            time.sleep(0.3)
            worst = 0.0
            for _ in range(50):
                t0 = time.perf_counter()
                c.resolve("web", lease=False)  # times out (2 s) on the old code
                worst = max(worst, time.perf_counter() - t0)
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/healthz", timeout=2) as r:
                assert r.status == 200
            # Bounds far above the ~1 ms a turn costs, far below the old freeze: a busy CI
            # machine must not make this flaky.
            assert worst < 1.0, worst
    assert metric(agent, "softlb_turns_yielded_total") > 0


def test_connections_per_uid_are_capped_and_the_refused_one_is_told(make_agent):
    agent = make_agent(config="[agent]\nmax_connections_per_uid = 20\n").start()
    wait_until(lambda: metric(agent, "softlb_connections_open") == 0)  # the readiness check's
    held = [raw(agent) for _ in range(20)]
    for s in held:  # each is accepted and served
        s.sendall(frame({"id": 1, "op": "hello"}))
        assert read_frames(s, 1)[0]["result"]["version"] == 1
    extra = raw(agent)
    (err,) = read_frames(extra, 1)
    assert err["error"]["code"] == "UNAVAILABLE" and "max_connections_per_uid" in err["error"]["message"]
    assert closed(extra)
    extra.close()
    held.pop().close()
    wait_until(lambda: metric(agent, "softlb_connections_open") == 19)
    again = raw(agent)
    again.sendall(frame({"id": 2, "op": "hello"}))
    assert read_frames(again, 1)[0]["id"] == 2
    assert metric(agent, 'softlb_connections_refused_total{reason="peer_limit"}') == 1
    for s in held + [again]:
        s.close()


def test_idle_connections_are_closed_but_watching_ones_are_not(make_agent):
    agent = make_agent(config='[agent]\nidle_timeout = "300ms"\n').start()
    idle, watching = raw(agent), raw(agent)
    watching.sendall(frame({"id": 1, "op": "watch", "service": "web"}))
    assert read_frames(watching, 1)[0]["id"] == 1
    t0 = time.monotonic()
    assert closed(idle)  # blocks until the agent closes it (5 s timeout otherwise)
    assert time.monotonic() - t0 < 3
    watching.settimeout(0.5)
    with pytest.raises(socket.timeout):
        watching.recv(1)  # still open: no EOF
    watching.sendall(frame({"id": 2, "op": "hello"}))
    watching.settimeout(5)
    assert read_frames(watching, 1)[0]["id"] == 2
    assert metric(agent, "softlb_connections_idle_closed_total") >= 1
    idle.close()
    watching.close()


def test_watches_are_bounded_per_connection_and_in_total(make_agent):
    agent = make_agent(config="[agent]\nmax_watches_per_connection = 5\nmax_watches = 8\n").start()
    a, b = raw(agent), raw(agent)
    a.sendall(b"".join(frame({"id": i, "op": "watch", "service": "web"}) for i in range(7)))
    answers = {m["id"]: m for m in read_frames(a, 7)}
    assert sum("result" in m for m in answers.values()) == 5
    refused = [m for m in answers.values() if "error" in m]
    assert len(refused) == 2 and all("max_watches_per_connection" in m["error"]["message"] for m in refused)
    b.sendall(b"".join(frame({"id": i, "op": "watch", "service": "web"}) for i in range(4)))
    answers = read_frames(b, 4)
    assert sum("result" in m for m in answers) == 3  # 8 in all
    assert any("agent.max_watches" in m.get("error", {}).get("message", "") for m in answers)
    # An unwatch frees a slot.
    a.sendall(frame({"id": 100, "op": "unwatch", "watch": 0}) + frame({"id": 101, "op": "watch", "service": "web"}))
    got = {m["id"]: m for m in read_frames(a, 2)}
    assert "result" in got[100] and "result" in got[101]
    assert metric(agent, "softlb_watches_refused_total") == 3
    a.close()
    b.close()


class Backends:
    """Three live TCP endpoints for connect probes (the kernel completes the handshake)."""

    def __init__(self):
        self.socks = []
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(4096)
            self.socks.append(s)

    def catalog(self):
        return "".join(endpoint_toml("web", "127.0.0.1", s.getsockname()[1], id=f"web-{i}")
                       for i, s in enumerate(self.socks, 1))

    def close(self):
        for s in self.socks:
            s.close()


PROBED = """
[services.web]
panic_threshold = 0
[services.web.probe]
interval = "100ms"
timeout = "500ms"
fall = 2
"""


@pytest.mark.parametrize("reserve", [128, 0], ids=["fd_reserve", "no_reserve_probe_skips"])
def test_fd_exhaustion_never_marks_healthy_backends_down(make_agent, reserve):
    """Item 2: ulimit -n 256 and 400 idle connections. With the reserve, connections stop
    short of the limit; with none, probes hit EMFILE and are skipped, not failed."""
    backends = Backends()
    try:
        agent = make_agent(catalog=backends.catalog(), nofile=256,
                           config=f"[agent]\nfd_reserve = {reserve}\nmax_connections = 100000\n" + PROBED).start()
        with agent.client(timeout=2) as c:
            wait_until(lambda: all(e["health"]["probe"] == "up" for e in c.endpoints("web")["endpoints"]))
            held = []
            for _ in range(400):
                try:
                    held.append(raw(agent))
                except OSError:
                    break
            time.sleep(1.5)  # 15 probe rounds: fall = 2 would have taken every endpoint down
            rows = c.endpoints("web")["endpoints"] if reserve else None
            for _ in range(30):
                assert c.resolve("web", lease=False).port in [s.getsockname()[1] for s in backends.socks]
            for s in held:
                s.close()
            rows = rows or c.endpoints("web")["endpoints"]
            assert all(e["eligible"] for e in rows), rows
            if reserve:
                assert metric(agent, 'softlb_connections_refused_total{reason="limit"}') > 0
            else:
                assert metric(agent, "softlb_probe_local_failures_total") > 0
    finally:
        backends.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other uids")
def test_allow_uids_admits_only_listed_peers(make_agent, tmp_path):
    os.chmod(tmp_path, 0o711)
    os.makedirs(tmp_path / "s", mode=0o711)
    os.chmod(tmp_path / "s", 0o711)
    agent = make_agent(config='[agent]\nallow_uids = [12345]\nsocket_group = "65534"\n').start()
    def run(uid):
        # A forked child (not a new interpreter: other uids cannot read this one's venv)
        # that drops to `uid` and asks the agent hello.
        r, w = os.pipe()
        # pytest's tmp dirs are root-only: reach the socket through a directory fd opened
        # now, which /proc resolves without walking the parents.
        d = os.open(os.path.dirname(agent.socket), os.O_RDONLY | os.O_DIRECTORY)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = "CRASH"
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(uid)
                c = socket.socket(socket.AF_UNIX)
                c.settimeout(5)
                c.connect(f"/proc/self/fd/{d}/{os.path.basename(agent.socket)}")
                try:
                    c.sendall(frame({"id": 1, "op": "hello"}))
                except BrokenPipeError:
                    pass  # refused and closed already: the refusal is still in our buffer
                code = read_frames(c, 1)[0].get("error", {}).get("code", "OK")
            except BaseException as e:
                code = repr(e)
            finally:
                os.write(w, code.encode()[:200])
                os._exit(0)
        os.close(w)
        os.close(d)
        try:
            return os.read(r, 200).decode()
        finally:
            os.close(r)
            os.waitpid(pid, 0)
    assert run(12345) == "OK"
    assert run(23456) == "UNAVAILABLE"
    assert metric(agent, 'softlb_connections_refused_total{reason="denied"}') == 1
    assert "uid 23456" in agent.log()


def test_catalog_path_turned_fifo_or_dev_zero_is_refused_and_the_agent_serves_on(agent):
    """Item 6: a FIFO at the catalog path blocked the whole agent in open() (SIGTERM
    included); a symlink to /dev/zero ended it with MemoryError."""
    os.unlink(agent.catalog_path)
    os.mkfifo(agent.catalog_path)
    with agent.client(timeout=2) as c:
        wait_until(lambda: metric(agent, "softlb_catalog_refused_total") >= 1)
        assert c.resolve("web", lease=False).port in (18001, 18002, 18003)
        os.unlink(agent.catalog_path)
        os.symlink("/dev/zero", agent.catalog_path)
        wait_until(lambda: metric(agent, "softlb_catalog_refused_total") >= 2)
        assert c.resolve("web", lease=False).port in (18001, 18002, 18003)
    assert "is a FIFO, not a regular file" in agent.log() and "is a device" in agent.log()
    os.unlink(agent.catalog_path)
    os.mkfifo(agent.catalog_path)
    time.sleep(0.7)
    assert agent.stop(timeout=5) == 0  # SIGTERM still works


def test_an_oversized_catalog_is_refused_before_it_is_read(make_agent):
    agent = make_agent(config="[catalog]\nmax_bytes = 2048\n").start()
    agent.write_catalog(THREE + "# " + "x" * 4096 + "\n")
    wait_until(lambda: metric(agent, "softlb_catalog_refused_total") >= 1)
    assert "over catalog.max_bytes = 2048" in agent.log()
    with agent.client(timeout=2) as c:
        assert c.resolve("web", lease=False).port in (18001, 18002, 18003)


def big_catalog(services: int, per: int) -> str:
    return "".join(
        f'[[services.s{s}.endpoints]]\naddress = "10.{s % 250}.{i // 250}.{i % 250 + 1}"\nport = {1000 + i}\n'
        for s in range(services) for i in range(per)) + THREE


def test_a_big_catalog_reload_does_not_stall_other_clients(agent):
    """Item 9: a 100,000-endpoint reload stalled every client for 3.8 s. Parsing now runs
    in a worker thread and the services are applied in slices. (50,000 endpoints here to
    keep the test short; bench/bystander.py runs 100,000.) The bound is loose: this is a
    shared 2-core machine, and a GIL handoff under load can take 100+ ms."""
    text = big_catalog(500, 100)
    with agent.client(timeout=2) as c:
        reloads = metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}')
        agent.write_catalog(text)
        worst, t_end = 0.0, time.monotonic() + 60
        while metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}') == reloads and time.monotonic() < t_end:
            for _ in range(20):
                t0 = time.perf_counter()
                c.resolve("web", lease=False)
                worst = max(worst, time.perf_counter() - t0)
        assert metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}') > reloads
        assert c.resolve("s299", lease=False).port >= 1000
        assert worst < 2.0, worst  # the old code: ~6 s here


def test_one_giant_service_is_applied_without_stalling_other_clients(agent):
    """Item 9: one service of 100,000 endpoints was applied in one core call (~1.8 s on the
    loop, more on a busy host). It is now built in steps (softlb/_set_build.py) while the
    old set serves. A bystander resolves on the Unix socket throughout; every call must
    succeed and none may take a second (a loose bound for a shared machine: the old code
    stalls the loop for the whole apply)."""
    n = 100_000
    text = THREE + "".join(
        f'[[services.giant.endpoints]]\naddress = "10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"\nport = {1000 + i % 50000}\n'
        for i in range(n))
    worst, calls, errors = 0.0, 0, []
    stop = threading.Event()

    def bystander() -> None:
        nonlocal worst, calls
        with agent.client(timeout=10) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.resolve("web", lease=False)
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(repr(e))
                worst = max(worst, time.perf_counter() - t0)
                calls += 1
                time.sleep(0.001)

    reloads = metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}')
    t = threading.Thread(target=bystander, daemon=True)
    t.start()
    try:
        agent.write_catalog(text)
        t_end = time.monotonic() + 120
        while metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}') == reloads and time.monotonic() < t_end:
            time.sleep(0.2)
        time.sleep(0.5)  # the bystander keeps going past the install
    finally:
        stop.set()
        t.join(timeout=15)
    assert metric(agent, 'softlb_reloads_total{result="ok",what="catalog"}') > reloads, "never applied"
    assert metric(agent, 'softlb_set_builds_total{result="installed"}') >= 1  # (absent before: 0)
    with agent.client(timeout=10) as c:
        assert c.resolve("giant", lease=False).port >= 1000
        assert len(c.endpoints("giant")["endpoints"]) == n
    assert not errors and calls > 100, (errors[:3], calls)
    assert worst < 1.0, worst


def test_every_one_of_many_watches_gets_every_change(make_agent):
    """Item 3: watches are woken a slice at a time; none may miss an update."""
    agent = make_agent(config="[agent]\nmax_watches_per_connection = 1000\n").start()
    s = raw(agent, timeout=10)
    n = 600
    s.sendall(b"".join(frame({"id": i, "op": "watch", "service": "web"}) for i in range(n)))
    first = read_frames(s, n)
    assert sorted(m["id"] for m in first) == list(range(n))
    for extra in (4, 5):
        agent.write_catalog(THREE + endpoint_toml("web", "127.0.0.1", 18000 + extra, id=f"web-{extra}"))
        got = read_frames(s, n)
        assert sorted(m["id"] for m in got) == list(range(n))
        assert all({e["id"] for e in m["result"]["endpoints"]} >= {f"web-{extra}"} for m in got)
    s.close()


def test_a_big_endpoints_listing_is_answered_in_order_without_stalling_others(make_agent):
    """Item 9: `endpoints` on a 100,000-endpoint service held the loop 3.7 s per call. It is
    now described and encoded in a worker thread; the asking connection waits (its answers
    stay in request order), the others do not: a resolve sent just after the listing request
    is answered before the listing (on the old code, after it). 20,000 endpoints here."""
    import select

    text = THREE + "".join(endpoint_toml("big", f"10.0.{i // 250}.{i % 250 + 1}", 9000, id=f"b{i}") for i in range(20000))
    agent = make_agent(catalog=text).start()
    s, r = raw(agent, timeout=30), raw(agent)
    s.sendall(frame({"id": 1, "op": "hello"}) + frame({"id": 2, "op": "endpoints", "service": "big"})
              + frame({"id": 3, "op": "hello"}))
    assert read_frames(s, 1)[0]["id"] == 1
    r.sendall(frame({"id": 9, "op": "resolve", "service": "web", "lease": False}))
    readable, _, _ = select.select([s, r], [], [], 30)
    assert readable == [r], "the bystander waited for the listing"
    assert read_frames(r, 1)[0]["id"] == 9
    got = read_frames(s, 2)
    assert [m["id"] for m in got] == [2, 3]
    assert len(got[0]["result"]["endpoints"]) == 20000 and got[0]["result"]["service"] == "big"
    # A second listing of the unchanged service is the cached encoding.
    s.sendall(frame({"id": 4, "op": "endpoints", "service": "big"}))
    assert len(read_frames(s, 1)[0]["result"]["endpoints"]) == 20000
    s.close()
    r.close()


MAGLEV = '[services.mg]\npolicy = "maglev"\n'


def test_maglev_rebuilds_run_in_steps_and_keys_stay_on_live_endpoints(make_agent):
    """Item 9: a maglev table build at 1,000 endpoints took 25-77 ms inside the engine call
    on every flap. Rebuilds now run in steps (agent/table_builds.py) while the old table,
    guarded to the live set, serves."""
    def catalog(skip):
        return THREE + "".join(endpoint_toml("mg", f"10.1.{i // 250}.{i % 250 + 1}", 8000, id=f"mg-{i}")
                               for i in range(300) if i != skip)

    agent = make_agent(catalog=catalog(None), config=MAGLEV).start()
    with agent.client(timeout=2) as c:
        before = {k: c.resolve("mg", key=k, lease=False).id for k in map(str, range(200))}
        for skip in (7, 8, 9):
            agent.write_catalog(catalog(skip))
            wait_until(lambda: metric(agent, 'softlb_table_builds_total{result="installed"}')
                       + metric(agent, 'softlb_table_builds_total{result="superseded"}') >= skip - 6)
            now = {k: c.resolve("mg", key=k, lease=False).id for k in map(str, range(200))}
            assert f"mg-{skip}" not in now.values()
            # Keys of the endpoints that stayed stay (maglev moves a few percent more).
            moved = sum(now[k] != v for k, v in before.items() if v not in ("mg-7", "mg-8", "mg-9"))
            assert moved <= 10, moved


def test_the_watchdog_keeps_pinging_during_a_pipelining_flood(make_agent, tmp_path, monkeypatch):
    """Item 1: under systemd (WatchdogSec=30s) the flood stopped the watchdog pings and got
    the agent killed. A datagram socket plays the service manager here."""
    path = str(tmp_path / "notify.sock")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    manager.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    agent = make_agent().start()
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.delenv("WATCHDOG_USEC")

    def pings(seconds):
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                n += manager.recv(4096).decode().split("\n").count("WATCHDOG=1")
            except socket.timeout:
                pass
        return n

    assert pings(1.0) >= 3
    with Flood(agent):
        time.sleep(0.3)
        during = pings(2.0)
    manager.close()
    assert during >= 4, during  # 10 expected; none on the old code
