"""The bench's slow-backend simulation, as a regression check of its conclusion.

It runs in simulated time with fixed seeds, so the numbers are deterministic: these are
assertions about the algorithms, not about how fast this machine is.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "policies.py"
    spec = importlib.util.spec_from_file_location("softlb_bench_policies", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_least_request_tracks_the_oracle_and_round_robin_does_not() -> None:
    bench = _bench()
    oracle = bench.simulate(bench.ORACLE, requests=20_000)
    lr = bench.simulate("least_request", requests=20_000)
    rr = bench.simulate("round_robin", requests=20_000)
    assert lr.p99 / oracle.p99 < rr.p99 / oracle.p99
    assert lr.p99 / oracle.p99 < 1.5
    assert rr.p99 / oracle.p99 > 1.5
    assert lr.slow_share < 0.02 < rr.slow_share


def test_section_is_replaced_in_place(tmp_path: Path) -> None:
    bench = _bench()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Wire\nkeep me\n\n## Policies\nold\n\n## Proxy\nkeep me too\n")
    bench.write_section(doc, "## Policies\nnew\n")
    assert doc.read_text() == "# Benchmarks\n\n## Wire\nkeep me\n\n## Policies\nnew\n\n## Proxy\nkeep me too\n"
    bench.write_section(tmp_path / "fresh.md", "## Policies\nx\n")
    assert (tmp_path / "fresh.md").read_text() == "# Benchmarks\n\n## Policies\nx\n"
