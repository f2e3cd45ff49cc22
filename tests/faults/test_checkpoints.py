"""Damaged checkpoints: a truncated or altered file of the newest checkpoint (a .distcp shard,
trainer_state.pt, an RNG file) or a garbage checkpoint_meta.json is found from the sizes and CRC-32s written
at save; a resume falls back to the previous intact checkpoint with a warning naming both, or stops naming
every damaged one; evaluate.py refuses a damaged checkpoint before building a model. A disk that fills up
during a save leaves no partial checkpoint and names it."""

from __future__ import annotations

import errno
import logging

import pytest
import torch

from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron import checkpoint as ckpt
from nemo_quagmire.megatron.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from nemo_quagmire.megatron.model import build_model
from nemo_quagmire.megatron.parallel import set_random_seed
from nemo_quagmire.megatron.train_step import setup_training
from tests.faults.conftest import load_script, tree
from tests.megatron.multiprocess_worker import MODEL, train


@pytest.fixture(scope="module")
def trainer(megatron_world1):
    set_random_seed(1234)
    trainer = setup_training(build_model(MODEL, ParallelConfig()), OptimConfig(lr=1e-3))
    train(trainer, range(1))
    return trainer


def _save(trainer, directory, step):
    return save_checkpoint(
        directory,
        step,
        trainer.model,
        model_cfg=MODEL,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        client_state={"step": step},
    )


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated .distcp": (lambda step: _truncate(next(step.glob("*.distcp"))), "bytes,"),
    "altered .distcp (same size)": (lambda step: _flip_a_byte(next(step.glob("*.distcp"))), "checksum"),
    "truncated trainer_state.pt": (lambda step: _truncate(step / "trainer_state.pt"), "trainer_state.pt has"),
    "deleted rng file": (lambda step: (step / "rng" / "rank_00000.pt").unlink(), "rank_00000.pt is missing"),
    "garbage checkpoint_meta.json": (
        lambda step: (step / "checkpoint_meta.json").write_text("{\x00garbage"),
        "checkpoint_meta.json is unreadable",
    ),
    "checkpoint_meta.json not an object": (
        lambda step: (step / "checkpoint_meta.json").write_text("[1, 2]"),
        "not a JSON object",
    ),
    "checkpoint_meta.json deleted": (
        lambda step: (step / "checkpoint_meta.json").unlink(),
        "not a complete checkpoint",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_previous_intact_checkpoint(trainer, tmp_path, caplog, damage):
    corrupt, expected = DAMAGE[damage]
    older, newer = _save(trainer, tmp_path, 1), _save(trainer, tmp_path, 2)
    corrupt(newer)
    with caplog.at_level(logging.WARNING):
        assert resumable_checkpoint(tmp_path) == older
    warning = caplog.text
    assert str(newer) in warning and str(older) in warning and expected in warning
    # set aside: pruning, latest_checkpoint and later resumes no longer see it
    assert not newer.exists() and (tmp_path / ".step_00000002.damaged").is_dir()
    assert latest_checkpoint(tmp_path) == older
    state = load_checkpoint(older, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
    assert state["step"] == 1


def test_every_checkpoint_damaged_stops_naming_each(trainer, tmp_path):
    first, second = _save(trainer, tmp_path, 1), _save(trainer, tmp_path, 2)
    _truncate(next(first.glob("*.distcp")))
    _truncate(second / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="every checkpoint in") as info:
        resumable_checkpoint(tmp_path)
    assert str(first) in str(info.value) and str(second) in str(info.value)
    assert first.exists() and second.exists()  # nothing set aside when there is nothing to resume from


def test_loading_a_damaged_checkpoint_names_it_and_the_file(trainer, tmp_path):
    path = _save(trainer, tmp_path, 1)
    _truncate(path / "trainer_state.pt")
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {path} is damaged: trainer_state.pt has \d+ bytes"
    ):
        load_checkpoint(path, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)


def test_evaluate_refuses_a_damaged_checkpoint_before_the_model(trainer, tmp_path, capsys, monkeypatch):
    from nemo_quagmire.megatron import parallel

    monkeypatch.setattr(parallel, "parallel_context", lambda *a, **k: pytest.fail("model built"))
    path = _save(trainer, tmp_path / "run" / "checkpoints", 1)
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    _truncate(next(path.glob("*.distcp")))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(path), "--benchmarks", "synthetic", "--n", "2", "--out", str(out)]
    assert load_script("evaluate").main([*argv, "--grader-workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} is damaged" in err and ".distcp has" in err and "Traceback" not in err
    assert not out.exists()
    (path / "checkpoint_meta.json").write_text("garbage")
    assert load_script("evaluate").main([*argv, "--grader-workers", "1"]) == 2
    assert "checkpoint_meta.json is unreadable" in capsys.readouterr().err


def test_a_full_disk_during_a_save_leaves_no_partial_checkpoint(trainer, tmp_path, monkeypatch):
    first = _save(trainer, tmp_path, 1)
    real_save = torch.save

    def disk_full_at_trainer_state(obj, target, *args, **kwargs):
        if str(target).endswith("trainer_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", disk_full_at_trainer_state)
    with pytest.raises(
        OSError, match=r"saving checkpoint .*step_00000002 failed \(No space left on device\)"
    ) as info:
        _save(trainer, tmp_path, 2)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no .partial, no step_00000002


def test_a_real_full_tmpfs_during_a_save(trainer, tmpfs):
    directory = tmpfs(size="1m")  # a tiny-model checkpoint with optimizer state is several MB
    with pytest.raises(OSError) as info:
        _save(trainer, directory, 1)
    assert info.value.errno == errno.ENOSPC and "step_00000001" in str(info.value)
    assert tree(directory) == []


@pytest.mark.parametrize("content", ["{garbage", "[1, 2]", "{}"])
def test_evaluate_refuses_an_hf_directory_with_a_bad_config(tmp_path, capsys, content):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(content)
    argv = ["--checkpoint", str(hf), "--benchmarks", "synthetic", "--out", str(tmp_path / "out")]
    assert load_script("evaluate").main([*argv, "--grader-workers", "1", "--tokenizer", str(hf)]) == 2
    err = capsys.readouterr().err
    assert f"{hf / 'config.json'}" in err and "Traceback" not in err and not (tmp_path / "out").exists()
