"""atheris target: the agent config file, bytes as read from disk -> AgentConfig (issue 10).

Property: `parse_agent_config_text` (what `load_config_file` calls on SIGHUP and at start)
raises ConfigError and nothing else, whatever the bytes.
Rerun: python tests/fuzz/fuzz_config.py [corpus dirs or one input file] -dict=tests/fuzz/dicts/toml.dict
"""

import sys

import atheris

with atheris.instrument_imports(include=["softlb"]):
    from softlb import ConfigError, parse_agent_config_text
    from softlb.policies import POLICIES

KNOWN = frozenset(POLICIES)


def test_one_input(data: bytes) -> None:
    try:
        parse_agent_config_text(data, KNOWN)
    except ConfigError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
