"""A trivial server on inherited sockets, for testing socket passing without the agent.

Takes its listening sockets with softlb_agent.listen_fds (as the agent does), prints one JSON
line describing them to stdout, then answers every connection: it reads one line and replies
`{"pid", "name", "address", "echo"}` as JSON. Runs until killed.
"""

import json
import os
import selectors
import sys

from softlb_agent.listen_fds import LISTEN_ENV, ListenFdsError, listen_fds


def main() -> None:
    try:
        sockets = listen_fds()
    except ListenFdsError as e:
        print(json.dumps({"pid": os.getpid(), "error": str(e)}), flush=True)
        sys.exit(2)
    print(json.dumps({
        "pid": os.getpid(),
        "sockets": [{"fd": s.fd, "name": s.name, "unix": s.is_unix, "address": s.address} for s in sockets],
        "env_left": [k for k in LISTEN_ENV if k in os.environ],
    }), flush=True)
    if not sockets:
        sys.exit(3)
    sel = selectors.DefaultSelector()
    for s in sockets:
        sel.register(s.sock, selectors.EVENT_READ, s)
    while True:
        for key, _ in sel.select():
            inherited = key.data
            conn, _ = inherited.sock.accept()
            with conn:
                conn.settimeout(5.0)
                line = conn.makefile("rb").readline().decode().strip()
                reply = {"pid": os.getpid(), "name": inherited.name, "address": inherited.address, "echo": line}
                conn.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
