"""The proxy's share of the agent's fd budget.

A proxied connection holds two fds (client and upstream) and, while bulk is spliced, a
pipe pair per direction; an http listener's pool holds idle upstreams besides. The IPC
listeners count their connections against the fd limit minus `agent.fd_reserve`; the
proxy's connections, counted only per listener (`max_connections`), could still take the
fds the agent's own probes, Consul queries and snapshot writes need. So proxy listeners
stop accepting while the process's open fds are within `fd_reserve` (plus what one more
connection may take) of the limit, and leave new connections queued in the kernel, as
`max_connections` does, until fds are released.

What is counted is the process's real open fds (a listing of /proc/self/fd), whoever holds
them: the IPC connections, pooled upstreams, the HTTP/2 side, pipes. A listing costs
O(open fds), so the accept path keeps an estimate that only rises (each accept adds the
most one connection may hold) and lists again every RECOUNT_EVERY accepts, or at once when
the estimate comes near the ceiling. A count sees the fds open at that moment: what
connections accepted just before it open afterwards (upstream sockets, pipes for bulk) can
overshoot the ceiling a little, which the reserve absorbs; near the ceiling the accept loop
yields after each accept so that overshoot stays small.
"""

from __future__ import annotations

import os
import resource
from typing import Callable

#: The most fds one proxied connection holds: client, upstream, two pipe pairs.
PER_CONNECTION = 6
#: Accepts between two real counts while far from the ceiling.
RECOUNT_EVERY = 256
#: Within this many fds of the ceiling, the accept loop lets each new connection open its
#: upstream before it counts again (a count sees only the fds already open).
NEAR = 16 * PER_CONNECTION


def open_fds() -> int:
    """How many fds the process has open now (the listing's own fd left out)."""
    return len(os.listdir("/proc/self/fd")) - 1


def fd_soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class FdRoom:
    """Whether a proxy listener may accept one more connection; shared by every listener."""

    def __init__(self, reserve: Callable[[], int], *, count: Callable[[], int] = open_fds,
                 limit: Callable[[], int] = fd_soft_limit) -> None:
        self._reserve = reserve  # read at every count: a reload may change it
        self._count = count
        self._limit = limit
        self._ceiling = 0
        self._estimate = 0
        self._since = RECOUNT_EVERY  # accepts since the last count: count at the first call

    def has_room(self) -> bool:
        if self._since >= RECOUNT_EVERY or self._estimate + PER_CONNECTION > self._ceiling:
            self.recount()
        return self._estimate + PER_CONNECTION <= self._ceiling

    @property
    def near(self) -> bool:
        """Close enough to the ceiling that what accepted connections open next (their
        upstream sockets) should be let happen before the next count."""
        return self._estimate + NEAR > self._ceiling

    def took(self) -> None:
        """One connection accepted."""
        self._estimate += PER_CONNECTION
        self._since += 1

    def recount(self) -> None:
        self._ceiling = self._limit() - self._reserve()
        self._estimate = self._count()
        self._since = 0
