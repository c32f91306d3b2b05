"""Turning DNS questions into answers, for the DNS front end (agent/dns.py serves them).

    NAME.service.<domain>    A/AAAA  one fresh pick per query, TTL 0 (or the VIP, agent.dns_answer)
                             SRV     every endpoint a pick may land on now: weight, port, target
    _NAME._tcp.service.<d>   SRV     the same (RFC 2782 form)
    HEX.addr.<domain>        A/AAAA  the address HEX encodes (the targets SRV answers name)
    <domain>                 SOA     (negative answers carry it too, minimum 0: never cached)

Unknown service, or one the catalog lists with no instance (Consul's answer for a name it
does not know): NXDOMAIN. Instances, none eligible: SERVFAIL (a resolver then tries again
instead of caching "no such name"). Names outside the domain: REFUSED; opcodes other
than QUERY: NOTIMP; what does not parse: FORMERR when the header can be answered, else
dropped, as are datagrams that are themselves responses (no reflection loops).

Picks go through the core's typed API with no lease (the agent never hears how a DNS
caller's connection went), so policies, health, locality, ejection and panic apply as for
a resolve. Messages are parsed and rendered by dnspython; a question seen before (the same
bytes but the id) replays the rendering for its pick (see Responder._plans).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from softlb import Endpoint, ErrorCode, LeaseScope, Pending, PickError

from .runtime import Runtime

log = logging.getLogger("softlb.dns")

#: What our answers over UDP may fill when the query's EDNS allows (DNS flag day 2020).
EDNS_PAYLOAD = 1232
TTL = 0
#: Distinct repeated queries remembered (see Responder._plans).
MAX_CACHED = 4096
#: Picks an A/AAAA answer may spend on a service serving both families looking for one of
#: the asked family.
MAX_FAMILY_TRIES = 8
#: SOA timers for the negative answers; minimum 0 so NXDOMAIN is not cached either.
_SOA_TIMERS = (1, 3600, 600, 86400, 0)
_IN = dns.rdataclass.IN
_A, _AAAA, _SRV, _SOA, _ANY = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.SRV, dns.rdatatype.SOA, dns.rdatatype.ANY


class _Plan:
    __slots__ = ("query", "service", "family", "max_size", "config")

    def __init__(self, query: dns.message.Message, service: str, family: int, max_size: int, config: Any) -> None:
        self.query, self.service, self.family, self.max_size, self.config = query, service, family, max_size, config


class _Static:
    __slots__ = ("service", "balancer", "version", "weights", "config", "out", "srv")

    def __init__(self, service: str, balancer: Any, version: int, weights: Any, config: Any) -> None:
        self.service, self.balancer, self.version, self.weights, self.config = service, balancer, version, weights, config
        self.out = b""
        self.srv = False


class Deferred:
    """A query that must wait for a catalog source before it can be answered."""

    __slots__ = ("query", "service", "max_size")

    def __init__(self, query: dns.message.Message, service: str, max_size: int) -> None:
        self.query, self.service, self.max_size = query, service, max_size


# ------------------------------------------------------------------------ the one pick


def pick(rt: Runtime, service: str, source: str | None) -> Endpoint:
    """One pick of a service the engine has, with no lease (LeaseScope.NONE: the agent never
    hears how a DNS caller's connection went), through the core's typed API: policies,
    health, locality, ejection, panic as for a resolve. Raises PickError.

    Synchronous, unlike `Runtime.pick`: the UDP loop answers a batch of datagrams without
    yielding, so the one wait (a service an on-demand source has not fetched yet) is done
    before, by `fetch`, in a task of its own."""
    r = rt.engine.pick(service, rt.now(), source=source, scope=LeaseScope.NONE)
    if type(r) is Pending:  # callers only pick services the engine has; gone meanwhile
        raise PickError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
    rt.flush()  # an ejection timer the pick ran, as Runtime.pick does
    return r.endpoint


async def fetch(rt: Runtime, service: str) -> ErrorCode | None:
    """Have the catalog source fetch a service nobody asked for yet (Consul on demand), as
    a resolve would (Runtime.await_source); the error to answer with if it cannot be had."""
    try:
        if not await rt.await_source(service):
            return ErrorCode.UNKNOWN_SERVICE if rt.fetch is None else ErrorCode.UNAVAILABLE
    except PickError as e:  # the source refuses it (a bad name, the on-demand limit)
        return e.code
    return None


# ------------------------------------------------------------------------ answering


def _family(address: str) -> int:
    """4 or 6 for an IP address, 0 for a host name."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 0


def _addr_label(address: str) -> str:
    return ipaddress.ip_address(address).packed.hex()


class Responder:
    """Turns query bytes into answer bytes. Everything here is synchronous; the one wait
    (a service a catalog source is still fetching) is handed back as an Deferred."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._domain_text = ""
        self._domain = dns.name.root
        self._service_origin = dns.name.root
        self._addr_origin = dns.name.root
        #: (balancer, version) -> the address families of what it serves: an AAAA query for
        #: an IPv4-only service is answered NODATA without spending a pick (getaddrinfo
        #: sends A and AAAA together; a round robin would otherwise skip every other one).
        self._families: dict[str, tuple[Any, int, frozenset[int]]] = {}
        #: Queries seen before (all but their id) that were answered with a plain pick, and
        #: the answer bytes per picked address: a repeated query costs a pick and a copy
        #: instead of ~0.5 ms of parsing and rendering. Cleared whole when full.
        self._plans: dict[bytes, _Plan | _Static] = {}
        self._rendered: dict[tuple[bytes, str], bytes] = {}
        self._plan: _Plan | None = None
        self._static: _Static | None = None
        self._planned = ""

    @property
    def domain(self) -> dns.name.Name:
        text = self.rt.config.dns_domain.strip(".")
        if text != self._domain_text:  # a reload may change it
            self._domain_text = text
            self._domain = dns.name.from_text(text)
            self._service_origin = dns.name.Name(("service",)).concatenate(self._domain)
            self._addr_origin = dns.name.Name(("addr",)).concatenate(self._domain)
        return self._domain

    # -- entry points

    def answer(self, wire: bytes, source: str | None, tcp: bool = False) -> bytes | Deferred | None:
        """The answer to one query, an Deferred to finish once the service is fetched, or
        None to drop the datagram (too short to answer, or itself a response)."""
        if len(wire) < 12 or wire[2] & 0x80:
            return None
        body = wire[2:] + (b"T" if tcp else b"U")
        plan = self._plans.get(body)
        if plan is not None:
            out = self._replay(plan, body, wire, source)
            if out is not None:
                return out
        self._plan = self._static = None
        out = self._parse_and_answer(wire, source, tcp)
        if isinstance(out, bytes) and (self._plan is not None or self._static is not None):
            if len(self._plans) >= MAX_CACHED or len(self._rendered) >= MAX_CACHED:
                self._plans.clear()
                self._rendered.clear()
            if self._plan is not None:
                self._plans[body] = self._plan
                self._rendered[body, self._planned] = out
            elif self._static is not None:
                self._static.out = out
                self._plans[body] = self._static
        return out

    def _keep(self, service: str, b: Any) -> None:
        """The answer being built depends on nothing but this balancer's state (SRV, NODATA,
        a VIP): a repeat of the query gets the same bytes until that state moves."""
        self._static = _Static(service, b, b.version, b.weights, self.rt.config)

    def _replay(self, plan: _Plan | _Static, body: bytes, wire: bytes, source: str | None) -> bytes | None:
        """The answer to a query seen before, byte for byte but its id: still one fresh
        pick, but the answer to that pick rendered once by dnspython and reused. None when
        anything it depended on moved (a reload, the service gone or changed family)."""
        b = self.rt.engine.services.get(plan.service)
        if isinstance(plan, _Static):
            if (plan.config is self.rt.config and b is plan.balancer and b.version == plan.version
                    and b.weights is plan.weights):
                if plan.srv:
                    self.rt.engine.mark_used(plan.service, self.rt.now())
                return wire[:2] + plan.out[2:]
            return None
        if plan.config is not self.rt.config or b is None or not b.served or self._served_families(plan.service, b) != {plan.family}:
            return None
        try:
            ep = pick(self.rt, plan.service, source)
        except PickError:
            return None  # the slow path picks again and says why
        out = self._rendered.get((body, ep.address))
        if out is None:
            r = self._response(plan.query, dns.rcode.NOERROR)
            r.answer.append(dns.rrset.from_rdata(plan.query.question[0].name, TTL, _address_rdata(ep.address, plan.family)))
            out = self._rendered[body, ep.address] = self._wire(r, plan.max_size)
        return wire[:2] + out[2:]

    def _parse_and_answer(self, wire: bytes, source: str | None, tcp: bool) -> bytes | Deferred | None:
        try:
            q = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many kinds for many malformations
            return _formerr(wire)
        # Over UDP: 512 bytes, or what the query's EDNS offers (up to ours).
        max_size = 65535 if tcp else 512 if q.edns < 0 else max(512, min(q.payload, EDNS_PAYLOAD))
        if q.opcode() != dns.opcode.QUERY:
            return self._rcode(q, dns.rcode.NOTIMP, max_size)
        if len(q.question) != 1:
            return self._rcode(q, dns.rcode.FORMERR, max_size)
        try:
            return self._answer(q, source, max_size)
        except Exception:
            # A bug answering one query costs that query, never the front end.
            log.exception("answering %s failed", q.question[0].to_text())
            self._plan = self._static = None  # never replay the failure
            self.rt.stats.errors["INTERNAL"] += 1
            return self._rcode(q, dns.rcode.SERVFAIL, max_size)

    def finish(self, pending: Deferred, error: ErrorCode | None, source: str | None) -> bytes:
        """Answer a query whose service the catalog source has now fetched (or could not)."""
        q, max_size = pending.query, pending.max_size
        if error is ErrorCode.UNKNOWN_SERVICE:
            return self._negative(q, dns.rcode.NXDOMAIN, max_size)
        if error is not None:
            return self._rcode(q, dns.rcode.SERVFAIL, max_size)
        try:
            out = self._answer(q, source, max_size, fetched=True)
            assert isinstance(out, bytes)  # fetched=True never defers again
            return out
        except Exception:
            log.exception("answering %s failed", q.question[0].to_text())
            self.rt.stats.errors["INTERNAL"] += 1
            return self._rcode(q, dns.rcode.SERVFAIL, max_size)

    # -- the question

    def _answer(self, q: dns.message.Message, source: str | None, max_size: int, fetched: bool = False) -> bytes | Deferred:
        rr = q.question[0]
        domain = self.domain
        if rr.rdclass not in (_IN, dns.rdataclass.ANY) or not rr.name.is_subdomain(domain):
            return self._rcode(q, dns.rcode.REFUSED, max_size)
        if rr.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            return self._rcode(q, dns.rcode.REFUSED, max_size)
        if rr.name == domain:
            r = self._response(q, dns.rcode.NOERROR)
            if rr.rdtype in (_SOA, _ANY):
                r.answer.append(self._soa())
            else:
                r.authority.append(self._soa())
            return self._wire(r, max_size)
        if rr.name.is_subdomain(self._service_origin) and rr.name != self._service_origin:
            labels = rr.name.relativize(self._service_origin).labels
            return self._service(q, rr.rdtype, labels, source, max_size, fetched)
        if rr.name.parent() == self._addr_origin:
            return self._address(q, rr.rdtype, rr.name.labels[0], max_size)
        return self._negative(q, dns.rcode.NXDOMAIN, max_size)

    def _service(self, q: dns.message.Message, qtype: int, labels: tuple[bytes, ...], source: str | None,
                 max_size: int, fetched: bool) -> bytes | Deferred:
        if len(labels) == 2 and labels[0][:1] == b"_" and labels[1].lower() in (b"_tcp", b"_udp"):
            labels = (labels[0][1:],)  # RFC 2782: _NAME._tcp.service.<domain>
        try:
            asked = b".".join(labels).decode("ascii")
        except UnicodeDecodeError:
            return self._negative(q, dns.rcode.NXDOMAIN, max_size)
        service = self._lookup(asked)
        if service is None:
            if not fetched and self.rt.fetch is not None and asked:
                return Deferred(q, asked, max_size)
            return self._negative(q, dns.rcode.NXDOMAIN, max_size)
        b = self.rt.engine.services[service]
        if not b.endpoints:
            # Listed with no instance at all, which is how Consul answers for a name it
            # does not know: NXDOMAIN, as Consul's own DNS says. SERVFAIL is for instances
            # that exist but none of which is eligible.
            return self._negative(q, dns.rcode.NXDOMAIN, max_size)
        if qtype == _SRV:
            return self._srv(q, service, max_size)
        if qtype not in (_A, _AAAA, _ANY):
            return self._negative(q, dns.rcode.NOERROR, max_size)
        family = 6 if qtype == _AAAA else 4
        if self.rt.config.dns_answer == "vip" and b.vip is not None:
            self._keep(service, b)
            if family == 6:
                return self._negative(q, dns.rcode.NOERROR, max_size)
            r = self._response(q, dns.rcode.NOERROR)
            r.answer.append(dns.rrset.from_rdata(q.question[0].name, TTL, A(_IN, _A, b.vip.address)))
            return self._wire(r, max_size)
        if b.served and qtype != _ANY and not ({family, 0} & self._served_families(service, b)):
            self._keep(service, b)
            return self._negative(q, dns.rcode.NOERROR, max_size)
        # A service serving both families: pick again (bounded) until the pick suits the
        # question, so A answers keep the policy's order among the IPv4 endpoints.
        mixed = qtype != _ANY and len(self._served_families(service, b)) > 1
        tries = min(len(b.served), MAX_FAMILY_TRIES) if mixed else 1
        for _ in range(tries):
            try:
                ep = pick(self.rt, service, source)
            except PickError as e:
                if e.code is ErrorCode.UNKNOWN_SERVICE:  # removed since the lookup above
                    return self._negative(q, dns.rcode.NXDOMAIN, max_size)
                return self._rcode(q, dns.rcode.SERVFAIL, max_size)
            got = _family(ep.address)
            if got in (0, family):
                break
        if not mixed and got == family and qtype != _ANY:
            self._plan = _Plan(q, service, family, max_size, self.rt.config)
            self._planned = ep.address
        name = q.question[0].name
        r = self._response(q, dns.rcode.NOERROR)
        if got == 0:  # a host name: the resolver follows the CNAME itself
            r.answer.append(dns.rrset.from_rdata(name, TTL, CNAME(_IN, dns.rdatatype.CNAME, dns.name.from_text(ep.address))))
        elif qtype == _ANY or got == family:
            r.answer.append(dns.rrset.from_rdata(name, TTL, _address_rdata(ep.address, got)))
        else:  # a mixed-family service picked the other family this time
            r.authority.append(self._soa())
        return self._wire(r, max_size)

    def _srv(self, q: dns.message.Message, service: str, max_size: int) -> bytes:
        engine = self.rt.engine
        b = engine.services[service]
        engine.mark_used(service, self.rt.now())  # a use: Consul keeps watching it
        if not b.served:
            return self._rcode(q, dns.rcode.SERVFAIL, max_size)
        self._keep(service, b)
        assert self._static is not None
        self._static.srv = True
        r = self._response(q, dns.rcode.NOERROR)
        name = q.question[0].name
        weights = b.weights or {}
        rdatas, extra = [], []
        for e in b.served:
            weight = max(0, min(65535, round(weights.get(e.id, e.weight))))
            family = _family(e.address)
            if family:
                target = dns.name.Name((_addr_label(e.address).encode(),)).concatenate(self._addr_origin)
                extra.append(dns.rrset.from_rdata(target, TTL, _address_rdata(e.address, family)))
            else:
                target = dns.name.from_text(e.address)
            rdatas.append(SRV(_IN, _SRV, 1, weight, e.port, target))
        r.answer.append(dns.rrset.from_rdata(name, TTL, *rdatas))
        r.additional.extend(extra)
        return self._wire(r, max_size)

    def _address(self, q: dns.message.Message, qtype: int, label: bytes, max_size: int) -> bytes:
        try:
            packed = bytes.fromhex(label.decode("ascii"))
            ip = ipaddress.ip_address(packed) if len(packed) in (4, 16) else None
        except (UnicodeDecodeError, ValueError):
            ip = None
        if ip is None:
            return self._negative(q, dns.rcode.NXDOMAIN, max_size)
        if qtype not in (_ANY, _A if ip.version == 4 else _AAAA):
            return self._negative(q, dns.rcode.NOERROR, max_size)
        r = self._response(q, dns.rcode.NOERROR)
        r.answer.append(dns.rrset.from_rdata(q.question[0].name, TTL, _address_rdata(str(ip), ip.version)))
        return self._wire(r, max_size)

    # -- helpers

    def _lookup(self, asked: str) -> str | None:
        """The service a DNS name means: exact first, then ignoring case (DNS names are
        case-insensitive, and some resolvers randomise case: draft-vixie-dnsext-dns0x20)."""
        services = self.rt.engine.services
        if asked in services:
            return asked
        # A scan, only when the exact name missed: ~50 us for 1,000 services, well under what
        # parsing the question cost. Names differing only in case: the first listed wins.
        low = asked.lower()
        return next((n for n in services if n.lower() == low), None)

    def _served_families(self, service: str, b: Any) -> frozenset[int]:
        hit = self._families.get(service)
        if hit is not None and hit[0] is b and hit[1] == b.version:
            return hit[2]
        fams = frozenset(_family(e.address) for e in b.served)
        if len(self._families) > 4096:
            self._families.clear()
        self._families[service] = (b, b.version, fams)
        return fams

    def _response(self, q: dns.message.Message, rcode: int) -> dns.message.Message:
        r = dns.message.make_response(q, our_payload=EDNS_PAYLOAD)
        r.flags |= dns.flags.AA
        r.set_rcode(rcode)
        return r

    def _soa(self) -> dns.rrset.RRset:
        d = self.domain
        mname = dns.name.Name(("ns",)).concatenate(d)
        rname = dns.name.Name(("hostmaster",)).concatenate(d)
        return dns.rrset.from_rdata(d, TTL, SOA(_IN, _SOA, mname, rname, *_SOA_TIMERS))

    def _negative(self, q: dns.message.Message, rcode: int, max_size: int) -> bytes:
        """NXDOMAIN or NODATA, with the SOA that tells resolvers not to cache it."""
        r = self._response(q, rcode)
        r.authority.append(self._soa())
        return self._wire(r, max_size)

    def _rcode(self, q: dns.message.Message, rcode: int, max_size: int) -> bytes:
        r = self._response(q, rcode)
        if rcode in (dns.rcode.NOTIMP, dns.rcode.FORMERR):
            r.question = []
        return self._wire(r, max_size)

    @staticmethod
    def _wire(r: dns.message.Message, max_size: int) -> bytes:
        # Over UDP an answer that does not fit is truncated (TC set): the resolver retries
        # over TCP, where max_size is 65535.
        return r.to_wire(max_size=max_size, prefer_truncation=True)


def _address_rdata(address: str, family: int) -> A | AAAA:
    return A(_IN, _A, address) if family == 4 else AAAA(_IN, _AAAA, address)


def _formerr(wire: bytes) -> bytes:
    """FORMERR for a query dnspython cannot parse, from its header alone: same id and
    opcode, QR set, no sections (RFC 1035 4.1.1)."""
    opcode_rd = wire[2] & 0x79  # opcode bits and RD
    return wire[:2] + bytes((0x80 | opcode_rd, dns.rcode.FORMERR)) + b"\x00" * 8
