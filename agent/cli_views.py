"""What the CLI prints for `status`, `endpoints` and `watch`, and the hints it gives when
pointed at the wrong port. Pure formatting over the JSON the agent returns, so every view
is the same data as `--json`."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
from typing import Any, Sequence

DEFAULT_ADMIN = "127.0.0.1:7071"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def yn(v: Any) -> str:
    return "yes" if v else "no"


def ago(seconds: float | None) -> str:
    from softlb import format_duration

    return "-" if seconds is None else format_duration(max(0.0, seconds))


def clock(t: float | None = None) -> str:
    """A local wall-clock time stamp with the offset: what an operator lines up with logs."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).astimezone().isoformat(timespec="seconds") \
        if t is not None else datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------ status


def admin_address(arg: str | None) -> str:
    return arg or os.environ.get("SOFTLB_ADMIN") or DEFAULT_ADMIN


def http_get_json(addr: str, path: str, timeout: float) -> tuple[int, Any]:
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}", "Accept": "application/json"})
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(body)
    except ValueError:
        raise OSError(f"{addr} answered HTTP {r.status} but not JSON: is it softlb's admin port?") from None


def format_status(st: dict[str, Any]) -> str:
    src = st["source"]
    verdict = "ok" if st["ready"] and src["up"] and not any(s.get("problem") for s in st["services"]) else "PROBLEM"
    lines = [
        f"softlb {st['version']}  pid {st['pid']}  up {ago(st['uptime'])}  (since {clock(st['started'])})  "
        f"health: {verdict}",
        f"source   {src['kind']}: {src['status']}" + ("" if src["up"] else "  <- not answering")
        + (f"; data age {ago(src['data_age'])}" if src.get("data_age") is not None else ""),
    ]
    if src.get("stale_services"):
        lines.append(f"stale    serving old data for: {', '.join(src['stale_services'])}")
    last = st.get("last_reload")
    if last is None:
        lines.append("reload   none since start")
    else:
        what = f"{last['what']} at {clock(last['at'])}"
        lines.append(f"reload   {what}: ok" if last["ok"] else f"reload   {what}: REFUSED: {last['error']}")
    if st.get("problem"):
        lines.append(f"ready    NO: {st['problem']}")
    here = st.get("agent") or {}
    where = ", ".join(f"{k} {v}" for k, v in here.items() if v) or "no locality labels (--node/--zone/--region)"
    lines.append(f"agent    {where}")
    ls = st["listeners"]
    lines.append("listen   " + ", ".join(f"{k} {v}" for k, v in ls.items() if v) + f"; clients connected "
                 f"{st['clients_connected']}")
    rec = st.get("errors_recent") or {}
    errs = ", ".join(f"{k} {v}" for k, v in st["errors"].items()) or "none"
    lines.append(f"errors   {rec.get('count', 0)} in the last {ago(rec.get('seconds'))}; since start: {errs}")
    lines.append("")
    rows = [(s["name"], s["policy"], f"{s['eligible']}/{s['endpoints']}", s.get("served", "-"), yn(s["panic"]), yn(s["stale"]),
             s.get("problem") or "-") for s in st["services"]]
    lines.append(table(rows, ("SERVICE", "POLICY", "ELIGIBLE", "SERVED", "PANIC", "STALE", "PROBLEM")))
    return "\n".join(lines)


# ------------------------------------------------------------------------ endpoints


def _probe_cells(h: dict[str, Any]) -> tuple[str, str]:
    """PROBE (state and current streak) and LAST PROBE (result, age, detail)."""
    if h.get("probe") is None:
        return "-", "-"
    if h.get("last_probe_ok") is None:
        return h["probe"], "none yet"
    word = "ok" if h["last_probe_ok"] else "fail"
    last = f"{word} {ago(h['last_probe_age'])} ago"
    if h.get("last_probe_detail"):
        last += f": {h['last_probe_detail']}"
    return f"{h['probe']} ({h['probe_streak']}x {word})", last


def _ejection_cell(h: dict[str, Any]) -> str:
    count = h.get("ejections", 0)
    if h.get("ejected"):
        return f"yes, {ago(h['ejected_remaining'])} left (#{count})"
    return f"no ({count} before)" if count else "no"


def why_text(e: dict[str, Any]) -> str:
    why = e.get("why") or {}
    if why.get("reason") in (None, ""):
        return "-"
    return str(why.get("detail") or why.get("reason"))


