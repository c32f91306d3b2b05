"""Operator-facing CLI behaviour against real agents: wrong-port hints both ways, a port
clash naming flag, key and holder, watch's time-stamped changes, JSON logs, check hints,
and `softlb top` driven in a real terminal (tmux)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from agentproc import THREE, endpoint_toml, free_port, wait_until


def test_cli_pointed_at_the_admin_port_says_so(agent):
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "resolve", "web", "--addr",
                        f"127.0.0.1:{agent.admin_port}", "--timeout", "1"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 3 and "WRONG_PORT" in r.stderr and "admin port" in r.stderr, r.stderr


def test_http_on_the_protocol_port_gets_a_hint(agent):
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
    s.sendall(b"GET /v1/services HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 400") and b"admin port" in data and b"curl http://" in data
    assert agent.client().resolve("web")


def test_port_clash_names_the_flag_the_key_and_the_holder(make_agent):
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket,time\ns=socket.socket()\n"
                               f"s.bind(('127.0.0.1',{port}))\ns.listen()\nprint('up',flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"up\n"
        a = make_agent()
        a.args[a.args.index("--admin") + 1] = f"127.0.0.1:{port}"
        a.start(wait=False)
        assert a.proc.wait(timeout=20) == 2
        log = a.log()
        assert f"127.0.0.1:{port} (agent.admin) is already in use by pid {holder.pid}" in log, log
        assert "--admin HOST:PORT" in log
    finally:
        holder.kill()
        holder.wait(timeout=5)


def test_check_names_the_catalog_config_mixup_and_typos(tmp_path):
    cat = tmp_path / "catalog.toml"
    cat.write_text(endpoint_toml("web", "127.0.0.1", 1))
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(cat)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "pass it as --catalog-file FILE" in r.stderr, r.stderr
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nzome = "a"\n')
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and 'agent.zome: unknown setting (did you mean "zone"?)' in r.stderr, r.stderr


def test_check_refuses_config_and_catalog_files_that_are_not_utf8(tmp_path):
    """Found by atheris (issue 10): tomllib's UnicodeDecodeError escaped as a traceback, and
    would have escaped a SIGHUP reload the same way; now a ConfigError naming the file."""
    cfg, cat = tmp_path / "agent.toml", tmp_path / "catalog.toml"
    cfg.write_bytes(b'[agent]\nzone = "\xff"\n')
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"{cfg}: config is not UTF-8 text: byte 0xff at offset 16" in r.stderr, r.stderr
    cfg.write_text(f'[catalog]\nfile = "{cat}"\n')
    cat.write_bytes(b"\xfe" + endpoint_toml("web", "127.0.0.1", 1).encode())
    r = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"{cat}: catalog is not UTF-8 text: byte 0xfe at offset 0" in r.stderr, r.stderr


def test_watch_prints_time_stamps_and_what_changed(agent):
    p = subprocess.Popen([sys.executable, "-m", "softlb_agent", "watch", "web", "--json", "--socket", agent.socket],
                         stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(p.stdout.readline())
        assert first["changes"] == [{"kind": "initial", "endpoints": 3, "served": 3}]
        datetime.datetime.fromisoformat(first["time"])
        agent.write_catalog(THREE.replace('id = "web-3"', 'id = "web-4"'))
        second = json.loads(p.stdout.readline())
        kinds = {(c["kind"], c.get("endpoint")) for c in second["changes"]}
        assert kinds == {("joined", "web-4"), ("left", "web-3")}
    finally:
        p.kill()
        p.wait(timeout=5)
    p = subprocess.Popen([sys.executable, "-m", "softlb_agent", "watch", "web", "--socket", agent.socket],
                         stdout=subprocess.PIPE, text=True)
    try:
        head = p.stdout.readline()
        assert "  web  v" in head and "3 endpoints, 3 served" in head
        datetime.datetime.fromisoformat(head.split()[0])
    finally:
        p.kill()
        p.wait(timeout=5)


def test_json_logs_have_service_endpoint_and_reason(make_agent):
    agent = make_agent(extra_args=["--log-format", "json"]).start()
    with agent.client() as c:
        for _ in range(5):
            c.report(service="web", endpoint="web-2", ok=False)
    wait_until(lambda: '"event": "ineligible"' in agent.log())
    lines = [json.loads(x) for x in agent.log().splitlines() if x.startswith("{")]
    ev = next(x for x in lines if x.get("event") == "ineligible")
    assert ev["service"] == "web" and ev["endpoint"] == "web-2" and "ejected by outlier detection" in ev["reason"]
    assert all({"time", "level", "logger", "msg"} <= set(x) for x in lines)
    agent.write_catalog(THREE.replace('id = "web-3"', 'id = "web-4"'))
    wait_until(lambda: '"event": "left"' in agent.log())
    lines = [json.loads(x) for x in agent.log().splitlines() if x.startswith("{")]
    moves = {(x["event"], x["endpoint"]) for x in lines if x.get("event") in ("joined", "left")}
    assert moves == {("joined", "web-4"), ("left", "web-3")}


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt: tmux)")
def test_top_in_a_real_terminal(agent):
    session = f"softlb-top-{os.getpid()}"
    sock = f"/tmp/softlb-tmux-{os.getpid()}"  # a private tmux server: stopped by kill-server below

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, timeout=10).stdout

    def pane() -> str:
        return tmux("capture-pane", "-p", "-t", session)

    cmd = f"{sys.executable} -m softlb_agent top --admin 127.0.0.1:{agent.admin_port} --interval 0.3"
    tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "30", cmd)
    try:
        with agent.client() as c:
            for _ in range(30):
                c.resolve("web", lease=False)
        wait_until(lambda: "round_robin" in pane(), timeout=15)
        assert "SERVICE" in pane() and "3/3" in pane()
        tmux("send-keys", "-t", session, "Enter")
        wait_until(lambda: "web-3" in pane() and "PICKS/S" in pane(), timeout=10)
        tmux("send-keys", "-t", session, "Escape")
        wait_until(lambda: "PICKS/S" not in pane() and "REQ/S" in pane(), timeout=10)
        tmux("send-keys", "-t", session, "q")
        wait_until(lambda: session not in tmux("ls"), timeout=10)
    finally:
        tmux("kill-server")


def test_the_socket_directory_the_agent_created_is_removed_at_exit(make_agent):
    """`make demo` used to leave an empty /run/softlb behind."""
    agent = make_agent()
    parent = os.path.dirname(agent.socket)
    assert not os.path.exists(parent)
    agent.start()
    assert os.path.isdir(parent)
    assert agent.stop() == 0
    assert not os.path.exists(parent)


def test_a_socket_directory_that_was_there_stays(make_agent):
    agent = make_agent()
    parent = os.path.dirname(agent.socket)
    os.makedirs(parent)
    agent.start()
    assert agent.stop() == 0
    assert os.path.isdir(parent) and not os.path.exists(agent.socket)
