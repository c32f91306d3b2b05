"""The persisted catalog snapshot: atomic writes, round trip, bad files, seeding the source."""

from __future__ import annotations

import os
import random
import time
from functools import partial

import trio

from softlb._types import Endpoint, RegistryHealth
from softlb_agent import catalog_snapshot as snap
from softlb_agent.consul_watch import ConsulSource
from tests.consulsim import SimServer
from tests.consulsim.testing import Recorder, agent_config, run, until, watching

EPS = (
    Endpoint(id="a@n1", address="10.0.0.1", port=80, weight=3, tags=("x",), meta={"k": "v"},
             node="n1", zone="z", region="r", registry=RegistryHealth.WARNING),
    Endpoint(id="b@n2", address="10.0.0.2", port=81, rank=0),  # ?near= order survives a restart
)


def test_round_trip_converts_monotonic_and_wall_clock(tmp_path):
    path = snap.snapshot_path(str(tmp_path))
    snap.save(path, {"web": (EPS, 90.0), "empty": ((), None)}, now_mono=100.0, now_wall=1_000_000.0)
    assert [p.name for p in tmp_path.iterdir()] == [snap.FILENAME]  # no temp file left
    loaded = snap.load(path, now_mono=5.0, now_wall=1_000_060.0)
    assert loaded["web"] == (EPS, 5.0 - 70.0)  # fetched 10 s before the save, saved 60 s ago
    assert loaded["empty"] == ((), 5.0 - 60.0)


def test_clock_stepped_back_never_makes_data_newer(tmp_path):
    path = tmp_path / "s.json"
    snap.save(path, {"web": (EPS, 100.0)}, now_mono=100.0, now_wall=2000.0)
    assert snap.load(path, now_mono=50.0, now_wall=1000.0)["web"][1] == 50.0


def test_missing_corrupt_or_wrong_files_are_ignored(tmp_path, caplog):
    path = tmp_path / "s.json"
    assert snap.load(path, 0, 0) == {}
    for data in (b"{not json", b'{"version": 99}', b'{"version": 1, "services": {"w": {"endpoints": [{}]}}}',
                 b'{"version": 1, "services": {"w": {"fetched_at": 1, "endpoints": [{"id": "a", "address": "x", "port": "80"}]}}}',
                 b"[" * 200000,  # json.loads raised RecursionError, ending the agent's start
                 b'{"version": 1, "services": {"w": {"fetched_at": 1, "endpoints": [{"id": "a", "address": "x", "port": 80, "weight": 1180591620717411303424}]}}}',
                 b'{"version": 1, "services": {"w": {"fetched_at": 1, "endpoints": [{"id": "a", "address": "db..x", "port": 80}]}}}',
                 b'{"version": 1, "services": {"w": {"fetched_at": 1e999, "endpoints": []}}}',
                 b'{"version": 1, "services": {"w": {"fetched_at": 1, "endpoints": [{"id": "a", "address": "x", "port": 80, "rank": -1}]}}}',
                 b'{"version": 1, "services": {"w": {"fetched_at": 1, "endpoints": [{"id": "a", "address": "x", "port": 80, "rank": "1"}]}}}'):
        path.write_bytes(data)
        assert snap.load(path, 0, 0) == {}
    assert len([r for r in caplog.records if "ignored" in r.message]) == 10


def test_duplicate_endpoint_ids_keep_the_first(tmp_path, caplog):
    path = tmp_path / "s.json"
    dup = Endpoint(id="a@n1", address="10.0.0.9", port=90)
    snap.write_atomic(path, snap.encode({"web": ((EPS[0], dup, EPS[1]), 1.0)}, 1.0))
    assert snap.load(path, 0, 1.0)["web"][0] == EPS  # the Engine refuses duplicates outright
    assert "keeping the first of each" in caplog.text


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    snap.write_atomic(path, b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", boom)
    try:
        snap.write_atomic(path, b"new")
    except OSError:
        pass
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_seeded_source_serves_stale_then_fresh_and_writer_saves(tmp_path):
    srv = SimServer().start()
    url = srv.url
    srv.sim.add_instance("web", id="a", port=80)
    path = tmp_path / snap.FILENAME

    async def first_life():
        async with watching(agent_config(url)) as (src, rec), trio.open_nursery() as n:
            await until(lambda: rec.eps("web"))
            n.start_soon(partial(snap.run_snapshot_writer, src, path, interval=0.05))
            await until(path.exists)
            n.cancel_scope.cancel()

    async def second_life():
        # Consul is down now: the snapshot answers, stale.
        rec = Recorder()
        cfg = agent_config(url, services=())
        src = ConsulSource(cfg, rec, rng=random.Random(2))
        now = trio.current_time()
        for name, (eps, fetched_at) in snap.load(path, now, time.time()).items():
            src.seed(name, eps, fetched_at, now)
        assert [e.id for e in rec.eps("web")] == ["a@node-1"] and rec.stale("web")
        async with trio.open_nursery() as n:
            await n.start(src.run)
            assert await src.wait_ready("web", timeout=0.1)  # no wait: we have data
            await trio.sleep(0.3)
            assert rec.stale("web")
            with SimServer(port=int(url.rsplit(":", 1)[1])) as again:
                again.sim.add_instance("web", id="a", port=80)
                await until(lambda: not rec.stale("web"), timeout=5)
                n.cancel_scope.cancel()

    try:
        run(first_life)
    finally:
        srv.stop()
    run(second_life)


def test_temp_files_of_a_killed_writer_are_removed_at_start(tmp_path):
    path = snap.snapshot_path(str(tmp_path))
    snap.save(path, {"web": (EPS, 90.0)}, now_mono=100.0, now_wall=1_000_000.0)
    # What SIGKILL between open() and rename() leaves behind (another pid's temp file).
    left = tmp_path / f".{snap.FILENAME}.99999.tmp"
    left.write_bytes(b'{"version": 1, "serv')
    other = tmp_path / "unrelated.tmp"
    other.write_bytes(b"x")
    loaded = snap.load(path, now_mono=5.0, now_wall=1_000_060.0)
    assert set(loaded) == {"web"}
    assert not left.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [snap.FILENAME, "unrelated.tmp"]
    # Also without a snapshot (the kill hit the very first write).
    path.unlink()
    left.write_bytes(b"")
    assert snap.load(path, now_mono=5.0, now_wall=1_000_060.0) == {}
    assert not left.exists()
