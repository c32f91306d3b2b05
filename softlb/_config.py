"""The agent's configuration schema: TOML tables in, frozen dataclasses out.

Every setting has a documented default here, so `AgentConfig()` is a working config. Parsing
is strict: an unknown key or a wrong type is an error naming the key's full path, because a
typo in a load balancer's config silently ignored is an outage later. Reading files and
environment variables is the agent's job; this module only validates values it is handed.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from ._durations import parse_duration
from ._errors import ConfigError
from ._locality import level_problem, nearest_count
from ._vip import check_unique, parse_pool, parse_vip
from .policies import POLICIES

DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_ADMIN = "127.0.0.1:7071"
#: 1 MiB: far above any real request (a resolve is ~40 bytes) yet small enough that one
#: hostile client cannot make the agent buffer much.
DEFAULT_MAX_FRAME = 1 << 20


@dataclass(frozen=True)
class ProbeConfig:
    kind: str = "tcp"  # "tcp" (connect) or "http" (GET path, 200-399 is success)
    path: str = "/"
    host: str = ""  # Host header for http probes; empty: the endpoint's address, with :port unless 80
    interval: float = 5.0
    timeout: float = 1.0
    initial_delay: float = 0.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    #: Envoy's default is 10%, which never ejects anything in a service of fewer than ten
    #: endpoints: most services behind a per-host LB are that small.
    max_ejection_percent: int = 50


# --------------------------------------------------------------------------- proxy


PROXY_MODES = ("tcp", "http", "http2")


@dataclass(frozen=True)
class ProxyRoute:
    """An http/http2 listener's rule: requests whose Host and path match go to `service`."""

    service: str
    host: str = ""  # "" matches any Host; compared without port, case-insensitively
    path_prefix: str = ""  # "" matches any path

    def matches(self, host: str, path: str) -> bool:
        return (not self.host or self.host == host) and path.startswith(self.path_prefix)


@dataclass(frozen=True)
class ProxyConfig:
    """`[services.NAME.proxy]`: a listener forwarding to NAME's endpoints (docs/PROXY.md)."""

    listen: str
    mode: str = "tcp"
    connect_timeout: float = 1.0
    #: A connection with no bytes either way for this long is closed (tcp; http between requests).
    idle_timeout: float = 300.0
    #: One http/http2 request, from its first byte to the end of the answer.
    request_timeout: float = 30.0
    #: Further endpoints tried after a failed connect (and, for idempotent http requests,
    #: after a reset before any answer).
    retries: int = 2
    #: How long open connections and requests of a leaving endpoint or listener may finish.
    drain_timeout: float = 10.0
    #: Connections open at once; more wait in the kernel's accept queue.
    max_connections: int = 1024
    #: Checked in order; the first match wins, else the listener's own service (http, http2).
    routes: tuple[ProxyRoute, ...] = ()


