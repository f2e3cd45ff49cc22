"""Fault injection helpers: the six entry scripts loaded in-process, a small tmpfs where the machine allows
mounting one (root or a user namespace; otherwise those tests skip and the simulated-ENOSPC ones still run),
and a launcher for the few checks that need a real process (signals)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
GRADE_FIXTURES = REPO / "tests" / "scripts" / "fixtures" / "grade"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (its `main(argv)` returns the exit code)."""
    module_name = f"faults_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def launch(script: str, args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(size="1m", read_only=False)` -> a fresh mount point; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        target = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'})")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def tree(path: Path) -> list[str]:
    """Every path under `path`, relative, sorted (hidden files included): what a failed command left."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []
