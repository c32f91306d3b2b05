"""Big catalog files are parsed in a child process, not a thread of the agent.

Why: parsing is pure Python (tomllib, then the catalog's validation). In a worker thread it
competes with the event loop for the GIL, and the loop gives the GIL up at every socket
call: while a 100,000-endpoint file was parsed (seconds), every caller's resolve paid
several GIL hand-overs (the bystander's p99 was ~9 ms during such a reload, issue 10).
A child process parses on the other CPU with no GIL to share; the agent reads its answer
from a pipe and builds the endpoints a slice at a time between turns of the loop.

The child: `python -P -m softlb_agent.catalog_parser PATH MAX_BYTES` writes msgpack values
to stdout: ["s", name] opens a service, ["e", [fields, ...]] carries up to CHUNK of its
endpoints, ["end"] closes the answer; or ["error", kind, message] with kind "config" (a
ConfigError), "file" (not a regular file / too big) or "os" (unreadable, with errno).
"""

from __future__ import annotations

import errno as errno_
import os
import subprocess
import sys
from typing import Any

import msgpack
import trio

from softlb import ConfigError, Endpoint, RegistryHealth, parse_catalog_text

#: Endpoints per message, and built between two checkpoints in the agent: ~0.3 ms of
#: building here. At 500 (~1.5-3 ms each), a 100,000-endpoint file made 200 passes of
#: 2-3.5 ms CPU under load, the most frequent slow passes of the giant-service phase
#: (bench/bystander.py, the loop probe), each a bystander's wait.
CHUNK = 100


class CatalogFileError(Exception):
    """The catalog path is not a regular file of a sane size."""


def _fields(ep: Endpoint) -> list[Any]:
    return [ep.id, ep.address, ep.port, ep.weight, list(ep.tags), dict(ep.meta), ep.node, ep.zone,
            ep.region, ep.registry.value, ep.rank]


def _endpoint(f: list[Any]) -> Endpoint:
    return Endpoint(id=f[0], address=f[1], port=f[2], weight=f[3], tags=tuple(f[4]), meta=f[5], node=f[6],
                    zone=f[7], region=f[8], registry=RegistryHealth(f[9]), rank=f[10])


def main() -> None:
    from .file_source import read_catalog_file

    path, max_bytes = sys.argv[1], int(sys.argv[2])
    out = sys.stdout.buffer
    pack = msgpack.Packer(use_bin_type=True).pack
    try:
        services = parse_catalog_text(read_catalog_file(path, max_bytes))
    except ConfigError as e:
        out.write(pack(["error", "config", str(e)]))
        return
    except CatalogFileError as e:
        out.write(pack(["error", "file", str(e)]))
        return
    except OSError as e:
        out.write(pack(["error", "os", e.errno or 0, e.strerror or str(e)]))
        return
    for name, eps in services.items():
        out.write(pack(["s", name]))
        for i in range(0, len(eps), CHUNK):
            out.write(pack(["e", [_fields(ep) for ep in eps[i:i + CHUNK]]]))
    out.write(pack(["end"]))
    out.flush()


async def parse_in_child(path: str, max_bytes: int) -> dict[str, tuple[Endpoint, ...]]:
    """The catalog file's services, parsed by a child process (see the module docstring).
    Raises what parsing in the agent would: ConfigError, CatalogFileError or OSError."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    # -P: the working directory is not put on sys.path (a checkout there must not shadow us).
    cmd = [sys.executable, "-P", "-m", "softlb_agent.catalog_parser", path, str(max_bytes)]
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
    services: dict[str, list[Endpoint]] = {}
    current: list[Endpoint] | None = None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 << 20)
    try:
        assert proc.stdout is not None
        while True:
            data = await proc.stdout.receive_some(1 << 20)
            if not data:
                break
            unpacker.feed(data)
            for msg in unpacker:
                kind = msg[0]
                if kind == "e":
                    assert current is not None
                    current.extend(_endpoint(f) for f in msg[1])
                    await trio.lowlevel.checkpoint()
                elif kind == "s":
                    current = services[msg[1]] = []
                elif kind == "end":
                    return {name: tuple(eps) for name, eps in services.items()}
                elif kind == "error":
                    if msg[1] == "config":
                        raise ConfigError(msg[2])
                    if msg[1] == "file":
                        raise CatalogFileError(msg[2])
                    raise OSError(msg[2], msg[3])
        code = await proc.wait()
        raise OSError(errno_.EIO, f"the catalog parser process ended without an answer (exit status {code})")
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


if __name__ == "__main__":
    # Run as the package's module, not __main__: its CatalogFileError is the one file_source raises.
    from softlb_agent.catalog_parser import main as package_main

    package_main()