def route(routes: tuple[ProxyRoute, ...], default: str, host: str, path: str) -> str:
    """The service a request goes to: `host` is the Host header (port and case ignored)."""
    if routes:
        host = _strip_port(host).lower()
        for r in routes:
            if r.matches(host, path):
                return r.service
    return default


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def parse_proxy(t: _Table, allow_non_loopback: bool) -> ProxyConfig:
    listen = t.str("listen", "")
    if not listen:
        raise ConfigError(f"{t.path}.listen: required (\"127.0.0.1:PORT\")")
    check_listen(listen, f"{t.path}.listen", allow_non_loopback)
    mode = t.str("mode", "tcp")
    if mode not in PROXY_MODES:
        raise ConfigError(f"{t.path}.mode: must be \"tcp\", \"http\" or \"http2\", got \"{mode}\"")
    d = ProxyConfig(listen="")
    routes_raw = t.raw("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError(f"{t.path}.routes: expected an array of tables ([[...routes]])")
    if routes_raw and mode == "tcp":
        raise ConfigError(f"{t.path}.routes: a tcp listener cannot route (it never reads Host or path)")
    routes = []
    for i, r in enumerate(routes_raw):
        rt = _Table(r, f"{t.path}.routes[{i}]")
        service = rt.str("service", "")
        if not service:
            raise ConfigError(f"{rt.path}.service: required")
        host = rt.str("host", "").lower()
        prefix = rt.str("path_prefix", "")
        if prefix and not prefix.startswith("/"):
            raise ConfigError(f"{rt.path}.path_prefix: must start with /")
        if not host and not prefix:
            raise ConfigError(f"{rt.path}: give host, path_prefix or both (a route matching everything "
                              "is the listener's own service)")
        rt.done()
        routes.append(ProxyRoute(service=service, host=host, path_prefix=prefix))
    p = ProxyConfig(
        listen=listen,
        mode=mode,
        connect_timeout=t.duration("connect_timeout", d.connect_timeout),
        idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        request_timeout=t.duration("request_timeout", d.request_timeout),
        retries=t.int("retries", d.retries, 0, 10),
        drain_timeout=t.duration("drain_timeout", d.drain_timeout),
        max_connections=t.int("max_connections", d.max_connections, 1, 1_000_000),
        routes=tuple(routes),
    )
    for key in ("connect_timeout", "idle_timeout", "request_timeout"):
        if getattr(p, key) <= 0:
            raise ConfigError(f"{t.path}.{key}: must be positive")
    t.done()
    return p


@dataclass(frozen=True)
class ProxyPlan:
    """What a reload does to the proxy listeners, by service name, in this order: close
    (removed, moved, or changed mode: their ports are freed first), update (same listen and
    mode: new settings for new work, connections untouched), open (new, moved, changed mode)."""

    close: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    open: tuple[str, ...] = ()


def plan_proxies(running: Mapping[str, ProxyConfig], wanted: Mapping[str, ProxyConfig]) -> ProxyPlan:
    close, update, open_ = [], [], []
    for name, old in sorted(running.items()):
        new = wanted.get(name)
        if new is not None and new.listen == old.listen and new.mode == old.mode:
            if new != old:
                update.append(name)
        else:
            close.append(name)
    for name in sorted(wanted):
        if name not in running or name in close:
            open_.append(name)
    return ProxyPlan(tuple(close), tuple(update), tuple(open_))


def check_proxies(services: Mapping[str, ServiceConfig]) -> None:
    """No two proxy listeners on one address (a reload would fight over the port)."""
    seen: dict[str, str] = {}
    for name, s in services.items():
        if s.proxy is None:
            continue
        addr = s.proxy.listen.replace("localhost", "127.0.0.1")
        if addr in seen:
            raise ConfigError(f"services.{name}.proxy.listen: {s.proxy.listen} is also services.{seen[addr]}'s")
        seen[addr] = name


@dataclass(frozen=True)
class ServiceConfig:
    policy: str = "round_robin"
    #: Percent of endpoints that must be eligible; below it, balance over all (Envoy's panic).
    panic_threshold: int = 50
    probe: ProbeConfig | None = None
    outlier: OutlierConfig | None = field(default_factory=OutlierConfig)
    #: Ordered preference; empty means no locality preference.
    locality: tuple[str, ...] = ()
    slow_start: float = 0.0
    #: Policy-specific knobs (e.g. ring size), validated by the policy itself.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Only endpoints carrying all these tags are served (Consul and file sources alike).
    tags: tuple[str, ...] = ()
    #: A loopback proxy listener for this service (docs/PROXY.md); None: no proxy.
    proxy: ProxyConfig | None = None
    #: The service's address for connect-time balancing ("127.77.0.5:8080", or no port
    #: for every port); "" means none, or one from agent.vip_pool. See softlb/_vip.py.
    vip: str = ""


@dataclass(frozen=True)
class ConsulQuery:
    """How one service is asked of Consul: the [consul] defaults, per service in
    [consul.services.<name>] (docs/CONSUL.md, "Query options")."""

    #: Route only to passing instances (a warning one counts as critical).
    only_passing: bool = False
    namespace: str = ""  # Enterprise; empty: CONSUL_NAMESPACE, else the token's
    partition: str = ""  # Enterprise; empty: CONSUL_PARTITION, else the token's
    peer: str = ""  # services imported from this cluster peer
    filter: str = ""  # a Consul filter expression (?filter=)
    node_meta: Mapping[str, str] = field(default_factory=dict)  # ?node-meta=k:v, all must match
    near: str = ""  # "_agent" or a node name: Consul sorts by network distance


#: Values of consul.change_feed (docs/CONSUL.md, "The change feed").
CHANGE_FEEDS = ("health_state", "catalog_health", "off")


@dataclass(frozen=True)
class ConsulConfig:
    address: str = ""  # empty: CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    datacenter: str = ""
    token: str = ""  # empty: CONSUL_HTTP_TOKEN_FILE / CONSUL_HTTP_TOKEN
    ca_file: str = ""  # empty: CONSUL_CACERT
    wait: float = 300.0
    #: Any server may answer (spreads load off the leader); see max_stale.
    stale: bool = True
    #: Data older than this by Consul's account (X-Consul-LastContact, the cache's Age) is
    #: served marked stale; also sent as ?max_stale so Consul asks the leader past it.
    max_stale: float = 5.0
    tagged_address: str = ""  # "", "lan" or "wan"
    max_watches: int = 64
    #: Services watched because callers asked for them (not configured), at most. A resolve
    #: of one more unknown name is answered UNAVAILABLE instead of starting a watch, so a
    #: caller looping over made-up names cannot make the agent watch them all.
    max_on_demand: int = 256
    #: A name Consul does not know is refused for this long without asking Consul again.
    negative_ttl: float = 10.0
    idle_timeout: float = 600.0
    #: Under the clients' default 1 s call timeout, so a caller hears UNAVAILABLE, not a timeout.
    first_answer_timeout: float = 0.75
    min_query_interval: float = 0.1
    keep_previous_on_empty: float = 300.0
    #: Largest answer body read from Consul, in bytes; a bigger one is an error (backoff).
    max_body: int = 64 << 20
    #: Blocking watches start at random times within this window, not all at once.
    startup_spread: float = 0.5
    #: Non-blocking fetches (first answers, services the change feed names) per second.
    max_fetch_rate: int = 20
    #: How polled services learn of changes: one blocking feed (docs/CONSUL.md).
    change_feed: str = "catalog_health"
    #: Query options for every service, and per service overrides.
    query: ConsulQuery = field(default_factory=ConsulQuery)
    services: Mapping[str, ConsulQuery] = field(default_factory=dict)

    def query_for(self, service: str) -> ConsulQuery:
        return self.services.get(service) or self.query


@dataclass(frozen=True)
class ProvideConfig:
    """A service this host provides, registered with the local Consul agent."""

    name: str
    port: int
    id: str = ""
    address: str = ""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check: str = "ttl"  # "ttl" (kept alive by our probe), "http", "tcp" or "none"
    check_path: str = "/"
    check_interval: float = 10.0
    ttl: float = 15.0
    weight: int = 1  # Consul Weights.Passing
    warning_weight: int = 1  # Consul Weights.Warning
    #: Consul removes the registration after its check is critical this long (0: never).
    deregister_after: float = 600.0


@dataclass(frozen=True)
class AgentConfig:
    socket: str = ""  # empty: runtime-dir default, see softlb_agent.paths
    listen: str = DEFAULT_LISTEN  # "" disables the loopback msgpack port
    admin: str = DEFAULT_ADMIN  # "" disables the admin HTTP port
    state_dir: str = ""
    node: str = ""
    zone: str = ""
    region: str = ""
    allow_non_loopback: bool = False
    max_frame: int = DEFAULT_MAX_FRAME
    #: How long a connection's reader spins on a non-blocking recv after answering before it
    #: parks in epoll. Cross-core wakeups cost ~30 µs on small VMs; see docs/BENCHMARKS.md.
    busy_poll: float = 50e-6
    lease_ttl: float = 60.0
    source: str = "file"  # "file" or "consul"
    catalog_file: str = ""
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    provide: tuple[ProvideConfig, ...] = ()
    # -- isolation: bounds on what local callers can make the agent hold (docs/RELIABILITY.md)
    #: Client connections over the IPC socket and port together; lowered at start to fit the
    #: fd limit minus fd_reserve.
    max_connections: int = 4096
    #: Per peer uid (SO_PEERCRED) on the Unix socket; every TCP peer counts as one peer.
    max_connections_per_uid: int = 1024
    #: A connection with no request and no watch for this long is closed; 0 disables.
    idle_timeout: float = 300.0
    #: File descriptors kept free of client connections for probes, Consul and snapshots.
    fd_reserve: int = 128
    #: When either is non-empty, only these peer uids / primary gids (plus root and the
    #: agent's own uid) may use the Unix socket.
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    #: The Unix socket's permission bits and group (name or number; "" keeps the default).
    socket_mode: int = 0o660
    socket_group: str = ""
    max_watches: int = 10_000
    max_watches_per_connection: int = 256
    #: A catalog file larger than this is refused (the last good catalog keeps serving).
    max_catalog_bytes: int = 64 << 20
    # -- service addresses and the DNS front end (issue 15; softlb/_vip.py, agent/dns.py)
    #: Loopback subnet every service without its own `vip` gets an address from; "" none.
    vip_pool: str = ""
    dns: str = ""  # HOST:PORT of the DNS front end (UDP and TCP); "" disables
    dns_domain: str = "softlb"  # names are NAME.service.<dns_domain>
    #: A/AAAA answers: "pick" (one fresh pick per query) or "vip" (the service's VIP).
    dns_answer: str = "pick"

    def service(self, name: str) -> ServiceConfig:
        return self.services.get(name) or _DEFAULT_SERVICE


_DEFAULT_SERVICE = ServiceConfig()


# --------------------------------------------------------------------------- parsing


class _Table:
    """A TOML table being read: typed getters that know the key path, and a leftover check."""

    def __init__(self, data: Any, path: str, doc: str = "config") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or doc}: expected a table, got {_kind(data)}")
        self.data = dict(data)
        self.path = path
        #: "config" or "catalog": which kind of file this table is from (for hints).
        self.doc = doc
        self.seen: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def str(self, key: str, default: str) -> str:
        v = self.raw(key, default)
        if not isinstance(v, str):
            raise ConfigError(f"{self._where(key)}: expected a string, got {_kind(v)}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self._where(key)}: expected true or false, got {_kind(v)}")
        return v

    def int(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.raw(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self._where(key)}: expected an integer, got {_kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self._where(key)}: {v} is out of range [{lo}, {hi}]")
        return v

    def duration(self, key: str, default: float) -> float:
        v = self.raw(key, default)
        try:
            return parse_duration(v)
        except ValueError as e:
            raise ConfigError(f"{self._where(key)}: {e}") from None

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        v = self.raw(key, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self._where(key)}: expected a list of strings")
        return tuple(v)

    def str_map(self, key: str) -> dict[str, str]:
        v = self.raw(key, {})
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        ):
            raise ConfigError(f"{self._where(key)}: expected a table of strings")
        return dict(v)

    def table(self, key: str) -> _Table | None:
        v = self.raw(key)
        return None if v is None else _Table(v, self._where(key), self.doc)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            key = extra[0]
            msg = f"{self._where(key)}: unknown setting"
            close = difflib.get_close_matches(key, sorted(self.seen), n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean \"{close[0]}\"?)"
            raise ConfigError(msg + _mixup_hint(self.doc, self.path, key))


#: Keys that only an agent config has at its top level, and only a service's config has.
_CONFIG_TOP = ("agent", "catalog", "consul", "provide")
_SERVICE_KEYS = ("policy", "panic_threshold", "probe", "outlier", "locality", "slow_start", "options", "tags")


def _mixup_hint(doc: str, path: str, key: str) -> str:
    """The agent config and the catalog file are both TOML with [services.NAME] tables; say
    so when a key shows the file was handed to the wrong flag."""
    in_service = path.startswith("services.") and path.count(".") == 1
    if doc == "config" and in_service and key == "endpoints":
        return ("; endpoints are listed in a catalog file, not in the agent config: this looks like a catalog, "
                "pass it as --catalog-file FILE (or set catalog.file to it in the config)")
    if doc == "catalog" and ((path == "" and key in _CONFIG_TOP) or (in_service and key in _SERVICE_KEYS)):
        return ("; this looks like an agent config, not a catalog (a catalog lists only "
                "[[services.NAME.endpoints]]): pass it as --config FILE")
    return ""


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def parse_probe(t: _Table) -> ProbeConfig:
    d = ProbeConfig()
    kind = t.str("kind", d.kind)
    if kind not in ("tcp", "http"):
        raise ConfigError(f"{t.path}.kind: must be \"tcp\" or \"http\", got \"{kind}\"")
    p = ProbeConfig(
        kind=kind,
        path=t.str("path", d.path),
        host=t.str("host", d.host),
        interval=t.duration("interval", d.interval),
        timeout=t.duration("timeout", d.timeout),
        initial_delay=t.duration("initial_delay", d.initial_delay),
        rise=t.int("rise", d.rise, 1, 1000),
        fall=t.int("fall", d.fall, 1, 1000),
    )
    if p.interval <= 0 or p.timeout <= 0:
        raise ConfigError(f"{t.path}: interval and timeout must be positive")
    if not p.path.startswith("/"):
        raise ConfigError(f"{t.path}.path: must start with /")
    t.done()
    return p


def parse_outlier(t: _Table) -> OutlierConfig:
    d = OutlierConfig()
    o = OutlierConfig(
        consecutive_failures=t.int("consecutive_failures", d.consecutive_failures, 1, 1_000_000),
        base_ejection_time=t.duration("base_ejection_time", d.base_ejection_time),
        max_ejection_time=t.duration("max_ejection_time", d.max_ejection_time),
        max_ejection_percent=t.int("max_ejection_percent", d.max_ejection_percent, 0, 100),
    )
    if o.max_ejection_time < o.base_ejection_time:
        raise ConfigError(f"{t.path}: max_ejection_time is below base_ejection_time")
    t.done()
    return o


def parse_service(t: _Table, known_policies: frozenset[str], allow_non_loopback: bool = False) -> ServiceConfig:
    d = ServiceConfig()
    policy = t.str("policy", d.policy)
    if known_policies and policy not in known_policies:
        raise ConfigError(
            f"{t.path}.policy: unknown policy \"{policy}\" (one of: {', '.join(sorted(known_policies))})"
        )
    locality = t.strings("locality", d.locality)
    _check_locality(locality, f"{t.path}.locality")
    probe = t.table("probe")
    outlier_t = t.table("outlier")
    options = t.raw("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{t.path}.options: expected a table")
    if policy in known_policies and policy in POLICIES:
        # Each policy checks its own options, here, so a bad reload is refused whole
        # before anything is applied.
        try:
            POLICIES[policy].check_options(options)
        except ConfigError as e:
            raise ConfigError(f"{t.path}.{e}") from None
    s = ServiceConfig(
        policy=policy,
        panic_threshold=t.int("panic_threshold", d.panic_threshold, 0, 100),
        probe=parse_probe(probe) if probe else None,
        outlier=parse_outlier(outlier_t) if outlier_t else d.outlier,
        locality=locality,
        slow_start=t.duration("slow_start", d.slow_start),
        options=dict(options),
        tags=t.strings("tags"),
        proxy=parse_proxy(proxy_t, allow_non_loopback) if (proxy_t := t.table("proxy")) else None,
        vip=_vip_setting(t),
    )
    t.done()
    return s


def _check_locality(locality: tuple[str, ...], where: str) -> None:
    for i, level in enumerate(locality):
        problem = level_problem(level)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        if level == "*" and i != len(locality) - 1:
            raise ConfigError(f"{where}: \"*\" must come last")
    near = [lv for lv in locality if nearest_count(lv) is not None]
    if len(near) > 1:
        raise ConfigError(f"{where}: only one nearest:N level (\"{near[1]}\" could never match: "
                          f"\"{near[0]}\" already takes any ranked endpoint)")


def _check_nearest_has_order(cfg: AgentConfig) -> None:
    """With Consul as the source, a "nearest:N" level needs `near` for that service: without
    it Consul's answer has no distance order and the level would never match."""
    if cfg.source != "consul":
        return
    for name, s in cfg.services.items():
        level = next((lv for lv in s.locality if nearest_count(lv) is not None), None)
        if level is not None and not cfg.consul.query_for(name).near:
            raise ConfigError(
                f"services.{name}.locality: \"{level}\" ranks endpoints by Consul's network distance, "
                f"but Consul is not asked for it: set consul.near = \"_agent\" (or consul.services.{name}.near)")


def parse_consul_query(t: _Table, d: ConsulQuery) -> ConsulQuery:
    q = ConsulQuery(
        only_passing=t.bool("only_passing", d.only_passing),
        namespace=t.str("namespace", d.namespace),
        partition=t.str("partition", d.partition),
        peer=t.str("peer", d.peer),
        filter=t.str("filter", d.filter),
        node_meta=t.str_map("node_meta") if t.has("node_meta") else d.node_meta,
        near=t.str("near", d.near),
    )
    for k, v in q.node_meta.items():
        if not k or ":" in k:
            raise ConfigError(f"{t.path}.node_meta: key {k!r} must be non-empty without ':'")
    return q


def _vip_setting(t: _Table) -> str:
    text = t.str("vip", "")
    if not text:
        return ""
    try:
        return str(parse_vip(text))
    except ValueError as e:
        raise ConfigError(f"{t.path}.vip: {e}") from None


def parse_consul(t: _Table) -> ConsulConfig:
    d = ConsulConfig()
    query = parse_consul_query(t, d.query)
    per_service = {}
    services_t = t.table("services")
    if services_t is not None:
        for name in list(services_t.data):
            st = services_t.table(name)
            per_service[name] = parse_consul_query(st, query)  # type: ignore[arg-type]
            st.done()  # type: ignore[union-attr]
        services_t.done()
    c = ConsulConfig(
        address=t.str("address", d.address),
        datacenter=t.str("datacenter", d.datacenter),
        token=t.str("token", d.token),
        ca_file=t.str("ca_file", d.ca_file),
        wait=t.duration("wait", d.wait),
        stale=t.bool("stale", d.stale),
        max_stale=t.duration("max_stale", d.max_stale),
        tagged_address=t.str("tagged_address", d.tagged_address),
        max_watches=t.int("max_watches", d.max_watches, 1, 190),
        max_on_demand=t.int("max_on_demand", d.max_on_demand, 0, 100_000),
        negative_ttl=t.duration("negative_ttl", d.negative_ttl),
        idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        first_answer_timeout=t.duration("first_answer_timeout", d.first_answer_timeout),
        min_query_interval=t.duration("min_query_interval", d.min_query_interval),
        keep_previous_on_empty=t.duration("keep_previous_on_empty", d.keep_previous_on_empty),
        max_body=t.int("max_body", d.max_body, 4096, 1 << 30),
        startup_spread=t.duration("startup_spread", d.startup_spread),
        max_fetch_rate=t.int("max_fetch_rate", d.max_fetch_rate, 1, 1000),
        change_feed=t.str("change_feed", d.change_feed),
        query=query,
        services=per_service,
    )
    if c.tagged_address not in ("", "lan", "wan"):
        raise ConfigError(f"{t.path}.tagged_address: must be \"lan\" or \"wan\"")
    if not 1.0 <= c.wait <= 600.0:
        raise ConfigError(f"{t.path}.wait: must be between 1s and 10m (Consul caps it at 10m)")
    if c.change_feed not in CHANGE_FEEDS:
        raise ConfigError(f"{t.path}.change_feed: one of {', '.join(CHANGE_FEEDS)}")
    if c.max_stale <= 0:
        raise ConfigError(f"{t.path}.max_stale: must be positive")
    t.done()
    return c


def parse_provide(t: _Table) -> ProvideConfig:
    d = ProvideConfig(name="", port=0)
    name = t.str("name", "")
    if not name:
        raise ConfigError(f"{t.path}.name: required")
    check = t.str("check", d.check)
    if check not in ("ttl", "http", "tcp", "none"):
        raise ConfigError(f"{t.path}.check: one of ttl, http, tcp, none")
    p = ProvideConfig(
        name=name,
        port=t.int("port", 0, 1, 65535),
        id=t.str("id", ""),
        address=t.str("address", ""),
        tags=t.strings("tags"),
        meta=t.str_map("meta"),
        check=check,
        check_path=t.str("check_path", d.check_path),
        check_interval=t.duration("check_interval", d.check_interval),
        ttl=t.duration("ttl", d.ttl),
        weight=t.int("weight", d.weight, 0, 65535),
        warning_weight=t.int("warning_weight", d.warning_weight, 0, 65535),
        deregister_after=t.duration("deregister_after", d.deregister_after),
    )
    if 0 < p.deregister_after < 60:
        raise ConfigError(f"{t.path}.deregister_after: at least 1m (Consul's minimum), or 0 for never")
    t.done()
    return p


def check_listen(value: str, what: str, allow_non_loopback: bool) -> None:
    """`HOST:PORT` with a loopback host, unless non-loopback was explicitly allowed."""
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got \"{value}\"")
    host = host.strip("[]")
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: host must be an IP address or localhost, got \"{host}\"") from None
    if not ip.is_loopback and not allow_non_loopback:
        raise ConfigError(
            f"{what}: {host} is not a loopback address; softlb serves this host only "
            "(set allow_non_loopback = true to override)"
        )


