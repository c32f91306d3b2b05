"""The HTTP/2 connection's HPACK encoder without a dynamic table: what any HPACK decoder reads
back is what was encoded, across many blocks on one connection."""

from __future__ import annotations

from hpack import Decoder
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb._hpack_static import StaticEncoder, field, never_indexed

names = st.one_of(st.sampled_from([b":method", b":path", b":status", b"content-type", b"grpc-status", b"te",
                                   b"cookie", b"x-forwarded-for", b"user-agent"]),
                  st.binary(min_size=1, max_size=300).map(lambda b: b.lower()))
values = st.one_of(st.sampled_from([b"GET", b"POST", b"/", b"200", b"404", b"0", b"trailers", b""]),
                   st.binary(max_size=5000))
blocks = st.lists(st.lists(st.tuples(names, values, st.booleans()), max_size=12), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(blocks)
def test_decoder_reads_back_every_block(bs):
    enc, dec = StaticEncoder(), Decoder()
    dec.max_allowed_table_size = 4096
    for block in bs:
        headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in block]
        got = dec.decode(enc.encode(headers), raw=True)
        assert [tuple(h) for h in got] == [(n, v) for n, v, _ in block]
        assert [isinstance(h, NeverIndexedHeaderTuple) for h in got] == [never for _, _, never in block]
    assert len(dec.header_table.dynamic_entries) == 0


def test_representations():
    assert field(b":method", b"POST") == b"\x83"  # static index 3, whole
    assert field(b":status", b"200") == b"\x88"
    assert field(b"content-type", b"application/grpc") == b"\x0f\x10" + b"\x10application/grpc"  # name index 31
    assert field(b"x-a", b"b") == b"\x00\x03x-a\x01b"
    assert field(b":method", b"POST", never_indexed=True) == b"\x12\x04POST"
    assert StaticEncoder().encode([(b":status", b"200")]) == b"\x20\x88"  # table size 0 first


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(names, values), min_size=1, max_size=6), st.lists(st.integers(0, 63), max_size=10))
def test_repeated_blocks_from_the_block_cache_keep_never_indexed(fields, masks):
    """The same fields again (the cache's case), each time with other fields never-indexed:
    a never-indexed field equals its plain twin as a tuple, and must not get its bytes."""
    enc, dec = StaticEncoder(), Decoder()
    dec.max_allowed_table_size = 4096
    for mask in [0, *masks, 0]:
        headers = [NeverIndexedHeaderTuple(n, v) if mask >> i & 1 else (n, v) for i, (n, v) in enumerate(fields)]
        got = dec.decode(enc.encode(headers), raw=True)
        assert [tuple(h) for h in got] == fields
        assert [isinstance(h, NeverIndexedHeaderTuple) for h in got] == [bool(mask >> i & 1) for i in
                                                                         range(len(fields))]


def test_a_repeated_block_is_one_cache_lookup():
    from softlb import _hpack_static
    h = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-unique-block-test", b"1")]
    first = StaticEncoder().encode(h)
    assert tuple(h) in _hpack_static._blocks
    assert StaticEncoder().encode(list(h)) == first  # a fresh connection: the table-size update again
    enc = StaticEncoder()
    enc.encode([])
    assert enc.encode(h) == first[1:]
    # As a decoder gives them (hpack's HeaderTuple, a tuple subclass): the same block.
    decoded = [HeaderTuple(n, v) for n, v in h]
    assert enc.encode(decoded) == first[1:]
    assert never_indexed([*decoded, NeverIndexedHeaderTuple(b"a", b"b")]) and not never_indexed(decoded)
