"""agent/dns_answers.py's Responder in process: the repeated-query shortcut never answers from
state that has moved (endpoints, families, a reload), and junk never raises."""

from __future__ import annotations

import random
from dataclasses import replace

import dns.message
import dns.rcode
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb import Endpoint, parse_agent_config
from softlb_agent.dns_answers import Responder
from softlb_agent.runtime import Runtime


def run(fn):
    """Call fn(rt, responder) inside trio (the Runtime reads trio's clock)."""
    out = []

    async def main():
        rt = Runtime(parse_agent_config({"agent": {"vip_pool": "127.77.0.0/16"}}), None, random.Random(7))
        out.append(fn(rt, Responder(rt)))

    trio.run(main)
    return out[0]


def eps(*addrs):
    return [Endpoint(f"e{i}", a, 80 + i) for i, a in enumerate(addrs)]


def query(name, rdtype="A", qid=1):
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    return q.to_wire()


def addresses(rsp, name="web.service.softlb", rdtype="A", n=6):
    got = []
    for i in range(n):
        wire = rsp.answer(query(name, rdtype, qid=100 + i), "127.0.0.1")
        m = dns.message.from_wire(wire)
        assert m.id == 100 + i  # the shortcut patches the id in
        got.append(m.answer[0][0].address if m.answer else dns.rcode.to_text(m.rcode()))
    return got


def test_repeated_queries_still_pick_each_time_and_follow_changes():
    def body(rt, rsp):
        rt.engine.replace_all({"web": eps("127.0.0.1", "127.0.0.2")}, 0.0)
        first = addresses(rsp)
        assert set(first) == {"127.0.0.1", "127.0.0.2"} and first[0] != first[1]
        rt.engine.replace_all({"web": eps("127.0.0.3")}, 1.0)
        assert addresses(rsp) == ["127.0.0.3"] * 6
        # The service moves to IPv6: an A question now has no data, an AAAA one does.
        rt.engine.replace_all({"web": eps("::1")}, 2.0)
        assert addresses(rsp) == ["NOERROR"] * 6
        assert addresses(rsp, rdtype="AAAA") == ["::1"] * 6
        rt.engine.replace_all({"web": []}, 3.0)
        assert addresses(rsp) == ["NXDOMAIN"] * 6
        rt.engine.replace_all({}, 4.0)
        assert addresses(rsp) == ["NXDOMAIN"] * 6
    run(body)


def test_a_reload_to_vip_answers_applies_to_repeated_queries():
    def body(rt, rsp):
        rt.engine.replace_all({"web": eps("127.0.0.1")}, 0.0)
        assert addresses(rsp) == ["127.0.0.1"] * 6
        new = replace(rt.config, dns_answer="vip")
        rt.config = new
        rt.engine.reconfigure(new, 1.0)
        vip = rt.engine.services["web"].vip
        assert vip is not None and addresses(rsp) == [vip.address] * 6
    run(body)


def test_the_domain_follows_a_reload():
    def body(rt, rsp):
        rt.engine.replace_all({"web": eps("127.0.0.1")}, 0.0)
        assert addresses(rsp, n=1) == ["127.0.0.1"]
        rt.config = replace(rt.config, dns_domain="lb.internal")
        assert addresses(rsp, n=1) == ["REFUSED"]
        assert addresses(rsp, "web.service.lb.internal", n=1) == ["127.0.0.1"]
    run(body)


def test_repeated_srv_and_nodata_answers_follow_the_service():
    def srv_ports(rsp, qid):
        m = dns.message.from_wire(rsp.answer(query("web.service.softlb", "SRV", qid), "127.0.0.1"))
        assert m.id == qid
        return sorted(rd.port for rd in m.answer[0]) if m.answer else dns.rcode.to_text(m.rcode())

    def body(rt, rsp):
        rt.engine.replace_all({"web": eps("127.0.0.1", "127.0.0.2")}, 0.0)
        assert srv_ports(rsp, 1) == srv_ports(rsp, 2) == [80, 81]
        assert addresses(rsp, rdtype="AAAA", n=2) == ["NOERROR"] * 2
        for _ in range(5):  # e1 fails its way out (outlier ejection)
            rt.engine.report(1.0, ok=False, service="web", endpoint_id="e1")
        assert srv_ports(rsp, 3) == [80]
        rt.engine.replace_all({"web": [Endpoint("six-a", "::1", 80), Endpoint("six-b", "::2", 81)]}, 2.0)
        assert srv_ports(rsp, 4) == [80, 81]
        assert sorted(addresses(rsp, rdtype="AAAA", n=2)) == ["::1", "::2"]
    run(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.booleans())
