"""The demo: five tiny backends, the agent on the file catalog, and a few calls through it.

    .venv/bin/python examples/demo.py          (or: make demo)

Runs in the foreground until Ctrl-C, then stops every process it started by pid. While it
runs, in another terminal:

    .venv/bin/softlb resolve web        # rotates over web-1, web-2, web-3
    .venv/bin/softlb endpoints web
    curl -s localhost:7071/metrics
    $EDITOR examples/catalog.toml       # changes apply without a restart
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = [("web-1", 18081), ("web-2", 18082), ("web-3", 18083), ("api-1", 18091), ("api-2", 18092)]


def main() -> int:
    from softlb_client import AgentUnavailable, Client

    procs: list[subprocess.Popen[bytes]] = []
    # SIGTERM too must run the finally below, so no backend outlives the demo.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for name, port in BACKENDS:
            procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "backend.py"), "--name", name, "--port", str(port)]))
        agent = subprocess.Popen(
            [sys.executable, "-m", "softlb_agent", "agent", "--config", os.path.join(HERE, "agent.toml")], cwd=ROOT
        )
        procs.append(agent)
        client = Client(timeout=1.0)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.hello()
                break
            except AgentUnavailable:
                if agent.poll() is not None or time.monotonic() > deadline:
                    print("demo: the agent did not start (see its log above)", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        print("\ndemo: six calls to service 'web', each resolved by the agent, then sent to the backend:")
        for _ in range(6):
            r = client.resolve("web")
            t0 = time.monotonic()
            try:
                text = urllib.request.urlopen(f"http://{r.address}:{r.port}/", timeout=2).read().decode().strip()
                client.report(lease=r.lease, ok=True, latency=time.monotonic() - t0)
            except OSError as e:
                text = f"failed: {e}"
                client.report(lease=r.lease, ok=False)
            print(f"  resolve web -> {r.address}:{r.port} ({r.id}) -> {text!r}")
        client.close()
        print(
            "\ndemo: the agent is running. In another terminal try:\n"
            "  .venv/bin/softlb resolve web\n"
            "  .venv/bin/softlb endpoints web\n"
            "  .venv/bin/softlb watch web            (then edit examples/catalog.toml)\n"
            "  curl -s localhost:7071/v1/resolve/api\n"
            "Ctrl-C stops the demo.\n",
            flush=True,
        )
        agent.wait()
        return agent.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
