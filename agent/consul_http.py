"""A small trio-native Consul HTTP client for the watch loops, on httpx.AsyncClient.

Why not py-consul here: its client is `requests` (blocking) and its async client is
asyncio+aiohttp only. A blocking query parks for up to `wait` (5 min); run in a worker
thread it cannot be cancelled, so reconfiguring, expiring a watch or shutting down would
strand threads and sockets for minutes. httpx runs on trio through anyio and a cancelled
request closes its connection at once. py-consul is still used for registration
(agent/consul_register.py), which is a few short one-shot calls.

Settings follow the Consul CLI conventions: an explicit config value wins, then
CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE / CONSUL_CACERT (plus
CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY, CONSUL_CLIENT_CERT/KEY).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote

import httpx

from softlb import ConsulConfig

DEFAULT_ADDR = "127.0.0.1:8500"
#: Added to `wait + wait/16` for the read timeout: Consul may answer that late on a healthy
#: blocking query (its jitter), and the network plus a busy agent need slack on top.
READ_SLACK = 10.0
CONNECT_TIMEOUT = 5.0
#: Extra pooled connections beyond one per blocking watch: the poller and first fetches.
SPARE_CONNECTIONS = 4


class ConsulError(Exception):
    """A Consul request failed. `kind` groups failures for once-per-change logging."""

    kind = "error"


class ConsulUnreachable(ConsulError):
    kind = "unreachable"


class ConsulHTTPError(ConsulError):
    def __init__(self, status: int, body: str) -> None:
        # The message is Consul's text; `kind` ("http 500") carries the status for logs.
        super().__init__(body.strip()[:200] or "(empty body)")
        self.status = status
        self.body = body
        self.kind = f"http {status}"


class ConsulACLError(ConsulHTTPError):
    """403: the token is missing, unknown or lacks permission. An operator must act."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.kind = "acl denied"


@dataclass(frozen=True)
class ConsulSettings:
    base_url: str
    token: str = ""
    token_file: str = ""
    verify: bool | str = True  # False, True, or a CA file path
    cert: tuple[str, str] | None = None
    uds: str = ""
    datacenter: str = ""
    stale: bool = False

    @property
    def host_port(self) -> tuple[str, int, str]:
        """(host, port, scheme) for clients that want them apart (py-consul)."""
        u = httpx.URL(self.base_url)
        return u.host, u.port or (443 if u.scheme == "https" else 80), u.scheme


def consul_settings(cfg: ConsulConfig, environ: Mapping[str, str] | None = None) -> ConsulSettings:
    env = os.environ if environ is None else environ
    addr = cfg.address or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
    uds = ""
    if addr.startswith("unix://"):
        uds, base = addr[len("unix://"):], "http://consul"
    elif "://" in addr:
        base = addr
    else:
        ssl_on = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes")
        base = f"{'https' if ssl_on else 'http'}://{addr}"
    ca = cfg.ca_file or env.get("CONSUL_CACERT", "")
    verify: bool | str = ca or True
    if env.get("CONSUL_HTTP_SSL_VERIFY", "").lower() in ("0", "false", "no"):
        verify = False
    cert = None
    if env.get("CONSUL_CLIENT_CERT") and env.get("CONSUL_CLIENT_KEY"):
        cert = (env["CONSUL_CLIENT_CERT"], env["CONSUL_CLIENT_KEY"])
    token, token_file = cfg.token, ""
    if not token:
        token = env.get("CONSUL_HTTP_TOKEN", "")
        if not token and env.get("CONSUL_HTTP_TOKEN_FILE"):
            token_file = env["CONSUL_HTTP_TOKEN_FILE"]
            token = read_token_file(token_file)
    return ConsulSettings(base.rstrip("/"), token, token_file, verify, cert, uds,
                          cfg.datacenter, cfg.stale)


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConsulError(f"cannot read CONSUL_HTTP_TOKEN_FILE {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ConsulAnswer:
    """A 200 from Consul, not yet interpreted (that is softlb._consul's job)."""

    body: bytes
    index: str | None  # the raw X-Consul-Index header
    known_leader: bool | None
    last_contact_ms: int | None


def go_duration(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def ssl_context(settings: ConsulSettings) -> ssl.SSLContext | bool:
    if settings.verify is False and not settings.cert:
        return False
    ca = settings.verify if isinstance(settings.verify, str) else None
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if settings.cert:
            ctx.load_cert_chain(*settings.cert)
    except (OSError, ssl.SSLError) as e:
        raise ConsulError(f"Consul TLS files (CA {ca or 'system'}, cert {settings.cert}): {e}") from None
    if settings.verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ConsulClient:
    def __init__(self, settings: ConsulSettings, *, max_connections: int = 16) -> None:
        self.settings = settings
        self._token = settings.token
        transport = httpx.AsyncHTTPTransport(
            uds=settings.uds or None, verify=ssl_context(settings),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))
        self._http = httpx.AsyncClient(base_url=settings.base_url, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health_service(self, service: str, *, index: int = 0, wait: float = 0.0,
                             cached: bool = False) -> ConsulAnswer:
        """GET /v1/health/service/<service>. Blocking when index > 0 (up to `wait` seconds)."""
        params: list[tuple[str, str]] = []
        if index > 0:
            params += [("index", str(index)), ("wait", go_duration(wait))]
        if self.settings.datacenter:
            params.append(("dc", self.settings.datacenter))
        if self.settings.stale:
            params.append(("stale", ""))
        if cached:
            params.append(("cached", ""))
        read = (wait + wait / 16 if index > 0 else 0.0) + READ_SLACK
        timeout = httpx.Timeout(read, connect=CONNECT_TIMEOUT)
        # Encoded whole: a name must never add a query ("web?dc=x"), a fragment or a path
        # segment ("x/../web") to the request. Names callers send are also validated
        # upstream (ConsulSource.want); configured names only get this.
        return await self._get(f"/v1/health/service/{quote(service, safe='')}", params, timeout)

    async def _get(self, path: str, params: list[tuple[str, str]], timeout: httpx.Timeout) -> ConsulAnswer:
        headers = {"X-Consul-Token": self._token} if self._token else {}
        try:
            r = await self._http.get(path, params=params, headers=headers, timeout=timeout)
            body = r.content
        except httpx.TransportError as e:
            raise ConsulUnreachable(f"{type(e).__name__}: {e or 'no detail'}") from None
        if r.status_code == 403:
            self._reload_token()
            raise ConsulACLError(403, body.decode("utf-8", "replace"))
        if r.status_code != 200:
            raise ConsulHTTPError(r.status_code, body.decode("utf-8", "replace"))
        h = r.headers
        leader = h.get("X-Consul-KnownLeader")
        contact = h.get("X-Consul-LastContact", "")
        return ConsulAnswer(
            body=body,
            index=h.get("X-Consul-Index"),
            known_leader=None if leader is None else leader.lower() == "true",
            last_contact_ms=int(contact) if contact.isdigit() else None,
        )

    def _reload_token(self) -> None:
        # An operator fixing a 403 rewrites the token file; pick it up without a restart.
        if self.settings.token_file:
            try:
                self._token = read_token_file(self.settings.token_file)
            except ConsulError:
                pass
