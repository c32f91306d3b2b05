"""Run the simulator as a subprocess (so a test can kill it) and drive its control API."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


class SimControl:
    """HTTP client for `POST /_sim/<method>`: `SimControl(url).add_instance("web", port=80)`."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, **kwargs: Any) -> Any:
        req = urllib.request.Request(f"{self.url}/_sim/{method}", data=json.dumps(kwargs).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"consulsim {method}: {e.code} {e.read().decode()}") from None

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda **kw: self.call(method, **kw)


class SimProcess:
    """`python -m tests.consulsim` in a child process; stop() kills it by pid."""

    def __init__(self, port: int = 0, acl_token: str = "", startup_timeout: float = 10.0) -> None:
        args = [sys.executable, "-m", "tests.consulsim", "--port", str(port)]
        if acl_token:
            args += ["--acl-token", acl_token]
        self.proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], startup_timeout)
            line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if not line.startswith("READY "):
                raise RuntimeError(f"consulsim did not start (got {line!r})")
        except BaseException:
            self.kill()
            raise
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.control = SimControl(self.url)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a Consul agent (connections reset, no goodbye)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
