import pytest

from agentproc import THREE, AgentProcess


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
