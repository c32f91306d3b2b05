"""Policies in a real agent: keys from the CLI and the client, locality from the agent's
flags, and switching policy with SIGHUP while callers keep resolving."""

from __future__ import annotations

import json
import signal
import threading

from agentproc import endpoint_toml, wait_until

ZONED = "".join(
    endpoint_toml("web", "127.0.0.1", 18100 + i, id=f"web-{i}", zone="z1" if i < 2 else "z2") for i in range(4)
)


def _cli_id(agent, *args: str) -> str:
    r = agent.cli("resolve", "web", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]


def test_key_maps_the_same_from_cli_and_client(make_agent):
    agent = make_agent(catalog=ZONED, config='[services.web]\npolicy = "maglev"\n').start()
    by_cli = {k: _cli_id(agent, "--key", k) for k in ("alice", "bob", "carol")}
    with agent.client() as c:
        assert {k: c.resolve("web", key=k, lease=False).id for k in by_cli} == by_cli
        assert len({c.resolve("web", key=f"user-{i}", lease=False).id for i in range(60)}) == 4
    # The same keys land on the same endpoints after a restart (a new process, a new
    # hash seed, a new rng).
    agent.stop()
    again = make_agent(catalog=ZONED, config='[services.web]\npolicy = "maglev"\n').start()
    assert {k: _cli_id(again, "--key", k) for k in by_cli} == by_cli


def test_locality_follows_the_agents_zone_flag(make_agent):
    config = '[services.web]\nlocality = ["zone"]\n'
    agent = make_agent(catalog=ZONED, config=config, extra_args=["--zone", "z2"]).start()
    with agent.client() as c:
        assert {c.resolve("web", lease=False).id for _ in range(12)} == {"web-2", "web-3"}


def test_nearest_follows_the_catalog_files_rank(make_agent):
    # The file catalog's `rank` orders endpoints as Consul's ?near= does; rewriting the
    # file (web-2 drained to maintenance) moves picks to the next nearest.
    ranks = {"web-0": 3, "web-1": 1, "web-2": 0, "web-3": 2}

    def catalog(maintenance=()):
        return "".join(endpoint_toml("web", "127.0.0.1", 18100 + i, id=f"web-{i}", rank=ranks[f"web-{i}"],
                                     **({"registry": "maintenance"} if f"web-{i}" in maintenance else {}))
                       for i in range(4))
    agent = make_agent(catalog=catalog(), config='[services.web]\nlocality = ["nearest:2", "*"]\n').start()
    with agent.client() as c:
        assert {c.resolve("web", lease=False).id for _ in range(20)} == {"web-2", "web-1"}
        agent.write_catalog(catalog(maintenance=("web-2",)))
        wait_until(lambda: {c.resolve("web", lease=False).id for _ in range(20)} == {"web-1", "web-3"}, timeout=5)


def test_source_hash_pins_a_calling_process(make_agent):
    agent = make_agent(catalog=ZONED, config='[services.web]\npolicy = "source_hash"\n').start()
    with agent.client() as c:
        assert len({c.resolve("web", lease=False).id for _ in range(20)}) == 1


def test_sighup_switches_policy_without_dropping_a_request(make_agent):
    agent = make_agent(catalog=ZONED, config='[services.web]\npolicy = "round_robin"\n').start()
    stop = threading.Event()
    errors: list[BaseException] = []
    served = [0]

    def caller() -> None:
        try:
            with agent.client(timeout=5) as c:
                while not stop.is_set():
                    r = c.resolve("web", key="sticky")
                    c.report(lease=r.lease, ok=True, latency=0.001)
                    served[0] += 1
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    t = threading.Thread(target=caller)
    t.start()
    try:
        wait_until(lambda: served[0] > 50)
        for policy, options in (("maglev", "table_size = 251"), ("least_connections", ""), ("ring_hash", "")):
            agent.write_config(f'[services.web]\npolicy = "{policy}"\n[services.web.options]\n{options}\n')
            agent.send(signal.SIGHUP)
            wait_until(lambda: agent.client().services()[0]["policy"] == policy)
            before = served[0]
            wait_until(lambda: served[0] > before + 50)
        # A bad option is refused whole; the running policy keeps serving.
        agent.write_config('[services.web]\npolicy = "maglev"\n[services.web.options]\ntable_size = 100\n')
        agent.send(signal.SIGHUP)
        wait_until(lambda: "options.table_size: must be a prime" in agent.log())
        assert agent.client().services()[0]["policy"] == "ring_hash"
    finally:
        stop.set()
        t.join(timeout=10)
    assert not errors
    assert not t.is_alive()
