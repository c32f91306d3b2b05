"""The README's commands, run against a real agent on the demo catalog, give what the
README says they give. Every command line in its two command blocks must have a check here,
so a new README line without one fails this test.

Ports and the socket differ from the demo's (tests run in parallel with other agents): the
commands are run with `localhost:7071` replaced by the test agent's admin address and
`.venv/bin/softlb` by this interpreter's `-m softlb_agent` with `--socket`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CATALOG = (ROOT / "examples" / "catalog.toml").read_text()
CONFIG = '[agent]\nzone = "zone-a"\n[services.web]\npolicy = "round_robin"\n[services.api]\npolicy = "weighted_round_robin"\n'


def block_after(marker: str) -> list[tuple[str, str]]:
    """(command, comment) for each line of the first ```sh block after `marker`."""
    rest = README[README.index(marker):]
    body = rest[rest.index("```sh\n") + 6:]
    body = body[: body.index("```")]
    out = []
    for line in body.splitlines():
        cmd, _, comment = line.partition("  # ")
        if cmd.strip():
            out.append((cmd.strip(), comment.strip()))
    return out


RESOLVED = re.compile(r"^127\.0\.0\.1:1808[123]  web-[123]$")


def check_using_it(cmd: str, out: str) -> None:
    """The expected output of each line of the "Using it" block."""
    if cmd.endswith("softlb resolve web"):
        assert RESOLVED.match(out.strip()), out
    elif cmd.endswith("softlb resolve web --json"):
        d = json.loads(out)
        assert {"address", "port", "id", "lease"} <= set(d) and d["lease"] is None and "age" not in d
    elif cmd.endswith("softlb services"):
        assert out.startswith("SERVICE") and "\nweb " in out and "\napi " in out
    elif cmd.endswith("softlb endpoints web"):
        assert "WHY" in out and "web-3" in out
    elif cmd.endswith("softlb status"):
        assert "health: ok" in out and "web" in out
    elif cmd.endswith("softlb watch web"):
        assert "3 endpoints, 3 served" in out.splitlines()[0]
    elif cmd.endswith("softlb top"):
        pass  # needs a terminal: tests/agent/test_ops_cli.py drives it in tmux
    elif cmd.endswith("/v1/resolve/web"):
        assert json.loads(out)["id"] in ("web-1", "web-2", "web-3")
    elif cmd.endswith("localhost:7071/"):
        assert "/v1/status" in out and "/metrics" in out
    elif cmd.endswith("/metrics"):
        assert 'softlb_service_endpoints{service="web"} 3.0' in out
    else:
        raise AssertionError(f"README command without a check in this test: {cmd}")


def check_http(cmd: str, out: str) -> None:
    if "/v1/resolve/web?key=user42&tag=canary" in cmd:
        assert json.loads(out)["id"] == "web-3"  # the only canary
    elif cmd.startswith("lease=$("):
        pass  # sets the variable the next line uses
    elif "/v1/report?lease=$lease" in cmd:
        assert out.strip() == "{}"
    elif cmd.endswith("/v1/services"):
        assert [s["name"] for s in json.loads(out)] == ["api", "web"]
    elif cmd.endswith("/v1/status"):
        assert json.loads(out)["ready"] is True
    elif cmd.endswith("/v1/config"):
        assert json.loads(out)["config"]["zone"] == "zone-a"
    elif cmd.endswith("/metrics"):
        assert "softlb_resolves_total" in out
    elif cmd.endswith("/healthz"):
        assert out == "ok\n"
    elif cmd.endswith("/readyz"):
        assert out == "ready\n"
    else:
        raise AssertionError(f"README command without a check in this test: {cmd}")


def run(agent, cmd: str, env_lines: str = "", timeout: float = 20) -> str:
    softlb = f"{sys.executable} -m softlb_agent"
    cmd = cmd.replace("localhost:7071", f"localhost:{agent.admin_port}").replace(".venv/bin/softlb", softlb)
    if cmd.startswith(softlb):
        cmd += f" --socket {agent.socket}" if " status" not in cmd else f" --admin 127.0.0.1:{agent.admin_port}"
    if cmd.endswith(" watch web --socket " + agent.socket):
        cmd = f"timeout 3 {cmd} | head -1"
    r = subprocess.run(["bash", "-c", env_lines + cmd], capture_output=True, text=True, timeout=timeout)
    return r.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: the README's HTTP examples use it")
def test_readme_commands_and_outputs(make_agent):
    agent = make_agent(CATALOG, CONFIG).start()
    using = block_after("After `make demo`, in another terminal:")
    assert len(using) >= 8
    for cmd, _ in using:
        check_using_it(cmd, run(agent, cmd))
    http = block_after("From anything that speaks HTTP")
    assert len(http) >= 8
    env = ""
    for cmd, _ in http:
        out = run(agent, cmd, env)
        check_http(cmd, out)
        if cmd.startswith("lease=$("):
            env = cmd.replace("localhost:7071", f"localhost:{agent.admin_port}") + "\n"
