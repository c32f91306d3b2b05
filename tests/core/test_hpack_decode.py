"""The caching HPACK decoder reads every block as hpack's own decoder does, whatever the
blocks repeat, add to the dynamic table, or resize it."""

from __future__ import annotations

from hpack import Decoder, Encoder
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb._hpack_decode import BlockDecoder

fields = st.tuples(st.sampled_from([b":method", b":path", b"x-a", b"x-b", b"grpc-status", b"cookie"]),
                   st.sampled_from([b"", b"0", b"POST", b"/a", b"v" * 300, b"w" * 1500]), st.booleans())
header_lists = st.lists(fields, max_size=6)
steps = st.lists(st.one_of(header_lists, st.integers(0, 4096)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=5), st.lists(st.integers(0, 100), min_size=1, max_size=40),
       st.lists(st.integers(0, 4096), max_size=3))
def test_same_headers_as_hpack_however_blocks_repeat(pool, picks, sizes):
    enc, plain, cached = Encoder(), Decoder(), BlockDecoder(1 << 20, 4096)
    for i, k in enumerate(picks):
        if sizes and i % 7 == 6:
            enc.header_table_size = sizes[i % len(sizes)]
        headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in pool[k % len(pool)]]
        block = enc.encode(headers, huffman=bool(k & 1))
        want = plain.decode(block, raw=True)
        got = cached.decode(block)
        assert got == want
        assert [type(h) for h in got] == [type(h) for h in want]


def test_a_repeated_block_is_served_from_the_cache_until_the_table_changes():
    enc, dec = Encoder(), BlockDecoder(1 << 20, 4096)
    h = [(b"x-a", b"1")]
    dec.decode(enc.encode(h))  # adds x-a: 1 to the table
    again = enc.encode(h)  # now an index into the dynamic table
    assert dec.decode(again) == h and again in dec._cache
    dec.decode(enc.encode([(b"x-b", b"2")]))  # the table changed: the entry's index moved
    assert dec.decode(again) == [(b"x-b", b"2")]  # what the same bytes mean now


def test_a_resize_that_evicts_invalidates_the_cache():
    import pytest
    from hpack.exceptions import InvalidTableIndex

    enc, dec = Encoder(), BlockDecoder(1 << 20, 4096)
    dec.decode(enc.encode([(b"x-a", b"1")]))
    ref = bytes([0x80 | 62])  # the newest dynamic entry
    assert dec.decode(ref) == [(b"x-a", b"1")]
    assert dec.decode(b"\x20") == []  # a dynamic table size update to 0: the table is emptied
    with pytest.raises(InvalidTableIndex):
        dec.decode(ref)
