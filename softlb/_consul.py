"""Consul's health API, sans-I/O: JSON entries in, endpoints out; index rules; empty-set guard.

Everything here is a pure function of its inputs so the rules Consul documents (see
docs/CONSUL.md and the shared Consul API notes) are tested without a socket:

* `endpoints_from_health` maps the `/v1/health/service/<name>` entry list to endpoints.
  Health is filtered client side (never `?passing`) because Warning instances stay in
  rotation at their Warning weight; critical and maintenance instances are returned with
  that registry state so `softlb endpoints` can show them, and the balancer skips them.
* `next_index` / `index_changed` are the blocking-query index rules.
* `EmptySetGuard` keeps serving the previous endpoints for a while when a service that had
  instances suddenly has none (SmartStack's `use_previous_backends`).

Garbage from Consul raises `ConsulDataError` naming the entry and key; callers keep the last
good set and retry, they never crash or publish half a list. That includes JSON nested too
deeply to parse, weights outside 0..MAX_WEIGHT (refused rather than clamped: a clamped weight
would silently skew the balance, an error names the registration to fix) and addresses that
are neither an IP address nor a well-formed host name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ._address import address_problem as address_problem
from ._errors import SoftLBError
from ._types import Endpoint, RegistryHealth

#: Check ids Consul uses for maintenance mode: `consul maint -service` adds
#: `_service_maintenance:<service id>`, `consul maint` (node) adds `_node_maintenance`.
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE_CHECK = "_node_maintenance"

#: Node.Meta keys read as locality labels, first match wins. Plain `zone`/`region` is what
#: operators write in `node_meta`; the Kubernetes topology keys are what consul-k8s syncs.
ZONE_KEYS = ("zone", "topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
REGION_KEYS = ("region", "topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region")

_MAX_INDEX = (1 << 64) - 1

#: Weights.Passing/Warning above this are refused, as the file catalog refuses them: the
#: wire protocol packs weights as msgpack ints (a 2**70 weight cannot be sent), and the
#: weighted policies build tables proportional to weights.
MAX_WEIGHT = 1_000_000

#: What a service name may look like for the agent to ask Consul about it: letters, digits,
#: dashes (Consul's DNS-safe set), plus underscores and dots, starting with a letter or
#: digit. Anything else ("web?dc=other", "web#frag", "x/../web", "..") would change the
#: meaning of the query URL rather than name a service.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
MAX_SERVICE_NAME = 255

#: One DNS label (RFC 1123 letters, digits, dashes; underscores are seen in the wild).


class ConsulDataError(SoftLBError):
    """Consul (or something posing as it) answered with data we cannot use.

    The message names what is wrong (`entry[2].Service.Port: expected an integer, got a
    string`) so an operator can find the offending registration.
    """


# --------------------------------------------------------------------------- index rules


def parse_index(header_value: str | None) -> int | None:
    """The X-Consul-Index header as an int; None when absent. Unparsable -> ConsulDataError."""
    if header_value is None:
        return None
    text = header_value.strip()
    if not text:
        return None
    # isascii + length first: str.isdigit() accepts "²" (which int() refuses) and int()
    # refuses more than 4,300 digits; a uint64 has at most 20.
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or int(text) > _MAX_INDEX:
        raise ConsulDataError(f"X-Consul-Index: not an unsigned 64-bit integer: {header_value[:40]!r}")
    return int(text)


def next_index(old: int, header_value: str | None) -> int:
    """The index to send with the next blocking query, given the last one and the new header.

    * missing or 0 -> 1: Consul says index 1 is always safe, and 0 would make every query
      non-blocking (a hot loop).
    * lower than `old` -> 0: the index went backwards (snapshot restore, upgrade); the next
      query must be non-blocking to fetch the current state and a fresh index.
    * otherwise the new value.
    """
    new = parse_index(header_value)
    if not new:
        return 1
    if new < old:
        return 0
    return new


def index_changed(old: int, new: int) -> bool:
    """False when a blocking query came back with the index it was sent: it timed out."""
    return new != old


# --------------------------------------------------------------------------- answer headers


@dataclass(frozen=True)
class AnswerMeta:
    """What Consul's response headers say about an answer (docs/CONSUL.md, "Staleness").

    Only `X-Consul-Index` is needed to follow a watch, so only it is strict: an unusable
    index is a ConsulDataError. The others are optional hints; a malformed one is read as
    absent (and named in `ignored`), never a reason to throw the whole answer away.
    """

    index: str | None = None  # raw X-Consul-Index, for next_index
    known_leader: bool | None = None
    last_contact_ms: int | None = None
    backend: str = ""  # X-Consul-Query-Backend: "blocking-query", "streaming" or ""
    cache: str = ""  # X-Cache: "HIT", "MISS" or ""
    age: float | None = None  # Age (seconds) on an agent-cache answer
    filtered_by_acls: bool = False
    ignored: tuple[str, ...] = ()  # optional headers present but malformed


def _small_uint(text: str, limit: int = 10**12) -> int | None:
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 13):
        return None
    v = int(text)
    return v if v <= limit else None


def parse_answer_meta(headers: Mapping[str, str]) -> AnswerMeta:
    """Read Consul's headers (names matched case-insensitively: Consul sends Go's canonical
    `X-Consul-Knownleader`). Raises ConsulDataError only for an unusable X-Consul-Index."""
    h = {k.lower(): v for k, v in headers.items()}
    index = h.get("x-consul-index")
    parse_index(index)
    ignored: list[str] = []

    def flag(name: str) -> bool | None:
        v = h.get(name)
        if v is None:
            return None
        low = v.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        ignored.append(name)
        return None

    def number(name: str) -> int | None:
        v = h.get(name)
        if v is None:
            return None
        n = _small_uint(v)
        if n is None:
            ignored.append(name)
        return n

    known_leader = flag("x-consul-knownleader")
    last_contact = number("x-consul-lastcontact")
    age = number("age")
    filtered = flag("x-consul-results-filtered-by-acls") is True
    backend = h.get("x-consul-query-backend", "").strip().lower()
    cache = h.get("x-cache", "").strip().upper()
    return AnswerMeta(index=index, known_leader=known_leader, last_contact_ms=last_contact,
                      backend=backend if backend in ("blocking-query", "streaming") else "",
                      cache=cache if cache in ("HIT", "MISS") else "",
                      age=None if age is None else float(age), filtered_by_acls=filtered,
                      ignored=tuple(ignored))


@dataclass(frozen=True)
class Freshness:
    """How old an answer's data is, by Consul's own account."""

    lag: float  # seconds the data may trail the leader (LastContact, or the cache's Age)
    stale: bool  # lag above max_stale, or a server that knows no leader
    reason: str = ""


def answer_freshness(meta: AnswerMeta, max_stale: float) -> Freshness:
    """Stale or not, from what Consul says the headers mean.

    * `X-Consul-LastContact`: ms since the answering server heard from the leader (0 on
      the leader). Over `max_stale` -> stale.
    * `Age` on an agent-cache answer: 0 while the agent is connected, counting up after it
      lost its servers and keeps serving its last value. Over `max_stale` -> stale.
    * `X-Consul-KnownLeader: false` -> stale, except under the streaming backend, whose
      materialized view never sets it (upstream issue #9776): there it means nothing.
    """
    lag = 0.0
    reasons = []
    if meta.last_contact_ms is not None:
        lag = meta.last_contact_ms / 1000.0
    if meta.age is not None and meta.cache == "HIT":
        lag = max(lag, meta.age)
    if lag > max_stale:
        reasons.append(f"data {lag:.1f}s old (consul.max_stale {max_stale:g}s)")
    if meta.known_leader is False and meta.backend != "streaming":
        reasons.append("the answering server knows no leader")
    return Freshness(lag, bool(reasons), "; ".join(reasons))


#: A Retry-After longer than this is read as this: a bad or hostile header must not park a
#: watch for days.
MAX_RETRY_AFTER = 300.0


def parse_retry_after(value: str | None) -> float | None:
    """A 429's Retry-After in seconds (delta-seconds only; a date or garbage is None)."""
    if value is None:
        return None
    n = _small_uint(value)
    return None if n is None else min(float(n), MAX_RETRY_AFTER)


def acl_filtered_message(service: str) -> str:
    """What to tell the operator when Consul hid results from our token."""
    return (f"Consul filtered the answer for {service!r} by ACL (X-Consul-Results-Filtered-By-ACLs):"
            f" the token needs service:read on {service!r} and node:read on its nodes")


# --------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class MappingOptions:
    #: Only instances carrying all these tags become endpoints.
    tags: tuple[str, ...] = ()
    #: "" for Service.Address/Node.Address, "lan" or "wan" to prefer that tagged address.
    tagged_address: str = ""
    #: Only passing instances are routable: a warning one is treated as critical.
    only_passing: bool = False
    #: The answer is in Consul's nearest-first order (`?near=` was sent): stamp each endpoint
    #: with its place in it (Endpoint.rank), for the "nearest:N" locality level.
    ranked: bool = False


def decode_health_body(body: bytes | str) -> list[Any]:
    """Parse a health endpoint body; anything but a JSON array is ConsulDataError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConsulDataError(f"response body is not JSON: {e}") from None
    except RecursionError:
        # `"[" * 200000` exhausts the parser's stack; no real answer nests more than 5 deep.
        raise ConsulDataError("response body: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise ConsulDataError(f"response body: expected a JSON array, got {_kind(data)}")
    return data


def endpoints_from_health(
    entries: Any, options: MappingOptions = MappingOptions()
) -> tuple[Endpoint, ...]:
    """Map a `/v1/health/service/<name>` entry list to endpoints, sorted by id.

    Instances lacking a required tag are left out entirely; unhealthy ones are kept with
    their registry state (CRITICAL or MAINTENANCE) and weight 0. A duplicate id (the same
    service id on the same node twice, which Consul never sends) keeps the first. With
    `options.ranked`, each endpoint's rank is its place among those kept, in answer order.
    """
    if not isinstance(entries, list):
        raise ConsulDataError(f"response body: expected a JSON array, got {_kind(entries)}")
    out: dict[str, Endpoint] = {}
    for i, entry in enumerate(entries):
        ep = _endpoint(entry, f"entry[{i}]", options, len(out) if options.ranked else None)
        if ep is not None and ep.id not in out:
            out[ep.id] = ep
    return tuple(out[k] for k in sorted(out))


def aggregate_health(checks: Sequence[Any], where: str = "Checks") -> RegistryHealth:
    """Worst check wins: maintenance > critical > warning > passing.

    Node-level checks (serfHealth) count too: a dead node's services are dead. A status
    string we do not know is treated as critical, because serving an instance whose
    health we cannot read is the riskier mistake.
    """
    if not isinstance(checks, list):
        raise ConsulDataError(f"{where}: expected a list, got {_kind(checks)}")
    worst = RegistryHealth.PASSING
    for j, check in enumerate(checks):
        c = _Obj(check, f"{where}[{j}]")
        status = c.str("Status")
        check_id = c.str("CheckID", "")
        if status == "maintenance" or (
            status == "critical"
            and (check_id.startswith(SERVICE_MAINTENANCE_PREFIX) or check_id == NODE_MAINTENANCE_CHECK)
        ):
            return RegistryHealth.MAINTENANCE
        if status == "passing":
            continue
        if status == "warning":
            if worst is RegistryHealth.PASSING:
                worst = RegistryHealth.WARNING
            continue
        worst = RegistryHealth.CRITICAL
    return worst


def _endpoint(entry: Any, where: str, options: MappingOptions, rank: int | None) -> Endpoint | None:
    e = _Obj(entry, where)
    node = e.obj("Node")
    svc = e.obj("Service")
    tags = svc.str_list("Tags")
    # Consul matches ?tag= case-insensitively (strings.EqualFold); so do we.
    if options.tags and not _has_tags(tags, options.tags):
        return None
    node_name = node.str("Node")
    service_id = svc.str("ID")
    if not node_name or not service_id:
        raise ConsulDataError(f"{where}: empty Node.Node or Service.ID")
    address, port = _address(node, svc, options.tagged_address, where)
    checks = e.raw("Checks")
    health = aggregate_health([] if checks is None else checks, f"{where}.Checks")
    if options.only_passing and health is RegistryHealth.WARNING:
        health = RegistryHealth.CRITICAL
    weights = svc.opt_obj("Weights")
    if health is RegistryHealth.PASSING:
        weight = weights.int("Passing", 1, lo=0, hi=MAX_WEIGHT) if weights else 1
    elif health is RegistryHealth.WARNING:
        weight = weights.int("Warning", 1, lo=0, hi=MAX_WEIGHT) if weights else 1
    else:
        weight = 0
    node_meta = node.str_map("Meta")
    service_meta = svc.str_map("Meta")
    return Endpoint(
        id=f"{service_id}@{node_name}",
        address=address,
        port=port,
        weight=weight,
        tags=tuple(tags),
        meta=service_meta,
        node=node_name,
        zone=_first(node_meta, ZONE_KEYS) or _first(service_meta, ZONE_KEYS),
        region=_first(node_meta, REGION_KEYS) or _first(service_meta, REGION_KEYS),
        registry=health,
        rank=rank,
    )


def _has_tags(tags: Sequence[str], wanted: Sequence[str]) -> bool:
    have = {t.casefold() for t in tags}
    return all(w.casefold() in have for w in wanted)


def _address(node: _Obj, svc: _Obj, tagged: str, where: str) -> tuple[str, int]:
    port = svc.int("Port", 0, lo=0, hi=65535)
    if tagged:
        service_tagged = svc.opt_obj("TaggedAddresses")
        if service_tagged is not None:
            chosen = service_tagged.opt_obj(tagged)
            if chosen is not None:
                addr = chosen.str_any_case("Address", "")
                if addr:
                    return (_checked_address(addr, where),
                            chosen.int_any_case("Port", port, lo=0, hi=65535))
        node_tagged = node.opt_obj("TaggedAddresses")
        if node_tagged is not None:
            addr = node_tagged.str(tagged, "")
            if addr:
                return _checked_address(addr, where), port
    addr = svc.str("Address", "") or node.str("Address", "")
    if not addr:
        raise ConsulDataError(f"{where}: neither Service.Address nor Node.Address is set")
    return _checked_address(addr, where), port


def _checked_address(addr: str, where: str) -> str:
    problem = address_problem(addr)
    if problem:
        raise ConsulDataError(f"{where}: address {addr[:100]!r}: {problem}")
    return addr


def service_name_problem(name: str) -> str:
    """Why the agent will not ask Consul about a service called `name` ("" if it will)."""
    if len(name) > MAX_SERVICE_NAME or not _SERVICE_NAME.match(name):
        return (f"not a Consul service name: {name[:100]!r} (use letters, digits, '-', '_' "
                f"or '.', starting with a letter or digit, at most {MAX_SERVICE_NAME} characters)")
    return ""


def _first(meta: Mapping[str, str], keys: Sequence[str]) -> str:
    for k in keys:
        v = meta.get(k)
        if v:
            return v
    return ""


class _Obj:
    """A JSON object being read, with getters that name the key path in their errors."""

    __slots__ = ("d", "where")

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConsulDataError(f"{where}: expected an object, got {_kind(data)}")
        self.d = data
        self.where = where

    def raw(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def _missing(self, key: str) -> ConsulDataError:
        return ConsulDataError(f"{self.where}.{key}: missing")

    def obj(self, key: str) -> _Obj:
        if key not in self.d:
            raise self._missing(key)
        return _Obj(self.d[key], f"{self.where}.{key}")

    def opt_obj(self, key: str) -> _Obj | None:
        v = self.d.get(key)
        return None if v is None else _Obj(v, f"{self.where}.{key}")

    def str(self, key: str, default: str | None = None) -> str:
        v = self.d.get(key, default)
        if v is None:
            if default is None and key not in self.d:
                raise self._missing(key)
            return default or ""
        if not isinstance(v, str):
            raise ConsulDataError(f"{self.where}.{key}: expected a string, got {_kind(v)}")
        return v

    def str_any_case(self, key: str, default: str) -> str:
        return self.str(key if key in self.d else key.lower(), default)

    def int(self, key: str, default: int, *, lo: int, hi: int | None = None) -> int:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConsulDataError(f"{self.where}.{key}: expected an integer, got {_kind(v)}")
        if v < lo or (hi is not None and v > hi):
            raise ConsulDataError(f"{self.where}.{key}: {v} is out of range")
        return v

    def int_any_case(self, key: str, default: int, *, lo: int, hi: int) -> int:
        return self.int(key if key in self.d else key.lower(), default, lo=lo, hi=hi)

    def str_list(self, key: str) -> list[str]:
        v = self.d.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConsulDataError(f"{self.where}.{key}: expected a list of strings")
        return v

    def str_map(self, key: str) -> dict[str, str]:
        v = self.d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise ConsulDataError(f"{self.where}.{key}: expected an object of strings")
        return dict(v)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


# --------------------------------------------------------------------------- empty-set guard


@dataclass(frozen=True)
class GuardDecision:
    """What to publish after a Consul answer, and whether the guard is overriding it."""

    endpoints: tuple[Endpoint, ...]
    #: True while the previous set is served in place of an empty answer.
    holding: bool = False
    #: When holding: the `now` at which the empty answer will be accepted.
    hold_until: float | None = None


class EmptySetGuard:
    """Don't publish an empty set just because Consul suddenly says a service has none.

    A service that had instances and now has zero is far more often a registry accident
    (a deploy deregistering everything, an ACL change hiding the service, a half-restored
    Consul) than a real outage of every instance. For `hold` seconds from the first empty
    answer the previous set stays published and `holding` says so; after that the empty
    set is accepted. `hold <= 0` disables the guard. A non-empty answer ends the hold at
    once. "Empty" means no instances at all: instances that are all critical are Consul
    telling us about health, which the balancer's panic threshold deals with.
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._last: tuple[Endpoint, ...] = ()
        self._empty_since: float | None = None

    def seed(self, endpoints: Sequence[Endpoint]) -> None:
        """Start from a set known from elsewhere (the persisted snapshot)."""
        self._last = tuple(endpoints)

    def decide(self, fresh: Sequence[Endpoint], now: float) -> GuardDecision:
        fresh = tuple(fresh)
        if fresh or not self._last or self.hold <= 0:
            self._empty_since = None
            self._last = fresh
            return GuardDecision(fresh)
        if self._empty_since is None:
            self._empty_since = now
        until = self._empty_since + self.hold
        if now >= until:
            self._empty_since = None
            self._last = ()
            return GuardDecision(())
        return GuardDecision(self._last, holding=True, hold_until=until)

    @property
    def holding(self) -> bool:
        return self._empty_since is not None


# --------------------------------------------------------------------------- change feed


class CheckFeed:
    """Which services changed, from successive `/v1/health/state/any` answers.

    That endpoint lists every check in the datacenter, and its blocking index moves on any
    check change, so one blocking query tells the agent when any polled service needs a
    fetch. Each check is reduced to (ServiceName, ServiceID, Status, ServiceTags):
    an instance added or removed adds or removes its checks, a health change changes a
    status, a tag change shows in ServiceTags. Output-only changes (and ModifyIndex) are
    ignored: they change nothing we serve and would trigger fetches for nothing. A node
    check (`serfHealth`, `_node_maintenance`) that changes marks every service with a check
    on that node. Not seen: a re-registration that changes only an address, port, meta or
    weights, and instances without checks; the slow safety-net poll covers those.

    `names` is the set of services with at least one check: a name outside it is checked
    with Consul before being watched (docs/CONSUL.md, "Names Consul does not know").
    """

    def __init__(self) -> None:
        self._checks: dict[tuple[str, str], tuple[str, str, str, tuple[str, ...]]] | None = None
        self.names: frozenset[str] = frozenset()

    @property
    def primed(self) -> bool:
        return self._checks is not None

    def reset(self) -> None:
        """Forget the baseline (after a failure: changes in the gap are unknown)."""
        self._checks = None

    def update(self, entries: Any) -> set[str] | None:
        """The services whose checks changed since the last call; None for the first call
        (a baseline: the caller refreshes everything it is unsure of)."""
        if not isinstance(entries, list):
            raise ConsulDataError(f"response body: expected a JSON array, got {_kind(entries)}")
        new: dict[tuple[str, str], tuple[str, str, str, tuple[str, ...]]] = {}
        for i, entry in enumerate(entries):
            c = _Obj(entry, f"check[{i}]")
            key = (c.str("Node"), c.str("CheckID"))
            new[key] = (c.str("ServiceName", ""), c.str("ServiceID", ""), c.str("Status"),
                        tuple(c.str_list("ServiceTags")))
        old, self._checks = self._checks, new
        self.names = frozenset(v[0] for v in new.values() if v[0])
        if old is None:
            return None
        changed: set[str] = set()
        nodes: set[str] = set()
        for key in new.keys() | old.keys():
            a, b = old.get(key), new.get(key)
            if a == b:
                continue
            for v in (a, b):
                if v is None:
                    continue
                if v[0]:
                    changed.add(v[0])
                else:
                    nodes.add(key[0])
        if nodes:
            for table in (old, new):
                changed.update(v[0] for (node, _), v in table.items() if node in nodes and v[0])
        return changed


def feed_filter(services: Sequence[str]) -> str:
    """A `?filter=` for the check feed: node checks, and checks of `services` only, so each
    answer carries what we watch rather than every check in the datacenter. Service names
    are letters, digits, `-`, `_`, `.` (service_name_problem); `.` is written `[.]` so the
    expression needs no backslash escapes."""
    if not services:
        return 'ServiceName == ""'
    alternation = "|".join(n.replace(".", "[.]") for n in sorted(services))
    return f'ServiceName == "" or ServiceName matches "^({alternation})$"'


def catalog_service_names(body: Any) -> dict[str, tuple[str, ...]]:
    """`/v1/catalog/services` ({name: [tags]}) read strictly."""
    if not isinstance(body, dict):
        raise ConsulDataError(f"response body: expected a JSON object, got {_kind(body)}")
    out = {}
    for name, tags in body.items():
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConsulDataError(f"services.{name[:100]}: expected a list of strings")
        out[name] = tuple(tags)
    return out


def decode_json_body(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConsulDataError(f"response body is not JSON: {e}") from None
    except RecursionError:
        raise ConsulDataError("response body: JSON nested too deeply") from None
