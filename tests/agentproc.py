"""Start a real agent subprocess for tests, on a temporary socket and free loopback ports.

Every process started here is stopped by its pid (SIGTERM, then SIGKILL) in `stop()`,
which the fixtures call in a finally.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from softlb_client import Client


#: free_port() hands out ports from here: below the kernel's ephemeral range
#: (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), so no bind to port 0 and
#: no outgoing connection's source port, in any process, can take one between the pick and
#: the child process's bind. That was the race of the old "bind 0, read, close" version.
PORT_RANGE = (20000, 32000)
#: One file per port handed out, naming the pid that holds it: concurrent test runs (and
#: two calls in one process) never get the same port while its holder lives.
PORT_DIR = os.path.join(tempfile.gettempdir(), "softlb-test-ports")
_rng = random.SystemRandom()
_mine: list[str] = []
_held: list[socket.socket] = []


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):  # DNS listens on both
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reserve(port: int) -> bool:
    """Claim `port` for this process (atomically, O_EXCL); a claim whose pid is gone is
    taken over (renamed away first, so two takers cannot both win)."""
    path = os.path.join(PORT_DIR, str(port))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or "0")
            except (OSError, ValueError):
                return False  # being written right now: someone else's
            if pid and _alive(pid):
                return False
            try:
                os.rename(path, f"{path}.stale.{os.getpid()}")
                os.unlink(f"{path}.stale.{os.getpid()}")
            except OSError:
                return False  # another process took it over first
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _mine.append(path)
        return True
    return False


@atexit.register
def _release() -> None:
    for path in _mine:
        try:
            os.unlink(path)
        except OSError:
            pass


def free_port() -> int:
    """A loopback port (TCP and UDP) nothing is bound to, for a process the test starts to
    bind: outside the ephemeral range and reserved for this process's life (see PORT_RANGE)."""
    os.makedirs(PORT_DIR, exist_ok=True)
    for _ in range(1000):
        port = _rng.randrange(*PORT_RANGE)
        if _reserve(port):
            if _bindable(port):
                return port
            # Bound by something that is not ours: keep the claim (nobody else should try it).
    raise RuntimeError(f"no free port in {PORT_RANGE} after 1000 tries")


def refusing_port() -> int:
    """A port where connects are refused for the whole test run: bound and never listening,
    so nothing else can take it (a port that was merely free could be taken)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _held.append(s)
    return s.getsockname()[1]


def endpoint_toml(service: str, address: str, port: int, **extra: Any) -> str:
    lines = [f"[[services.{service}.endpoints]]", f'address = "{address}"', f"port = {port}"]
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, str) else f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


#: Three web endpoints, web-1..3 on 127.0.0.1:18001-18003: the default test catalog.
THREE = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}") for i in range(1, 4))


class AgentProcess:
    def __init__(self, tmp: str, catalog: str, config: str = "", extra_args: list[str] | None = None,
                 admin: bool = True, nofile: int | None = None) -> None:
        #: RLIMIT_NOFILE (soft and hard) for the agent process, to test fd exhaustion.
        self.nofile = nofile
        self.tmp = tmp
        self.catalog_path = os.path.join(tmp, "catalog.toml")
        self.config_path = os.path.join(tmp, "agent.toml")
        self.socket = os.path.join(tmp, "s", "softlb.sock")
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.admin_port = free_port() if admin else None
        self.log_path = os.path.join(tmp, "agent.log")
        self.write_catalog(catalog)
        with open(self.config_path, "w") as f:
            f.write(config)
        extra_args = extra_args or []
        # One catalog source: the file written here, unless the test points at Consul.
        source = [] if "--consul" in extra_args else ["--catalog-file", self.catalog_path]
        self.args = [
            sys.executable, "-m", "softlb_agent", "agent", "--config", self.config_path,
            *source, "--socket", self.socket, "--listen", self.addr,
            "--admin", f"127.0.0.1:{self.admin_port}" if admin else "", "--log-level", "debug",
        ] + extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def write_catalog(self, text: str) -> None:
        # Write-then-rename, as editors and config management do.
        tmp = self.catalog_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.catalog_path)

    def write_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(text)

    def start(self, wait: bool = True) -> AgentProcess:
        self._log = open(self.log_path, "ab")
        preexec = None
        if self.nofile is not None:
            import resource

            n = self.nofile

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(socket_path=self.socket, timeout=0.5) as c:
                    c.hello()
                if self.admin_port:
                    # The admin port is bound after the socket serves: wait for it too.
                    socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.5).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            return self.proc.returncode
        finally:
            self._log.close()

    def client(self, **kw: Any) -> Client:
        return Client(socket_path=self.socket, **kw)

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "softlb_agent", *args, "--socket", self.socket],
                              capture_output=True, text=True, timeout=timeout)


def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
