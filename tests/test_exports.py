"""The core's public surface (like trio's test_exports): the agent reaches the core only
through `softlb` and `softlb.policies`, never through a private `softlb._x` module, and
every name the surface promises is really there."""

import ast
import pathlib

import softlb
import softlb.policies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_the_agent_imports_no_private_core_module():
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        for module, names in _imports(path):
            parts = module.split(".")
            if parts[0] == "softlb" and any(p.startswith("_") for p in parts[1:]):
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(names)}")
            if parts[0] == "softlb" and any(n.startswith("_") and not n.startswith("__") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}: private name from {module}: {names}")
    assert not offenders, "\n".join(offenders)


def test_every_core_name_the_agent_uses_is_exported():
    missing = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        for module, names in _imports(path):
            if module in ("softlb", "softlb.policies"):
                mod = softlb if module == "softlb" else softlb.policies
                missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    assert not missing, missing


def test_exported_names_are_reexported_as_themselves():
    # `from ._x import Y as Y`: each public name is the object the private module defines.
    text = (ROOT / "softlb" / "__init__.py").read_text()
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                assert a.asname == a.name, f"{a.name} re-exported as {a.asname}: use 'X as X'"
                assert getattr(softlb, a.name) is not None
