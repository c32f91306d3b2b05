"""The `softlb` command: run the agent, or ask a running agent.

    softlb agent --config FILE [flags]       run the agent (logs to stderr)
    softlb resolve SERVICE [--key K] [--json]
    softlb services [--json]
    softlb endpoints SERVICE [--json]
    softlb watch SERVICE [--json]            time-stamped changes (--json: one line per update)
    softlb status [--json] [--admin H:P]     is this host's LB healthy (from the admin port)
    softlb top [--admin H:P]                 live view of services and endpoints
    softlb check --config FILE               validate config + catalog, run nothing

Exit codes (stable, for scripts): 0 ok; 1 the agent answered with an error (unknown
service, no healthy endpoint...); 2 usage or config error; 3 the agent is unreachable or
timed out; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

EXIT_OK = 0
EXIT_ANSWER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", help="agent Unix socket (default: $SOFTLB_SOCKET or the runtime dir)")
    p.add_argument("--addr", metavar="HOST:PORT", help="use the agent's loopback port instead of the socket")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="per-call timeout (default 2)")


def _version() -> str:
    from softlb import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="softlb", description="softlb: a per-host soft load balancer.")
    ap.add_argument("--version", action="version", version=f"softlb {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    a = sub.add_parser("agent", help="run the agent", description="Run the softlb agent in the foreground (logs to stderr).")
    a.add_argument("--config", metavar="FILE", help="agent config (TOML)")
    a.add_argument("--socket", metavar="PATH", help="Unix socket to serve (default: runtime dir)")
    a.add_argument("--listen", metavar="HOST:PORT", help="loopback msgpack port (default 127.0.0.1:7070; '' disables)")
    a.add_argument("--admin", metavar="HOST:PORT", help="loopback admin HTTP port (default 127.0.0.1:7071; '' disables)")
    a.add_argument("--state-dir", metavar="DIR", help="where the agent keeps state across restarts")
    a.add_argument("--catalog-file", metavar="FILE", help="serve the embedded file catalog from FILE")
    a.add_argument("--consul", metavar="URL", help="use Consul at URL as the catalog source")
    a.add_argument("--node", help="this host's node label (locality)")
    a.add_argument("--zone", help="this host's zone label (locality)")
    a.add_argument("--region", help="this host's region label (locality)")
    a.add_argument("--dns", metavar="HOST:PORT",
                   help="serve DNS (UDP and TCP) for NAME.service.softlb on this loopback address (default off; docs/DNS.md)")
    a.add_argument("--allow-non-loopback", action="store_true", default=None,
                   help="allow --listen/--admin on a non-loopback address")
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity on stderr (default info; debug also logs each Consul request)")
    a.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line with service/endpoint/reason fields")

    c = sub.add_parser("check", help="validate a config (and its catalog file) without running",
                       description="Validate an agent config and, for the file source, its catalog. "
                                   "Exit 0 if both are good, 2 with the reason otherwise. systemd's "
                                   "ExecReload= runs this first, so a bad edit fails `systemctl reload`.")
    c.add_argument("--config", metavar="FILE", required=True)
    c.add_argument("--catalog-file", metavar="FILE", help="check this catalog instead of the config's")
    c.add_argument("--json", action="store_true", help="print {ok, error} as JSON")

    r = sub.add_parser("resolve", help="pick one endpoint of a service")
    r.add_argument("service")
    r.add_argument("--key", help="hash key for consistent-hash policies")
    r.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="only endpoints with this tag (repeatable)")
    _client_args(r)

    s = sub.add_parser("services", help="list the services the agent knows")
    _client_args(s)

    e = sub.add_parser("endpoints", help="show a service's endpoints and their state")
    e.add_argument("service")
    _client_args(e)

    w = sub.add_parser("watch", help="print a service's endpoints now, then a time-stamped line per change",
                       description="Print the endpoints table once, then for every change a time stamp and what "
                                   "changed (joined, left, served/not served and why, panic, stale). --json prints "
                                   "one JSON object per update: {time, service, version, changes, state}.")
    w.add_argument("service")
    _client_args(w)

    st = sub.add_parser("status", help="is this host's load balancer healthy? (one screen)",
                        description="Version, uptime, catalog source and its state, the last reload, services with "
                                    "eligible/total, panic and the first problem, listeners, clients, recent "
                                    "errors. Read from the admin port. Exit 0 healthy, 1 a problem is shown, 3 "
                                    "the agent is unreachable.")
    st.add_argument("--admin", metavar="HOST:PORT", help="the agent's admin port (default $SOFTLB_ADMIN or 127.0.0.1:7071)")
    st.add_argument("--json", action="store_true", help="print the /v1/status JSON")
    st.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS")

    t = sub.add_parser("top", help="live view: services, then a service's endpoints (keys: arrows, enter, q)",
                       description="A refreshing terminal view of the agent's admin port: services with request "
                                   "rate, error rate, eligible/total and panic; Enter shows a service's endpoints "
                                   "with picks/s, latency, state and reason. Keys: up/down (or j/k) move, Enter "
                                   "opens, Esc/Backspace goes back, q quits.")
    t.add_argument("--admin", metavar="HOST:PORT", help="the agent's admin port (default $SOFTLB_ADMIN or 127.0.0.1:7071)")
    t.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    return ap


# ------------------------------------------------------------------------ views

from .cli_views import format_endpoints, table, yn as _yn  # noqa: E402


# ------------------------------------------------------------------------ commands


def _run_agent(args: argparse.Namespace) -> int:
    import trio

    from softlb import AgentConfig, ConfigError
    from softlb import with_overrides

    from .app import load_config_file, run_agent

    from .service_manager import JournalFormatter, stderr_is_journal

    from .logfmt import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else JournalFormatter() if stderr_is_journal()
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.log_level != "debug":
        # httpx logs every request at INFO: one line per Consul blocking query.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logging.getLogger("softlb.agent")

    def overrides(cfg: AgentConfig) -> AgentConfig:
        from dataclasses import replace
        return with_overrides(
            cfg,
            socket=args.socket, listen=args.listen, admin=args.admin, state_dir=args.state_dir,
            catalog_file=args.catalog_file, node=args.node, zone=args.zone, region=args.region,
            allow_non_loopback=args.allow_non_loopback, dns=args.dns,
            source=("consul" if args.consul else ("file" if args.catalog_file else None)),
            # Here, not after: a SIGHUP reload re-applies overrides and must keep --consul.
            consul=replace(cfg.consul, address=args.consul) if args.consul else None,
        )

    try:
        if args.consul and args.catalog_file:
            raise ConfigError("--catalog-file and --consul both given: choose one catalog source")
        cfg = overrides(load_config_file(args.config) if args.config else AgentConfig())
        trio.run(lambda: run_agent(cfg, config_path=args.config, overrides=overrides))
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except BaseExceptionGroup as eg:  # a startup error raised inside the agent's nursery
        config_errors, rest = eg.split(ConfigError)
        if rest is not None or config_errors is None:
            raise
        for e in _leaves(config_errors):
            log.error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _fail(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """An error: to stderr as a line, or with --json as {"error": ...} on stdout, so scripts
    parsing stdout always get JSON."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"softlb: {code}: {message}" if code not in ("AGENT_UNAVAILABLE", "TIMEOUT") else f"softlb: {message}",
              file=sys.stderr)
    return exit_code


