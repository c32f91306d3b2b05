"""An agent restart under a real systemd (PID 1 of a systemd-nspawn container, the recipe
in /work/shared/realsystemd), while wrk sends requests through the agent's http proxy
listener: the listener is a socket unit's (FileDescriptorName=proxy-web), so during the
restart new connections wait in its queue, the old agent drains (answers in flight,
`Connection: close` to keep-alive clients), the new one takes over. Zero failed requests.

Skips, saying why, where the container cannot run (no systemd-nspawn, not root, the
recipe missing, or this checkout not on the root file system the container sees).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

REALSD = os.environ.get("SOFTLB_REALSYSTEMD", "/work/shared/realsystemd")
#: The recipe's shared directory: /realsd inside the container.
SHARE = "/tmp/realsd/share"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _why_not() -> str | None:
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (Debian package systemd-container)"
    if os.geteuid() != 0:
        return "needs root to boot the systemd-nspawn container"
    if not os.path.exists(os.path.join(REALSD, "setup.sh")):
        return f"no container recipe at {REALSD} (set SOFTLB_REALSYSTEMD)"
    if shutil.which("wrk") is None:
        return "wrk is not installed"
    if os.stat(ROOT).st_dev != os.stat("/").st_dev or os.stat(sys.executable).st_dev != os.stat("/").st_dev:
        return "the checkout or the Python running the tests is not on / (the container sees only /)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


def in_(*cmd: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(REALSD, "in.sh"), *cmd], input=input, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def container():
    leader = "/tmp/realsd/leader.pid"
    was_running = os.path.exists(leader) and in_("true", timeout=10).returncode == 0
    if not was_running:
        # The container mounts its own /tmp: bind this checkout (and its venv) in at the
        # same path, wherever the clone lives (CI clones into a folder of its own).
        env = dict(os.environ, REALSD_NSPAWN_ARGS=f"--bind={ROOT}:{ROOT}")
        out = subprocess.run([os.path.join(REALSD, "setup.sh")], capture_output=True, text=True, timeout=300, env=env)
        if not os.path.exists(leader):
            pytest.skip(f"the container did not start: {out.stdout[-500:]} {out.stderr[-500:]}")
    deadline = time.monotonic() + 60
    while in_("systemctl", "is-system-running", timeout=30).stdout.strip() not in ("running", "degraded"):
        if time.monotonic() > deadline:
            pytest.fail("the container's systemd did not finish booting in 60s")
        time.sleep(0.2)
    if in_("test", "-x", sys.executable, timeout=30).returncode != 0:
        if not was_running:
            subprocess.run([os.path.join(REALSD, "teardown.sh")], capture_output=True, timeout=120)
        pytest.skip(f"the running container cannot see {sys.executable} (booted by someone else without this checkout)")
    try:
        yield in_
    finally:
        if not was_running:  # ours: take it down; someone else's: leave it as found
            subprocess.run([os.path.join(REALSD, "teardown.sh")], capture_output=True, timeout=120)


def test_agent_restart_under_wrk_through_the_proxy_fails_no_request(container):
    name = f"softlb-pt-{secrets.token_hex(3)}"
    d = f"/run/{name}"
    port, b1, b2 = 18480, 18481, 18482
    units = {
        f"{name}.socket": f"""
[Socket]
ListenStream=127.0.0.1:{port}
FileDescriptorName=proxy-web
Backlog=4096
Service={name}.service
""",
        f"{name}.service": f"""
[Service]
Type=notify
NotifyAccess=main
Environment=PYTHONPATH=/realsd/{name}
ExecStart={sys.executable} -m softlb_agent agent --config {d}/agent.toml --catalog-file {d}/catalog.toml --socket {d}/s/softlb.sock --listen "" --admin ""
TimeoutStopSec=30s
KillMode=mixed
""",
    }
    files = {
        "agent.toml": f'[services.web.proxy]\nlisten = "127.0.0.1:{port}"\nmode = "http"\ndrain_timeout = "5s"\n',
        "catalog.toml": "".join(f'[[services.web.endpoints]]\nid = "b{i}"\naddress = "127.0.0.1"\nport = {p}\n'
                                for i, p in ((1, b1), (2, b2))),
    }
    run = container
    started: list[str] = []
    # The container sees the host's / through an overlay whose lower layer it may have
    # cached: code edited since it booted can look stale inside. So the agent runs from a
    # fresh copy in the shared directory (a plain bind mount, /realsd inside).
    share = os.path.join(SHARE, name)
    for pkg, as_name in (("agent", "softlb_agent"), ("softlb", "softlb")):
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(share, as_name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    try:
        assert run("mkdir", "-p", d).returncode == 0
        for fname, text in files.items():
            assert run("sh", "-c", f"cat > {d}/{fname}", input=text).returncode == 0
        for unit, text in units.items():
            assert run("sh", "-c", f"cat > /etc/systemd/system/{unit}", input=text).returncode == 0
        assert run("systemctl", "daemon-reload").returncode == 0
        for i, p in ((1, b1), (2, b2)):
            unit = f"{name}-b{i}"
            r = run("systemd-run", f"--unit={unit}", sys.executable, f"{ROOT}/examples/backend.py",
                    "--name", f"b{i}", "--port", str(p))
            assert r.returncode == 0, r.stderr
            started.append(f"{unit}.service")
        r = run("systemctl", "start", f"{name}.socket", f"{name}.service", timeout=120)
        started += [f"{name}.service", f"{name}.socket"]
        assert r.returncode == 0, r.stderr + run("journalctl", "-u", f"{name}.service", "--no-pager").stdout
        assert run("curl", "-sf", f"http://127.0.0.1:{port}/").stdout.startswith("hello from b")
        where = run("env", f"PYTHONPATH=/realsd/{name}", sys.executable, "-c",
                    "import softlb_agent; print(softlb_agent.__file__)").stdout
        assert where.startswith(f"/realsd/{name}/"), where  # the unit runs the fresh copy

        wrk = subprocess.Popen([os.path.join(REALSD, "in.sh"), "wrk", "-t1", "-c8", "-d14s", "--timeout", "30s",
                                f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pids = []
            for _ in range(2):
                time.sleep(4)
                pids.append(run("systemctl", "show", "-P", "MainPID", f"{name}.service").stdout.strip())
                r = run("systemctl", "restart", f"{name}.service", timeout=120)
                assert r.returncode == 0, r.stderr
            out, err = wrk.communicate(timeout=60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait(10)
        pids.append(run("systemctl", "show", "-P", "MainPID", f"{name}.service").stdout.strip())
        journal = run("journalctl", "-u", f"{name}.service", "--no-pager", "-n", "200").stdout
        assert len(set(pids)) == 3 and "0" not in pids, (pids, journal)  # two real restarts
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        assert total > 100, out
        assert "Socket errors" not in out and "Non-2xx" not in out, out + journal[-3000:]
        print(f"\n{total} requests through the proxy across 2 restarts under systemd, 0 failed")
    finally:
        for unit in reversed(started):
            run("systemctl", "stop", unit, timeout=60)
        for unit in units:
            run("rm", "-f", f"/etc/systemd/system/{unit}")
        run("systemctl", "daemon-reload")
        run("rm", "-rf", d)
        shutil.rmtree(share, ignore_errors=True)
