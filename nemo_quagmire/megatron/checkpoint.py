"""Checkpoints for exact resume and for changing the parallel layout, with megatron dist_checkpointing.

A checkpoint ``<dir>/step_00000042/`` holds:

- the model and optimizer as one ``torch_dist`` sharded checkpoint (weights reshard freely: saved at TP=2,
  they load at TP=1 or PP=2; the distributed-optimizer state uses ``dp_reshardable``, so it reshards across
  data-parallel ranks only and loads only at the TP/PP it was saved with);
- ``trainer_state.pt``: the LR scheduler and the caller's state (step, data position, ...);
- ``rng/rank_XXXXX.pt``: every rank's python, numpy, torch (CPU and CUDA) and megatron-tracker RNG states,
  restored when the layout is unchanged, so a resumed run repeats the uninterrupted one exactly;
- ``checkpoint_meta.json``: the model config and layout, written last.

Saving is atomic: everything is written to ``<dir>/.step_00000042.partial`` and renamed once complete, so a
crash mid-save leaves the previous checkpoints intact and :func:`latest_checkpoint` never returns a partial
one.
Loading compares the stored model config with the caller's first and names any architecture mismatch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

logger = get_logger(__name__)

FORMAT_VERSION = 1
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
META_FILE = "checkpoint_meta.json"  # written last: its presence marks a complete checkpoint
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file()


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _STEP_DIR.match(path.name)) and _is_complete(path)
    ]
    return max(steps)[1] if steps else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: Sequence[torch.nn.Module],
    *,
    model_cfg: ModelConfig,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    client_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save a checkpoint for ``step`` (collective: every rank calls it with the same arguments).

    Args:
        directory: where ``step_XXXXXXXX`` checkpoints live (on a file system all ranks share).
        step: the step number (names the checkpoint; an existing checkpoint of this step is replaced).
        model: this rank's model chunks (DDP-wrapped or not).
        model_cfg: the model's config, stored to check compatibility on load.
        optimizer: megatron optimizer to save.
        scheduler: LR scheduler to save.
        client_state: the caller's state (plain python values and tensors), returned by
            :func:`load_checkpoint`.
        keep_last: after saving, delete all but the newest ``keep_last`` checkpoints (None = keep all).

    Returns:
        The checkpoint's path.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    directory = Path(directory)
    final = _step_dir(directory, step)
    partial = directory / f".{final.name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".step_*.partial"):  # left by a crash
            shutil.rmtree(stale)
        partial.mkdir()
    dist.barrier()

    sharded = {"model": _unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(sharded, str(partial))

    rng_dir = partial / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_states(), rng_dir / f"rank_{rank:05d}.pt")
    if rank == 0:
        trainer_state = {
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "client_state": client_state or {},
        }
        torch.save(trainer_state, partial / "trainer_state.pt")
    dist.barrier()

    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_config": model_cfg.model_dump(mode="json"),
            "layout": _layout(),
            "has_optimizer": optimizer is not None,
            "optimizer_metadata": OPTIMIZER_METADATA,
        }
        with atomic_write(partial / META_FILE) as handle:
            json.dump(meta, handle, indent=2)
        _replace_dir(partial, final)
        if keep_last is not None:
            _prune(directory, keep_last)
    dist.barrier()
    logger.info(
        "saved checkpoint %s (TP %d, PP %d)",
        final,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: Sequence[torch.nn.Module],
    *,
    model_cfg: ModelConfig,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    load_optimizer_state: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and optimizer, scheduler, RNG states); collective.

    The weights load under any TP/PP layout. Optimizer state loads only under the TP/PP it was saved with;
    pass ``load_optimizer_state=False`` to keep a fresh optimizer (its fp32 master weights are then reset from
    the loaded weights). RNG states are restored only under an identical layout (otherwise a warning).

    Returns:
        The ``client_state`` given to :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        ValueError: the checkpoint is of another architecture (the mismatching fields are named), or optimizer
            state is requested but absent or saved under another TP/PP.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no checkpoint_meta.json); use latest_checkpoint()"
        )
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    saved_cfg = ModelConfig.model_validate(meta["model_config"])
    mismatches = saved_cfg.architecture_mismatches(model_cfg)
    if mismatches:
        listed = ", ".join(
            f"{name}: {saved!r} (checkpoint) vs {ours!r} (model)"
            for name, (saved, ours) in mismatches.items()
        )
        raise ValueError(
            f"checkpoint {path} is of a different architecture: {listed}; load it into a model "
            "built from its config (checkpoint_meta.json) or pick another checkpoint"
        )
    layout = _layout()
    saved_layout = meta["layout"]
    restore_optimizer = optimizer is not None and load_optimizer_state
    if restore_optimizer:
        if not meta["has_optimizer"]:
            raise ValueError(f"checkpoint {path} has no optimizer state; pass load_optimizer_state=False")
        if (saved_layout["tp"], saved_layout["pp"]) != (layout["tp"], layout["pp"]):
            raise ValueError(
                f"optimizer state in {path} was saved at TP={saved_layout['tp']}, PP={saved_layout['pp']} "
                "and reshards only across data-parallel ranks (dp_reshardable), but this run has "
                f"TP={layout['tp']}, PP={layout['pp']}; pass load_optimizer_state=False to load the weights "
                "with a fresh optimizer"
            )

    module = _unwrap(model)
    sharded = {"model": module.sharded_state_dict()}
    if restore_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=meta["optimizer_metadata"]
        )
    loaded = dist_checkpointing.load(sharded, str(path))
    module.load_state_dict(loaded["model"])
    if restore_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()

    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if restore_rng:
        if saved_layout == layout:
            _set_rng_states(torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=True))
        else:
            logger.warning(
                "RNG states in %s are for layout %s, this run is %s: not restored", path, saved_layout, layout
            )
    logger.info("loaded checkpoint %s (saved at step %d)", path, meta["step"])
    return trainer_state["client_state"]


def _unwrap(model: Sequence[torch.nn.Module]) -> torch.nn.Module:
    if len(model) != 1:
        raise ValueError(f"expected one model chunk (no virtual pipeline), got {len(model)}")
    return getattr(model[0], "module", model[0])  # megatron DDP keeps the GPTModel in .module


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size(),
    }


def _rng_states() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    displaced = target.with_name(f".{target.name}.replaced")
    if target.exists():
        shutil.rmtree(displaced, ignore_errors=True)
        target.rename(displaced)
    source.rename(target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(displaced, ignore_errors=True)


def _prune(directory: Path, keep_last: int) -> None:
    complete = sorted(
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _STEP_DIR.match(path.name)) and _is_complete(path)
    )
    for _, path in complete[:-keep_last]:
        shutil.rmtree(path)
        logger.info("pruned checkpoint %s", path)
