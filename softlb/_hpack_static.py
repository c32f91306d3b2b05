"""HPACK encoding without the dynamic table, for the headers `H2Connection` sends.

The hpack library's encoder looks every field up in its dynamic table, Huffman-codes
new values and adds them to the table: 6% of the proxy's time per gRPC call. On loopback
the bytes that saves do not matter. Here each field is its static-table index when the
static table has it whole, else a literal "without indexing" (with the static name index
when there is one), never Huffman-coded; a field the peer must never index stays "never
indexed". The first header block of a connection sets the dynamic table to 0 bytes
(RFC 7541 6.3), so the encoding holds whatever table size the peer allows. Nothing depends
on what was sent before, so each field's bytes are computed once and reused, and so are
whole blocks: a proxy sends the same request head, answer head and trailers call after call
(a gRPC channel's), and one dict lookup of the block is a fifth of its field-by-field join.
"""

from __future__ import annotations

from typing import Iterable

from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

_EXACT: dict[tuple[bytes, bytes], int] = {}
_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _EXACT.setdefault((_n, _v), _i)
    _NAME.setdefault(_n, _i)

#: Encoded fields by (never indexed, name, value); cleared when it grows past a bound.
_cache: dict[tuple[bool, bytes, bytes], bytes] = {}
_CACHE_MAX = 4096
#: Encoded blocks by their fields (a never-indexed field compares equal to a plain one, so
#: blocks holding one are neither kept nor looked up); cleared past a bound.
_blocks: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
_BLOCKS_MAX = 256
_BLOCK_FIELDS_MAX = 32
#: A dynamic table size update to 0 (RFC 7541 6.3).
_TABLE_SIZE_ZERO = b"\x20"


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` with an N-bit prefix, the first octet's high bits `first`."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(s: bytes) -> bytes:
    return _integer(len(s), 7, 0) + s


def field(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """One header field's representation."""
    if not never_indexed:
        i = _EXACT.get((name, value))
        if i is not None:
            return _integer(i, 7, 0x80)  # indexed header field
    first = 0x10 if never_indexed else 0x00  # literal never indexed / without indexing
    i = _NAME.get(name)
    if i is not None:
        return _integer(i, 4, first) + _string(value)
    return bytes([first]) + _string(name) + _string(value)


def never_indexed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a field is to be sent never-indexed (hpack's `NeverIndexedHeaderTuple`, as
    decoded or given): such a field is equal, as a tuple, to its plain twin, so a cache
    keyed on the fields must not answer for it."""
    return NeverIndexedHeaderTuple in map(type, headers)  # the loop in C: a third of a Python one


class StaticEncoder:
    """`encode(headers) -> bytes`, the dynamic table always 0 bytes (whatever the peer's
    HEADER_TABLE_SIZE allows, 0 fits it)."""

    __slots__ = ("_first",)

    def __init__(self) -> None:
        self._first = True

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        key = tuple(headers)
        b = _blocks.get(key)
        if b is not None and never_indexed(key):  # an equal block, but not the same bytes
            b = None
        if b is None:
            b = self._encode(key)
        if self._first:
            self._first = False
            return _TABLE_SIZE_ZERO + b
        return b

    @staticmethod
    def _encode(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
        out = []
        plain = len(headers) <= _BLOCK_FIELDS_MAX
        for h in headers:
            never = type(h) is NeverIndexedHeaderTuple
            if never:
                plain = False
            key = (never, h[0], h[1])
            b = _cache.get(key)
            if b is None:
                if len(_cache) >= _CACHE_MAX:
                    _cache.clear()
                b = _cache[key] = field(h[0], h[1], never)
            out.append(b)
        block = b"".join(out)
        if plain:
            if len(_blocks) >= _BLOCKS_MAX:
                _blocks.clear()
            _blocks[headers] = block
        return block
