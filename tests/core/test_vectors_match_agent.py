"""The committed vectors are what the generator (the agent's own encoder) produces."""

import subprocess
import sys
from pathlib import Path

GEN = Path(__file__).resolve().parents[1] / "wire_vectors" / "generate.py"


def test_vectors_file_is_up_to_date():
    r = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, "tests/wire_vectors/vectors.json is stale: run python tests/wire_vectors/generate.py"
