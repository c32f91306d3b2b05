"""The per-language conformance runners (RUNNER.md): find the toolchain, build once per
session, start one as a subprocess and talk JSON lines to it.

Shared by the conformance driver (tests/conformance/), the clients' own suites
(tests/clients/) and bench/clients.py. Every process started here is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = os.path.join(ROOT, "clients")
LANGS = ("python", "node", "go", "c")

#: Builds are slow (npm ci, go build, make): each runs once per process, behind a lock;
#: a failed build is remembered too (every test of that language fails with its output).
_built: dict[str, tuple[list[str] | None, Exception | None]] = {}
_lock = threading.Lock()
_tmp = tempfile.mkdtemp(prefix="softlb-runners-")


class Unavailable(Exception):
    """The language's runner or toolchain is missing: the caller skips with this reason."""


def _missing(*tools: str) -> str | None:
    gone = [t for t in tools if shutil.which(t) is None]
    return f"toolchain missing: {', '.join(gone)} not on PATH" if gone else None


def _run_build(argv: list[str], cwd: str, timeout: float, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} (in {cwd}) failed with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def node_ready() -> None:
    """`npm ci` in clients/node, once per session. Raises Unavailable or RuntimeError."""
    node_dir = os.path.join(CLIENTS, "node")
    if not os.path.isfile(os.path.join(node_dir, "package.json")):
        raise Unavailable("clients/node is missing")
    why = _missing("node", "npm")
    if why:
        raise Unavailable(why + " (Debian: apt-get install nodejs npm)")
    with _lock:
        if "npm" not in _built:
            try:
                _run_build(["npm", "ci", "--no-audit", "--no-fund"], node_dir, timeout=300)
                _built["npm"] = ([], None)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                _built["npm"] = (None, e)
        err = _built["npm"][1]
    if err is not None:
        raise err


def go_env() -> dict[str, str]:
    """Offline: Debian's packaged Go modules only (clients/go/go.mod replaces them in), never
    a module proxy, a checksum database or a toolchain download."""
    env = {"GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOSUMDB": "off", "GOTOOLCHAIN": "local"}
    if not os.environ.get("HOME"):  # CI may have no HOME: Go then needs its dirs named
        env.update(GOCACHE=os.path.join(_tmp, "gocache"), GOPATH=os.path.join(_tmp, "gopath"))
    return env


def runner_argv(lang: str) -> list[str]:
    """The command starting `lang`'s runner, built if needed; raises Unavailable."""
    with _lock:
        if lang in _built:
            argv, err = _built[lang]
            if err is not None:
                raise err
            assert argv is not None
            return argv
    try:
        argv = _build(lang)
    except (Unavailable, RuntimeError, subprocess.TimeoutExpired) as e:
        with _lock:
            _built[lang] = (None, e)
        raise
    with _lock:
        _built[lang] = (argv, None)
    return argv


def _build(lang: str) -> list[str]:
    if lang == "python":
        return [sys.executable, os.path.join(CLIENTS, "python", "conformance_runner.py")]
    if lang == "node":
        path = os.path.join(CLIENTS, "node", "conformance-runner.mjs")
        if not os.path.isfile(path):
            raise Unavailable("clients/node/conformance-runner.mjs is missing")
        node_ready()
        return ["node", path]
    if lang == "go":
        if not os.path.isdir(os.path.join(CLIENTS, "go", "cmd", "softlb-conformance")):
            raise Unavailable("clients/go/cmd/softlb-conformance is missing")
        why = _missing("go")
        if why:
            raise Unavailable(why + " (Debian: apt-get install golang-go)")
        out = os.path.join(_tmp, "go-runner")
        _run_build(["go", "build", "-o", out, "./cmd/softlb-conformance"], os.path.join(CLIENTS, "go"), 600, go_env())
        return [out]
    if lang == "c":
        if not os.path.isfile(os.path.join(CLIENTS, "c", "conformance_runner.c")):
            raise Unavailable("clients/c/conformance_runner.c is missing")
        why = _missing("make", "cc")
        if why:
            raise Unavailable(why + " (Debian: apt-get install build-essential libmsgpack-dev)")
        _run_build(["make", "-C", os.path.join(CLIENTS, "c"), "runner"], ROOT, 600)
        return [os.path.join(CLIENTS, "c", "build", "conformance-runner")]
    raise ValueError(lang)


class RunnerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Runner:
    """One runner subprocess. `cmd()` sends a command and returns its result (raising
    RunnerError for an error reply); watch events queue up in `events`."""

    def __init__(self, lang: str, argv: list[str], log_path: str) -> None:
        self.lang = lang
        self._log = open(log_path, "ab")
        self.log_path = log_path
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._seq = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"seq": None, "ok": False, "error": {"code": "BAD_RUNNER_OUTPUT", "message": line}}
            (self.events if "event" in msg else self.replies).put(msg)
        self.replies.put({"seq": None, "eof": True})

    def reply(self, cmd: str, wait: float = 15.0, **args: Any) -> dict[str, Any]:
        """Send one command; return its whole reply line (waiting at most `wait` s)."""
        self._seq += 1
        seq = self._seq
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "seq": seq, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            msg = self.replies.get(timeout=wait)
        except queue.Empty:
            raise AssertionError(f"{self.lang} runner: no reply to {cmd} within {wait}s\n{self.stderr()}") from None
        if msg.get("eof"):
            raise AssertionError(f"{self.lang} runner exited during {cmd}:\n{self.stderr()}")
        assert msg.get("seq") == seq, f"{self.lang} runner answered {msg} to seq {seq}"
        return msg

    def cmd(self, cmd: str, wait: float = 15.0, **args: Any) -> Any:
        msg = self.reply(cmd, wait, **args)
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise RunnerError(str(err.get("code")), str(err.get("message")))
        return msg.get("result")

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next watch update or watch error within `timeout` s (other kinds are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if ev.get("event") in ("watch", "watch_error"):
                return ev

    def stderr(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def close(self) -> None:
        """Ask it to exit; kill it by pid if it does not within 5 s."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                try:
                    self.proc.stdin.write(json.dumps({"cmd": "exit", "seq": 0}) + "\n")
                    self.proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        finally:
            self._log.close()