def format_endpoints(d: dict[str, Any]) -> str:
    eps = d.get("endpoints", [])
    panic = yn(d.get("panic"))
    if d.get("panic_threshold") is not None:
        eligible = sum(1 for e in eps if e.get("eligible"))
        panic += f" ({eligible}/{len(eps)} eligible, threshold {d['panic_threshold']}%)"
    head = f"service {d['service']}  policy {d['policy']}  panic {panic}  stale {yn(d.get('stale'))}"
    if d.get("age") is not None and d.get("stale"):
        head += f" (data age {d['age']:.1f}s)"
    filters = []
    if d.get("tags"):
        filters.append(f"tags {','.join(d['tags'])}")
    if d.get("locality"):
        here = d.get("here") or {}
        mine = ", ".join(f"{k} {v}" for k, v in here.items() if v) or "no labels"
        level = d.get("locality_level") or "none matched"
        filters.append(f"locality {','.join(d['locality'])} (agent: {mine}; serving: {level})")
    if filters:
        head += "\n" + "  ".join(filters)
    # RANK (the source's nearest-first order) only when the source gives one.
    ranked = any(e.get("rank") is not None for e in eps)
    rows = []
    for e in eps:
        h = e.get("health") or {}
        probe, last = _probe_cells(h) if h else ("-", "-")
        rank = ("-" if e.get("rank") is None else e["rank"],) if ranked else ()
        rows.append((e["id"], f"{e['address']}:{e['port']}", e.get("weight"), e.get("registry", ""), probe, last,
                     _ejection_cell(h) if h else "-", yn(e.get("eligible")), yn(e.get("served", e.get("eligible"))),
                     ",".join(e.get("tags") or ()) or "-", e.get("zone") or "-", *rank, why_text(e)))
    return head + "\n" + table(rows, ("ID", "ADDRESS", "WEIGHT", "REGISTRY", "PROBE", "LAST PROBE", "EJECTED",
                                       "ELIGIBLE", "SERVED", "TAGS", "ZONE", *(("RANK",) if ranked else ()), "WHY"))


# ------------------------------------------------------------------------ watch


def _state(e: dict[str, Any]) -> str:
    why = e.get("why") or {}
    if e.get("served"):
        return "served" + (f" ({why['reason']})" if why.get("reason") else "")
    return f"not served ({why.get('detail') or why.get('reason') or 'unknown'})"


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed between two `endpoints` views: joined, left, state changes, panic/stale."""
    if after.get("removed"):
        return [{"kind": "removed"}]
    old = {e["id"]: e for e in (before or {}).get("endpoints", [])}
    new = {e["id"]: e for e in after.get("endpoints", [])}
    out: list[dict[str, Any]] = []
    if before is None:
        return [{"kind": "initial", "endpoints": len(new), "served": sum(1 for e in new.values() if e.get("served"))}]
    for k in ("panic", "stale"):
        if bool(before.get(k)) != bool(after.get(k)):
            out.append({"kind": k, "from": bool(before.get(k)), "to": bool(after.get(k))})
    for eid, e in new.items():
        if eid not in old:
            out.append({"kind": "joined", "endpoint": eid, "address": f"{e['address']}:{e['port']}", "to": _state(e)})
        elif _state(old[eid]) != _state(e):
            out.append({"kind": "changed", "endpoint": eid, "from": _state(old[eid]), "to": _state(e)})
    for eid in old:
        if eid not in new:
            out.append({"kind": "left", "endpoint": eid})
    return out


def format_change(c: dict[str, Any]) -> str:
    k = c["kind"]
    if k == "initial":
        return f"{c['endpoints']} endpoints, {c['served']} served"
    if k in ("panic", "stale"):
        return f"{k}: {yn(c['from'])} -> {yn(c['to'])}"
    if k == "joined":
        return f"+ {c['endpoint']} joined ({c['address']}): {c['to']}"
    if k == "left":
        return f"- {c['endpoint']} left"
    if k == "removed":
        return "the service was removed from the catalog"
    return f"~ {c['endpoint']}: {c['from']} -> {c['to']}"


def watch_line(service: str, before: dict[str, Any] | None, after: dict[str, Any], as_json: bool) -> str:
    cs = changes(before, after)
    now = clock()
    if as_json:
        return json.dumps({"time": now, "service": service, "version": after.get("version"), "changes": cs,
                           "state": after})
    head = f"{now}  {service}  v{after.get('version')}"
    if before is None:
        return f"{head}  {format_change(cs[0])}\n{format_endpoints(after)}\n"
    if not cs:
        return f"{head}  (no visible change)"
    return head + "\n" + "\n".join("  " + format_change(c) for c in cs)


# ------------------------------------------------------------------------ wrong port


def speaks_http(addr: str, timeout: float = 0.5) -> bool:
    """Whether HOST:PORT answers an HTTP request (the admin port given as --addr)."""
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except (OSError, ValueError):
        return False
