"""What the training entry scripts share: plan (dry run) or train a validated run config.

`scripts/train_grpo.py` and `scripts/train_sft.py` differ only in their config schema, planner and trainer
builder; the exit codes are the same: 0 done (or the plan fits), 1 the plan does not fit, 2 invalid config.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def run_config_or_exit(schema: type[ConfigT], raw: Any, what: str) -> ConfigT:
    """The validated run config of the Hydra config `raw`, with `checkpoint.load_from` resolved (the model
    shape and tokenizer from the checkpoint: `config.source.resolve_run_config`); on any input error the
    problems on stderr and exit code 2, before anything starts. Call inside `hydra.main`."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nemo_quagmire.config.errors import validate_or_exit
    from nemo_quagmire.config.source import CheckpointSourceError, resolve_run_config

    container = OmegaConf.to_container(raw, resolve=True)
    try:
        container = resolve_run_config(container, HydraConfig.get().overrides.task)
    except CheckpointSourceError as error:
        print(f"invalid {what}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return validate_or_exit(schema, container, what)


def plan_or_train(
    cfg: Any,
    *,
    plan: Callable[[Any], tuple[str, bool]],
    build: Callable[[Any], Any],
    what: str,
) -> int:
    """Print the dry-run plan of `cfg` (`cfg.dry_run`), or build the trainer inside the parallel context and
    fit it. Returns the exit code."""
    if cfg.dry_run:
        try:
            report, fits = plan(cfg)
        except ValueError as error:
            print(f"invalid {what}: {error}", file=sys.stderr)
            return 2
        print(report)  # the plan is the output of a dry run
        return 0 if fits else 1
    from nemo_quagmire.megatron.parallel import launched_world, parallel_context, validate_layout

    world_size, backend = launched_world()
    try:  # before any process group exists: a layout that cannot run exits 2 on every rank alike
        validate_layout(cfg.model, cfg.parallel, world_size, backend=backend)
    except ValueError as error:
        print(f"invalid {what}: {error}", file=sys.stderr)
        return 2
    with parallel_context(cfg.model, cfg.parallel, seed=cfg.seed):
        build(cfg).fit()
    return 0
