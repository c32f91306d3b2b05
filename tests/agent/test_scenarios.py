"""Issue 14's must-show scenarios, each against a real agent process: one `softlb status`
or `softlb endpoints` call names the cause, and /metrics, read with prometheus_client's
text parser, shows the event with the right numbers.

    tag filter matching nothing | locality mistake | backend killed | refused reload |
    Consul stalled
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentproc import THREE, AgentProcess, endpoint_toml, free_port, wait_until
from softlb_client import SoftLBError


def metrics(agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def m(agent, name: str, **labels: str) -> float:
    return metrics(agent)[(name, tuple(sorted(labels.items())))]


def status(agent, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "softlb_agent", "status", "--admin",
                           f"127.0.0.1:{agent.admin_port}", *extra], capture_output=True, text=True, timeout=20)


def resolve_fails(agent, n: int) -> str:
    msg = ""
    with agent.client() as c:
        for _ in range(n):
            with pytest.raises(SoftLBError) as ei:
                c.resolve("web")
            assert ei.value.code == "NO_HEALTHY_ENDPOINT"
            msg = ei.value.message
    return msg


def tagged(tag: str, zone: str = "") -> str:
    extra = {"zone": zone} if zone else {}
    return "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}", tags=[tag], **extra)
                   for i in range(1, 4))


def test_tag_filter_matching_nothing(make_agent):
    agent = make_agent(tagged("v2"), config='[services.web]\ntags = ["V2"]\n').start()
    msg = resolve_fails(agent, 3)
    assert "check services.web.tags" in msg
    r = agent.cli("endpoints", "web")
    assert r.returncode == 0
    assert r.stdout.count('tag filter: services.web.tags = ["V2"]; this endpoint has ["v2"]') == 3, r.stdout
    assert m(agent, "softlb_resolves_total", service="web", code="NO_HEALTHY_ENDPOINT") == 3
    assert m(agent, "softlb_resolves_total", service="web", code="OK") == 0
    assert m(agent, "softlb_errors_total", code="NO_HEALTHY_ENDPOINT") == 3
    assert m(agent, "softlb_service_endpoints", service="web") == 3
    assert m(agent, "softlb_service_served_endpoints", service="web") == 0
    st = status(agent)
    assert st.returncode == 1 and "NOTHING SERVED" in st.stdout and "services.web.tags" in st.stdout


def test_locality_mistake(make_agent):
    agent = make_agent(tagged("v1", zone="zone-a"), config='[services.web]\nlocality = ["zone"]\n',
                       extra_args=["--zone", "zone-c"]).start()
    resolve_fails(agent, 2)
    r = agent.cli("endpoints", "web")
    assert "locality zone (agent: zone zone-c; serving: none matched)" in r.stdout, r.stdout
    assert r.stdout.count("agent: zone 'zone-c'; endpoint: zone 'zone-a'") == 3
    assert m(agent, "softlb_service_eligible_endpoints", service="web") == 3
    assert m(agent, "softlb_service_served_endpoints", service="web") == 0
    assert m(agent, "softlb_resolves_total", service="web", code="NO_HEALTHY_ENDPOINT") == 2


def _backend(port: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", "import socket,time\n"
                          f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                          f"s.bind(('127.0.0.1', {port})); s.listen(64)\n"
                          "while True:\n    c, _ = s.accept(); c.close()\n"])
    wait_until(lambda: _listening(port), timeout=10)
    return p


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_backend_killed(make_agent):
    ports = [free_port() for _ in range(3)]
    backends = [_backend(p) for p in ports]
    try:
        cat = "".join(endpoint_toml("web", "127.0.0.1", p, id=f"web-{i}") for i, p in enumerate(ports, 1))
        probe = '[services.web.probe]\nkind = "tcp"\ninterval = "200ms"\ntimeout = "200ms"\nfall = 2\nrise = 2\n'
        agent = make_agent(cat, config=probe).start()
        with agent.client() as c:
            for _ in range(6):
                c.resolve("web", lease=False)
        backends[1].kill()
        backends[1].wait(timeout=5)
        wait_until(lambda: m(agent, "softlb_service_probe_down_endpoints", service="web") == 1, timeout=10)
        st = status(agent)
        assert st.returncode == 1 and "1 not served: probe down" in st.stdout, st.stdout
        assert m(agent, "softlb_endpoint_eligible", service="web", endpoint="web-2") == 0
        assert m(agent, "softlb_service_eligible_endpoints", service="web") == 2
        assert m(agent, "softlb_endpoint_picks_total", service="web", endpoint="web-2") == 2
        with agent.client() as c:
            assert {c.resolve("web", lease=False).id for _ in range(10)} == {"web-1", "web-3"}
        assert m(agent, "softlb_endpoint_picks_total", service="web", endpoint="web-2") == 2
        assert m(agent, "softlb_resolves_total", service="web", code="OK") == 16
        assert "web: endpoint web-2 is no longer eligible (probe down" in agent.log()
    finally:
        for b in backends:
            b.kill()
            b.wait(timeout=5)


def test_refused_reload(make_agent):
    agent = make_agent(THREE).start()
    assert m(agent, "softlb_reloads_total", what="catalog", result="ok") == 1
    agent.write_catalog(THREE + "[[services.web.endpoints]]\nport = 1\n")
    wait_until(lambda: m(agent, "softlb_reloads_total", what="catalog", result="refused") == 1)
    st = status(agent)
    assert st.returncode == 1
    assert "REFUSED" in st.stdout and "services.web.endpoints[3].address: required" in st.stdout, st.stdout
    assert json.loads(status(agent, "--json").stdout)["ready"] is False
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/readyz", timeout=5)
    assert ei.value.code == 503 and b"catalog reload refused" in ei.value.read()
    assert m(agent, "softlb_last_reload_ok") == 0
    assert agent.client().resolve("web")  # the last good catalog still serves
    agent.write_catalog(THREE)
    wait_until(lambda: m(agent, "softlb_last_reload_ok") == 1)
    assert m(agent, "softlb_reloads_total", what="catalog", result="ok") == 2


def test_consul_stalled(tmp_path):
    from tests.consulsim import SimProcess

    sim = SimProcess()
    agent = None
    try:
        sim.control.add_instance(service="web", id="a", address="10.0.0.1", port=80)
        config = f'[agent]\nstate_dir = "{tmp_path}/state"\n[consul]\nwait = "1s"\nmin_query_interval = "20ms"\n' \
                 '[services.web]\n'
        agent = AgentProcess(str(tmp_path), "", config, extra_args=["--consul", sim.url]).start()
        assert m(agent, "softlb_service_stale", service="web") == 0
        sim.control.set_fault(mode="stall")
        # The blocking query's read timeout is wait + wait/16 + 10s slack.
        wait_until(lambda: m(agent, "softlb_service_stale", service="web") == 1, timeout=25, interval=0.5)
        st = status(agent)
        assert st.returncode == 1 and "not answering" in st.stdout and "stale    serving old data for: web" \
            in st.stdout, st.stdout
        assert m(agent, "softlb_source_up") == 0
        assert m(agent, "softlb_service_data_age_seconds", service="web") > 10
        assert agent.client().resolve("web", lease=False).stale is True
    finally:
        if agent is not None:
            agent.stop()
        sim.kill()
