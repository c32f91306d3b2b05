"""Duration strings as operators write them: "500ms", "1s", "1m30s", "2h"."""

from __future__ import annotations

import math
import re

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(us|µs|ms|s|m|h)")


def parse_duration(text: str | int | float) -> float:
    """Seconds as a float. Bare numbers are seconds; strings need a unit (Go style)."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"negative duration: {text!r}")
        if not math.isfinite(text):
            raise ValueError(f"not a duration: {text!r}")
        return float(text)
    if not isinstance(text, str):
        # A TOML list or table where a duration belongs (found by tests/core/test_fuzz_parsers.py).
        raise ValueError(f"not a duration: {type(text).__name__}")
    s = text.strip()
    pos, total = 0, 0.0
    if not s:
        raise ValueError("empty duration")
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise ValueError(f'not a duration: "{text}" (use forms like "500ms", "1s", "1m30s")')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable form; used in tables and error messages."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


def plural(n: int, word: str) -> str:
    """"1 service", "2 services": counts in messages read as English."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
