import pytest

from agentproc import AgentProcess, endpoint_toml

THREE = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}") for i in range(1, 4))


@pytest.fixture
def make_agent(tmp_path):
    started = []

    def make(catalog=THREE, config="", **kw):
        a = AgentProcess(str(tmp_path), catalog, config, **kw)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def agent(make_agent):
    return make_agent().start()