def _run_client(args: argparse.Namespace) -> int:
    from softlb_client import AgentUnavailable, Client, SoftLBError, Timeout
    from softlb_client import ProtocolError

    from .cli_views import speaks_http, watch_line

    if args.timeout <= 0:
        return _fail(args, "USAGE", f"--timeout must be positive, got {args.timeout}", EXIT_USAGE)
    try:
        client = Client(socket_path=args.socket, addr=args.addr, timeout=args.timeout)
    except ValueError as e:
        return _fail(args, "USAGE", f"--addr: {e}", EXIT_USAGE)
    try:
        if args.cmd == "resolve":
            r = client.resolve(args.service, key=args.key, tags=args.tags, lease=False)
            if args.json:
                d = r.as_dict()
                if d.get("age") is None:
                    d.pop("age", None)  # as on the wire and over HTTP: "age" only with stale data
                print(json.dumps(d))
            else:
                flags = "".join((" (panic)" if r.panic else "", " (stale)" if r.stale else ""))
                print(f"{r.address}:{r.port}  {r.id}{flags}")
        elif args.cmd == "services":
            svcs = client.services()
            if args.json:
                print(json.dumps(svcs))
            else:
                rows = [[s["name"], s["policy"], s.get("catalog_endpoints", s["endpoints"]), s["eligible"],
                         s.get("served", "-"), _yn(s["panic"]), _yn(s["stale"])] for s in svcs]
                header = ["SERVICE", "POLICY", "ENDPOINTS", "ELIGIBLE", "SERVED", "PANIC", "STALE"]
                if any("vip" in s for s in svcs):  # service addresses (docs/CONFIG.md): only when used
                    header.append("VIP")
                    for row, s in zip(rows, svcs):
                        v = s.get("vip")
                        row.append(None if v is None else f"{v['address']}:{v['port']}" if v["port"] else f"{v['address']}:*")
                print(table(rows, header))
        elif args.cmd == "endpoints":
            d = client.endpoints(args.service)
            print(json.dumps(d) if args.json else format_endpoints(d))
        elif args.cmd == "watch":
            before = None
            for d in client.watch(args.service):
                print(watch_line(args.service, before, d, args.json), flush=True)
                before = d
    except (AgentUnavailable, Timeout, ProtocolError) as e:
        if args.addr and speaks_http(args.addr):
            return _fail(args, "WRONG_PORT", f"{args.addr} answers HTTP: that is the admin port (agent.admin), not "
                         "the protocol port (agent.listen, default 127.0.0.1:7070); use --addr with the "
                         f"listen port, or curl http://{args.addr}/", EXIT_UNAVAILABLE)
        hint = "" if args.json else " (is the agent running? `systemctl status softlb-agent`, or pass --socket/--addr)"
        return _fail(args, e.code, e.message + hint, EXIT_UNAVAILABLE)
    except SoftLBError as e:
        return _fail(args, e.code, e.message, EXIT_ANSWER_ERROR)
    except BrokenPipeError:
        # `softlb watch web | head -1`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    from softlb import ConfigError
    from softlb import parse_catalog_text, plural

    from .app import load_config_file

    summary = ""
    try:
        cfg = load_config_file(args.config)
        catalog = args.catalog_file or (cfg.catalog_file if cfg.source == "file" else "")
        if cfg.source == "file" and not catalog:
            # The agent refuses to start like this; so does check.
            raise ConfigError(f"{args.config}: no catalog: set catalog.file, or catalog.source = \"consul\"")
        if catalog:
            try:
                with open(catalog, "rb") as f:  # bytes: a file that is not UTF-8 is a ConfigError
                    services = parse_catalog_text(f.read())
            except OSError as e:
                raise ConfigError(f"{catalog}: cannot read: {e.strerror}") from None
            except ConfigError as e:
                raise ConfigError(f"{catalog}: {e}") from None
            summary = (f"; catalog {catalog}: {plural(len(services), 'service')}, "
                       f"{plural(sum(map(len, services.values())), 'endpoint')}")
    except ConfigError as e:
        print(json.dumps({"ok": False, "error": str(e)}) if args.json else f"softlb: {e}",
              file=sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    print(json.dumps({"ok": True, "error": None}) if args.json else f"{args.config}: ok{summary}")
    return EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    from .cli_views import admin_address, format_status, http_get_json

    addr = admin_address(args.admin)
    try:
        code, st = http_get_json(addr, "/v1/status", args.timeout)
    except (OSError, ValueError) as e:
        hint = "" if args.json else (" (is the agent running with its admin port there? pass --admin HOST:PORT "
                                     "or set SOFTLB_ADMIN)")
        return _fail(args, "AGENT_UNAVAILABLE", f"cannot read status from {addr}: {e}{hint}", EXIT_UNAVAILABLE)
    if code != 200:
        err = (st or {}).get("error", {}) if isinstance(st, dict) else {}
        return _fail(args, err.get("code", f"HTTP_{code}"), err.get("message", f"HTTP {code}"), EXIT_ANSWER_ERROR)
    print(json.dumps(st) if args.json else format_status(st))
    healthy = st["ready"] and st["source"]["up"] and not any(s.get("problem") for s in st["services"])
    return EXIT_OK if healthy else EXIT_ANSWER_ERROR


def _run_top(args: argparse.Namespace) -> int:
    from .cli_views import admin_address
    from .top import run_top

    return run_top(admin_address(args.admin), args.interval)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "agent":
        return _run_agent(args)
    if args.cmd == "check":
        return _run_check(args)
    if args.cmd == "status":
        return _run_status(args)
    if args.cmd == "top":
        return _run_top(args)
    return _run_client(args)


def main() -> None:
    sys.exit(run())
