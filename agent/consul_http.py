"""A small trio-native Consul HTTP client for the watch loops, on httpx.AsyncClient.

Why not py-consul here: its client is `requests` (blocking) and its async client is
asyncio+aiohttp only. A blocking query parks for up to `wait` (5 min); run in a worker
thread it cannot be cancelled, so reconfiguring, expiring a watch or shutting down would
strand threads and sockets for minutes. httpx runs on trio through anyio and a cancelled
request closes its connection at once. py-consul is still used for registration
(agent/consul_register.py), which is a few short one-shot calls.

Settings follow Consul's Go `api` package: an explicit config value wins, then
CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN_FILE (which beats CONSUL_HTTP_TOKEN), CONSUL_CACERT /
CONSUL_CAPATH, CONSUL_HTTP_SSL (also upgrades an http:// address), CONSUL_HTTP_SSL_VERIFY,
CONSUL_CLIENT_CERT/KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_AUTH, CONSUL_NAMESPACE and
CONSUL_PARTITION.

Answer bodies are read in chunks and refused past `consul.max_body`: an endless 200 body
costs a bounded buffer and an error, never the agent's memory.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote

import httpx

from softlb import AnswerMeta, ConsulConfig, ConsulQuery, parse_answer_meta, parse_retry_after

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


class ConsulBodyTooLarge(ConsulError):
    kind = "answer too large"


class ConsulHTTPError(ConsulError):
    def __init__(self, status: int, body: str, retry_after: float | None = None) -> None:
        # The message is Consul's text; `kind` ("http 500") carries the status for logs.
        super().__init__(body.strip()[:200] or "(empty body)")
        self.status = status
        self.body = body
        self.kind = f"http {status}"
        #: A 429's Retry-After (seconds): the backoff waits at least this long.
        self.retry_after = retry_after


class ConsulACLError(ConsulHTTPError):
    """403: the token is missing, unknown or lacks permission. An operator must act."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.kind = "acl denied"


class ConsulACLFiltered(ConsulError):
    """200 with X-Consul-Results-Filtered-By-ACLs: the token may not see everything; the
    answer is partial (often `[]`) and must not be taken for the service's instances."""

    kind = "acl denied"


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
    max_stale: float = 0.0
    capath: str = ""
    tls_server_name: str = ""
    auth: tuple[str, str] | None = None  # CONSUL_HTTP_AUTH user:password
    namespace: str = ""
    partition: str = ""
    max_body: int = 64 << 20

    @property
    def host_port(self) -> tuple[str, int, str]:
        """(host, port, scheme) for clients that want them apart (py-consul)."""
        u = httpx.URL(self.base_url)
        return u.host, u.port or (443 if u.scheme == "https" else 80), u.scheme


def consul_settings(cfg: ConsulConfig, environ: Mapping[str, str] | None = None) -> ConsulSettings:
    env = os.environ if environ is None else environ
    addr = cfg.address or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
    ssl_on = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes")
    uds = ""
    if addr.startswith("unix://"):
        uds, base = addr[len("unix://"):], "http://consul"
    elif "://" in addr:
        base = addr
        # As in Consul's api.DefaultConfig: CONSUL_HTTP_SSL=true upgrades an http address.
        if ssl_on and base.startswith("http://"):
            base = "https://" + base[len("http://"):]
    else:
        base = f"{'https' if ssl_on else 'http'}://{addr}"
    ca = cfg.ca_file or env.get("CONSUL_CACERT", "")
    capath = "" if cfg.ca_file else env.get("CONSUL_CAPATH", "")
    verify: bool | str = ca or True
    if env.get("CONSUL_HTTP_SSL_VERIFY", "").lower() in ("0", "false", "no"):
        verify = False
    cert = None
    if env.get("CONSUL_CLIENT_CERT") and env.get("CONSUL_CLIENT_KEY"):
        cert = (env["CONSUL_CLIENT_CERT"], env["CONSUL_CLIENT_KEY"])
    # Consul's api: the token file beats the token variable; our config beats both.
    token, token_file = cfg.token, ""
    if not token:
        if env.get("CONSUL_HTTP_TOKEN_FILE"):
            token_file = env["CONSUL_HTTP_TOKEN_FILE"]
            token = read_token_file(token_file)
        else:
            token = env.get("CONSUL_HTTP_TOKEN", "")
    auth = None
    if env.get("CONSUL_HTTP_AUTH"):
        user, _, password = env["CONSUL_HTTP_AUTH"].partition(":")
        auth = (user, password)
    return ConsulSettings(base.rstrip("/"), token, token_file, verify, cert, uds,
                          cfg.datacenter, cfg.stale, cfg.max_stale if cfg.stale else 0.0, capath,
                          env.get("CONSUL_TLS_SERVER_NAME", ""), auth,
                          env.get("CONSUL_NAMESPACE", ""), env.get("CONSUL_PARTITION", ""),
                          cfg.max_body)


