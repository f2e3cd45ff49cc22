"""scripts/export_hf.py refuses bad input with exit code 2 and writes nothing (its successful exports are
checked in test_hf_checkpoints.py: bitwise round trip, transformers; and in the vLLM stage)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_quagmire.config.model import get_model_preset
from tests.checkpoint_meta import write_checkpoint_meta

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("export_hf", REPO / "scripts" / "export_hf.py")
export_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_hf)


def _checkpoint(run_dir: Path) -> Path:
    """A checkpoint as far as the input checks read it (its meta file), in a run dir without model/."""
    return write_checkpoint_meta(run_dir / "checkpoints" / "step_00000003", 3, get_model_preset("tiny"))


def test_bad_input_exits_2_and_writes_nothing(tiny_chat_model, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    out = tmp_path / "out"
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--out", str(out)], "no such directory"),
        (["--checkpoint", str(tiny_chat_model), "--out", str(out)], "is already an HF directory"),
        (
            ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "taken")],
            "exists; choose a new directory",
        ),
        (["--checkpoint", str(checkpoint), "--out", str(out)], "has no model/ directory"),
        (["--checkpoint", str(checkpoint), "--out", str(out), "--tokenizer", str(tmp_path)], "holds no HF"),
    ]
    for argv, message in cases:
        assert export_hf.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
