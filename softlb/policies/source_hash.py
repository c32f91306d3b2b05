"""Source affinity (IPVS sh, made consistent): the caller's identity is the hash key.

The agent passes `source` -- the peer's uid/pid on the Unix socket, its address through the
proxy -- so one caller keeps reaching the same backend while the set is unchanged, and only
about 1/N of callers move when one of N endpoints leaves. The placement is a Ketama ring,
exactly as ring_hash, with the same options.
"""

from __future__ import annotations

from .ring_hash import RingHash


class SourceHash(RingHash):
    name = "source_hash"

    def hash_input(self, key: str | None, source: str | None) -> str | None:
        return source
