"""docs/CLIENTS.md's conformance table names every scenario the driver runs, in order, with a
cell per client, and only outcomes the generator writes."""

from __future__ import annotations

import re

from tests.conformance.runners import LANGS
from tests.conformance.table import BEGIN, DOC, END
from tests.conformance.test_scenarios import SCENARIOS


def test_the_table_has_a_row_per_scenario_and_a_column_per_client():
    doc = open(DOC).read()
    table = doc[doc.index(BEGIN) + len(BEGIN): doc.index(END)].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["scenario", "what it shows", *LANGS]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [re.sub(r"`", "", r[0]) for r in rows] == list(SCENARIOS)
    for r in rows:
        assert len(r) == 2 + len(LANGS) and set(r[2:]) <= {"pass", "FAIL", "skip"}, r