def query_params(settings: ConsulSettings, q: ConsulQuery | None) -> list[tuple[str, str]]:
    """The per-service query options as Consul's parameters (config beats the environment)."""
    q = q or ConsulQuery()
    params: list[tuple[str, str]] = []
    ns = q.namespace or settings.namespace
    partition = q.partition or settings.partition
    if ns:
        params.append(("ns", ns))
    if partition:
        params.append(("partition", partition))
    if q.peer:
        params.append(("peer", q.peer))
    if q.filter:
        params.append(("filter", q.filter))
    params += [("node-meta", f"{k}:{v}") for k, v in sorted(q.node_meta.items())]
    if q.near:
        params.append(("near", q.near))
    return params


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConsulError(f"cannot read CONSUL_HTTP_TOKEN_FILE {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ConsulAnswer:
    """A 200 from Consul; `meta` is its headers as softlb._consul reads them."""

    body: bytes
    meta: AnswerMeta

    @property
    def index(self) -> str | None:
        return self.meta.index


def go_duration(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def ssl_context(settings: ConsulSettings) -> ssl.SSLContext | bool:
    if settings.verify is False and not settings.cert:
        return False
    if settings.verify is True and not settings.cert and not settings.capath:
        return True
    ca = settings.verify if isinstance(settings.verify, str) else None
    try:
        ctx = ssl.create_default_context(cafile=ca, capath=settings.capath or None)
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

    def _common(self, wait: float, index: int) -> tuple[list[tuple[str, str]], httpx.Timeout]:
        params: list[tuple[str, str]] = []
        if index > 0:
            params += [("index", str(index)), ("wait", go_duration(wait))]
        if self.settings.datacenter:
            params.append(("dc", self.settings.datacenter))
        if self.settings.stale:
            params.append(("stale", ""))
            if self.settings.max_stale > 0:
                params.append(("max_stale", go_duration(self.settings.max_stale)))
        read = (wait + wait / 16 if index > 0 else 0.0) + READ_SLACK
        return params, httpx.Timeout(read, connect=CONNECT_TIMEOUT)

    async def health_service(self, service: str, *, index: int = 0, wait: float = 0.0,
                             cached: bool = False, query: ConsulQuery | None = None) -> ConsulAnswer:
        """GET /v1/health/service/<service>. Blocking when index > 0 (up to `wait` seconds)."""
        params, timeout = self._common(wait, index)
        if cached:
            # The cache's own background query then reads stale too; max_stale is the
            # RPC path's retry-on-the-leader knob, the cache answers with Age instead.
            params = [p for p in params if p[0] != "max_stale"]
            params.append(("cached", ""))
        params += query_params(self.settings, query)
        # Encoded whole: a name must never add a query ("web?dc=x"), a fragment or a path
        # segment ("x/../web") to the request. Names callers send are also validated
        # upstream (ConsulSource.want); configured names only get this.
        return await self._get(f"/v1/health/service/{quote(service, safe='')}", params, timeout)

    async def health_state_any(self, *, index: int = 0, wait: float = 0.0, filter: str = "") -> ConsulAnswer:
        """GET /v1/health/state/any: every check in the datacenter (the change feed), or
        those matching `filter`."""
        params, timeout = self._common(wait, index)
        params += query_params(self.settings, None)
        if filter:
            params.append(("filter", filter))
        return await self._get("/v1/health/state/any", params, timeout)

    async def catalog_services(self, *, index: int = 0, wait: float = 0.0) -> ConsulAnswer:
        """GET /v1/catalog/services: every service name in the datacenter, with its tags."""
        params, timeout = self._common(wait, index)
        params += query_params(self.settings, None)
        return await self._get("/v1/catalog/services", params, timeout)

    async def _get(self, path: str, params: list[tuple[str, str]], timeout: httpx.Timeout) -> ConsulAnswer:
        headers = {"X-Consul-Token": self._token} if self._token else {}
        ext = {"sni_hostname": self.settings.tls_server_name} if self.settings.tls_server_name else None
        limit = self.settings.max_body
        try:
            async with self._http.stream("GET", path, params=params, headers=headers, timeout=timeout,
                                         auth=self.settings.auth, extensions=ext) as r:
                declared = r.headers.get("Content-Length", "").strip()
                if declared.isascii() and declared.isdigit() and (len(declared) > 12 or int(declared) > limit):
                    raise ConsulBodyTooLarge(f"{path}: answer of {declared[:20]} bytes is over "
                                             f"consul.max_body ({limit} bytes)")
                chunks: list[bytes] = []
                size = 0
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        # Leaving the block closes the connection: the rest is never read.
                        raise ConsulBodyTooLarge(f"{path}: answer over consul.max_body ({limit} bytes)")
                    chunks.append(chunk)
                body = b"".join(chunks)
        except httpx.TransportError as e:
            raise ConsulUnreachable(f"{type(e).__name__}: {e or 'no detail'}") from None
        if r.status_code == 403:
            self._reload_token()
            raise ConsulACLError(403, body.decode("utf-8", "replace"))
        if r.status_code != 200:
            retry = parse_retry_after(r.headers.get("Retry-After")) if r.status_code == 429 else None
            raise ConsulHTTPError(r.status_code, body.decode("utf-8", "replace"), retry)
        return ConsulAnswer(body=body, meta=parse_answer_meta(r.headers))

    def _reload_token(self) -> None:
        # An operator fixing a 403 rewrites the token file; pick it up without a restart.
        if self.settings.token_file:
            try:
                self._token = read_token_file(self.settings.token_file)
            except ConsulError:
                pass
