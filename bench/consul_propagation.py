"""Benchmark: the agent following Consul (the Consul API test server, as a subprocess).

    .venv/bin/python bench/consul_propagation.py [--runs 3] [--json] [--quick]

Starts `python -m tests.consulsim` and a real agent subprocess (`--consul URL`), both on
loopback, and stops both by pid.

  propagation        a Consul write (instance added / set critical) -> the agent's
                     `endpoints` answer shows it; p50/p99 over --samples writes per run,
                     50 ms apart; the clock starts before the write's own HTTP call
  at_rest            configured services with blocking watches and no changes: Consul
                     requests per minute per service, measured with wait=5s over --rest
                     seconds (at rest a watch costs one request per wait period, so with the
                     default wait=300s divide by 60)
  thousand           1,000 configured services, max_watches=16 (16 blocking watches, 984
                     polled round robin with ?cached): agent RSS and CPU at rest, and the
                     Consul request rate, over --rest seconds after the first answers

Every figure is the median over --runs runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import psutil  # noqa: E402

from agentproc import AgentProcess  # noqa: E402
from tests.consulsim import SimProcess  # noqa: E402


def agent_config(state: str, services: list[str], **consul: str) -> str:
    lines = ["[agent]", f'state_dir = "{state}"', "[consul]"]
    lines += [f"{k} = {v}" for k, v in consul.items()]
    lines += [f"[services.{s}]" for s in services]
    return "\n".join(lines) + "\n"


def start(tmp: str, url: str, config: str) -> AgentProcess:
    a = AgentProcess(tmp, "", config, extra_args=["--consul", url, "--log-level", "warning"], admin=False)
    return a.start()


def propagation(samples: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, SimProcess() as sim:
        ctl = sim.control
        ctl.add_instance(service="web", id="base", port=1)
        agent = start(tmp, sim.url, agent_config(f"{tmp}/state", ["web"], min_query_interval='"10ms"'))
        try:
            c = agent.client(timeout=5)
            lat = []
            for i in range(samples):
                add = i % 2 == 0
                t0 = time.perf_counter()
                if add:
                    ctl.add_instance(service="web", id=f"i{i}", port=2)
                    want = lambda eps, i=i: any(e["id"] == f"i{i}@node-1" for e in eps)
                else:
                    ctl.set_check(id=f"i{i - 1}", status="critical")
                    want = lambda eps, i=i: any(e["id"] == f"i{i - 1}@node-1" and not e["eligible"] for e in eps)
                while not want(c.endpoints("web")["endpoints"]):
                    if time.perf_counter() - t0 > 5:
                        raise RuntimeError("no propagation within 5 s")
                lat.append(time.perf_counter() - t0)
                if not add:
                    ctl.remove_instance(id=f"i{i - 1}")
                # Let the watch settle back into its blocking query: changes at rest, not
                # back to back inside the min_query_interval spacing.
                time.sleep(0.05)
            c.close()
        finally:
            agent.stop()
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "max_ms": lat[-1] * 1e3, "samples": len(lat)}


def at_rest(n_services: int, seconds: float) -> dict[str, float]:
    names = [f"s{i}" for i in range(n_services)]
    with tempfile.TemporaryDirectory() as tmp, SimProcess() as sim:
        for s in names:
            sim.control.add_instance(service=s, id=f"{s}-a", port=1)
        agent = start(tmp, sim.url, agent_config(f"{tmp}/state", names, wait='"5s"'))
        try:
            time.sleep(2)  # first answers
            sim.control.reset_counts()
            time.sleep(seconds)
            counts = sim.control.get_counts()
        finally:
            agent.stop()
    total = sum(v for k, v in counts.items() if k.startswith("/v1/health/service/"))
    per_min = total / n_services / (seconds / 60)
    return {"services": n_services, "wait_s": 5, "req_per_min_per_service": per_min,
            "req_per_wait_period": per_min * 5 / 60}


def thousand(seconds: float, max_watches: int = 16) -> dict[str, float]:
    names = [f"s{i}" for i in range(1000)]
    with tempfile.TemporaryDirectory() as tmp, SimProcess() as sim:
        for s in names:
            sim.control.add_instance(service=s, id=f"{s}-a", port=1)
        agent = start(tmp, sim.url, agent_config(f"{tmp}/state", names, max_watches=str(max_watches)))
        try:
            proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
            # Wait until every service has had its first answer (the poller fetches new
            # services at once), then measure at rest.
            with agent.client(timeout=10) as c:
                deadline = time.monotonic() + 120
                while len(c.services()) < 1000:
                    if time.monotonic() > deadline:
                        raise RuntimeError("not all 1000 services answered within 120 s")
                    time.sleep(0.5)
            time.sleep(2)
            sim.control.reset_counts()
            cpu0 = proc.cpu_times()
            t0 = time.monotonic()
            time.sleep(seconds)
            cpu1 = proc.cpu_times()
            dt = time.monotonic() - t0
            rss = proc.memory_info().rss
            counts = sim.control.get_counts()
        finally:
            agent.stop()
    total = sum(v for k, v in counts.items() if k.startswith("/v1/health/service/"))
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / dt
    return {"services": 1000, "max_watches": max_watches, "rss_mib": rss / 2**20,
            "cpu_percent": cpu * 100, "req_per_s_total": total / dt,
            "req_per_min_per_service": total / dt * 60 / 1000}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rest", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 run, fewer samples, 10 s at rest")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.samples, args.rest = 1, 40, 10.0
    results = {
        "propagation": median_of([propagation(args.samples) for _ in range(args.runs)]),
        "at_rest": median_of([at_rest(20, args.rest) for _ in range(args.runs)]),
        "thousand": median_of([thousand(args.rest) for _ in range(args.runs)]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine()},
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
