"""Wiring invariants: the pure cores import only torch/numpy/scipy (and the stdlib), and megatron.core is
imported by nemo_quagmire.megatron alone. Checked on the source (AST): lazy imports in functions count too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_quagmire"

# Core module -> third-party top-level packages it may import besides the stdlib and its own core siblings.
CORE_ALLOWED = {
    "algorithms": {"torch"},
    "eval/passk.py": {"numpy"},
    "rewards": {"math_verify", "latex2sympy2_extended", "sympy"},
    "predict": {"numpy", "scipy"},
}
# Rendering modules inside a core package: they draw what the pure modules computed.
RENDERING_ALLOWED = {"predict/report.py": {"matplotlib"}}
FRAMEWORKS = {"megatron", "transformer_engine", "vllm", "nemo", "lightning", "pytorch_lightning", "ray"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _files(rel: str) -> list[Path]:
    target = PACKAGE / rel
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("core", sorted(CORE_ALLOWED))
def test_core_imports_only_allowed_packages(core):
    allowed = CORE_ALLOWED[core] | set(sys.stdlib_module_names) | {"__future__"}
    core_prefixes = tuple(f"nemo_quagmire.{c.split('/')[0].removesuffix('.py')}" for c in CORE_ALLOWED)
    core_prefixes += ("nemo_quagmire.utils",)
    files = _files(core)
    if not files or not files[0].exists():
        pytest.skip(f"{core} does not exist yet")
    bad = []
    for path in files:
        allowed_here = allowed | RENDERING_ALLOWED.get(path.relative_to(PACKAGE).as_posix(), set())
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "nemo_quagmire":
                if not name.startswith(core_prefixes) and name != "nemo_quagmire":
                    bad.append(f"{path.relative_to(PACKAGE)}: {name}")
            elif top not in allowed_here:
                bad.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert not bad, "pure core imports a framework or non-core module:\n" + "\n".join(bad)


def test_only_the_megatron_package_imports_megatron():
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "megatron"
        for name in _imports(path)
        if name.split(".")[0] == "megatron"
    ]
    assert not offenders, "megatron.core imported outside nemo_quagmire/megatron:\n" + "\n".join(offenders)


def test_framework_imports_are_lazy_in_core_packages():
    """No module outside the adapters imports a GPU-only or heavy framework at module top level."""
    adapters = {"megatron", "integrations", "rollout"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in adapters:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders, "top-level framework import outside the adapters:\n" + "\n".join(offenders)


def test_only_integrations_import_lightning_or_nemo():
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "integrations"
        for name in _imports(path)
        if name.split(".")[0] in {"lightning", "pytorch_lightning", "nemo"}
    ]
    assert not offenders, "Lightning/NeMo imported outside integrations/:\n" + "\n".join(offenders)
