"""The C client's own suite (clients/c: `make test`), run from pytest so CI runs it.

The suite is C (codec vectors + live tests against an in-process fake agent); it prints
one line per test and ends with exactly "N passed, N failed".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C_DIR = os.path.join(ROOT, "clients", "c")


def _toolchain_missing() -> str | None:
    gone = [t for t in ("make", "cc", "pkg-config") if shutil.which(t) is None]
    if gone:
        return f"toolchain missing: {', '.join(gone)} (Debian: apt-get install gcc make pkg-config libmsgpack-dev)"
    if subprocess.run(["pkg-config", "--exists", "msgpack"]).returncode and \
            subprocess.run(["pkg-config", "--exists", "msgpack-c"]).returncode:
        return "msgpack-c missing (Debian: apt-get install libmsgpack-dev)"
    return None


def test_c_client_suite_passes():
    why = _toolchain_missing()
    if why:
        pytest.skip(why)
    r = subprocess.run(["make", "-s", "--no-print-directory", "-C", C_DIR, "test"],
                       capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    m = re.fullmatch(r"(\d+) passed, (\d+) failed", summary)
    assert r.returncode == 0 and m and m.group(2) == "0", f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert int(m.group(1)) >= 19, summary   # a suite that shrank is not a pass
