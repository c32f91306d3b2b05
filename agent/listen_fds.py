"""Listening sockets handed over by systemd (socket activation).

Why: when systemd (or tests/helpers/socket_holder.py) owns the listening sockets, they stay
open while the agent restarts; connections that arrive meanwhile wait in the kernel's accept
queue and are answered by the next agent, so a restart refuses nobody.

The protocol (sd_listen_fds(3)): the manager passes N sockets as fds 3..3+N-1 and sets
`LISTEN_FDS=N`, `LISTEN_PID=<our pid>` and optionally `LISTEN_FDNAMES=a:b:...`. If LISTEN_PID
names another process the variables leaked from a parent and are ignored. The variables are
removed after reading so that no child of the agent believes the sockets are its own.

Matching an inherited socket to what the config asks for (`claim`): first by fd name (a unit
may set `FileDescriptorName=listen`, `admin` ...), then by bound address.
A `.socket` unit gives *one* name to all its sockets, so inside the shipped unit the Unix
socket and the loopback port are told apart by family and address, not by name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Iterable, Mapping, MutableMapping

log = logging.getLogger("softlb.systemd")

SD_LISTEN_FDS_START = 3
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: The name systemd reports for an fd whose unit sets no FileDescriptorName= is the unit's
#: name; "unknown" is what it uses when it has nothing at all.
UNNAMED = "unknown"


class ListenFdsError(Exception):
    """The inherited-socket environment is malformed, or an fd is not a listening stream."""


@dataclass(frozen=True)
class InheritedSocket:
    sock: socket.socket
    name: str
    family: int
    #: "/path", "@abstract" (Unix) or "127.0.0.1:7070" / "[::1]:7070" (TCP).
    address: str

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX

    def describe(self) -> str:
        return f"fd {self.fd} ({self.name}) {self.address}"


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset: bool = True,
) -> list[InheritedSocket]:
    """Take the sockets passed to this process, classified; [] when none were passed.

    Raises ListenFdsError when the variables are addressed to us but malformed, or an fd is
    not a listening SOCK_STREAM socket of a family softlb serves (AF_UNIX, AF_INET, AF_INET6):
    a misconfigured unit should stop the start with that message, not limp along.
    """
    env = os.environ if environ is None else environ
    try:
        return _take(env, os.getpid() if pid is None else pid)
    finally:
        if unset:
            for name in LISTEN_ENV:
                env.pop(name, None)


def _take(env: Mapping[str, str], pid: int) -> list[InheritedSocket]:
    listen_pid = env.get("LISTEN_PID")
    if not listen_pid:
        return []
    if listen_pid != str(pid):
        log.debug("LISTEN_PID=%s is not us (%d): ignoring inherited sockets", listen_pid, pid)
        return []
    raw_n = env.get("LISTEN_FDS", "")
    if not raw_n.isdigit():
        raise ListenFdsError(f"LISTEN_FDS={raw_n!r}: expected a count of file descriptors")
    n = int(raw_n)
    names: list[str] = env["LISTEN_FDNAMES"].split(":") if env.get("LISTEN_FDNAMES") else []
    if names and len(names) != n:
        raise ListenFdsError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={n} sockets")
    names = names or [UNNAMED] * n
    taken: list[InheritedSocket] = []
    try:
        for i in range(n):
            taken.append(_classify(SD_LISTEN_FDS_START + i, names[i]))
    except BaseException:
        for s in taken:
            s.sock.detach()  # leave the fds as we found them for whoever reports the error
        raise
    return taken


def _classify(fd: int, name: str) -> InheritedSocket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ListenFdsError(f"fd {fd} ({name}): not open ({e.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ListenFdsError(f"fd {fd} ({name}): not a socket")
    # socket.socket(fileno=...) asks the kernel for family/type/protocol (SO_DOMAIN etc.).
    sock = socket.socket(fileno=fd)
    try:
        if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            raise ListenFdsError(f"fd {fd} ({name}): address family {sock.family!r} is not served")
        if sock.type != socket.SOCK_STREAM:
            raise ListenFdsError(f"fd {fd} ({name}): {sock.type!r}; softlb needs a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenFdsError(f"fd {fd} ({name}): a stream socket that is not listening")
        address = format_address(sock.family, sock.getsockname())
    except BaseException:
        sock.detach()
        raise
    # sd_listen_fds() sets close-on-exec: the sockets are ours now, not our children's.
    sock.set_inheritable(False)
    return InheritedSocket(sock=sock, name=name, family=sock.family, address=address)


def format_address(family: int, sockname: object) -> str:
    if family == socket.AF_UNIX:
        if isinstance(sockname, bytes):  # abstract names come back as bytes with a NUL
            return "@" + sockname.lstrip(b"\0").decode(errors="replace")
        return str(sockname) or "(unnamed)"
    host, port = sockname[:2]  # type: ignore[index]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _split_host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def same_address(inherited: InheritedSocket, configured: str) -> bool:
    """Whether an inherited socket is bound where the config says a listener should be."""
    if not configured:
        return False
    if inherited.is_unix:
        if configured.startswith("@") or inherited.address.startswith("@"):
            return inherited.address == configured
        return os.path.abspath(inherited.address) == os.path.abspath(configured)
    want, have = _split_host_port(configured), _split_host_port(inherited.address)
    if want is None or have is None or want[1] != have[1]:
        return False
    if want[0] == "localhost":
        return ipaddress.ip_address(have[0]).is_loopback
    try:
        return ipaddress.ip_address(want[0]) == ipaddress.ip_address(have[0])
    except ValueError:
        return False


class InheritedListeners:
    """The inherited sockets, claimed one by one by the parts of the agent that listen."""

    def __init__(self, sockets: Iterable[InheritedSocket] = ()) -> None:
        self._free = list(sockets)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> InheritedListeners:
        return cls(listen_fds(environ))

    def __len__(self) -> int:
        return len(self._free)

    def claim(self, role: str, address: str, *, sole_unix: bool = False) -> InheritedSocket | None:
        """The socket for `role` (a listener the config asks for at `address`), or None.

        A socket named `role` wins; otherwise one bound at `address`. With `sole_unix`, a
        single Unix socket left is taken whatever its path: for the IPC socket whose path
        the operator set in the .socket unit and the config left at its default.
        """
        for pick in (
            lambda s: s.name == role,
            lambda s: same_address(s, address),
        ):
            for s in self._free:
                if pick(s):
                    self._free.remove(s)
                    return s
        if sole_unix:
            unix = [s for s in self._free if s.is_unix]
            if len(unix) == 1:
                self._free.remove(unix[0])
                return unix[0]
        return None

    def close_unclaimed(self) -> list[InheritedSocket]:
        """Close what no listener claimed (systemd keeps its own copy) and say so."""
        left, self._free = self._free, []
        for s in left:
            log.warning("inherited socket %s matches no configured listener; closing it", s.describe())
            s.sock.close()
        return left
