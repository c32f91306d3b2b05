"""`python -m tests.consulsim --port N`: serve until SIGTERM/SIGINT; prints READY <url>."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import SimServer
from .state import ConsulSim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.consulsim")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--acl-token", default="")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    sim = ConsulSim(seed=args.seed)
    sim.set_acl(args.acl_token)
    srv = SimServer(sim, args.host, args.port).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"READY {srv.url}", flush=True)
    done.wait()
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
