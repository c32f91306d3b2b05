"""Regenerate the scenario x client table in docs/CLIENTS.md from a real run of the driver.

    .venv/bin/python -m tests.conformance.table          # runs tests/conformance/test_scenarios.py

Each cell is the outcome of that scenario for that client in this run: pass, FAIL, or
"skip" (runner or toolchain missing here; the reason is in pytest's -rs output).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from tests.conformance.runners import LANGS, ROOT

sys.path.insert(0, os.path.join(ROOT, "tests"))  # agentproc, as under pytest
from tests.conformance.test_scenarios import SCENARIOS  # noqa: E402

DOC = os.path.join(ROOT, "docs", "CLIENTS.md")
BEGIN, END = "<!-- conformance-table:begin -->", "<!-- conformance-table:end -->"


def run() -> dict[tuple[str, str], str]:
    with tempfile.TemporaryDirectory() as d:
        xml = os.path.join(d, "out.xml")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/conformance/test_scenarios.py",
                        f"--junitxml={xml}"], cwd=ROOT, timeout=1800)
        outcome = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            m = re.fullmatch(r"test_(\w+)\[(\w+)\]", case.get("name", ""))
            if not m:
                continue
            kinds = {c.tag for c in case}
            outcome[(m[1], m[2])] = "FAIL" if kinds & {"failure", "error"} else "skip" if "skipped" in kinds else "pass"
        return outcome


def render(outcome: dict[tuple[str, str], str]) -> str:
    lines = ["| scenario | what it shows | " + " | ".join(LANGS) + " |",
             "|---|---|" + "---|" * len(LANGS)]
    for name, text in SCENARIOS.items():
        lines.append(f"| `{name}` | {text} | " + " | ".join(outcome.get((name, lang), "?") for lang in LANGS) + " |")
    return "\n".join(lines)


def main() -> int:
    outcome = run()
    with open(DOC) as f:
        doc = f.read()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    with open(DOC, "w") as f:
        f.write(doc[:start] + "\n" + render(outcome) + "\n" + doc[end:])
    print(render(outcome))
    return 1 if "FAIL" in outcome.values() else 0


if __name__ == "__main__":
    sys.exit(main())
