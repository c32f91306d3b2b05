"""`softlb top`: a live, keyboard-driven terminal view of one agent (like htop), on rich.

It reads the admin port only: /metrics (parsed with prometheus_client's parser) for the
counters it turns into rates between two refreshes, /v1/status for the services table and
/v1/services/NAME for a service's endpoints with their state and reason. So it shows
exactly what Prometheus and `softlb status` see, and needs no access to the agent's socket.

Keys: up/down or k/j move, Enter opens a service, Esc/Backspace/h goes back, q quits.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .cli_views import ago, http_get_json


def _http_text(addr: str, path: str, timeout: float) -> str:
    import http.client

    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@dataclass
class Model:
    """What the screen shows; `refresh` fills it, `render` draws it."""

    addr: str
    status: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] | None = None
    rates: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    prev: tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]] | None = None
    cur: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    selected: int = 0
    open: str | None = None
    error: str = ""

    def refresh(self) -> None:
        try:
            _, self.status = http_get_json(self.addr, "/v1/status", 2.0)
            now = time.monotonic()
            cur = counters(_http_text(self.addr, "/metrics", 2.0))
            if self.prev is not None and now > self.prev[0]:
                dt = now - self.prev[0]
                old = self.prev[1]
                self.rates = {k: max(0.0, v - old.get(k, 0.0)) / dt for k, v in cur.items() if k in old}
            self.prev, self.cur = (now, cur), cur
            self.detail = None
            if self.open is not None:
                code, d = http_get_json(self.addr, f"/v1/services/{self.open}", 2.0)
                self.detail = d if code == 200 else None
            self.error = ""
        except (OSError, ValueError) as e:
            self.error = f"cannot read {self.addr}: {e}"

    def services(self) -> list[dict[str, Any]]:
        return list(self.status.get("services", []))

    def rate(self, name: str, **labels: str) -> float:
        return self.rates.get((name, tuple(sorted(labels.items()))), 0.0)

    def key(self, k: str) -> bool:
        """Apply one key; False to quit."""
        n = len(self.services()) if self.open is None else len((self.detail or {}).get("endpoints", []))
        if k in ("q", "Q", "\x03"):
            return False
        if k in ("down", "j"):
            self.selected = min(self.selected + 1, max(0, n - 1))
        elif k in ("up", "k"):
            self.selected = max(0, self.selected - 1)
        elif k in ("enter", "l") and self.open is None and self.services():
            self.open = self.services()[min(self.selected, n - 1)]["name"]
            self.selected = 0
            self.refresh()
        elif k in ("esc", "backspace", "h") and self.open is not None:
            names = [s["name"] for s in self.services()]
            self.selected = names.index(self.open) if self.open in names else 0
            self.open = None
        return True

    # ---------------------------------------------------------------- drawing

    def render(self) -> Group:
        st = self.status
        head = Text()
        if st:
            src = st.get("source", {})
            head.append(f"softlb {st.get('version')}  up {ago(st.get('uptime'))}  clients {st.get('clients_connected')}"
                        f"  source {src.get('kind')}: {src.get('status')}", style="bold")
            last = st.get("last_reload")
            if last and not last.get("ok"):
                head.append(f"\nlast reload REFUSED: {last.get('error')}", style="bold red")
        if self.error:
            head.append(f"\n{self.error}", style="bold red")
        body = self._services_table() if self.open is None else self._endpoints_table()
        keys = Text("up/down move  enter open  esc back  q quit" if self.open is None else
                    "up/down move  esc back  q quit", style="dim")
        return Group(head, body, keys)

    def _services_table(self) -> Table:
        t = Table(title="services", expand=True)
        for col in ("SERVICE", "POLICY", "REQ/S", "ERR/S", "ELIGIBLE", "PANIC", "STALE", "PROBLEM"):
            t.add_column(col)
        for i, s in enumerate(self.services()):
            name = s["name"]
            req = self.rate("softlb_resolves_total", service=name, code="OK") + \
                self.rate("softlb_resolves_total", service=name, code="NO_HEALTHY_ENDPOINT")
            err = self.rate("softlb_resolves_total", service=name, code="NO_HEALTHY_ENDPOINT") + \
                self.rate("softlb_reports_total", service=name, outcome="failed")
            style = "reverse" if i == self.selected else ("red" if s.get("problem") or s.get("panic") else "")
            t.add_row(name, s["policy"], f"{req:.1f}", f"{err:.1f}", f"{s['eligible']}/{s['endpoints']}",
                      "YES" if s["panic"] else "no", "yes" if s["stale"] else "no", s.get("problem") or "-",
                      style=style)
        return t

    def _endpoints_table(self) -> Table:
        name = self.open or ""
        d = self.detail or {}
        t = Table(title=f"{name}: policy {d.get('policy', '?')}, panic {'YES' if d.get('panic') else 'no'}",
                  expand=True)
        for col in ("ID", "ADDRESS", "PICKS/S", "LATENCY", "STATE", "WHY"):
            t.add_column(col)
        for i, e in enumerate(d.get("endpoints", [])):
            lbl = {"service": name, "endpoint": e["id"]}
            picks = self.rate("softlb_endpoint_picks_total", **lbl)
            n = self.rate("softlb_endpoint_latency_seconds_count", **lbl)
            lat = self.rate("softlb_endpoint_latency_seconds_sum", **lbl) / n if n else None
            why = e.get("why") or {}
            state = "served" if e.get("served") else "not served"
            style = "reverse" if i == self.selected else ("" if e.get("served") else "red")
            t.add_row(e["id"], f"{e['address']}:{e['port']}", f"{picks:.1f}",
                      "-" if lat is None else f"{lat * 1000:.1f} ms", state,
                      why.get("detail") if why.get("reason") else "-", style=style)
        return t


_KEYS = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "l", "\x1b[D": "esc", "\r": "enter", "\n": "enter",
         "\x7f": "backspace", "\x1b": "esc"}


def _read_key(fd: int, timeout: float) -> str | None:
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return None
    data = os.read(fd, 16).decode("utf-8", "replace")
    return _KEYS.get(data, data[:1])


def run_top(addr: str, interval: float = 1.0) -> int:
    if not sys.stdin.isatty():
        print("softlb top needs a terminal (for a one-shot view: softlb status)", file=sys.stderr)
        return 2
    model = Model(addr)
    model.refresh()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    console = Console()
    try:
        tty.setcbreak(fd)
        with Live(model.render(), console=console, screen=True, auto_refresh=False) as live:
            next_refresh = time.monotonic() + interval
            while True:
                k = _read_key(fd, max(0.0, next_refresh - time.monotonic()))
                if k is not None and not model.key(k):
                    break
                if time.monotonic() >= next_refresh:
                    model.refresh()
                    next_refresh = time.monotonic() + interval
                live.update(model.render(), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return 0