def toml_document(text: bytes | str, what: str) -> dict[str, Any]:
    """A config or catalog file's bytes as a TOML document. A file that is not UTF-8 is a
    ConfigError like bad TOML (atheris found tomllib's UnicodeDecodeError escaping: issue 10)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} is not UTF-8 text: byte {text[e.start]:#04x} at offset {e.start}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} is not valid TOML: {e}") from None


def parse_agent_config_text(text: bytes | str, known_policies: frozenset[str] = frozenset()) -> AgentConfig:
    """Validate an agent config file's contents (bytes as read, or text)."""
    return parse_agent_config(toml_document(text, "config"), known_policies)


def parse_agent_config(data: Mapping[str, Any], known_policies: frozenset[str] = frozenset()) -> AgentConfig:
    """Validate a whole agent config document (the parsed TOML)."""
    root = _Table(data, "")
    d = AgentConfig()
    agent = root.table("agent") or _Table({}, "agent")
    catalog = root.table("catalog") or _Table({}, "catalog")
    consul = root.table("consul")
    services_t = root.table("services") or _Table({}, "services")
    services = {}
    for name in list(services_t.data):
        if not name:
            raise ConfigError("services: empty service name")
        services[name] = parse_service(services_t.table(name), known_policies,  # type: ignore[arg-type]
                                       agent.raw("allow_non_loopback", False) is True)
    provide_raw = root.raw("provide", [])
    if not isinstance(provide_raw, list):
        raise ConfigError("provide: expected an array of tables ([[provide]])")
    provide = tuple(parse_provide(_Table(p, f"provide[{i}]")) for i, p in enumerate(provide_raw))
    source = catalog.str("source", d.source)
    if source not in ("file", "consul"):
        raise ConfigError(f"catalog.source: must be \"file\" or \"consul\", got \"{source}\"")
    cfg = AgentConfig(
        socket=agent.str("socket", d.socket),
        listen=agent.str("listen", d.listen),
        admin=agent.str("admin", d.admin),
        state_dir=agent.str("state_dir", d.state_dir),
        node=agent.str("node", d.node),
        zone=agent.str("zone", d.zone),
        region=agent.str("region", d.region),
        allow_non_loopback=agent.bool("allow_non_loopback", d.allow_non_loopback),
        max_frame=agent.int("max_frame", d.max_frame, 64, 64 << 20),
        busy_poll=agent.duration("busy_poll", d.busy_poll),
        lease_ttl=agent.duration("lease_ttl", d.lease_ttl),
        source=source,
        catalog_file=catalog.str("file", d.catalog_file),
        consul=parse_consul(consul) if consul else d.consul,
        services=services,
        provide=provide,
        **_isolation_settings(agent, catalog, d),
        vip_pool=agent.str("vip_pool", d.vip_pool),
        dns=agent.str("dns", d.dns),
        dns_domain=agent.str("dns_domain", d.dns_domain),
        dns_answer=agent.str("dns_answer", d.dns_answer),
    )
    for t in (agent, catalog, root):
        t.done()
    return finalize(cfg)


