"""Wiring invariants: the pure cores import only torch/numpy/scipy (and the stdlib); megatron.core is
imported by nemo_quagmire.megatron and the framework adapters alone (lazily); the light install imports
without megatron-core, Hydra or the trainers. Checked on the source (AST; lazy imports in functions count
too) and, for the light install, in a fresh interpreter."""

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


# config/ is a leaf: pure schemas that every layer reads, so it imports nothing above it (no engine, trainer,
# callback, rollout, planner or script), not even lazily. Allowed: the stdlib, pydantic and its typing
# helpers, the project's utils, and the pure modules whose names and rules the schemas validate against.
CONFIG_ALLOWED_PACKAGES = {"pydantic", "pydantic_core", "typing_extensions", "annotated_types"}
CONFIG_ALLOWED_MODULES = (
    "nemo_quagmire.config",
    "nemo_quagmire.utils",
    "nemo_quagmire.algorithms",  # the advantage-estimator registry, the loss's mode names
    "nemo_quagmire.eval.benchmarks",  # benchmark names, prompt templates
    "nemo_quagmire.data.synthetic",  # the embedded task's config
)


def _resolved_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports too), relative ones resolved."""
    package = ["nemo_quagmire", *path.relative_to(PACKAGE).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


def config_import_violations(files: list[Path]) -> list[str]:
    allowed_top = CONFIG_ALLOWED_PACKAGES | set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in files:
        for name in sorted(_resolved_imports(path)):
            top = name.split(".")[0]
            if top == "nemo_quagmire":
                if not any(name == m or name.startswith(m + ".") for m in CONFIG_ALLOWED_MODULES):
                    bad.append(f"{path.relative_to(PACKAGE)}: {name}")
            elif top not in allowed_top:
                bad.append(f"{path.relative_to(PACKAGE)}: {name}")
    return bad


def test_config_is_a_leaf():
    bad = config_import_violations(_files("config"))
    assert not bad, "config/ imports above itself (move the type into config/ instead):\n" + "\n".join(bad)


def test_the_config_leaf_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above fails on each kind of upward import: lazy, relative, a framework."""
    fake = tmp_path / "nemo_quagmire"
    (fake / "config").mkdir(parents=True)
    (fake / "config" / "bad.py").write_text(
        "from nemo_quagmire.utils.errors import InputError\n"
        "def f():\n    from nemo_quagmire.megatron.parallel import launched_world\n"
        "from ..trainer import sft_steps\nimport hydra\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    bad = config_import_violations([fake / "config" / "bad.py"])
    assert bad == [
        "config/bad.py: hydra",
        "config/bad.py: nemo_quagmire.megatron.parallel",
        "config/bad.py: nemo_quagmire.trainer",
    ]


def test_config_imports_without_the_layers_above_it():
    """Every config module in a fresh interpreter in which importing megatron, Hydra, the engine, trainers,
    callbacks, rollouts, planners or study code raises (the transitive check of the AST test above)."""
    import subprocess

    modules = [
        "nemo_quagmire." + p.relative_to(PACKAGE).as_posix().removesuffix(".py").replace("/", ".")
        for p in _files("config")
    ]
    above = ("megatron", "transformer_engine", "vllm", "hydra", "omegaconf", "lightning", "nemo")
    above += tuple(
        f"nemo_quagmire.{p}"
        for p in ("megatron", "trainer", "callbacks", "rollout", "integrations", "plan", "study", "launch")
    )
    code = _BLOCKER.format(blocked=above, modules=modules, scripts=[])
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_only_the_megatron_package_imports_megatron():
    """The engine, and the adapters to frameworks built on megatron (NeMo 2, Megatron-Bridge hand them
    megatron model chunks and parallel state; they import it lazily, see the test below)."""
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in {"megatron", "integrations"}
        for name in _imports(path)
        if name.split(".")[0] == "megatron"
    ]
    assert not offenders, "megatron.core imported outside nemo_quagmire/megatron:\n" + "\n".join(offenders)


# Entry-side modules import the engine inside functions on purpose: a bad input fails before the heavy import.
LAZY_ENGINE_ON_PURPOSE = {"trainer/entry.py", "trainer/preflight.py", "trainer/checkpoint_source.py"}


def test_the_loops_reach_the_engine_through_the_policy_adapter_imported_at_the_top():
    """trainer/'s loops import nemo_quagmire.megatron at module level (the MegatronPolicy adapter and the
    data-parallel helpers), never inside a function: no hidden engine calls in the orchestration."""
    offenders = []
    for path in _files("trainer"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in LAZY_ENGINE_ON_PURPOSE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    ("nemo_quagmire.megatron", "megatron")
                ):
                    offenders.append(f"{rel}:{node.lineno}: {node.module}")
    assert not offenders, "function-local engine imports in the loops:\n" + "\n".join(offenders)


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


# The light install (no [train] extra): what must import without megatron-core, Hydra or the trainers, so
# that the package can go into an NGC NeMo / Megatron-Bridge container next to the container's megatron.
LIGHT_PACKAGES = ("eval", "rewards", "predict", "callbacks", "integrations")
NEEDS_ITS_FRAMEWORK = {"integrations/nemo.py": "nemo"}  # the NeMo 2 mixin subclasses llm.GPTModel
TRAIN_ONLY = (
    "megatron",
    "transformer_engine",
    "hydra",
    "omegaconf",
    "tensorboard",
    "safetensors",
    "nemo_quagmire.megatron",
    "nemo_quagmire.trainer.grpo",
    "nemo_quagmire.trainer.sft",
    "nemo_quagmire.trainer.build",
    "nemo_quagmire.trainer.run",
)
_BLOCKER = """
import importlib, runpy, sys

class TrainOnly:
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in {blocked!r}):
            raise ModuleNotFoundError(f"{{name}} belongs to the [train] extra", name=name)

sys.meta_path.insert(0, TrainOnly())
for module in {modules!r}:
    importlib.import_module(module)
for script in {scripts!r}:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), (script, done.code)
"""


def test_the_light_layer_imports_without_megatron_hydra_or_the_trainers():
    """Every module of the light packages, and the grading and predictor scripts, in a fresh interpreter in
    which importing megatron, Hydra, TensorBoard or the project's engine and trainers raises."""
    import subprocess

    modules = []
    for package in LIGHT_PACKAGES:
        for path in _files(package):
            rel = path.relative_to(PACKAGE).as_posix()
            if rel in NEEDS_ITS_FRAMEWORK:
                continue
            modules.append(
                "nemo_quagmire." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            )
    scripts = [str(PACKAGE.parent / "scripts" / name) for name in ("grade.py", "predict_report.py")]
    code = _BLOCKER.format(blocked=TRAIN_ONLY, modules=modules, scripts=scripts)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(modules) > 20  # the walk found the packages


def test_framework_adapters_import_their_framework_lazily_or_by_name():
    """integrations/nemo.py is the only adapter that needs its framework at import time (it subclasses
    NeMo's model); the rest import megatron / NeMo / Megatron-Bridge inside functions."""
    offenders = []
    for path in _files("integrations"):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in {"megatron", "megatron_bridge", "nemo"} and NEEDS_ITS_FRAMEWORK.get(rel) != top:
                    offenders.append(f"{rel}: {name}")
    assert not offenders, "top-level framework import in an adapter:\n" + "\n".join(offenders)
