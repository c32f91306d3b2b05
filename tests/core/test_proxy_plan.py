"""Reloads of proxy listeners as a sequence: softlb.plan_proxies, driven by hypothesis
through random reloads, keeps the running set equal to the config, never touches a
listener whose address and mode stayed, and frees a port before anything opens on it."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from softlb import ProxyConfig, plan_proxies

NAMES = ("a", "b", "c", "d")
PORTS = [f"127.0.0.1:{p}" for p in (9001, 9002, 9003, 9004)]


@st.composite
def configs(draw: st.DrawFn) -> dict[str, ProxyConfig]:
    """A valid set of listeners: at most one per address (softlb.check_proxies)."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    ports = draw(st.permutations(PORTS))
    return {n: ProxyConfig(listen=ports[i], mode=draw(st.sampled_from(["tcp", "http", "http2"])),
                           idle_timeout=draw(st.sampled_from([1.0, 300.0])), retries=draw(st.integers(0, 2)))
            for i, n in enumerate(names)}


@settings(max_examples=60, stateful_step_count=25, deadline=None)
class Reloads(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, ProxyConfig] = {}
        #: Per service, how many times its listener was opened (a proxy for "its
        #: connections were disturbed").
        self.opened: dict[str, int] = {}
        self.wanted: dict[str, ProxyConfig] = {}

    @rule(wanted=configs())
    def reload(self, wanted: dict[str, ProxyConfig]) -> None:
        before = dict(self.running)
        plan = plan_proxies(self.running, wanted)
        assert set(plan.update).isdisjoint(plan.close) and set(plan.update).isdisjoint(plan.open)
        ports_in_use = {c.listen for c in self.running.values()}
        for name in plan.close:
            ports_in_use.discard(self.running.pop(name).listen)
        for name in plan.update:
            assert name in self.running
            self.running[name] = wanted[name]
        for name in plan.open:
            assert name not in self.running
            assert wanted[name].listen not in ports_in_use  # its port was freed first
            ports_in_use.add(wanted[name].listen)
            self.running[name] = wanted[name]
            self.opened[name] = self.opened.get(name, 0) + 1
        # Kept listeners (same listen and mode) are never closed or opened again.
        for name, old in before.items():
            new = wanted.get(name)
            if new is not None and (new.listen, new.mode) == (old.listen, old.mode):
                assert name not in plan.close and name not in plan.open
        self.wanted = wanted

    @invariant()
    def running_is_the_config(self) -> None:
        assert self.running == self.wanted


TestReloads = Reloads.TestCase
