"""Checkpoints at TP=1: exact resume, atomic saves under a crash, pruning, refusal of another architecture.
Resharding across TP/PP and the distributed-optimizer layout check run in test_multiprocess.py."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nemo_quagmire.megatron.model import build_model
from nemo_quagmire.megatron.parallel import set_random_seed
from nemo_quagmire.megatron.train_step import setup_training
from tests.megatron.multiprocess_worker import MODEL, train


def _trainer(seed: int, distributed_optimizer: bool = True):
    set_random_seed(seed)
    return setup_training(
        build_model(MODEL, ParallelConfig()),
        OptimConfig(lr=1e-3, use_distributed_optimizer=distributed_optimizer),
    )


@pytest.mark.parametrize(
    "distributed_optimizer", [True, False], ids=["distributed_optimizer", "fp32_optimizer"]
)
def test_resume_repeats_the_uninterrupted_run(megatron_world1, tmp_path, distributed_optimizer):
    trainer = _trainer(1234, distributed_optimizer)
    train(trainer, range(2))
    torch.manual_seed(99)
    expected_draw = torch.rand(())
    torch.manual_seed(99)  # the RNG state the resumed run must get back
    save_checkpoint(
        tmp_path,
        2,
        trainer.model,
        model_cfg=MODEL,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        client_state={"next_step": 2, "data": torch.tensor([5, 6])},
    )
    uninterrupted = train(trainer, range(2, 4))

    resumed = _trainer(4321, distributed_optimizer)  # other random weights: everything must come from disk
    state = load_checkpoint(
        latest_checkpoint(tmp_path),
        resumed.model,
        model_cfg=MODEL,
        optimizer=resumed.optimizer,
        scheduler=resumed.scheduler,
    )
    assert torch.rand(()) == expected_draw
    assert state["next_step"] == 2 and state["data"].tolist() == [5, 6]
    assert resumed.step == 2
    assert train(resumed, range(2, 4)) == uninterrupted


def test_a_crash_mid_save_keeps_the_previous_checkpoint(megatron_world1, tmp_path, monkeypatch):
    trainer = _trainer(1234)
    train(trainer, range(1))
    first = save_checkpoint(tmp_path, 1, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
    from megatron.core import dist_checkpointing  # checkpoint.py imports it lazily: patch megatron's module

    def save_then_crash(state, directory, *args, **kwargs):
        torch.save({"half": "written"}, f"{directory}/__0_0.distcp")
        raise OSError("disk full")

    monkeypatch.setattr(dist_checkpointing, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / ".step_00000002.partial").exists()  # a failed save removes its files
    assert not (tmp_path / "step_00000002").exists()
    load_checkpoint(first, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
    (tmp_path / ".step_00000002.partial").mkdir()  # what a process killed mid-save leaves
    save_checkpoint(tmp_path, 2, trainer.model, model_cfg=MODEL)  # the next save clears the debris
    assert not (tmp_path / ".step_00000002.partial").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_keep_last_prunes_older_checkpoints(megatron_world1, tmp_path):
    (model,) = _trainer(1234).model
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, [model], model_cfg=MODEL, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000015"]
    save_checkpoint(tmp_path, 15, [model], model_cfg=MODEL, keep_last=2)  # re-saving a step replaces it
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000015"


def test_another_architecture_is_refused_by_name(megatron_world1, tmp_path):
    (model,) = _trainer(1234).model
    path = save_checkpoint(tmp_path, 1, [model], model_cfg=MODEL)
    other = MODEL.replace(num_layers=2, rotary_base=500000.0)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, [model], model_cfg=other)
    assert "num_layers: 4 (checkpoint) vs 2 (model)" in str(info.value)
    assert "rotary_base: 10000.0 (checkpoint) vs 500000.0 (model)" in str(info.value)


def test_missing_or_incomplete_checkpoints(megatron_world1, tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / "step_00000003").mkdir()  # no checkpoint_meta.json: never finished
    assert latest_checkpoint(tmp_path) is None
    (model,) = _trainer(1234).model
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000003", [model], model_cfg=MODEL)
    with pytest.raises(ValueError, match="no optimizer state"):
        trainer = _trainer(1234)
        path = save_checkpoint(tmp_path, 4, trainer.model, model_cfg=MODEL)
        load_checkpoint(path, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
