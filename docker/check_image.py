"""Build-time check of the image's two Python environments (docker/Dockerfile runs it after each install).

    python docker/check_image.py trainer              # the container's Python: torch + TE + megatron-core
    /opt/vllm/bin/python docker/check_image.py vllm   # vLLM's venv: vllm + the light nemo_quagmire

A wrong combination should fail the build, not the first training step on a GPU node hours later: a torch
without CUDA, a Transformer Engine outside the range megatron-core declares for itself (read from
megatron-core's own metadata, not restated here), a vLLM other than the pinned release, or a vLLM venv that
cannot start the rollout server the trainer launches (`python -m nemo_quagmire.rollout.vllm_server`).
Imports and versions only (Transformer Engine by version, without importing it): no GPU is needed, so it
runs in `docker build`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement
from packaging.version import Version

VLLM_SERVER_MODULE = "nemo_quagmire.rollout.vllm_server"


def declared_te_range(megatron_requirements: list[str] | None) -> Requirement | None:
    """The transformer-engine requirement megatron-core declares for its GPU extra (e.g. 0.16.1:
    `transformer-engine[core_cu13,pytorch]<2.12.0,>=2.9.0a0; extra == "dev"`), or None if it declares none."""
    for line in megatron_requirements or []:
        requirement = Requirement(line)
        if requirement.name.replace("_", "-").lower() == "transformer-engine":
            return requirement
    return None


def _import_problems(*modules: str) -> list[str]:
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:  # the message names the missing piece (a module, a CUDA library)
            problems.append(f"import {module} failed in {sys.executable}: {error}")
    return problems


def _version(name: str) -> Version | None:
    try:
        return Version(version(name))
    except PackageNotFoundError:
        return None


def check_trainer() -> list[str]:
    import torch

    problems = _import_problems("megatron.core", "nemo_quagmire.trainer.build")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build: the base image's CUDA torch was replaced")
    # Transformer Engine by its metadata only: importing it loads CUDA libraries, and `docker build` may run
    # without a GPU driver.
    te_version, mcore_version = _version("transformer_engine"), _version("megatron-core")
    for name, found in (("transformer_engine", te_version), ("megatron-core", mcore_version)):
        if found is None:
            problems.append(f"{name} is not installed in {sys.executable}")
    if te_version is None or mcore_version is None:
        return problems
    wanted = declared_te_range(requires("megatron-core"))
    if wanted is not None and not wanted.specifier.contains(te_version, prereleases=True):
        problems.append(
            f"transformer_engine {te_version} is outside megatron-core {mcore_version}'s declared range "
            f"{wanted.specifier}: choose a base image whose TE fits, or another megatron-core"
        )
    print(
        f"trainer env: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformer_engine {te_version}, megatron-core {mcore_version}"
    )
    return problems


def check_vllm(expected_vllm: str) -> list[str]:
    # The server module needs only the light dependencies (no megatron-core): if it does not import here,
    # the trainer cannot start its engines.
    problems = _import_problems("vllm", VLLM_SERVER_MODULE)
    vllm_version = _version("vllm")
    if vllm_version != Version(expected_vllm):
        problems.append(f"vllm {vllm_version} installed, {expected_vllm} pinned (VLLM_VERSION)")
    print(f"vllm env: vllm {vllm_version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("env", choices=["trainer", "vllm"])
    parser.add_argument("--vllm-version", help="the pinned vLLM release (vllm env)")
    args = parser.parse_args(argv)
    if args.env == "vllm" and not args.vllm_version:
        parser.error("the vllm check needs --vllm-version")
    problems = check_trainer() if args.env == "trainer" else check_vllm(args.vllm_version)
    for problem in problems:
        print(f"check_image: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
