"""The `softlb` command: run the agent, or ask a running agent.

    softlb agent --config FILE [flags]       run the agent (logs to stderr)
    softlb resolve SERVICE [--key K] [--json]
    softlb services [--json]
    softlb endpoints SERVICE [--json]
    softlb watch SERVICE [--json]

Exit codes (stable, for scripts): 0 ok; 1 the agent answered with an error (unknown
service, no healthy endpoint...); 2 usage or config error; 3 the agent is unreachable or
timed out; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="softlb", description="softlb: a per-host soft load balancer.")
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
    a.add_argument("--allow-non-loopback", action="store_true", default=None,
                   help="allow --listen/--admin on a non-loopback address")
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

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

    w = sub.add_parser("watch", help="print a service's endpoints now and on every change")
    w.add_argument("service")
    _client_args(w)
    return ap


# ------------------------------------------------------------------------ tables


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _yn(v: Any) -> str:
    return "yes" if v else "no"


def format_endpoints(d: dict[str, Any]) -> str:
    head = f"service {d['service']}  policy {d['policy']}  panic {_yn(d.get('panic'))}  stale {_yn(d.get('stale'))}"
    if d.get("age") is not None and d.get("stale"):
        head += f" (data age {d['age']:.1f}s)"
    rows = [
        (e["id"], f"{e['address']}:{e['port']}", e.get("weight"), e.get("registry", ""),
         _yn(e.get("eligible")), ",".join(e.get("tags") or ()) or "-", e.get("zone") or "-")
        for e in d.get("endpoints", [])
    ]
    return head + "\n" + table(rows, ("ID", "ADDRESS", "WEIGHT", "REGISTRY", "ELIGIBLE", "TAGS", "ZONE"))


# ------------------------------------------------------------------------ commands


def _run_agent(args: argparse.Namespace) -> int:
    import trio

    from softlb import AgentConfig, ConfigError
    from softlb._config import with_overrides

    from .app import load_config_file, run_agent

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("softlb.agent")

    def overrides(cfg: AgentConfig) -> AgentConfig:
        from dataclasses import replace
        return with_overrides(
            cfg,
            socket=args.socket, listen=args.listen, admin=args.admin, state_dir=args.state_dir,
            catalog_file=args.catalog_file, node=args.node, zone=args.zone, region=args.region,
            allow_non_loopback=args.allow_non_loopback,
            source=("consul" if args.consul else ("file" if args.catalog_file else None)),
            # Here, not after: a SIGHUP reload re-applies overrides and must keep --consul.
            consul=replace(cfg.consul, address=args.consul) if args.consul else None,
        )

    try:
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


def _run_client(args: argparse.Namespace) -> int:
    from softlb_client import AgentUnavailable, Client, SoftLBError, Timeout

    client = Client(socket_path=args.socket, addr=args.addr, timeout=args.timeout)
    try:
        if args.cmd == "resolve":
            r = client.resolve(args.service, key=args.key, tags=args.tags, lease=False)
            if args.json:
                print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in r.__dict__.items()}))
            else:
                flags = "".join((" (panic)" if r.panic else "", " (stale)" if r.stale else ""))
                print(f"{r.address}:{r.port}  {r.id}{flags}")
        elif args.cmd == "services":
            svcs = client.services()
            if args.json:
                print(json.dumps(svcs))
            else:
                print(table([(s["name"], s["policy"], s["endpoints"], s["eligible"], _yn(s["panic"]), _yn(s["stale"]))
                             for s in svcs], ("SERVICE", "POLICY", "ENDPOINTS", "ELIGIBLE", "PANIC", "STALE")))
        elif args.cmd == "endpoints":
            d = client.endpoints(args.service)
            print(json.dumps(d) if args.json else format_endpoints(d))
        elif args.cmd == "watch":
            for d in client.watch(args.service):
                print(json.dumps(d) if args.json else format_endpoints(d) + "\n", flush=True)
    except (AgentUnavailable, Timeout) as e:
        print(f"softlb: {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SoftLBError as e:
        print(f"softlb: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_ANSWER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()
    return EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "agent":
        return _run_agent(args)
    return _run_client(args)


def main() -> None:
    sys.exit(run())
