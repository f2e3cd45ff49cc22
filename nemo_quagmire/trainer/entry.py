"""What the training entry scripts share: plan (dry run) or train a validated run config.

`scripts/train_grpo.py` and `scripts/train_sft.py` differ only in their config schema, planner and trainer
builder; the exit codes are the same: 0 done (or the plan fits), 1 the plan does not fit, 2 invalid config.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


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
    from nemo_quagmire.megatron.parallel import parallel_context

    with parallel_context(cfg.model, cfg.parallel, seed=cfg.seed):
        build(cfg).fit()
    return 0
