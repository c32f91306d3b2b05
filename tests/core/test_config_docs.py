"""docs/CONFIG.md documents every config key, so the reference cannot silently fall behind."""

import pathlib
from dataclasses import fields

from softlb._config import AgentConfig, ConsulConfig, OutlierConfig, ProbeConfig, ProvideConfig, ProxyConfig, ProxyRoute, ServiceConfig

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text()
# Dataclass fields whose TOML key differs, or that are tables rather than keys.
TOML_KEY = {"catalog_file": "file", "consul": None, "query": None, "services": None, "provide": None, "probe": None, "outlier": None, "proxy": None}


def test_every_config_key_is_documented():
    missing = []
    for cls in (AgentConfig, ConsulConfig, ServiceConfig, ProbeConfig, OutlierConfig, ProvideConfig, ProxyConfig, ProxyRoute):
        for f in fields(cls):
            key = TOML_KEY.get(f.name, f.name)
            if key is not None and f"`{key}`" not in DOC:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"docs/CONFIG.md lacks: {missing}"
