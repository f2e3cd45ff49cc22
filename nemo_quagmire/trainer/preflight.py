"""Everything about a training run that can be checked before a process group, a model or a file exists.

Why: the expensive parts of a run (process-group start-up, model build, an SFT warm-up, the first
validation) used to come before some of its input was read, so a missing file or an impossible layout
surfaced minutes later as a traceback, after the run directory was created. `preflight` reads the config
once more against the machine: the layout against the launched world size, every input path (training
data, tokenizer, held-out file, benchmarks, initial weights: their metadata, the sizes of their files and
their architecture), the grader workers against the CPUs and the run directory's writability; it reports
every problem at once and writes nothing. The pydantic schemas check what needs no machine (values, keys,
combinations) and run first, also for dry runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_quagmire.utils.errors import InputError

__all__ = ["ConfigError", "preflight"]


class ConfigError(InputError):
    """A run config cannot run on this machine (every problem, one per line, names its key)."""


def preflight(cfg: Any) -> None:
    """Check a validated run config (`SFTRunConfig` or `GRPORunConfig`) against this machine.

    Raises:
        ConfigError: listing every problem found, each naming its key, the value and the fix.
    """
    problems = (
        _layout_problems(cfg)
        + _data_problems(cfg)
        + _validation_problems(cfg)
        + _initial_weights_problems(cfg)
        + _output_problems(cfg)
        + _rollout_problems(cfg)
    )
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))


def _layout_problems(cfg: Any) -> list[str]:
    """The layout against the launched world, then the batch rules against the data-parallel size left."""
    from nemo_quagmire.config.run import data_parallel_problems
    from nemo_quagmire.megatron.parallel import launched_world, validate_layout

    world_size, backend = launched_world()
    try:
        layout = validate_layout(cfg.model, cfg.parallel, world_size, backend=backend)
    except ValueError as err:
        return [f"parallel: {line.strip()}" for line in str(err).splitlines()[1:]] or [f"parallel: {err}"]
    return data_parallel_problems(cfg, layout.dp)


def _data_problems(cfg: Any) -> list[str]:
    data, problems = cfg.data, []
    if data.task != "jsonl":
        return problems
    if not Path(data.train_file).is_file():
        problems.append(f"data.train_file={data.train_file!r}: no such file")
    if not Path(data.tokenizer).is_dir():
        problems.append(f"data.tokenizer={data.tokenizer!r}: no such directory (a local HF tokenizer)")
    return problems


def _validation_problems(cfg: Any) -> list[str]:
    from nemo_quagmire.config.run import SYNTHETIC
    from nemo_quagmire.eval.benchmarks import BenchmarkError, available_benchmarks
    from nemo_quagmire.rewards.pool import check_num_workers

    val, problems = cfg.validation, []
    if val.heldout_loss and val.heldout_file is not None and not Path(val.heldout_file).is_file():
        problems.append(f"validation.heldout_file={val.heldout_file!r}: no such file")
    if files := [name for name in val.benchmarks if name != SYNTHETIC]:
        try:
            available = available_benchmarks(val.benchmarks_dir)
        except BenchmarkError as err:
            problems.append(f"validation.benchmarks_dir={val.benchmarks_dir!r}: {err}")
        else:
            if unknown := [name for name in files if name not in available]:
                problems.append(
                    f"validation.benchmarks: {unknown} not in the benchmarks directory; available: "
                    f"{', '.join([*available, SYNTHETIC])}"
                )
    if val.benchmarks:
        try:
            check_num_workers(val.grader_workers, "validation.grader_workers")
        except InputError as err:
            problems.append(str(err))
    return problems


def _initial_weights_problems(cfg: Any) -> list[str]:
    from nemo_quagmire.config.model import ModelConfig
    from nemo_quagmire.megatron.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta
    from nemo_quagmire.utils.manifest import manifest_problems

    load_from = cfg.checkpoint.load_from
    if load_from is None:
        return []
    path, where = Path(load_from), f"checkpoint.load_from={load_from!r}"
    if not path.is_dir():
        return [f"{where}: no such directory (an HF model directory or a checkpoint step_N directory)"]
    if (path / "config.json").is_file() and not (path / META_FILE).is_file():
        try:  # an HF directory: the HF importer reads its config and weights in full
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return [f"{where}: {path / 'config.json'} is not a readable JSON file ({err})"]
        return [] if isinstance(config, dict) else [f"{where}: {path / 'config.json'} is not a JSON object"]
    if not (path / META_FILE).is_file():
        return [
            f"{where}: neither a checkpoint of this project ({META_FILE}) nor an HF directory (config.json)"
        ]
    try:
        meta = read_checkpoint_meta(path)
        saved = ModelConfig.model_validate(meta["model_config"])
    except (CheckpointError, ValueError) as err:
        return [f"{where}: {err}"]
    # Sizes only here (each rank would read every byte); the load verifies checksums across ranks.
    if damaged := manifest_problems(path, meta.get("files") or {}, checksums=False):
        return [f"{where}: damaged checkpoint: {', '.join(damaged)}"]
    if mismatches := saved.architecture_mismatches(cfg.model):
        listed = ", ".join(
            f"{name}: {a!r} (checkpoint) vs {b!r} (model)" for name, (a, b) in mismatches.items()
        )
        return [f"{where}: another architecture ({listed}); set the model to the checkpoint's config"]
    return []


def _output_problems(cfg: Any) -> list[str]:
    from nemo_quagmire.utils.io import check_output_dir

    try:
        check_output_dir(cfg.run_dir, "run_dir")
    except InputError as err:
        return [str(err)]
    return []


def _rollout_problems(cfg: Any) -> list[str]:
    """vLLM rollouts (GRPO): the servers' Python imports vLLM, the platform and the engine layout fit."""
    rollout = getattr(cfg, "rollout", None)
    if rollout is None or rollout.engine != "vllm":
        return []
    from nemo_quagmire.rollout.distributed import check_vllm_rollouts_of

    try:
        check_vllm_rollouts_of(cfg)
    except ValueError as err:
        return [f"rollout: {line}" for line in str(err).splitlines()]
    return []
