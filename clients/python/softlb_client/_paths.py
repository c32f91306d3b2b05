"""Where the agent's Unix socket lives by default (the agent uses the same rule)."""

from __future__ import annotations

import os


#: Where the system agent (systemd units, root) serves every caller on the host.
SYSTEM_SOCKET = "/run/softlb/softlb.sock"


def default_socket_path() -> str:
    """$SOFTLB_SOCKET, else systemd's $RUNTIME_DIRECTORY (the agent itself under systemd),
    else the system socket when it exists or we are root, else a per-user socket in
    $XDG_RUNTIME_DIR/softlb or /tmp/softlb-<uid> (a user's own agent)."""
    env = os.environ.get("SOFTLB_SOCKET")
    if env:
        return env
    rd = os.environ.get("RUNTIME_DIRECTORY")
    if rd:
        return os.path.join(rd.split(":")[0], "softlb.sock")
    # A host agent serves every user: non-root callers must find it without configuration.
    if os.geteuid() == 0 or os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "softlb", "softlb.sock")
    return f"/tmp/softlb-{os.geteuid()}/softlb.sock"


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
