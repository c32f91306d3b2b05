"""Fixtures for the conformance driver: a runner per language (skipping, with the reason,
a language whose runner or toolchain is missing) and real agents on a file catalog."""

from __future__ import annotations

import os

import pytest

from agentproc import AgentProcess
from tests.conformance.runners import LANGS, Runner, Unavailable, runner_argv


@pytest.fixture(params=LANGS)
def lang(request):
    return request.param


@pytest.fixture
def make_runner(lang, tmp_path):
    """make_runner(addr, timeout=2.0) -> a started runner already connected to `addr`."""
    try:
        argv = runner_argv(lang)
    except Unavailable as e:
        pytest.skip(f"{lang}: {e}")
    started: list[Runner] = []

    def make(addr: str, timeout: float = 2.0) -> Runner:
        r = Runner(lang, argv, str(tmp_path / f"runner-{lang}-{len(started)}.log"))
        started.append(r)
        r.cmd("connect", addr=addr, timeout=timeout)
        return r

    yield make
    for r in started:
        r.close()


@pytest.fixture
def make_agent(tmp_path):
    started: list[AgentProcess] = []

    def make(catalog: str, config: str = "", **kw) -> AgentProcess:
        d = tmp_path / f"agent{len(started)}"
        os.makedirs(d)
        a = AgentProcess(str(d), catalog, config, **kw)
        started.append(a)
        return a.start()

    yield make
    for a in started:
        a.stop()
