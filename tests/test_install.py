"""The install resolved to the versions the project relies on (pip can pick surprising ones silently)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def test_math_verify_is_the_antlr_4_9_build():
    # math-verify[antlr4-13-2] next to hydra-core silently resolves to math-verify 0.3.3; [antlr4-9-3]: 0.9.
    assert Version(version("math-verify")) >= Version("0.9.0")
    assert version("antlr4-python3-runtime").startswith("4.9.")


def test_installed_versions_match_the_constraints_file():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, pinned = line.split("==")
            pins[name.strip()] = pinned.strip()
    assert pins, f"no pins found in {CONSTRAINTS}"
    mismatched = {n: (p, version(n)) for n, p in pins.items() if Version(version(n)).base_version != p}
    assert not mismatched, f"installed versions differ from {CONSTRAINTS.name} (pin, installed): {mismatched}"


def _setup_arguments() -> dict:
    """What setup.py passes to setuptools.setup (read by running it with setup() replaced)."""
    import runpy
    from unittest import mock

    captured: dict = {}
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(CONSTRAINTS.with_name("setup.py")), run_name="setup")
    return captured


def _names(requirements: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in requirements}


def test_the_base_install_leaves_megatron_and_the_trainers_to_the_train_extra():
    # The light base must go into an NGC NeMo / Megatron-Bridge container without replacing its megatron.
    args = _setup_arguments()
    base = _names(args["install_requires"])
    extras = {name: _names(reqs) for name, reqs in args["extras_require"].items()}
    heavy = {"megatron-core", "hydra-core", "omegaconf", "transformer-engine", "tensorboard", "nemo-toolkit"}
    assert not heavy & base.keys()
    assert {"megatron-core", "hydra-core", "omegaconf"} <= extras["train"].keys()
    assert extras["train"].keys() <= extras["dev"].keys()  # the suite tests the trainers
    assert {"train", "dev", "gpu", "vllm", "nemo"} <= extras.keys()  # names the Dockerfile and README use


def test_the_nemo_extra_and_the_train_extra_ask_for_different_megatron_cores():
    # NeMo 2.7 trains with megatron-core 0.15 only (0.16 removed arguments NeMo passes); the engine's compat
    # layer targets 0.16.1. pip must refuse the pair rather than pick one silently.
    extras = _setup_arguments()["extras_require"]
    train = _names(extras["train"])["megatron-core"].specifier
    nemo = _names(extras["nemo"])["megatron-core"].specifier
    pinned = next(line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("megatron-core=="))
    assert train.contains(pinned.split("==")[1]) and not nemo.contains(pinned.split("==")[1])
    assert nemo.contains("0.15.3") and not train.contains("0.15.3")
