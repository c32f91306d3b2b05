"""Coverage-guided fuzzing of the parsers that take untrusted input (issue 10), with atheris.

Each tests/fuzz/fuzz_*.py target runs as a real subprocess (libFuzzer's main) for a bounded
time, starting from its committed seed corpus (tests/fuzz/corpus/NAME) and dictionary
(tests/fuzz/dicts). A crash (an exception other than the parser's documented one, a failed
assertion, a hang over -timeout or memory over -rss_limit_mb) fails the test with the input.
New inputs go to a temporary corpus, never into the committed seeds.

Longer runs by hand (docs/RELIABILITY.md):
    SOFTLB_FUZZ_SECONDS=300 .venv/bin/python -m pytest -q tests/fuzz -k frames
or run one target directly: .venv/bin/python tests/fuzz/fuzz_frames.py tests/fuzz/corpus/frames
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris (in the test extra) has no wheel for this Python or platform")

HERE = pathlib.Path(__file__).resolve().parent
TARGETS = {"frames": None, "config": "toml.dict", "catalog": "toml.dict", "consul": "consul.dict"}
#: Per target; the four together stay under about a minute on two shared cores.
SECONDS = int(os.environ.get("SOFTLB_FUZZ_SECONDS", "10"))
FINDINGS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def run_target(script: pathlib.Path, seeds: pathlib.Path, work: pathlib.Path, seconds: int,
               dictionary: pathlib.Path | None = None) -> tuple[bool, str, int]:
    """Fuzz `script` for `seconds`; (clean, report, executions). The report shows a finding's
    input and the end of libFuzzer's output."""
    corpus = work / "corpus"
    corpus.mkdir()
    cmd = [sys.executable, str(script), str(corpus), str(seeds), f"-max_total_time={seconds}",
           "-runs=10000000", "-timeout=10", "-rss_limit_mb=1536", "-max_len=8192",
           f"-artifact_prefix={work}/", "-print_final_stats=1"]
    if dictionary is not None:
        cmd.append(f"-dict={dictionary}")
    # atheris prints the Python traceback on stdout, libFuzzer its report on stderr: one stream.
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=seconds + 120)
    found = sorted(p for p in work.iterdir() if p.name.startswith(FINDINGS))
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stdout)
    executions = int(m.group(1)) if m else 0
    if r.returncode == 0 and not found:
        return True, "", executions
    report = [f"{script.name} exited {r.returncode}"]
    for p in found:
        report.append(f"{p}: {p.read_bytes()[:2000]!r}\n  rerun: {sys.executable} {script} {p}")
    report.append("\n".join(r.stdout.splitlines()[-60:]))
    return False, "\n".join(report), executions


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_finds_nothing_in_the_parser(name, tmp_path):
    d = TARGETS[name]
    clean, report, executions = run_target(HERE / f"fuzz_{name}.py", HERE / "corpus" / name, tmp_path,
                                           SECONDS, HERE / "dicts" / d if d else None)
    assert clean, report
    seeds = len(list((HERE / "corpus" / name).iterdir()))
    assert executions > seeds, f"only {executions} executions: the target did not fuzz past its seeds"


def test_a_target_that_breaks_its_property_fails_with_the_input(tmp_path):
    """The runner itself: an exception outside the documented one is reported with the input."""
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "one").write_bytes(b"boom!")
    script = tmp_path / "fuzz_broken.py"
    script.write_text("import sys, atheris\n"
                      "def one(data):\n"
                      "    if data.startswith(b'boom'):\n"
                      "        raise KeyError('not the documented error')\n"
                      "atheris.Setup(sys.argv, one)\natheris.Fuzz()\n")
    (tmp_path / "work").mkdir()
    clean, report, _ = run_target(script, tmp_path / "seeds", tmp_path / "work", 5)
    assert not clean
    assert "b'boom!'" in report and "KeyError: 'not the documented error'" in report, report
