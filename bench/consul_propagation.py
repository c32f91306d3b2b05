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
  long_tail          the change-feed designs (consul.change_feed) on a busy datacenter:
                     1,000 configured services (max_watches=16) plus --others services the
                     agent does not watch, whose checks flip --churn times a second. Per
                     design: Consul requests/s and answer bytes/s at rest (no churn) and under
                     churn, and the p50/p99 time from a check flip of a random polled service
                     to the agent answering with it (capped at --cap seconds: "off" polls
                     984 services round robin and mostly exceeds it)

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


def _wait_all_listed(agent, n: int, timeout: float = 180) -> None:
    with agent.client(timeout=10) as c:
        deadline = time.monotonic() + timeout
        while len(c.services()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {n} services answered within {timeout} s")
            time.sleep(0.5)


def _rates(ctl, seconds: float) -> tuple[float, float]:
    ctl.reset_counts()
    time.sleep(seconds)
    counts, nbytes = ctl.get_counts(), ctl.get_bytes()
    req = sum(v for k, v in counts.items() if k.startswith("/v1/"))
    return req / seconds, sum(v for k, v in nbytes.items() if k.startswith("/v1/")) / seconds


def long_tail(design: str, rest: float, samples: int, others: int, churn: float, cap: float,
              max_watches: int = 16) -> dict[str, float]:
    import random
    import threading
    rng = random.Random(1)
    names = [f"s{i}" for i in range(1000)]
    with tempfile.TemporaryDirectory() as tmp, SimProcess() as sim:
        ctl = sim.control
        for s in names:
            ctl.add_instance(service=s, id=f"{s}-a", port=1)
        for i in range(others):
            ctl.add_instance(service=f"o{i}", id=f"o{i}-a", port=1, node=f"other-{i % 200}")
        agent = start(tmp, sim.url, agent_config(
            f"{tmp}/state", names, max_watches=str(max_watches), change_feed=f'"{design}"',
            max_fetch_rate="200", wait='"5m"'))
        stop = threading.Event()
        try:
            _wait_all_listed(agent, 1000)
            time.sleep(3)
            rest_req, rest_bytes = _rates(ctl, rest)

            def churn_loop() -> None:
                state = {}
                while not stop.wait(1.0 / churn):
                    o = f"o{rng.randrange(others)}-a"
                    state[o] = "critical" if state.get(o, "passing") == "passing" else "passing"
                    ctl.set_check(id=o, status=state[o], node=f"other-{int(o[1:-2]) % 200}")
            churner = threading.Thread(target=churn_loop, daemon=True)
            if others and churn > 0:
                churner.start()
            time.sleep(1)
            ctl.reset_counts()
            t_churn = time.monotonic()
            lat = []
            with agent.client(timeout=10) as c:
                for i in range(samples):
                    target = names[rng.randrange(max_watches, 1000)]  # a polled service
                    eps = c.endpoints(target)["endpoints"]
                    want_eligible = not eps[0]["eligible"]
                    t0 = time.perf_counter()
                    ctl.set_check(id=f"{target}-a", status="passing" if want_eligible else "critical")
                    while c.endpoints(target)["endpoints"][0]["eligible"] != want_eligible:
                        if time.perf_counter() - t0 > cap:
                            break
                        time.sleep(0.005)
                    lat.append(time.perf_counter() - t0)
                    time.sleep(0.1)
            dt = time.monotonic() - t_churn
            counts, nbytes = ctl.get_counts(), ctl.get_bytes()
        finally:
            stop.set()
            agent.stop()
    lat.sort()
    churn_req = sum(v for k, v in counts.items() if k.startswith("/v1/")) / dt
    churn_bytes = sum(v for k, v in nbytes.items() if k.startswith("/v1/")) / dt
    return {"p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "over_cap": sum(x >= cap for x in lat) / len(lat),
            "rest_req_per_s": rest_req, "rest_kib_per_s": rest_bytes / 1024,
            "churn_req_per_s": churn_req, "churn_kib_per_s": churn_bytes / 1024}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rest", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 run, fewer samples, 10 s at rest")
    ap.add_argument("--only", choices=["propagation", "at_rest", "thousand", "long_tail"], action="append")
    ap.add_argument("--designs", default="catalog_health,health_state,off")
    ap.add_argument("--others", type=int, default=2000, help="long_tail: unwatched services in the DC")
    ap.add_argument("--churn", type=float, default=20.0, help="long_tail: check flips/s on those")
    ap.add_argument("--cap", type=float, default=5.0, help="long_tail: give up on one sample after this")
    ap.add_argument("--tail-samples", type=int, default=100)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.samples, args.rest = 1, 40, 10.0
    if args.only == ["long_tail"]:
        results = {}
        # Interleaved: design A, B, C, then again, so machine noise hits all alike.
        runs: dict[str, list[dict[str, float]]] = {d: [] for d in args.designs.split(",")}
        for _ in range(args.runs):
            for d in runs:
                runs[d].append(long_tail(d, args.rest, args.tail_samples, args.others, args.churn, args.cap))
        for d, r in runs.items():
            results[f"long_tail[{d}]"] = median_of(r)
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine()}
        if args.json:
            print(json.dumps(results, indent=1))
            return
        for name, r in results.items():
            print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items()))
        return
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
