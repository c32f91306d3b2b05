"""Hold listening sockets the way systemd does, and run servers on them one after another.

The holder binds the sockets once (a Unix path and/or a loopback TCP port) and keeps them
open for its whole life. Each `start()` runs a child with those sockets passed as fds 3, 4,
... with LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID set (via listen_exec.py, because LISTEN_PID
must be the child's own pid). `kill()` SIGKILLs the child; the sockets stay open in the
holder, so connections made before the next `start()` wait in the accept queue instead of
being refused. That is exactly the property a systemd socket unit gives the agent.

Every child is stopped by pid in `close()` (the holder is a context manager).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

LISTEN_EXEC = Path(__file__).with_name("listen_exec.py")


class SocketHolder:
    def __init__(self, sockets: Sequence[tuple[str, socket.socket]]) -> None:
        for name, _ in sockets:
            if not name or ":" in name:
                raise ValueError(f"fd name {name!r}: must be non-empty without ':'")
        self.sockets = list(sockets)
        self.child: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every child ever started, in order
        self._unix_paths = [
            s.getsockname() for _, s in sockets if s.family == socket.AF_UNIX and isinstance(s.getsockname(), str)
        ]

    @classmethod
    def bind(cls, *, unix_path: str | None = None, tcp: str | None = "127.0.0.1:0",
             names: Sequence[str] | None = None) -> SocketHolder:
        """Bind a Unix socket at `unix_path` and/or TCP at `tcp` ("HOST:PORT", 0 = any)."""
        socks: list[socket.socket] = []
        try:
            if unix_path is not None:
                u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(u)
                u.bind(unix_path)
                u.listen(socket.SOMAXCONN)
            if tcp is not None:
                host, _, port = tcp.rpartition(":")
                t = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                socks.append(t)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((host.strip("[]"), int(port)))
                t.listen(socket.SOMAXCONN)
        except BaseException:
            for s in socks:
                s.close()
            raise
        names = list(names) if names is not None else ["unknown"] * len(socks)
        if len(names) != len(socks):
            for s in socks:
                s.close()
            raise ValueError(f"{len(names)} names for {len(socks)} sockets")
        return cls(list(zip(names, socks)))

    @property
    def unix_path(self) -> str:
        return self._unix_paths[0]

    @property
    def tcp_address(self) -> tuple[str, int]:
        for _, s in self.sockets:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                host, port = s.getsockname()[:2]
                return host, port
        raise LookupError("no TCP socket held")

    def start(self, argv: Sequence[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Run `argv` with the held sockets; the previous child must be gone."""
        if self.child is not None and self.child.poll() is None:
            raise RuntimeError(f"child {self.child.pid} is still running")
        fds = [s.fileno() for _, s in self.sockets]
        cmd = [
            sys.executable, "-I", "-S", str(LISTEN_EXEC),
            ",".join(map(str, fds)), ":".join(n for n, _ in self.sockets), "--", *argv,
        ]
        self.child = subprocess.Popen(cmd, pass_fds=fds, **popen_kwargs)  # type: ignore[call-overload]
        self.pids.append(self.child.pid)
        return self.child

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal the current child by pid and reap it; returns its exit status."""
        child = self.child
        if child is None or child.poll() is not None:
            return None if child is None else child.returncode
        os.kill(child.pid, sig)
        return child.wait(timeout)

    def close(self) -> None:
        try:
            if self.child is not None and self.child.poll() is None:
                self.kill(signal.SIGKILL)
        finally:
            if self.child is not None:
                for stream in (self.child.stdout, self.child.stderr, self.child.stdin):
                    if stream is not None:
                        stream.close()
            for _, s in self.sockets:
                s.close()
            for path in self._unix_paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> SocketHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
