"""A tiny demo backend: answers every HTTP GET with its name. Loopback only.

    python examples/backend.py --name web-1 --port 18081
"""

from __future__ import annotations

import argparse
import http.server
import signal
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    body = f"hello from {args.name}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        # socketserver's default backlog of 5 drops a burst of connects (the proxy's tcp
        # mode opens one per client connection), and a dropped SYN waits a second.
        request_queue_size = 128

    srv = Server((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
