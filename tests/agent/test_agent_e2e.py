"""The agent as operators run it: a real subprocess, its CLI, its sockets and signals."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest
from agentproc import THREE, endpoint_toml, wait_until

from softlb_client import Client, SoftLBError


def test_cli_resolve_rotates_over_the_endpoints(agent):
    seen = []
    for _ in range(6):
        r = agent.cli("resolve", "web", "--json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert {"address", "port", "id"} <= set(d)
        seen.append(d["id"])
    assert Counter(seen) == {"web-1": 2, "web-2": 2, "web-3": 2}
    assert seen[:3] == seen[3:]


def test_cli_tables_and_exit_codes(agent):
    r = agent.cli("services")
    assert r.returncode == 0 and r.stdout.split("\n")[0].split() == ["SERVICE", "POLICY", "ENDPOINTS", "ELIGIBLE", "SERVED", "PANIC", "STALE"]
    assert "web" in r.stdout
    r = agent.cli("endpoints", "web")
    assert r.returncode == 0 and "web-2" in r.stdout and "127.0.0.1:18002" in r.stdout
    r = agent.cli("endpoints", "web", "--json")
    assert [e["id"] for e in json.loads(r.stdout)["endpoints"]] == ["web-1", "web-2", "web-3"]
    r = agent.cli("resolve", "nope")
    assert r.returncode == 1 and "UNKNOWN_SERVICE" in r.stderr
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "resolve", "web", "--socket", "/nonexistent/x.sock",
                        "--timeout", "0.2"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 3 and "cannot connect" in r.stderr
    r = agent.cli("--help")
    assert r.returncode == 0 and "resolve" in r.stdout


def test_tcp_port_and_unix_socket_serve_the_same(agent):
    with Client(addr=agent.addr) as tcp, agent.client() as unix:
        assert tcp.services() == unix.services()
        assert tcp.resolve("web").port in (18001, 18002, 18003)


def test_socket_is_owner_and_group_only(agent):
    mode = stat.S_IMODE(os.stat(agent.socket).st_mode)
    assert mode & 0o007 == 0 and mode & 0o600 == 0o600


def test_many_concurrent_clients(agent):
    errors, counts = [], Counter()
    lock = threading.Lock()

    def worker():
        try:
            with agent.client(timeout=5) as c:
                for _ in range(200):
                    r = c.resolve("web", lease=False)
                    with lock:
                        counts[r.id] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors
    assert sum(counts.values()) == 2400 and set(counts) == {"web-1", "web-2", "web-3"}


def test_catalog_edit_is_picked_up_without_restart(agent):
    pid = agent.proc.pid
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 19001, id="new-1") + endpoint_toml("db", "127.0.0.1", 5432))
    wait_until(lambda: {s["name"] for s in agent.client().services()} == {"web", "db"})
    with agent.client() as c:
        assert {c.resolve("web").id for _ in range(3)} == {"new-1"}
    assert agent.proc.pid == pid and agent.proc.poll() is None


def test_broken_edit_keeps_the_last_good_catalog(agent):
    agent.write_catalog("[[services.web.endpoints]]\naddress = \"127.0.0.1\"\nport = 99999\n")
    wait_until(lambda: "not reloaded" in agent.log())
    assert "port: 99999 is out of range" in agent.log()
    with agent.client() as c:
        assert {c.resolve("web").id for _ in range(3)} == {"web-1", "web-2", "web-3"}
    # and a later good edit still applies
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 19001, id="fixed"))
    wait_until(lambda: agent.client().resolve("web").id == "fixed")


def test_a_catalog_edit_that_is_not_utf8_keeps_the_last_good_catalog(agent):
    with open(agent.catalog_path, "ab") as f:
        f.write(b"# \xc3\x28\n")
    wait_until(lambda: "not reloaded" in agent.log())
    assert "catalog is not UTF-8 text: byte 0xc3 at offset" in agent.log()
    with agent.client() as c:
        assert {c.resolve("web").id for _ in range(3)} == {"web-1", "web-2", "web-3"}


def test_sighup_reloads_catalog(agent):
    # Same size and a restored mtime would defeat polling; SIGHUP must reload regardless.
    st = os.stat(agent.catalog_path)
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 18001, id="web-9"))
    os.utime(agent.catalog_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    agent.send(signal.SIGHUP)
    wait_until(lambda: agent.client().resolve("web").id == "web-9")


def test_sighup_with_broken_config_keeps_serving(agent):
    agent.write_config("[agent]\nbogus = 1\n")
    agent.send(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in agent.log())
    assert "agent.bogus: unknown setting" in agent.log()
    assert agent.client().resolve("web").port in (18001, 18002, 18003)


def test_sighup_with_a_config_that_is_not_utf8_keeps_serving(agent):
    """Found by atheris (issue 10): tomllib's UnicodeDecodeError escaped the reload."""
    with open(agent.config_path, "wb") as f:
        f.write(b'[agent]\nzone = "\xff"\n')
    agent.send(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in agent.log())
    assert "config is not UTF-8 text: byte 0xff at offset 16" in agent.log()
    assert agent.client().resolve("web").port in (18001, 18002, 18003)
    assert agent.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown(agent, sig):
    assert agent.stop(sig) == 0
    assert not os.path.exists(agent.socket)


