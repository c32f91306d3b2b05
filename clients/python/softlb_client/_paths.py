"""Where the agent's Unix socket lives by default (the agent uses the same rule)."""

from __future__ import annotations

import os


def default_socket_path() -> str:
    """$SOFTLB_SOCKET, else systemd's $RUNTIME_DIRECTORY, else /run/softlb for root,
    else $XDG_RUNTIME_DIR/softlb, else /tmp/softlb-<uid>."""
    env = os.environ.get("SOFTLB_SOCKET")
    if env:
        return env
    rd = os.environ.get("RUNTIME_DIRECTORY")
    if rd:
        return os.path.join(rd.split(":")[0], "softlb.sock")
    if os.geteuid() == 0:
        return "/run/softlb/softlb.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "softlb", "softlb.sock")
    return f"/tmp/softlb-{os.geteuid()}/softlb.sock"


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
