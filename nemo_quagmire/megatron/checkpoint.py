"""Checkpoints for exact resume and for changing the parallel layout, with megatron dist_checkpointing.

A checkpoint ``<dir>/step_00000042/`` holds:

- the model and optimizer as one ``torch_dist`` sharded checkpoint (weights reshard freely: saved at TP=2,
  they load at TP=1 or PP=2; the distributed-optimizer state uses ``dp_reshardable``, so it reshards across
  data-parallel ranks only and loads only at the TP/PP it was saved with);
- ``trainer_state.pt``: the LR scheduler and the caller's state (step, data position, ...);
- ``rng/rank_XXXXX.pt``: every rank's python, numpy, torch (CPU and CUDA) and megatron-tracker RNG states,
  restored when the layout is unchanged, so a resumed run repeats the uninterrupted one exactly;
- ``checkpoint_meta.json``: the model config and layout, and the size and CRC-32 of every other file
  (``files``, computed by all ranks in parallel), written last.

Saving is atomic: everything is written to ``<dir>/.step_00000042.partial`` and renamed once complete, so a
crash mid-save leaves the previous checkpoints intact and :func:`latest_checkpoint` never returns a partial
one; a save that fails (a full disk) removes its partial directory and says so.
Loading checks every file against the manifest first (a truncated or altered file is named, not met as an
EOFError deep in torch), then compares the stored model config with the caller's and names any architecture
mismatch. :func:`resumable_checkpoint` picks the newest checkpoint that passes those checks: a damaged newer
one is reported, moved aside (``.step_N.damaged``) and the previous complete one used.
"""

from __future__ import annotations

import errno
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
from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger
from nemo_quagmire.utils.manifest import digest_files, list_files, manifest_problems

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = [
    "CheckpointError",
    "checkpoint_problems",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resumable_checkpoint",
    "save_checkpoint",
]

logger = get_logger(__name__)