def test_refuses_non_loopback_listen(make_agent):
    a = make_agent(extra_args=["--listen", "0.0.0.0:7999"])
    a.start(wait=False)
    assert a.proc.wait(timeout=20) == 2
    assert "not a loopback address" in a.log()


def test_bad_catalog_at_start_is_a_clear_error(make_agent):
    a = make_agent(catalog="[[services.web.endpoints]]\nport = 1\n")
    a.start(wait=False)
    assert a.proc.wait(timeout=20) == 2
    assert "services.web.endpoints[0].address: required" in a.log()


def test_second_agent_on_the_same_socket_is_refused(agent, make_agent):
    b = make_agent()
    b.args[b.args.index("--socket") + 1] = agent.socket
    b.start(wait=False)
    assert b.proc.wait(timeout=20) == 2
    assert "another agent is already serving" in b.log()
    assert agent.client().resolve("web")


def test_admin_http_api(make_agent):
    agent = make_agent(catalog=THREE + endpoint_toml("web", "127.0.0.1", 18004, id="web-4", tags=["canary"])).start()
    base = f"http://127.0.0.1:{agent.admin_port}"

    def get(path, method="GET"):
        req = urllib.request.Request(base + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert get("/healthz") == (200, b"ok\n")
    status, body = get("/v1/services")
    assert status == 200 and [s["name"] for s in json.loads(body)] == ["web"]
    status, body = get("/v1/resolve/web?tag=canary")
    r = json.loads(body)
    assert status == 200 and r["id"] == "web-4" and r["lease"] is None
    # The same JSON as the socket protocol's resolve result, key for key.
    assert set(r) == set(agent.client().call("resolve", service="web", lease=False))
    status, body = get("/v1/resolve/web?lease=1")
    lease = json.loads(body)["lease"]
    assert isinstance(lease, int)
    assert get(f"/v1/report?lease={lease}&ok=false&latency=0.2", method="POST") == (200, b"{}\n")
    status, body = get(f"/v1/report?lease={lease}", method="POST")
    assert status == 404 and json.loads(body)["error"]["code"] == "UNKNOWN_LEASE"
    assert get("/v1/report?lease=1", method="GET")[0] == 405
    assert get("/v1/resolve/web?latency=x&tag=nope")[0] == 503
    assert json.loads(get("/v1/resolve/web?lease=maybe")[1])["error"]["code"] == "BAD_ARGUMENT"
    assert json.loads(get("/v1/resolve/nope")[1])["error"]["code"] == "UNKNOWN_SERVICE"
    metrics = get("/metrics")[1].decode()
    assert 'softlb_service_endpoints{service="web"} 4' in metrics
    assert 'softlb_service_ejected_endpoints{service="web"} 0' in metrics
    s = socket.create_connection(("127.0.0.1", agent.admin_port), timeout=5)
    s.sendall(b"garbage\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()


def test_unknown_service_error_reaches_the_client_with_its_code(agent):
    with agent.client() as c, pytest.raises(SoftLBError) as e:
        c.resolve("nope")
    assert e.value.code == "UNKNOWN_SERVICE"


def test_check_command_validates_config_and_catalog(tmp_path):
    cfg, cat = tmp_path / "agent.toml", tmp_path / "catalog.toml"
    cat.write_text(endpoint_toml("web", "127.0.0.1", 1))
    cfg.write_text(f'[catalog]\nfile = "{cat}"\n')

    def check(*extra):
        return subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(cfg), *extra],
                              capture_output=True, text=True, timeout=30)

    r = check()
    assert r.returncode == 0 and "1 service, 1 endpoint" in r.stdout
    cat.write_text("[[services.web.endpoints]]\nport = 1\n")
    r = check()
    assert r.returncode == 2 and "services.web.endpoints[0].address: required" in r.stderr
    r = check("--json")
    assert r.returncode == 2 and json.loads(r.stdout)["ok"] is False
    cfg.write_text("[agent]\nlisten = \"8.8.8.8:1\"\n")
    r = check()
    assert r.returncode == 2 and "not a loopback address" in r.stderr


