"""Big catalog files are parsed in a child process (agent/catalog_parser.py): the same
services, and the same errors, as parsing in the agent."""

from __future__ import annotations

import os

import pytest
import trio

from agentproc import endpoint_toml
from softlb import ConfigError
from softlb_agent.catalog_parser import CatalogFileError, parse_in_child
from softlb_agent.file_source import CHILD_PARSE_BYTES, _read_and_parse


def _big(n: int = 20000, per_service: int = 100) -> str:
    text = "".join(endpoint_toml(f"s{i // per_service}", f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 8000 + i % 50,
                                 id=f"e{i}", tags=["a", "b"], weight=i % 5, zone=f"z{i % 3}")
                   + 'meta = { k = "v" }\n' for i in range(n))
    assert len(text) > CHILD_PARSE_BYTES  # the size that takes this path in the agent
    return text


def test_the_child_gives_the_same_services_as_parsing_in_the_agent(tmp_path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(_big() + '[[services.ranked.endpoints]]\naddress = "10.9.9.9"\nport = 1\nrank = 3\n'
                    'registry = "critical"\n')
    got = trio.run(parse_in_child, str(path), 64 << 20)
    assert got == _read_and_parse(str(path), 64 << 20)
    assert len(got) == 201 and got["ranked"][0].rank == 3


def test_a_bad_big_file_is_the_same_config_error(tmp_path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(_big() + "[[services.x.endpoints]]\naddress = \"10.0.0.1\"\nport = 99999\n")
    with pytest.raises(ConfigError) as inline:
        _read_and_parse(str(path), 64 << 20)
    with pytest.raises(ConfigError) as child:
        trio.run(parse_in_child, str(path), 64 << 20)
    assert str(child.value) == str(inline.value) and "port" in str(child.value)
    path.write_bytes(b"\xff" + path.read_bytes())  # not UTF-8
    with pytest.raises(ConfigError, match="not UTF-8"):
        trio.run(parse_in_child, str(path), 64 << 20)


def test_file_errors_come_back_as_such(tmp_path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(_big())
    with pytest.raises(CatalogFileError, match="over catalog.max_bytes"):
        trio.run(parse_in_child, str(path), 1000)
    with pytest.raises(FileNotFoundError):
        trio.run(parse_in_child, str(tmp_path / "gone.toml"), 64 << 20)


def test_cancelling_the_parse_stops_the_child(tmp_path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(_big(60000))
    before = set(os.listdir("/proc"))

    async def main() -> None:
        with trio.move_on_after(0.3):
            await parse_in_child(str(path), 64 << 20)

    trio.run(main)
    # No child of ours is left running (it was killed and reaped).
    mine = [p for p in set(os.listdir("/proc")) - before if p.isdigit() and _ppid(p) == os.getpid()]
    assert mine == []


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


class _BuiltPerStep(trio.abc.Instrument):
    """The most endpoints `_endpoint` built within one task step."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.now = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.most = max(self.most, self.now)


def test_the_agent_builds_the_childs_endpoints_a_hundred_between_checkpoints(tmp_path, monkeypatch) -> None:
    """Each slice is a pass every other caller waits behind: 500 a slice made the 100,000-
    endpoint file's most frequent slow passes (2-3.5 ms CPU under load)."""
    from softlb_agent import catalog_parser

    path = tmp_path / "catalog.toml"
    path.write_text(_big(per_service=20000))
    seen = _BuiltPerStep()
    build = catalog_parser._endpoint

    def counted(f: list) -> object:
        seen.now += 1
        return build(f)

    monkeypatch.setattr(catalog_parser, "_endpoint", counted)
    got = trio.run(parse_in_child, str(path), 64 << 20, instruments=[seen])
    assert sum(len(eps) for eps in got.values()) == 20000
    assert 0 < seen.most <= 100