FORMAT_VERSION = 2  # 2: checkpoint_meta.json lists every file's size and CRC-32 ("files")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
META_FILE = "checkpoint_meta.json"  # written last: its presence marks a complete checkpoint
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(InputError):
    """A checkpoint cannot be used: damaged, incomplete or unreadable (the message names it and why)."""


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


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``checkpoint_meta.json`` of checkpoint ``path``.

    Raises:
        CheckpointError: it is missing, not JSON, or lacks the keys every checkpoint has.
    """
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is unreadable ({err})") from None
    required = ("format_version", "step", "model_config", "layout", "has_optimizer", "optimizer_metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is not a JSON object")
    if missing := [key for key in required if key not in meta]:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} lacks {missing}")
    return meta


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """Why checkpoint ``path`` cannot be loaded (empty: intact); collective when torch.distributed is up.

    Checks the metadata, then every file against the sizes and CRC-32s written at save (checkpoints of
    format 1 have none: only their metadata is checked). Ranks split the files and agree on the result.
    """
    try:
        meta = read_checkpoint_meta(path)
        ModelConfig.model_validate(meta["model_config"])
        files = meta.get("files")
        if files is not None and not isinstance(files, dict):
            raise CheckpointError(f"checkpoint {path}: {META_FILE} 'files' is not a mapping")
        local: list[str] = []
    except (CheckpointError, ValueError) as err:
        files, local = None, [str(err).removeprefix(f"checkpoint {path}: ")]
    if files:
        names = sorted(files)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        local = manifest_problems(path, {name: files[name] for name in names[rank::world]})
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    return sorted({problem for part in gathered for problem in part})


def resumable_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``directory`` that is intact (collective), or None if there is none.

    A newer one that is damaged (a file truncated or altered, garbage metadata, a step directory without
    metadata) is logged with what is wrong and which checkpoint is used instead, and renamed to
    ``.step_N.damaged`` so that pruning and later resumes ignore it.

    Raises:
        CheckpointError: checkpoints exist but every one is damaged (each is named with its problems).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(
        (
            (int(match.group(1)), path)
            for path in directory.iterdir()
            if (match := _STEP_DIR.match(path.name))
        ),
        reverse=True,
    )
    damaged: list[tuple[Path, list[str]]] = []
    for _, path in candidates:
        problems = checkpoint_problems(path)
        if not problems:
            if damaged:
                named = "; ".join(f"{bad} ({', '.join(why)})" for bad, why in damaged)
                logger.warning(
                    "damaged checkpoint(s) skipped: %s; resuming from %s instead (the damaged ones are moved "
                    "to .step_N.damaged)",
                    named,
                    path,
                )
                _set_aside(damaged)
            return path
        damaged.append((path, problems))
    if damaged:
        named = "\n  ".join(f"{bad}: {', '.join(why)}" for bad, why in damaged)
        raise CheckpointError(
            f"every checkpoint in {directory} is damaged:\n  {named}\nmove them away to start afresh, or "
            "set checkpoint.resume=never"
        )
    return None


def _set_aside(damaged: list[tuple[Path, list[str]]]) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        for path, _ in damaged:
            target = path.with_name(f".{path.name}.damaged")
            suffix = 1
            while target.exists():
                suffix += 1
                target = path.with_name(f".{path.name}.damaged-{suffix}")
            path.rename(target)
    if dist.is_initialized():
        dist.barrier()


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

    try:
        _write_partial(partial, step, model, model_cfg, optimizer, scheduler, client_state)
    except BaseException as err:  # torch's CheckpointException derives from BaseException
        # A full disk mid-save: leave nothing partial, name the checkpoint, keep the OSError's errno.
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        cause = None if interrupted else _os_error_in(err) or _full_disk(directory)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if cause is None:
            raise
        raise OSError(
            cause.errno,
            f"saving checkpoint {final} failed ({cause.strerror}); its partial files were removed and the "
            "previous checkpoints are intact",
            cause.filename,
        ) from err
    if rank == 0:
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


def _write_partial(
    partial: Path,
    step: int,
    model: Sequence[torch.nn.Module],
    model_cfg: ModelConfig,
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    client_state: dict[str, Any] | None,
) -> None:
    """Every file of the checkpoint into ``partial``, the metadata with the manifest last (collective)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
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

    names = list_files(partial, exclude=(META_FILE,))  # every rank lists the same shared directory
    digests: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(digests, digest_files(partial, names[rank :: dist.get_world_size()]))
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_config": model_cfg.model_dump(mode="json"),
            "layout": _layout(),
            "has_optimizer": optimizer is not None,
            "optimizer_metadata": OPTIMIZER_METADATA,
            "files": {name: digest for part in digests for name, digest in sorted(part.items())},
        }
        with atomic_write(partial / META_FILE) as handle:
            json.dump(meta, handle, indent=2)


_FULL_DISK_BYTES = 64 * 2**20


def _full_disk(directory: Path) -> OSError | None:
    """ENOSPC if ``directory``'s file system is (nearly) full: torch's zip writer reports a full disk as a
    RuntimeError ("unexpected pos") that carries no errno."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if free >= _FULL_DISK_BYTES:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free} bytes free", str(directory))


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused ``error`` (megatron wraps I/O errors in its own exceptions), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
        CheckpointError: a file differs from what was written (named), or the checkpoint cannot be read.
        ValueError: the checkpoint is of another architecture (the mismatching fields are named), or optimizer
            state is requested but absent or saved under another TP/PP.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no checkpoint_meta.json); use latest_checkpoint()"
        )
    if problems := checkpoint_problems(path):
        raise CheckpointError(f"checkpoint {path} is damaged: {', '.join(problems)}")
    meta = read_checkpoint_meta(path)
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
    try:  # the manifest cannot vouch for a checkpoint of format 1
        loaded = dist_checkpointing.load(sharded, str(path))
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}") from err
    module.load_state_dict(loaded["model"])
    if restore_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()

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
