"""The simulated Consul catalog: nodes, service instances, checks, raft-like indexes, faults.

One lock (a Condition) guards everything; HTTP handler threads block on it for blocking
queries, and every write calls `notify_all`. Indexes follow Consul's shape closely enough
for clients to be tested against: a global counter that every write bumps, a per-service
index (the last write touching that service, which is what `/v1/health/service/<name>`
reports and blocks on) and a catalog index (service set or tags changed) for
`/v1/catalog/services`. Methods marked `@control` are the test-control API, callable
in-process or over HTTP as `POST /_sim/<method>` with JSON keyword arguments.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from .coordinates import DIMENSIONS, Coordinate

CONTROL_METHODS: set[str] = set()

#: The node that `/v1/agent/*` registrations land on (the "local agent" of the simulation).
AGENT_NODE = "sim-agent"
MAINT_PREFIX = "_service_maintenance:"
DEFAULT_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)


def control(fn: Callable[..., Any]) -> Callable[..., Any]:
    CONTROL_METHODS.add(fn.__name__)
    return fn


@dataclass
class Node:
    name: str
    address: str
    meta: dict[str, str] = field(default_factory=dict)
    tagged: dict[str, str] = field(default_factory=dict)


@dataclass
class Instance:
    node: str
    id: str
    service: str
    address: str = ""
    port: int = 0
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    tagged: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str = "critical"
    output: str = ""
    notes: str = ""
    service_id: str = ""
    kind: str = "external"  # external (set by tests), ttl, http, tcp, maintenance, serf
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 10.0
    target: str = ""
    method: str = "GET"
    last_update: float = 0.0
    next_run: float = 0.0
    modify_index: int = 1


@dataclass
class Fault:
    mode: str  # "stall", "500", "garbage", "drop", "429", "endless"
    prefix: str
    remaining: int | None
    body: str
    retry_after: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class ConsulSim:
    def __init__(self, *, seed: int | None = None, start_index: int = 10) -> None:
        self.cond = threading.Condition()
        self.rng = random.Random(seed)
        self.index = start_index
        self.catalog_index = start_index
        self.service_index: dict[str, int] = {}
        #: bumped on a simulated snapshot restore: ends every blocking wait (Consul does too)
        self.epoch = 0
        self.nodes: dict[str, Node] = {}
        self.instances: dict[tuple[str, str], Instance] = {}
        self.checks: dict[tuple[str, str], Check] = {}
        self.faults: list[Fault] = []
        self.acl_token = ""
        #: valid tokens without service:read/node:read: reads are filtered to nothing (with
        #: X-Consul-Results-Filtered-By-ACLs), writes get 403 (agent/acl.go filtering)
        self.acl_filtered_tokens: set[str] = set()
        #: index of the checks table (what /v1/health/state/* reports and blocks on)
        self.checks_index = start_index
        #: "blocking-query" or "streaming" (agent config use_streaming_backend)
        self.backend = "blocking-query"
        #: agent cache (?cached): request key -> (value, index); set_servers_lost freezes it
        self.cache: dict[str, tuple[Any, int]] = {}
        self.servers_lost_at: float | None = None
        self.datacenter = "dc1"
        self.known_leader = True
        self.last_contact_ms = 0
        self.max_query_time = 600.0
        self.default_query_time = 300.0
        self.counts: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()  # response body bytes by path
        self.log: deque[tuple[float, str, str]] = deque(maxlen=5000)
        self.closing = False
        #: network coordinates by node (coordinates.py): the `?near=` sort reads them
        self.coords: dict[str, Coordinate] = {}
        self._add_node(AGENT_NODE, "127.0.0.1")

    # ------------------------------------------------------------------ index plumbing

    def _bump(self, services: set[str] | frozenset[str] = frozenset(), catalog: bool = False,
              checks: bool = True) -> None:
        """One raft write. `catalog`: the services table changed (any instance written, as
        catalog/services' index moves); `checks`: the checks table changed."""
        self.index += 1
        for s in services:
            self.service_index[s] = self.index
        if catalog:
            self.catalog_index = self.index
        if checks:
            self.checks_index = self.index
        self.cond.notify_all()

    def _services_on(self, node: str) -> set[str]:
        return {i.service for (n, _), i in self.instances.items() if n == node}

    def health_index(self, service: str) -> int:
        return max(1, self.service_index.get(service, self.catalog_index))

    # ------------------------------------------------------------------ queries

    def health_entries(self, service: str, tags: list[str], passing: bool,
                       node_meta: dict[str, str] | None = None) -> list[dict[str, Any]]:
        out = []
        for (node_name, sid), inst in sorted(self.instances.items()):
            # ?tag= matches case-insensitively (strings.EqualFold in the catalog's filter)
            have = {t.casefold() for t in inst.tags}
            if inst.service != service or any(t.casefold() not in have for t in tags):
                continue
            if node_meta and any(self.nodes[node_name].meta.get(k) != v for k, v in node_meta.items()):
                continue
            node = self.nodes[node_name]
            checks = [c for (n, _), c in sorted(self.checks.items())
                      if n == node_name and c.service_id in ("", sid)]
            if passing and any(c.status != "passing" for c in checks):
                continue
            out.append({
                "Node": {"ID": f"id-{node.name}", "Node": node.name, "Address": node.address,
                         "Datacenter": "dc1", "TaggedAddresses": dict(node.tagged) or None,
                         "Meta": dict(node.meta) or None, "CreateIndex": 1, "ModifyIndex": 1},
                "Service": self._service_json(inst),
                "Checks": [self._check_json(c, inst) for c in checks],
            })
        return out

    def _service_json(self, inst: Instance) -> dict[str, Any]:
        return {"ID": inst.id, "Service": inst.service, "Tags": list(inst.tags),
                "Address": inst.address, "TaggedAddresses": dict(inst.tagged) or None,
                "Meta": dict(inst.meta) or None, "Port": inst.port,
                "Weights": dict(inst.weights), "EnableTagOverride": False,
                "CreateIndex": 1, "ModifyIndex": self.service_index.get(inst.service, 1)}

    def _check_json(self, c: Check, inst: Instance | None) -> dict[str, Any]:
        svc = inst if inst and c.service_id else None
        return {"Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
                "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
                "ServiceName": svc.service if svc else "",
                "ServiceTags": list(svc.tags) if svc else [],
                "Type": {"ttl": "ttl", "http": "http", "tcp": "tcp"}.get(c.kind, ""),
                "CreateIndex": 1, "ModifyIndex": c.modify_index}

    def checks_in_state(self, state: str) -> list[dict[str, Any]]:
        """/v1/health/state/<state>: every check in the datacenter ("any": all states)."""
        return [self._check_json(c, self.instances.get((n, c.service_id)) if c.service_id else None)
                for (n, _), c in sorted(self.checks.items()) if state == "any" or c.status == state]

    def catalog_services(self) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {}
        for inst in self.instances.values():
            out.setdefault(inst.service, set()).update(inst.tags)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def agent_services(self) -> dict[str, Any]:
        return {sid: self._service_json(i) for (n, sid), i in sorted(self.instances.items())
                if n == AGENT_NODE}

    def agent_checks(self) -> dict[str, Any]:
        return {cid: self._check_json(c, self.instances.get((AGENT_NODE, c.service_id)))
                for (n, cid), c in sorted(self.checks.items()) if n == AGENT_NODE}

    def take_fault(self, path: str) -> Fault | None:
        for f in self.faults:
            if path.startswith(f.prefix):
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self.faults.remove(f)
                return f
        return None

    # ------------------------------------------------------------------ control API

    def _add_node(self, name: str, address: str, meta: dict[str, str] | None = None,
                  tagged: dict[str, str] | None = None) -> None:
        self.nodes[name] = Node(name, address, dict(meta or {}), dict(tagged or {}))
        self.checks[(name, "serfHealth")] = Check(
            name, "serfHealth", "Serf Health Status", "passing", "Agent alive and reachable",
            kind="serf")

    @control
    def add_node(self, name: str, address: str, meta: dict[str, str] | None = None,
                 tagged: dict[str, str] | None = None) -> None:
        with self.cond:
            self._add_node(name, address, meta, tagged)
            self._bump(self._services_on(name))

    @control
    def set_node(self, name: str, address: str | None = None, meta: dict[str, str] | None = None,
                 health: str | None = None) -> None:
        """Change a node's address, meta, or its serfHealth status."""
        with self.cond:
            node = self.nodes[name]
            if address is not None:
                node.address = address
            if meta is not None:
                node.meta = dict(meta)
            if health is not None:
                self.checks[(name, "serfHealth")].status = health
            self._bump(self._services_on(name), checks=health is not None)
            if health is not None:
                self.checks[(name, "serfHealth")].modify_index = self.index

    @control
    def set_coordinate(self, node: str, rtt: float | None = None, vec: list[float] | None = None,
                       height: float = 0.0, adjustment: float = 0.0) -> None:
        """Give `node` a network coordinate: `rtt` seconds from the origin (Consul's
        GenerateCoordinate), or a full Vivaldi `vec`; neither removes it. Moves no index:
        coordinates are their own table, which health queries do not watch."""
        with self.cond:
            if rtt is None and vec is None:
                self.coords.pop(node, None)
            elif vec is not None:
                if len(vec) != DIMENSIONS:
                    raise ValueError(f"vec: {DIMENSIONS} numbers, got {len(vec)}")
                self.coords[node] = Coordinate(tuple(float(x) for x in vec), height, adjustment)
            else:
                assert rtt is not None
                self.coords[node] = replace(Coordinate.at_rtt(rtt), height=height, adjustment=adjustment)

    @control
    def add_instance(self, service: str, id: str | None = None, node: str = "node-1",
                     address: str = "", port: int = 0, tags: list[str] | None = None,
                     meta: dict[str, str] | None = None, weights: dict[str, int] | None = None,
                     tagged: dict[str, dict[str, Any]] | None = None,
                     status: str = "passing", node_address: str = "127.0.0.1") -> str:
        """Add (or replace) an instance with one test-controlled check `service:<id>`."""
        sid = id or f"{service}-{len(self.instances) + 1}"
        with self.cond:
            if node not in self.nodes:
                self._add_node(node, node_address)
            self.instances[(node, sid)] = Instance(
                node, sid, service, address, port, list(tags or []), dict(meta or {}),
                dict(weights or {"Passing": 1, "Warning": 1}), dict(tagged or {}))
            self.checks[(node, f"service:{sid}")] = Check(
                node, f"service:{sid}", f"Service '{service}' check", status, service_id=sid)
            self._bump({service}, catalog=True)
            self.checks[(node, f"service:{sid}")].modify_index = self.index
        return sid

    @control
    def update_instance(self, id: str, node: str = "node-1", **changes: Any) -> None:
        with self.cond:
            inst = self.instances[(node, id)]
            for k, v in changes.items():
                if not hasattr(inst, k) or k in ("node", "id", "service"):
                    raise KeyError(f"cannot update {k!r}")
                setattr(inst, k, v)
            # A service write: the services table (catalog/services' index) moves. The checks
            # table only moves if the checks' copy of the service changes: ServiceTags
            # (state/catalog.go ensureCheckTxn copies name and tags, skips IsSame checks).
            tags = "tags" in changes
            self._bump({inst.service}, catalog=True, checks=tags)
            if tags:
                for c in self.checks.values():
                    if c.node == node and c.service_id == id:
                        c.modify_index = self.index

    @control
    def remove_instance(self, id: str, node: str = "node-1") -> None:
        with self.cond:
            inst = self.instances.pop((node, id))
            for key in [k for k, c in self.checks.items() if k[0] == node and c.service_id == id]:
                del self.checks[key]
            self._bump({inst.service}, catalog=True)

    @control
    def set_check(self, id: str, status: str, output: str = "", node: str = "node-1") -> None:
        """Set a check's status; `id` may be a check id or a service id (its `service:<id>`)."""
        with self.cond:
            c = self.checks.get((node, id)) or self.checks[(node, f"service:{id}")]
            c.status, c.output = status, output
            self._bump(self._services_for_check(c))
            c.modify_index = self.index

    def _services_for_check(self, c: Check) -> set[str]:
        if not c.service_id:
            return self._services_on(c.node)
        inst = self.instances.get((c.node, c.service_id))
        return {inst.service} if inst else set()

    @control
    def bump_index(self, service: str | None = None) -> int:
        """A write that changes nothing (Consul does these); wakes blocking queries."""
        with self.cond:
            self._bump({service} if service else set(self.service_index), catalog=service is None,
                       checks=service is None)
            return self.index

    @control
    def set_index(self, index: int) -> None:
        """Move every index to `index` (a snapshot restore when lower) and end all waits."""
        with self.cond:
            self.index = index
            self.catalog_index = min(self.catalog_index, index)
            for s, i in self.service_index.items():
                self.service_index[s] = min(i, index)
            self.epoch += 1
            self.cond.notify_all()

    @control
    def set_fault(self, mode: str, prefix: str = "/v1/health/", count: int | None = None,
                  body: str = "<html><body>502 Bad Gateway</body></html>", retry_after: str = "",
                  headers: dict[str, str] | None = None) -> None:
        """`429`: Consul's rate limit, empty body, `Retry-After: <retry_after>` if given;
        `endless`: 200 with a valid index and a body that never ends (chunked);
        `headers`: the normal answer with these headers replaced (hostile header values)."""
        if mode not in ("stall", "500", "garbage", "drop", "429", "endless", "headers"):
            raise ValueError(f"unknown fault {mode!r}")
        with self.cond:
            self.faults.append(Fault(mode, prefix, count, body, retry_after, dict(headers or {})))
            self.cond.notify_all()

    @control
    def set_acl_filtered(self, tokens: list[str]) -> None:
        """Valid tokens that lack read permission: reads answer 200 filtered to nothing."""
        with self.cond:
            self.acl_filtered_tokens = set(tokens)

    @control
    def set_backend(self, backend: str) -> None:
        """"streaming" (Consul >= 1.10's default for blocking health reads) or "blocking-query"."""
        if backend not in ("streaming", "blocking-query"):
            raise ValueError(f"unknown backend {backend!r}")
        with self.cond:
            self.backend = backend

    @control
    def set_servers_lost(self, lost: bool = True) -> None:
        """The local agent loses (or regains) its servers: RPC reads fail with 500, the
        agent cache keeps serving its last values with a growing Age."""
        with self.cond:
            self.servers_lost_at = time.monotonic() if lost else None
            self.epoch += 1
            self.cond.notify_all()

    @control
    def clear_faults(self) -> None:
        with self.cond:
            self.faults.clear()
            self.cond.notify_all()

    @control
    def set_acl(self, token: str) -> None:
        """Require this token on every /v1 request ("" turns ACLs off)."""
        with self.cond:
            self.acl_token = token

    @control
    def set_leader(self, known: bool = True, last_contact_ms: int = 0) -> None:
        with self.cond:
            self.known_leader, self.last_contact_ms = known, last_contact_ms

    @control
    def get_counts(self) -> dict[str, int]:
        with self.cond:
            return dict(self.counts)

    @control
    def get_log(self) -> list[tuple[float, str, str]]:
        with self.cond:
            return list(self.log)

    @control
    def get_bytes(self) -> dict[str, int]:
        with self.cond:
            return dict(self.bytes_out)

    @control
    def reset_counts(self) -> None:
        with self.cond:
            self.counts.clear()
            self.bytes_out.clear()
            self.log.clear()

    @control
    def dump(self) -> dict[str, Any]:
        with self.cond:
            return {"index": self.index, "service_index": dict(self.service_index),
                    "instances": [asdict(i) for i in self.instances.values()],
                    "checks": [asdict(c) for c in self.checks.values()]}

    # ------------------------------------------------------------------ agent endpoints

    def register(self, svc: dict[str, Any], checks: list[dict[str, Any]], replace_checks: bool) -> None:
        """`svc`/`checks` already normalised (lower-case keys, no underscores) and validated."""
        now = time.monotonic()
        sid = svc["id"]
        with self.cond:
            old = self.instances.get((AGENT_NODE, sid))
            self.instances[(AGENT_NODE, sid)] = Instance(
                AGENT_NODE, sid, svc["name"], svc["address"], svc["port"], svc["tags"],
                svc["meta"], svc["weights"], svc["tagged"])
            listed = set()
            for c in checks:
                key = (AGENT_NODE, c["checkid"])
                listed.add(c["checkid"])
                prev = self.checks.get(key)
                self.checks[key] = Check(
                    AGENT_NODE, c["checkid"], c["name"],
                    # Re-registering keeps a known check's status, like the agent's local state.
                    prev.status if prev else c["status"], prev.output if prev else "",
                    c["notes"], sid, c["kind"], c["ttl"], c["interval"], c["timeout"], c["target"],
                    c["method"], last_update=now, next_run=now)
            if replace_checks:
                for key in [k for k, c in self.checks.items() if k[0] == AGENT_NODE
                            and c.service_id == sid and k[1] not in listed
                            and not k[1].startswith(MAINT_PREFIX)]:
                    del self.checks[key]
            services = {svc["name"]} | ({old.service} if old else set())
            self._bump(services, catalog=True, checks=bool(checks) or replace_checks)
            for c in checks:
                self.checks[(AGENT_NODE, c["checkid"])].modify_index = self.index

    def deregister(self, sid: str) -> bool:
        with self.cond:
            inst = self.instances.pop((AGENT_NODE, sid), None)
            if inst is None:
                return False
            for key in [k for k, c in self.checks.items() if k[0] == AGENT_NODE and c.service_id == sid]:
                del self.checks[key]
            self._bump({inst.service}, catalog=True)
            return True

    def update_ttl(self, check_id: str, status: str, note: str) -> bool | None:
        """None: no such check; False: not a TTL check."""
        with self.cond:
            c = self.checks.get((AGENT_NODE, check_id))
            if c is None:
                return None
            if c.kind != "ttl":
                return False
            c.last_update = time.monotonic()
            if (c.status, c.output) != (status, note):
                c.status, c.output = status, note
                self._bump(self._services_for_check(c))
                c.modify_index = self.index
            return True

    def maintenance(self, sid: str, enable: bool, reason: str) -> bool:
        with self.cond:
            inst = self.instances.get((AGENT_NODE, sid))
            if inst is None:
                return False
            key = (AGENT_NODE, MAINT_PREFIX + sid)
            if enable and key not in self.checks:
                self.checks[key] = Check(AGENT_NODE, key[1], "Service Maintenance Mode", "critical",
                                         notes=reason or DEFAULT_MAINT_REASON, service_id=sid,
                                         kind="maintenance", modify_index=self.index + 1)
                self._bump({inst.service})
            elif not enable and key in self.checks:
                del self.checks[key]
                self._bump({inst.service})
            return True

    # ------------------------------------------------------------------ time-driven checks

    def due_checks(self, now: float) -> list[Check]:
        """Expire TTLs (under the lock) and return HTTP/TCP checks whose probe is due."""
        due = []
        with self.cond:
            for c in self.checks.values():
                if c.kind == "ttl" and c.status != "critical" and now - c.last_update > c.ttl:
                    c.status, c.output = "critical", "TTL expired"
                    self._bump(self._services_for_check(c))
                    c.modify_index = self.index
                elif c.kind in ("http", "tcp") and now >= c.next_run:
                    c.next_run = now + c.interval
                    due.append(c)
        return due

    def probe_result(self, c: Check, status: str, output: str) -> None:
        with self.cond:
            live = self.checks.get((c.node, c.check_id))
            if live is c and (c.status, c.output) != (status, output):
                c.status, c.output = status, output
                self._bump(self._services_for_check(c))
                c.modify_index = self.index

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