def _ids(t: _Table, key: str) -> tuple[int, ...]:
    v = t.raw(key, [])
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in v):
        raise ConfigError(f"{t._where(key)}: expected a list of numeric ids")
    return tuple(v)


def _isolation_settings(agent: _Table, catalog: _Table, d: AgentConfig) -> dict[str, Any]:
    mode = agent.str("socket_mode", f"{d.socket_mode:04o}")
    if not (1 <= len(mode) <= 4 and all(c in "01234567" for c in mode)) or int(mode, 8) & ~0o777:
        raise ConfigError(f"agent.socket_mode: expected octal permission bits like \"0660\", got \"{mode}\"")
    if int(mode, 8) & 0o007:
        raise ConfigError("agent.socket_mode: other users may not have access (use socket_group or allow_uids)")
    return dict(
        max_connections=agent.int("max_connections", d.max_connections, 1, 1_000_000),
        max_connections_per_uid=agent.int("max_connections_per_uid", d.max_connections_per_uid, 1, 1_000_000),
        idle_timeout=agent.duration("idle_timeout", d.idle_timeout),
        fd_reserve=agent.int("fd_reserve", d.fd_reserve, 0, 1_000_000),
        allow_uids=_ids(agent, "allow_uids"),
        allow_gids=_ids(agent, "allow_gids"),
        socket_mode=int(mode, 8),
        socket_group=agent.str("socket_group", d.socket_group),
        max_watches=agent.int("max_watches", d.max_watches, 1, 10_000_000),
        max_watches_per_connection=agent.int("max_watches_per_connection", d.max_watches_per_connection, 1, 1_000_000),
        max_catalog_bytes=catalog.int("max_bytes", d.max_catalog_bytes, 1024, 1 << 34),
    )


