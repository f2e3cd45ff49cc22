"""The install resolved to the versions the project relies on (pip can pick surprising ones silently)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

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
