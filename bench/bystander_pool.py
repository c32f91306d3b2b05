"""Figures from bench/bystander.py runs made with --json and --samples (bench/bystander_ab.sh).

    bystander_pool.py PREFIX                  one run: PREFIX.json and PREFIX.samples
    bystander_pool.py --pool A B ROUNDS       each side's runs A.1 ... A.ROUNDS pooled

A pooled figure puts every call of a side's runs in one distribution, each call in the
phase whose window (the run's own clock) it ended in.
"""

from __future__ import annotations

import json
import statistics
import sys


def _load(prefix: str) -> tuple[dict, list[tuple[float, float, bool]]]:
    with open(prefix + ".json") as f:
        result = json.load(f)
    with open(prefix + ".samples") as f:
        samples = [(float(t), float(d), ok == "1") for t, d, ok in (line.split() for line in f)]
    return result, samples


def _in(result: dict, samples: list, phase: str) -> list[float]:
    t0, t1 = result[phase]["window"]
    return [d for t, d, ok in samples if ok and t0 <= t + d < t1]


def _figures(lat: list[float]) -> str:
    if len(lat) < 2:
        return "-"
    q = statistics.quantiles(sorted(lat), n=100)
    over = sum(d > 0.003 for d in lat) / len(lat) * 100
    return f"p50 {q[49] * 1e3:6.3f}  p99 {q[98] * 1e3:6.2f} ms  over 3 ms {over:5.2f}%  ({len(lat)} calls)"


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--pool":
        a, b, rounds = args[1], args[2], int(args[3])
        runs = {side: [_load(f"{p}.{r}") for r in range(1, rounds + 1)] for side, p in (("A", a), ("B", b))}
        phases = [k for k in runs["A"][0][0] if k != "machine"]
        for phase in phases:
            for side in "AB":
                lat = [d for result, samples in runs[side] for d in _in(result, samples, phase)]
                each = sorted(result[phase].get("p99_ms", 0) for result, _ in runs[side])
                print(f"{phase:<14}{side}  {_figures(lat)}  runs' p99 {each}")
        return
    result, samples = _load(args[0])
    for phase, r in result.items():
        if phase == "machine":
            print(f"load average {r['loadavg_1m']}; cpu groups: {r['cpu_groups']}")
            continue
        print(f"{phase:<14}{_figures(_in(result, samples, phase))}  max {r.get('max_ms', '-')} ms  "
              f"errors {r['errors']}  agent cpu {r.get('agent_cpu', '-')}")


if __name__ == "__main__":
    main()
