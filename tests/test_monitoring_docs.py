"""docs/monitoring/ stays true: the alert rules pass `promtool check rules`, the dashboard's
queries are valid PromQL (checked by promtool too, wrapped as recording rules), and every
metric name they use is one the agent exports; the README's table lists every family."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent.admin import ask, render_metrics
from softlb_agent.runtime import Runtime

DOCS = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
RULES = DOCS / "alerts.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"
#: Names a query may use that the agent does not export (Prometheus' own).
OUTSIDE = {"up"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus, "
                                                             "listed in .ci/apt-packages)")


def exported() -> tuple[set[str], set[str]]:
    """(sample names, family names) the agent exports, every family with samples."""
    async def main():
        rt = Runtime(AgentConfig(), None, random.Random(1))
        now = trio.current_time()
        rt.engine.replace_all(parse_catalog_text('[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = 1\n'), now)
        le = rt.engine.pick("web", now)
        rt.engine.finish(le.lease, now, ok=True, latency=0.01)
        rt.source_confirmed_at = now
        await ask(rt, {"op": "resolve", "service": "nope"}, "test")  # an error, for softlb_errors_total
        return render_metrics(rt)

    text = trio.run(main)
    fams = list(text_string_to_metric_families(text))
    return {s.name for f in fams for s in f.samples}, {f.name for f in fams}


def dashboard_queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


def rule_queries() -> list[str]:
    return re.findall(r"^\s+expr:\s*(.+)$", RULES.read_text(), flags=re.M)


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?=\s*[{\[)]|\s*(?:==|>|<|/|and|$))", expr))
    return {w for w in words if w.startswith(("softlb_", "process_")) or w in OUTSIDE}


def test_every_metric_name_in_rules_and_dashboard_is_exported():
    samples, _ = exported()
    used = set()
    for q in rule_queries() + dashboard_queries():
        used |= metric_names(q)
    assert len(used) > 15
    assert used - samples - OUTSIDE == set()


def test_monitoring_readme_lists_every_family():
    _, families = exported()
    text = (DOCS / "README.md").read_text()
    missing = {f for f in families if f.startswith("softlb_") and f"`{f}" not in text and f"`{f}_total`" not in text}
    assert missing == set()


@needs_promtool
def test_alert_rules_pass_promtool():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    subst = {"$__rate_interval": "5m", "$instance": ".*", "$service": ".*"}
    rules = []
    for i, q in enumerate(dashboard_queries()):
        for k, v in subst.items():
            q = q.replace(k, v)
        rules.append({"record": f"dashboard:query_{i}", "expr": q})
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
