"""The shipped unit files: `systemd-analyze verify` clean, hardened, and in step with the agent."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from softlb._config import DEFAULT_LISTEN

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = UNITS / "softlb-agent.service"
SOCKET = UNITS / "softlb-agent.socket"
INSTALLED_BINARY = "/opt/softlb/bin/softlb"  # where docs/OPERATIONS.md installs it
#: Regression guard, not a target: docs/OPERATIONS.md records the measured score (1.1 on
#: systemd 252). Losing a hardening knob pushes the score up past this.
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Unit files repeat keys (ListenStream=, SystemCallFilter=), so keep every value."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def copy_for_verify(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at the softlb actually installed in this venv.

    verify checks that ExecStart's binary exists and is executable; substituting the real
    console script keeps that check meaningful instead of creating a fake /opt/softlb.
    """
    binary = Path(sys.executable).parent / "softlb"
    if not binary.exists():
        pytest.skip(f"the softlb console script is not installed next to {sys.executable}")
    text = SERVICE.read_text()
    assert text.count(INSTALLED_BINARY) == 2, "ExecStart/ExecReload moved; update INSTALLED_BINARY and the docs"
    (tmp_path / SERVICE.name).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    return tmp_path


def verify(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *names], cwd=directory, capture_output=True, text=True, timeout=60,
    )


@needs_analyze
def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path):
    d = copy_for_verify(tmp_path)
    result = verify(d, SOCKET.name, SERVICE.name)
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys and unparsable values, only warning: treat any output
    # about our units as a failure.
    ours = [ln for ln in (result.stdout + result.stderr).splitlines() if "softlb" in ln]
    assert ours == []


@needs_analyze
def test_verify_catches_a_misspelled_key(tmp_path):
    """The check above can fail: a typo in a hardening knob is reported."""
    d = copy_for_verify(tmp_path)
    service = d / SERVICE.name
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = verify(d, SOCKET.name, SERVICE.name)
    assert "ProtectSystm" in result.stderr


@needs_analyze
def test_security_exposure_stays_low():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security review: {result.stderr.strip()}")
    m = re.search(r"Overall exposure level for softlb-agent\.service: ([0-9.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


def test_service_contract():
    svc = read_unit(SERVICE)["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"].endswith("s")
    assert one["ExecStart"].split()[0] == INSTALLED_BINARY
    assert one["RuntimeDirectory"] == "softlb" and one["RuntimeDirectoryPreserve"] == "yes"
    assert one["StateDirectory"] == "softlb"
    assert one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert svc["SystemCallFilter"][0] == "@system-service"
    for knob in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "MemoryMax", "TasksMax",
                 "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules", "LockPersonality",
                 "RestrictNamespaces"):
        assert knob in one, knob
    assert one["ProtectSystem"] == "strict"


def test_socket_unit_listens_where_the_agent_expects():
    sock = read_unit(SOCKET)["Socket"]
    streams = sock["ListenStream"]
    assert streams == ["/run/softlb/softlb.sock", DEFAULT_LISTEN]
    assert sock["SocketMode"] == ["0660"]
    assert sock["FileDescriptorName"] == ["softlb"]
    # RuntimeDirectory= of the service must be the socket's directory, or a stop deletes it.
    assert Path(streams[0]).parent == Path("/run") / read_unit(SERVICE)["Service"]["RuntimeDirectory"][0]

