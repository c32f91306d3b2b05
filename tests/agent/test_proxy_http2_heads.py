"""The http2 listener's memory of request heads per client connection (`_head`): whatever
the sequence of heads, reloads and never-indexed fields, it answers exactly what reading
the head afresh (`_read_head`: check, route, forwarded form) answers, under the config in
force, and never-indexed fields go upstream as such."""

from __future__ import annotations

from types import SimpleNamespace

from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from softlb import ProxyConfig, ProxyRoute
from softlb_agent.proxy.http2 import HEADS_KEPT, _head, _read_head

PSEUDO = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call")]
REGULAR = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
# Few heads, so the same one comes back often (the memory's case).
AUTHORITIES = [b"b.local", b"c.local:80"]
EXTRAS = [[], [(b"grpc-timeout", b"100m"), (b"authorization", b"secret"), (b"x-forwarded-for", b"10.0.0.1")],
          [(b"Bad-Upper", b"v")]]  # malformed: never remembered, always refused
CONFIGS = [ProxyConfig(listen="127.0.0.1:1"),
           ProxyConfig(listen="127.0.0.1:1", routes=(ProxyRoute("svc_b", host="b.local"),)),
           ProxyConfig(listen="127.0.0.1:1", request_timeout=2.0,
                       routes=(ProxyRoute("svc_c", host="c.local"), ProxyRoute("svc_b", path_prefix="/demo"))),
           ]


class Heads(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = SimpleNamespace(service="svc", config=CONFIGS[0])
        self.conn = SimpleNamespace(peer_ip="127.0.0.1")
        self.side = SimpleNamespace(heads={}, heads_cfg=None)
        self.answered: list[str] = []

    @rule(authority=st.sampled_from(AUTHORITIES), extra=st.sampled_from(EXTRAS), decoded=st.booleans(),
          never=st.one_of(st.just(0), st.integers(0, 1023)))
    def request(self, authority: bytes, extra: list[tuple[bytes, bytes]], decoded: bool, never: int) -> None:
        fields = [*PSEUDO, (b":authority", authority), *REGULAR, *extra]
        # As a decoder gives them (HeaderTuple, NeverIndexedHeaderTuple) or as plain tuples.
        headers = [NeverIndexedHeaderTuple(n, v) if never >> i & 1 else HeaderTuple(n, v) if decoded else (n, v)
                   for i, (n, v) in enumerate(fields)]
        got = _head(self.state, self.conn, self.side, headers)  # type: ignore[arg-type]
        want = _read_head(self.state, self.conn, tuple(headers))  # type: ignore[arg-type]
        assert got == want
        self.answered.append(type(got).__name__)
        if not isinstance(got, str):
            sent = [type(h) is NeverIndexedHeaderTuple for h in got.forwarded if h[0] != b"x-forwarded-for"]
            assert sent == [type(h) is NeverIndexedHeaderTuple for h in headers if h[0] != b"x-forwarded-for"]

    @rule(i=st.integers(0, len(CONFIGS) - 1))
    def reload(self, i: int) -> None:
        # A reload puts a new config object in place, even one equal to the old.
        c = CONFIGS[i]
        self.state.config = ProxyConfig(listen=c.listen, request_timeout=c.request_timeout, routes=c.routes)

    @invariant()
    def bounded(self) -> None:
        assert len(self.side.heads) <= HEADS_KEPT


def test_a_well_formed_head_is_remembered_and_a_malformed_one_is_not():
    m = Heads()
    m.request(b"b.local", [], True, 0)
    m.request(b"b.local", [(b"Bad-Upper", b"v")], True, 0)
    assert m.answered == ["_Head", "str"] and len(m.side.heads) == 1


Heads.TestCase.settings = settings(max_examples=300, stateful_step_count=20, deadline=None)
test_heads = Heads.TestCase
