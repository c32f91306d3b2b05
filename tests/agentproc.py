"""Start a real agent subprocess for tests, on a temporary socket and free loopback ports.

Every process started here is stopped by its pid (SIGTERM, then SIGKILL) in `stop()`,
which the fixtures call in a finally.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from softlb_client import Client


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
