"""Stable hashing for the consistent-hash policies.

Python's `hash()` of a str is salted per process (PYTHONHASHSEED), so a key would map to a
different backend after every agent restart. BLAKE2b is in the standard library, fast in C,
and defined the same everywhere, so placement depends only on the endpoint ids and the key.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

_EIGHT_U64 = struct.Struct("<8Q")


def _bytes(text: str) -> bytes:
    # surrogatepass: ids and keys arrive from msgpack/TOML and may hold lone surrogates;
    # hashing must not raise on them.
    return text.encode("utf-8", "surrogatepass")


def hash64(text: str) -> int:
    """A 64-bit hash of a caller's key or source."""
    return int.from_bytes(blake2b(_bytes(text), digest_size=8).digest(), "little")


def hash128(text: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of an endpoint id (Maglev's offset and skip)."""
    d = blake2b(_bytes(text), digest_size=16, person=b"softlb-maglev").digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def ring_points(endpoint_id: str, count: int) -> list[int]:
    """`count` 64-bit ring positions for an endpoint; the first k are the same for any count
    >= k, so changing an endpoint's share only adds or removes its tail points."""
    base = _bytes(endpoint_id) + b"\x00"
    out: list[int] = []
    for block in range((count + 7) // 8):
        # One 64-byte digest yields eight positions (Ketama takes four from each MD5).
        digest = blake2b(base + block.to_bytes(4, "little"), digest_size=64, person=b"softlb-ring").digest()
        out.extend(_EIGHT_U64.unpack(digest))
    del out[count:]
    return out