def test_sighup_follows_a_new_catalog_file(agent, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(endpoint_toml("web", "127.0.0.1", 18050, id="other-1"))
    agent.write_config(f'[catalog]\nfile = "{other}"\n')
    # --catalog-file on the command line outranks the config file: drop it for this test.
    i = agent.args.index("--catalog-file")
    del agent.args[i:i + 2]
    assert agent.stop() == 0
    agent.start()
    assert agent.client().resolve("web").id == "other-1"
    third = tmp_path / "third.toml"
    third.write_text(endpoint_toml("web", "127.0.0.1", 18051, id="third-1"))
    agent.write_config(f'[catalog]\nfile = "{third}"\n')
    agent.send(signal.SIGHUP)
    wait_until(lambda: agent.client().resolve("web").id == "third-1")


def test_relative_paths_in_a_config_file_are_beside_it(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "catalog.toml").write_text(endpoint_toml("web", "127.0.0.1", 1))
    (tmp_path / "conf" / "agent.toml").write_text('[catalog]\nfile = "catalog.toml"\n')
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(tmp_path / "conf" / "agent.toml")],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "conf" / "catalog.toml") in r.stdout


def test_an_emptied_catalog_is_refused_and_the_last_good_one_serves(agent):
    agent.write_catalog("")
    wait_until(lambda: "is empty: not reloaded" in agent.log())
    with agent.client() as c:
        assert {c.resolve("web").id for _ in range(3)} == {"web-1", "web-2", "web-3"}


def test_socket_directory_squatted_by_another_user_is_refused():
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="softlb-squat-", dir="/tmp")  # pytest's tmp is root-only
    try:
        os.chmod(top, 0o755)
        d = os.path.join(top, "squat")
        os.mkdir(d)
        os.chmod(d, 0o777)
        os.chown(d, 65534, 65534)
        cat = os.path.join(top, "c.toml")
        with open(cat, "w") as f:
            f.write(endpoint_toml("web", "127.0.0.1", 1))
        os.chmod(cat, 0o644)
        try:
            r = subprocess.run(
                ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-m", "softlb_agent",
                 "agent", "--catalog-file", cat, "--socket", os.path.join(d, "s.sock"), "--listen", "", "--admin", ""],
                capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("setpriv is not installed: cannot run the agent as another user")
        assert r.returncode == 2 and "writable by others and not ours" in r.stderr, r.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_second_signal_does_not_cut_the_shutdown_short(agent):
    # Ctrl-C on `make demo`: the terminal sends INT, then demo.py sends TERM.
    agent.send(signal.SIGINT)
    agent.send(signal.SIGTERM)
    assert agent.proc.wait(timeout=20) == 0
    assert not os.path.exists(agent.socket)


def test_admin_survives_a_non_ascii_digit_lease(agent):
    s = socket.create_connection(("127.0.0.1", agent.admin_port), timeout=5)
    s.sendall(b"POST /v1/report?lease=%C2%B2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    assert agent.client().resolve("web") and agent.proc.poll() is None


def test_sighup_while_draining_does_not_kill_the_cleanup(agent):
    held = socket.socket(socket.AF_UNIX)
    held.connect(agent.socket)
    held.sendall(b"\x00\x00\x00\x10")  # half a request: the drain waits for the rest
    time.sleep(0.2)
    agent.send(signal.SIGTERM)
    time.sleep(0.3)
    agent.send(signal.SIGHUP)  # unread while draining; re-delivered when the receiver closes
    time.sleep(0.3)
    held.close()  # now the drain can finish
    assert agent.proc.wait(timeout=20) == 0
    assert not os.path.exists(agent.socket)
