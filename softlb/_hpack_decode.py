"""HPACK decoding (the hpack library's decoder) with a cache of whole header blocks.

A gRPC client sends the same request headers call after call, and after the first call
its block is a few bytes of references to entries it added to the dynamic table: the
same bytes, meaning the same headers, for as long as the table does not change. Decoding
such a block with hpack costs ~15% of the proxy's CPU per gRPC call (a Python loop per
field, with a debug log call each). So a block is looked up first; an entry is valid
only while the table is the one it was decoded against (`_CountingTable.generation`
counts every insertion and resize), and a block that changes the table is never kept.
Entries are bounded in number and size, per connection.
"""

from __future__ import annotations

from hpack import Decoder
from hpack.table import HeaderTable

Headers = list[tuple[bytes, bytes]]

#: Blocks kept per connection, and the largest kept (encoded and decoded): gRPC's repeated
#: blocks are tens of bytes, and a bound keeps a connection's cache at ~100 KB at most.
CACHE_ENTRIES = 16
CACHE_BLOCK_MAX = 512
CACHE_HEADERS_MAX = 4096


class _CountingTable(HeaderTable):
    """hpack's dynamic table, counting its changes (the decoder inserts through `add` and
    resizes through `maxsize`)."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property  # type: ignore[override]
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]


class BlockDecoder:
    """`decode(block) -> headers` as hpack's `Decoder.decode(block, raw=True)`; raises
    what it raises (`OversizedHeaderListError` past `max_header_list_size`)."""

    __slots__ = ("_decoder", "_table", "_cache")

    def __init__(self, max_header_list_size: int, max_table_size: int) -> None:
        self._decoder = Decoder(max_header_list_size)
        self._decoder.max_allowed_table_size = max_table_size
        self._table = self._decoder.header_table = _CountingTable()
        self._cache: dict[bytes, tuple[int, Headers]] = {}

    def decode(self, block: bytes) -> Headers:
        gen = self._table.generation
        hit = self._cache.get(block)
        if hit is not None and hit[0] == gen:
            return list(hit[1])
        headers: Headers = self._decoder.decode(block, raw=True)  # type: ignore[assignment]
        if (self._table.generation == gen and len(block) <= CACHE_BLOCK_MAX
                and sum(len(n) + len(v) for n, v in headers) <= CACHE_HEADERS_MAX):
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[bytes(block)] = (gen, headers)
            return list(headers)
        return headers
