"""Issue 9's must-shows against a real agent: a reload whose tag filter matches nothing is
answered NO_HEALTHY_ENDPOINT naming the filter — over the socket, the CLI and HTTP — and the
connection stays open."""

import json
import signal
import urllib.error
import urllib.request

import pytest
from agentproc import endpoint_toml, wait_until

from softlb_client import SoftLBError

CATALOG = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}", tags=["v2"]) for i in (1, 2))


def test_reload_to_a_tag_filter_matching_nothing_says_so_everywhere(make_agent):
    agent = make_agent(catalog=CATALOG, config='[services.web]\ntags = ["v2"]\n').start()
    with agent.client() as c:
        assert c.resolve("web").id in ("web-1", "web-2")
        agent.write_config('[services.web]\ntags = ["V2"]\n')  # a case typo: matches nothing
        agent.send(signal.SIGHUP)
        wait_until(lambda: "reloaded" in agent.log())

        def refused() -> SoftLBError:
            with pytest.raises(SoftLBError) as e:
                c.resolve("web")
            return e.value

        err = wait_until(lambda: (e := refused()).code == "NO_HEALTHY_ENDPOINT" and e)
        assert "services.web.tags" in err.message and "V2" in err.message
        # The same connection keeps answering: hello, services, and the error again.
        assert c.hello()["version"] == 1
        (svc,) = c.services()
        assert svc["endpoints"] == 0 and svc["eligible"] == 0
        assert refused().code == "NO_HEALTHY_ENDPOINT"

    cli = agent.cli("resolve", "web")
    assert cli.returncode == 1 and "services.web.tags" in cli.stderr, cli

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/v1/resolve/web", timeout=5)
        raise AssertionError("expected an HTTP error")
    except urllib.error.HTTPError as e:
        assert e.code == 503
        body = json.loads(e.read())
        assert body["error"]["code"] == "NO_HEALTHY_ENDPOINT" and "services.web.tags" in body["error"]["message"]
