"""atheris target: the file catalog, bytes as read from disk -> endpoints (issue 10).

Property: `parse_catalog_text` raises ConfigError and nothing else, whatever the bytes.
Rerun: python tests/fuzz/fuzz_catalog.py [corpus dirs or one input file] -dict=tests/fuzz/dicts/toml.dict
"""

import sys

import atheris

with atheris.instrument_imports(include=["softlb"]):
    from softlb import ConfigError, parse_catalog_text


def test_one_input(data: bytes) -> None:
    try:
        parse_catalog_text(data)
    except ConfigError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
