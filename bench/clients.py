"""Benchmark: each client's sequential resolve round trip beside a raw blocking socket.

    .venv/bin/python bench/clients.py [--n 1000] [--runs 15] [--json] [--write]

One real agent subprocess (temporary Unix socket, a 3-endpoint round-robin service), one
conformance runner per client whose runner and toolchain are present (RUNNER.md: built as
the conformance suite builds them), and the floor: a raw blocking Python socket sending the
same frames ({"id", "op": "resolve", "service": "web", "lease": false}) and decoding each
answer. Each client times n sequential resolves inside its runner ("bench" command), so
process start and JSON are excluded. Runs are A/B pairs: each client run beside a
raw-socket run of its own (who goes first alternates; the clients' order rotates); a figure
is the median over --runs runs of µs per call; a ratio is the median of the per-pair
ratios. Target (issue 12): every client within 2x of the raw socket.
--write puts the table in docs/BENCHMARKS.md (its own section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import msgpack  # noqa: E402

from agentproc import THREE, AgentProcess  # noqa: E402
from tests.conformance.runners import LANGS, Runner, Unavailable, runner_argv  # noqa: E402

DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
BEGIN, END = "<!-- bench-clients:begin -->", "<!-- bench-clients:end -->"


def raw_socket_seconds(path: str, n: int) -> float:
    """The floor: blocking socket, one frame out, one frame in, msgpack both ways."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    pack, unpack = msgpack.Packer(use_bin_type=True).pack, msgpack.unpackb

    def one(i: int) -> None:
        body = pack({"id": i, "op": "resolve", "service": "web", "lease": False})
        s.sendall(len(body).to_bytes(4, "big") + body)
        buf = s.recv(65536)
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            buf += s.recv(65536)
        msg = unpack(buf[4:], raw=False)
        assert msg["id"] == i and "result" in msg

    try:
        one(0)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            one(i)
        return time.perf_counter() - t0
    finally:
        s.close()


def measure(n: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(tmp, THREE).start()
        runners: dict[str, Runner] = {}
        skipped: dict[str, str] = {}
        try:
            for lang in LANGS:
                try:
                    runners[lang] = Runner(lang, runner_argv(lang), os.path.join(tmp, f"{lang}.log"))
                except Unavailable as e:
                    skipped[lang] = str(e)
                    continue
                runners[lang].cmd("connect", addr=agent.socket, timeout=5.0)
            us: dict[str, list[float]] = {"raw socket": [], **{lang: [] for lang in runners}}
            ratios: dict[str, list[float]] = {lang: [] for lang in runners}
            for lang, r in runners.items():  # warm-up (JIT, caches, connections), not counted
                r.cmd("bench", wait=300, service="web", n=n)
            langs = list(runners)
            for i in range(runs):
                # A/B pairs: each client run beside its own raw-socket run, who goes first
                # alternating, clients in a rotating order: the ratio of a pair shares its noise.
                for lang in langs[i % len(langs):] + langs[:i % len(langs)]:
                    pair = {}
                    for name in ((lang, "raw socket") if i % 2 else ("raw socket", lang)):
                        if name == "raw socket":
                            pair[name] = raw_socket_seconds(agent.socket, n) / n * 1e6
                        else:
                            pair[name] = runners[name].cmd("bench", wait=300, service="web", n=n)["seconds"] / n * 1e6
                    us["raw socket"].append(pair["raw socket"])
                    us[lang].append(pair[lang])
                    ratios[lang].append(pair[lang] / pair["raw socket"])
        finally:
            for r in runners.values():
                r.close()
            agent.stop()
    return {
        "n": n, "runs": runs, "skipped": skipped,
        "median_us": {k: statistics.median(v) for k, v in us.items()},
        "ratio_to_raw": {k: statistics.median(v) for k, v in ratios.items()},
        "all_us": us,
    }


def table(res: dict) -> str:
    lines = ["| client | µs per resolve (median) | × raw socket (median of per-pair ratios) | within 2× |",
             "|---|---|---|---|"]
    lines.append(f"| raw blocking socket (Python, same frames) | {res['median_us']['raw socket']:.1f} | 1.00 | — |")
    for lang, r in res["ratio_to_raw"].items():
        lines.append(f"| {lang} | {res['median_us'][lang]:.1f} | {r:.2f} | {'yes' if r <= 2 else '**no**'} |")
    for lang, why in res["skipped"].items():
        lines.append(f"| {lang} | not measured: {why} | | |")
    return "\n".join(lines)


def write_doc(res: dict, cmd: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, node "
            f"{_version('node')}, {_version('go', 'version')}; shared with other work (load average {load} at the end: "
            f"compare the ratios, each from an A/B pair). Command: `{cmd}` "
            f"({res['runs']} A/B pairs of {res['n']} sequential resolves per client, Unix socket, `lease: false`; "
            "bench/clients.py's docstring has the method).\n\n" + table(res) + "\n")
    with open(DOC) as f:
        doc = f.read()
    if BEGIN not in doc:
        doc = doc.rstrip("\n") + "\n\n## Clients: sequential resolve round trip (issue 12)\n" + BEGIN + "\n" + END + "\n"
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    with open(DOC, "w") as f:
        f.write(doc[:start] + body + doc[end:])


def _version(tool: str, flag: str = "--version") -> str:
    try:
        return subprocess.run([tool, flag], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return f"no {tool}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="sequential resolves per run and client")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    a = p.parse_args()
    res = measure(a.n, a.runs)
    print(json.dumps(res, indent=1) if a.json else table(res))
    if a.write:
        write_doc(res, ".venv/bin/python bench/clients.py " + " ".join(sys.argv[1:]))
    return 0 if all(r <= 2 for r in res["ratio_to_raw"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
