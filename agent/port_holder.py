"""Who holds a TCP port: for a bind that failed with EADDRINUSE, name the process.

Reads /proc/net/tcp{,6} for a listening socket on the port, then looks for its inode among
/proc/PID/fd links. Best effort: another user's fds are unreadable unless we are root, so
the answer may be None; it is only ever used to word an error message.
"""

from __future__ import annotations

import os


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, ValueError):
            continue
    return inodes


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, command line) of a process listening on TCP `port`, when readable."""
    targets = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not targets:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in targets:
                    return int(pid), _cmdline(pid)
            except OSError:
                continue
    return None


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:120]
    except OSError:
        return "?"
