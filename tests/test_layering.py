"""The core stays sans-I/O: no trio/socket/asyncio/threading, no clock, no global random."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parent.parent / "softlb"
FORBIDDEN_MODULES = {"trio", "socket", "asyncio", "threading", "time", "selectors", "subprocess"}


def test_importing_the_core_loads_no_io_modules():
    code = "import sys, softlb, softlb._engine, softlb._filecatalog; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % FORBIDDEN_MODULES
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # `time`/`threading` may be pulled in by the stdlib itself; what matters is trio/socket/asyncio.
    loaded = set(eval(out))
    assert not loaded & {"trio", "socket", "asyncio", "selectors", "subprocess"}, loaded


def test_core_source_never_imports_io_or_reads_clock_or_global_random():
    bad = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
                if names[0] == "random" and any(a.name != "Random" for a in node.names):
                    bad.append(f"{path.name}: from random import {[a.name for a in node.names]}")
            else:
                names = []
            bad += [f"{path.name}: import {n}" for n in names if n in FORBIDDEN_MODULES]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random" and node.attr != "Random":
                bad.append(f"{path.name}:{node.lineno}: random.{node.attr} (use the injected rng)")
    assert not bad, bad


def test_agent_and_client_do_not_depend_on_each_other_wrongly():
    client = CORE.parent / "clients" / "python" / "softlb_client"
    for path in client.rglob("*.py"):
        text = path.read_text()
        assert "softlb_agent" not in text and "from softlb " not in text and "import softlb\n" not in text, path