def test_junk_is_answered_or_dropped_never_raised(junk, tcp):
    def body(rt, rsp):
        rt.engine.replace_all({"web": eps("127.0.0.1")}, 0.0)
        good = query("web.service.softlb")
        for wire in (junk, good[:12] + junk, good[:2] + b"\x01\x00" + junk):
            out = rsp.answer(wire, "127.0.0.1", tcp=tcp)
            assert out is None or (isinstance(out, bytes) and len(out) >= 12 and out[:2] == wire[:2])
    run(body)


# ------------------------------------------------------------------------ state machine

from hypothesis.stateful import RuleBasedStateMachine, initialize, rule  # noqa: E402

ADDRS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "::2"]


class ResponderMachine(RuleBasedStateMachine):
    """Catalog changes, outcomes, reloads and repeated questions in any order: every answer
    (shortcut or not) matches what the engine's state says now."""

    @initialize()
    def start(self):
        self.rt = None

        async def make():
            self.rt = Runtime(parse_agent_config({"agent": {"vip_pool": "127.77.0.0/16"}}), None, random.Random(3))

        trio.run(make)
        self.rsp = Responder(self.rt)
        self.now = 0.0
        self.qid = 0

    def _in_trio(self, fn):
        out = []

        async def main():
            out.append(fn())

        trio.run(main)
        return out[0]

    @rule(chosen=st.lists(st.sampled_from(ADDRS), unique=True, max_size=4),
          registry=st.sampled_from(["passing", "critical", "maintenance"]))
    def set_catalog(self, chosen, registry):
        from softlb import RegistryHealth

        self.now += 1
        eps = [Endpoint(f"e{a}", a, 80 + ADDRS.index(a),
                        registry=RegistryHealth(registry) if a == chosen[-1] else RegistryHealth.PASSING)
               for a in chosen]
        self._in_trio(lambda: self.rt.engine.replace_all({"web": eps} if chosen else {}, self.now))

    @rule(i=st.integers(0, 4))
    def fail(self, i):
        b = self.rt.engine.services.get("web")
        if b is None or f"e{ADDRS[i]}" not in b.by_id:
            return
        self.now += 0.01
        for _ in range(5):
            self._in_trio(lambda: self.rt.engine.report(self.now, ok=False, service="web", endpoint_id=f"e{ADDRS[i]}"))

    @rule(mode=st.sampled_from(["pick", "vip"]))
    def reload(self, mode):
        new = replace(self.rt.config, dns_answer=mode)
        self.rt.config = new
        self._in_trio(lambda: self.rt.engine.reconfigure(new, self.now))

    @rule(name=st.sampled_from(["web", "WEB", "nope"]), rdtype=st.sampled_from(["A", "AAAA", "SRV", "TXT"]),
          repeat=st.integers(1, 3))
    def ask(self, name, rdtype, repeat):
        for _ in range(repeat):
            self.qid = (self.qid + 1) & 0xFFFF
            wire = self._in_trio(lambda: self.rsp.answer(query(f"{name}.service.softlb", rdtype, self.qid), "127.0.0.1"))
            m = dns.message.from_wire(wire)
            assert m.id == self.qid
            self._check(m, rdtype, name)

    def _check(self, m, rdtype, name):
        b = self.rt.engine.services.get(name.lower())
        rcode = dns.rcode.to_text(m.rcode())
        if b is None or not b.endpoints:
            assert rcode == "NXDOMAIN"
            return
        served = {e.address: e for e in b.served}
        family = {"A": 4, "AAAA": 6}.get(rdtype)
        if rdtype == "SRV":
            if not served:
                assert rcode == "SERVFAIL"
            else:
                assert rcode == "NOERROR" and sorted(rd.port for rd in m.answer[0]) == sorted(e.port for e in b.served)
            return
        if rdtype == "TXT":
            assert rcode == "NOERROR" and not m.answer
            return
        if self.rt.config.dns_answer == "vip" and b.vip is not None:
            got = [rd.address for rd in m.answer[0]] if m.answer else []
            assert rcode == "NOERROR" and got == ([b.vip.address] if family == 4 else [])
            return
        if not served:
            assert rcode == "SERVFAIL"
            return
        assert rcode == "NOERROR"
        of_family = {a for a in served if (":" in a) == (family == 6)}
        if not of_family:
            assert not m.answer
        else:
            assert len(m.answer) == 1 and m.answer[0][0].address in of_family


TestResponderMachine = ResponderMachine.TestCase
TestResponderMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
