"""Balancing policies: cost per pick, and a simulation with one slow backend.

    python bench/policies.py            # full run (a few minutes on a 2-core VM)
    python bench/policies.py --quick    # smaller, for a look
    python bench/policies.py --write    # also replace "## Policies" in docs/BENCHMARKS.md

Cost per pick: each policy is built over 10, 100 and 1,000 endpoints and timed over a batch
of picks (hash policies get a distinct key per pick, so hashing is included); the median of
several batches is reported, timeit-style. "lease" adds the on_start/on_finish pair a leased
request costs. "update" is the median cost of rebuilding for a new endpoint set.

Simulation: discrete events in simulated time (nothing sleeps). N single-server FIFO
backends, one of them 10x slower; exponential service times; Poisson arrivals at 70% of the
total capacity. Each policy picks through the Policy interface exactly as the agent drives
it: pick and on_start on arrival, on_finish with the response time on completion. The oracle
knows every backend's true mean service time and queue length: it takes the fastest idle
backend, else the one with the shortest expected wait, (queue + 1) * mean. A second oracle
always takes the shortest expected wait (so never the slow backend while a fast one will
free up sooner), for reference.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from softlb import Endpoint  # noqa: E402
from softlb.policies import POLICIES  # noqa: E402

ORACLE = "oracle"
#: A stronger oracle for reference: never the slow backend while waiting for a fast one is
#: expected to be quicker -- (queue + 1) * true mean, always.
ORACLE_WAIT = "oracle_shortest_wait"
FAST_SERVICE = 0.010  # seconds: the mean service time of a normal backend
SLOW_FACTOR = 10.0


def _endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(id=f"be{i}", address=f"10.1.{i // 250}.{i % 250 + 1}", port=9000 + i) for i in range(n)]


# ------------------------------------------------------------------------ cost per pick


@dataclass
class Cost:
    policy: str
    endpoints: int
    pick_ns: float
    lease_ns: float
    update_ms: float


def _batch(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def pick_costs(sizes=(10, 100, 1000), batch: int = 20_000, repeats: int = 7) -> list[Cost]:
    out = []
    keys = [f"key-{i}" for i in range(batch)]
    for n in sizes:
        eps = _endpoints(n)
        other = _endpoints(n + 1)[1:]  # one left, one joined: a typical update
        for name, cls in POLICIES.items():
            p = cls(rng=random.Random(1))
            p.update(eps, 0.0)
            pick = p.pick

            def picks() -> None:
                for k in keys:
                    pick(k, k, 0.0)

            def leases() -> None:
                start, finish = p.on_start, p.on_finish
                for k in keys:
                    eid = pick(k, k, 0.0).id
                    start(eid, 0.0)
                    finish(eid, True, 0.01, 0.0)

            def updates() -> None:
                p.update(other, 0.0)
                p.update(eps, 0.0)

            out.append(Cost(
                name, n,
                pick_ns=_batch(picks, repeats) / batch * 1e9,
                lease_ns=_batch(leases, repeats) / batch * 1e9,
                update_ms=_batch(updates, 3) / 2 * 1e3,
            ))
    return out


# ------------------------------------------------------------------------- simulation


@dataclass
class SimResult:
    policy: str
    p50: float
    p99: float
    slow_share: float  # fraction of requests sent to the slow backend


def simulate(policy: str, *, backends: int = 10, load: float = 0.7, requests: int = 100_000,
             seed: int = 1, warmup: float = 0.1) -> SimResult:
    """One run; the first `warmup` fraction of requests is not measured."""
    rng = random.Random(seed)  # arrivals and service times: the same for every policy
    means = [FAST_SERVICE * (SLOW_FACTOR if i == 0 else 1.0) for i in range(backends)]
    rate = load * sum(1.0 / m for m in means)
    eps = _endpoints(backends)
    index = {ep.id: i for i, ep in enumerate(eps)}
    pol = None
    if policy not in (ORACLE, ORACLE_WAIT):
        pol = POLICIES[policy](rng=random.Random(seed + 1))
        pol.update(eps, 0.0)
    free_at = [0.0] * backends  # when each backend's FIFO queue drains
    in_system = [0] * backends
    done: list[tuple[float, int, float]] = []  # (completion time, backend, response time)
    latencies = []
    to_slow = 0
    fastest_first = sorted(range(backends), key=means.__getitem__)
    now = 0.0
    for r in range(requests):
        now += rng.expovariate(rate)
        while done and done[0][0] <= now:
            t, b, lat = heapq.heappop(done)
            in_system[b] -= 1
            if pol is not None:
                pol.on_finish(eps[b].id, True, lat, t)
        if pol is None:
            b = None
            if policy == ORACLE:
                b = next((i for i in fastest_first if in_system[i] == 0), None)
            if b is None:
                b = min(range(backends), key=lambda i: (in_system[i] + 1) * means[i])
        else:
            key = f"req-{r}"
            source = f"caller-{rng.randrange(50)}"
            b = index[pol.pick(key, source, now).id]
            pol.on_start(eps[b].id, now)
        service = rng.expovariate(1.0 / means[b])
        finish = max(now, free_at[b]) + service
        free_at[b] = finish
        in_system[b] += 1
        heapq.heappush(done, (finish, b, finish - now))
        if r >= warmup * requests:
            latencies.append(finish - now)
            to_slow += b == 0
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, math.ceil(f * len(latencies)) - 1)]  # noqa: E731
    return SimResult(policy, q(0.5), q(0.99), to_slow / len(latencies))


def simulate_all(requests: int, seed: int = 1) -> list[SimResult]:
    return [simulate(name, requests=requests, seed=seed) for name in [ORACLE, ORACLE_WAIT, *POLICIES]]


# ----------------------------------------------------------------------------- report


def render(costs: list[Cost], sims: list[SimResult], command: str, requests: int) -> str:
    sizes = sorted({c.endpoints for c in costs})
    by = {(c.policy, c.endpoints): c for c in costs}
    lines = [
        "## Policies",
        "",
        f"Machine: {platform.machine()} VM with {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Command: `{command}` (bench/policies.py; its docstring describes the method).",
        "",
        "### Cost per pick",
        "",
        "Median of 7 batches of 20,000 picks. *pick*: `pick()` alone, hash policies hashing a",
        "distinct key each time; *lease*: `pick` + `on_start` + `on_finish`, the full cost of one",
        "leased request; *update*: rebuilding for a changed endpoint set (one left, one joined).",
        "",
        "| policy | " + " | ".join(f"pick @{n}" for n in sizes) + " | "
        + " | ".join(f"lease @{n}" for n in sizes) + " | " + " | ".join(f"update @{n}" for n in sizes) + " |",
        "|---" * (1 + 3 * len(sizes)) + "|",
    ]
    for name in POLICIES:
        row = [name]
        row += [f"{by[name, n].pick_ns / 1000:.2f} µs" for n in sizes]
        row += [f"{by[name, n].lease_ns / 1000:.2f} µs" for n in sizes]
        row += [f"{by[name, n].update_ms:.2f} ms" for n in sizes]
        lines.append("| " + " | ".join(row) + " |")
    oracle = next(s for s in sims if s.policy == ORACLE)
    lines += [
        "",
        "### One slow backend: p99 latency against an oracle",
        "",
        f"10 single-server FIFO backends, mean service {FAST_SERVICE * 1e3:.0f} ms, one of them "
        f"{SLOW_FACTOR:.0f}x slower ({FAST_SERVICE * SLOW_FACTOR * 1e3:.0f} ms);",
        "exponential service times, Poisson arrivals at 70% of total capacity, "
        f"{requests:,} requests (first 10% not measured),",
        "simulated time, fixed seed. Hash policies get a distinct key per request (source_hash: one of",
        "50 callers). The oracle knows true speeds and queue lengths and takes the fastest idle backend",
        "(the slow one too, when every fast one is busy), else the shortest expected wait",
        "(queue + 1) x mean; `oracle_shortest_wait` always takes the shortest expected wait. Policies",
        "whose share of the slow backend exceeds its capacity (it can serve ~1.1% of requests at this",
        "load; a blind policy sends it 10%) build an unbounded queue there; their p99 grows with the",
        "length of the run.",
        "",
        "| policy | p50 | p99 | p99 / oracle p99 | share sent to the slow backend |",
        "|---|---|---|---|---|",
    ]
    for s in sims:
        lines.append(
            f"| {s.policy} | {_secs(s.p50)} | {_secs(s.p99)} | {s.p99 / oracle.p99:,.2f} | {s.slow_share:.2%} |"
        )
    by_name = {s.policy: s for s in sims}
    lr, rr = by_name["least_request"], by_name["round_robin"]
    strong = by_name[ORACLE_WAIT]
    lines += [
        "",
        f"least_request's p99 is {lr.p99 / oracle.p99:.2f}x the oracle's ({lr.p99 / strong.p99:.2f}x the "
        f"shortest-wait oracle's); round robin's is {rr.p99 / oracle.p99:,.0f}x.",
    ]
    return "\n".join(lines) + "\n"


def _secs(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:,.0f} s"


def write_section(path: Path, section: str) -> None:
    """Replace the "## Policies" section (up to the next "## ") of the file, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("\n## Policies\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and batches")
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    requests = 20_000 if args.quick else 200_000
    costs = pick_costs(batch=2_000 if args.quick else 20_000, repeats=3 if args.quick else 7)
    sims = simulate_all(requests)
    cmd = "python bench/policies.py" + (" --quick" if args.quick else "") + " --write"
    report = render(costs, sims, cmd, requests)
    print(report)
    if args.write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
