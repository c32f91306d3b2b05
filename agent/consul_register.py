"""Provider registration: `[[provide]]` entries registered with the local Consul agent.

The other half of discovery (Nerve's job in SmartStack). For each provided service:

* register it with a check: `ttl` (default) is kept alive by this agent's own TCP probe of
  the local service every ttl/3, passing or failing it with the probe's result as the note;
  `http`/`tcp` hand the probing to Consul; `none` registers without a check;
* re-register when Consul lost it (the agent restarted with no persisted state, or an
  operator deregistered it): a TTL update answering "unknown check", or the service missing
  from `/v1/agent/services` for http/tcp/none checks;
* deregister everything on clean shutdown (cancellation), bounded in time.

py-consul does the HTTP here: these are a handful of short calls, so running its blocking
client in a worker thread is fine, unlike the long blocking queries of the watches. Calls
are serialised (its `requests` session is shared) and `CONSUL_HTTP_TOKEN`'s silent override
of the constructor token is undone so `consul.token` in our config wins, as it does for
the watches. Failures are logged once per change of a registration's state.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import consul
import requests
import trio

from softlb import Backoff, RetryPolicy
from softlb import ProvideConfig

from .consul_http import ConsulSettings, go_duration

log = logging.getLogger("softlb.consul.register")

#: Short: registration calls are quick, and a stuck call must not hold shutdown.
CALL_TIMEOUT = 5.0
DEREGISTER_BUDGET = 5.0
PROBE_TIMEOUT = 1.0
#: Errors a py-consul call may raise that mean "Consul or the network", not a bug of ours.
CALL_ERRORS = (consul.ConsulException, requests.RequestException, OSError)


@dataclass
class Registration:
    provide: ProvideConfig
    service_id: str
    check_id: str
    state: str = "pending"  # "registered" or "error: ..."
    registered: bool = field(default=False)
    attempted: bool = field(default=False)

    @property
    def target(self) -> tuple[str, int]:
        return self.provide.address or "127.0.0.1", self.provide.port


def service_id(p: ProvideConfig) -> str:
    # Name alone collides when one host runs two instances of a service on different ports.
    return p.id or f"{p.name}-{p.port}"


def check_definition(reg: Registration) -> dict[str, Any] | None:
    p = reg.provide
    host, port = reg.target
    if p.check == "none":
        return None
    if p.check == "ttl":
        check = consul.Check.ttl(go_duration(p.ttl))
        name = "softlb probe (TTL)"
    elif p.check == "http":
        check = consul.Check.http(f"http://{host}:{port}{p.check_path}", go_duration(p.check_interval))
        name = "HTTP check"
    else:
        check = consul.Check.tcp(host, port, go_duration(p.check_interval))
        name = "TCP check"
    out = {**check, "CheckID": reg.check_id, "Name": name}
    if p.deregister_after > 0:
        # So a registration nobody keeps alive (softlb gone, the [[provide]] entry removed
        # while it was down) does not stay behind, critical, for ever.
        out["DeregisterCriticalServiceAfter"] = go_duration(p.deregister_after)
    return out


async def probe_tcp(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            return False, f"TCP connect {host}:{port}: {e.strerror or e}"
        await stream.aclose()
        return True, f"TCP connect {host}:{port}: ok"
    return False, f"TCP connect {host}:{port}: timed out after {timeout}s"


class ProviderRegistrar:
    def __init__(self, provides: Sequence[ProvideConfig], settings: ConsulSettings, *,
                 retry: RetryPolicy = RetryPolicy(), rng: random.Random | None = None) -> None:
        self.settings = settings
        self.retry = retry
        self.rng = rng or random.Random()
        self.registrations = [Registration(p, service_id(p), f"softlb:{service_id(p)}")
                              for p in provides]
        self._lock = trio.Lock()
        self._client: consul.Consul | None = None
        #: registrations Consul lost and we restored (a metric and a test hook)
        self.reregistrations = 0

    def _make_client(self) -> consul.Consul:
        if self.settings.uds:
            raise consul.ConsulException("py-consul cannot reach Consul over a unix socket")
        host, port, scheme = self.settings.host_port
        c = consul.Consul(host=host, port=port, scheme=scheme, token=self.settings.token or None,
                          dc=self.settings.datacenter or None, verify=self.settings.verify,
                          cert=self.settings.cert, connections_timeout=CALL_TIMEOUT)
        c.token = self.settings.token or None  # py-consul prefers $CONSUL_HTTP_TOKEN
        if self.settings.auth:
            c.http.session.auth = self.settings.auth  # CONSUL_HTTP_AUTH
        return c

    async def _call(self, fn: Callable[[consul.Consul], Any], *, abandon: bool = True) -> Any:
        """Run one py-consul call in a worker thread, one at a time.

        `abandon=False` is for calls that change Consul: a cancelled wait must not leave
        such a call running on after us (a register landing after the deregistration would
        leave a ghost service behind); they are bounded by CALL_TIMEOUT anyway."""
        async with self._lock:
            if self._client is None:
                self._client = self._make_client()
            client = self._client
            return await trio.to_thread.run_sync(fn, client, abandon_on_cancel=abandon)

    def _set_state(self, reg: Registration, state: str) -> None:
        if state == reg.state:
            return
        if state == "registered":
            log.info("consul: registered %s (id %s, check %s)", reg.provide.name, reg.service_id,
                     reg.provide.check)
        else:
            log.warning("consul: registration of %s: %s", reg.service_id, state)
        reg.state = state

    async def register(self, reg: Registration) -> None:
        p = reg.provide
        check = check_definition(reg)

        def do(c: consul.Consul) -> Any:
            return c.agent.service.register(
                p.name, service_id=reg.service_id, address=p.address or None, port=p.port,
                tags=list(p.tags) or None, meta=dict(p.meta) or None, check=check,
                weights={"Passing": p.weight, "Warning": p.warning_weight})
        reg.attempted = True  # from now on, a clean stop must deregister it
        await self._call(do, abandon=False)
        reg.registered = True
        self._set_state(reg, "registered")

    async def _keep(self, reg: Registration) -> None:
        """Keep one registration alive until cancelled."""
        p = reg.provide
        backoff = Backoff(self.retry, self.rng)
        interval = p.ttl / 3 if p.check == "ttl" else p.check_interval
        while True:
            try:
                if not reg.registered:
                    await self.register(reg)
                if p.check == "ttl":
                    await self._ttl_update(reg)
                else:
                    services = await self._call(lambda c: c.agent.services())
                    if reg.service_id not in (services or {}):
                        log.warning("consul: %s vanished from the local agent; re-registering",
                                    reg.service_id)
                        await self.register(reg)
            except CALL_ERRORS as e:
                reg.registered = reg.registered and not isinstance(e, consul.ACLPermissionDenied)
                self._set_state(reg, f"error: {type(e).__name__}: {str(e)[:200]}")
                await trio.sleep(backoff.failure())
                continue
            backoff.success()
            await trio.sleep(interval)

    async def _ttl_update(self, reg: Registration) -> None:
        ok, note = await probe_tcp(*reg.target)

        def update(c: consul.Consul) -> Any:
            fn = c.agent.check.ttl_pass if ok else c.agent.check.ttl_fail
            return fn(reg.check_id, note)
        lost = ""
        try:
            if await self._call(update) is False:
                # Current Consul answers 404 "Unknown check ID" for a check it does not know
                # (agent/acl.go), and py-consul's CB.boolean turns a 404 into False.
                lost = "404 unknown check"
        except consul.ConsulException as e:
            if isinstance(e, consul.ACLPermissionDenied):
                raise
            if "does not have associated TTL" not in str(e) and "Unknown check" not in str(e):
                raise
            lost = str(e)[:120]  # older Consul: 500 "does not have associated TTL"
        if lost:
            # Consul lost our registration (agent restarted without state, or an operator
            # deregistered it): register again, once per occurrence, and pass the check.
            self.reregistrations += 1
            log.warning("consul: check %s unknown to Consul (%s); re-registering %s", reg.check_id,
                        lost, reg.service_id)
            await self.register(reg)
            if await self._call(update) is False:
                raise consul.ConsulException(f"check {reg.check_id} still unknown right after "
                                             "registering it")
        self._set_state(reg, "registered")

    async def deregister_all(self) -> None:
        for reg in self.registrations:
            # Attempted, not just confirmed: a register cancelled while in flight may well
            # have landed (deregistering one that did not is harmless).
            if not reg.attempted:
                continue
            try:
                await self._call(lambda c, sid=reg.service_id: c.agent.service.deregister(sid))
                reg.registered = False
                log.info("consul: deregistered %s", reg.service_id)
            except CALL_ERRORS as e:
                log.warning("consul: could not deregister %s: %s", reg.service_id, e)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register everything (first attempt before `started`), keep it alive, and
        deregister on the way out."""
        try:
            for reg in self.registrations:
                try:
                    await self.register(reg)
                    if reg.provide.check == "ttl":
                        await self._ttl_update(reg)  # pass at once rather than after ttl/3
                except CALL_ERRORS as e:
                    self._set_state(reg, f"error: {type(e).__name__}: {str(e)[:200]}")
            task_status.started()
            async with trio.open_nursery() as nursery:
                for reg in self.registrations:
                    nursery.start_soon(self._keep, reg)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(DEREGISTER_BUDGET):
                await self.deregister_all()