def finalize(cfg: AgentConfig) -> AgentConfig:
    """Cross-field checks; run again after command-line flags are merged in."""
    check_listen(cfg.listen, "agent.listen", cfg.allow_non_loopback)
    check_listen(cfg.admin, "agent.admin", cfg.allow_non_loopback)
    for name, s in cfg.services.items():
        if s.proxy is not None:
            check_listen(s.proxy.listen, f"services.{name}.proxy.listen", cfg.allow_non_loopback)
    check_proxies(cfg.services)
    if cfg.busy_poll > 0.01:
        raise ConfigError("agent.busy_poll: at most 10ms (it spins a core while it waits)")
    check_listen(cfg.dns, "agent.dns", cfg.allow_non_loopback)
    _check_vips_and_dns(cfg)
    _check_nearest_has_order(cfg)
    return cfg


#: A DNS name of labels of letters, digits, '-' and '_' (the domain the front end serves).
_DOMAIN = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")


def _check_vips_and_dns(cfg: AgentConfig) -> None:
    if cfg.vip_pool:
        try:
            parse_pool(cfg.vip_pool)
        except ValueError as e:
            raise ConfigError(f"agent.vip_pool: {e}") from None
    vips = {name: parse_vip(s.vip) for name, s in cfg.services.items() if s.vip}
    clash = check_unique(vips)
    if clash:
        raise ConfigError(f"services: {clash}")
    for name, v in vips.items():
        for key in ("listen", "admin", "dns"):
            addr = getattr(cfg, key)
            host, _, port = addr.rpartition(":")
            if addr and host == v.address and (v.port == 0 or str(v.port) == port):
                raise ConfigError(f"services.{name}.vip: {v} is the agent's own agent.{key} address")
    domain = cfg.dns_domain.strip(".")
    if not _DOMAIN.fullmatch(domain) or len(domain) > 200:
        raise ConfigError(f"agent.dns_domain: not a DNS domain name: \"{cfg.dns_domain}\"")
    if cfg.dns_answer not in ("pick", "vip"):
        raise ConfigError(f"agent.dns_answer: must be \"pick\" or \"vip\", got \"{cfg.dns_answer}\"")


def with_overrides(cfg: AgentConfig, **overrides: Any) -> AgentConfig:
    """Apply command-line flags (None means "not given") and re-check."""
    names = {f.name for f in fields(AgentConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - names
    if unknown:
        raise ConfigError(f"unknown override: {sorted(unknown)[0]}")
    return finalize(replace(cfg, **given))
