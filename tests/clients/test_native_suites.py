"""Every client's own test suite, run from the one pytest run (`make test`, CI): node's
`node --test`, `go test ./...`, `make -C clients/c test`. A client whose folder or
toolchain is missing skips, saying which."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conformance.runners import CLIENTS, Unavailable, go_env, node_ready


def run(argv: list[str], cwd: str, timeout: float, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"


def need(folder: str, *tools: str) -> str:
    path = os.path.join(CLIENTS, folder)
    if not os.path.isdir(path):
        pytest.skip(f"clients/{folder} is missing")
    gone = [t for t in tools if shutil.which(t) is None]
    if gone:
        pytest.skip(f"toolchain missing: {', '.join(gone)} not on PATH")
    return path


def test_node_client_suite():
    path = need("node", "node", "npm")
    try:
        node_ready()
    except Unavailable as e:
        pytest.skip(str(e))
    run(["node", "--test", "test/"], path, timeout=300)


def covered_by(module: str) -> None:
    """The Go and C engineers' own pytest modules run their suites (with the live agent and
    the checks they want): do not run them twice."""
    if os.path.isfile(os.path.join(os.path.dirname(__file__), module)):
        pytest.skip(f"run by tests/clients/{module}")


def test_go_client_suite():
    covered_by("test_go_client.py")
    path = need("go", "go")
    if not os.path.isfile(os.path.join(path, "go.mod")):
        pytest.skip("clients/go has no go.mod yet")
    run(["go", "test", "./..."], path, timeout=900, env=go_env())


def test_c_client_suite():
    covered_by("test_client_c.py")
    path = need("c", "make", "cc")
    if not os.path.isfile(os.path.join(path, "Makefile")):
        pytest.skip("clients/c has no Makefile yet")
    run(["make", "-C", path, "test"], path, timeout=900)
