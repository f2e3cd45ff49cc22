"""GRPO training with verifiable math rewards on the Megatron engine.

    python scripts/train_grpo.py                              # embedded default (conf/tiny.yaml), CPU
    python scripts/train_grpo.py --config-name=nemo12b        # Mistral-NeMo-12B on 8xH100 nodes (torchrun)
    python scripts/train_grpo.py --config-name=nemo12b dry_run=true   # plan only: layout and memory, no GPU
    python scripts/train_grpo.py max_steps=20 grpo.group_size=4       # Hydra overrides

Multi-process runs go through torchrun (`torchrun --nproc-per-node 8 scripts/train_grpo.py ...`).
Config errors name the key, the value and the fix, and exit with code 2 before anything starts or is
written. SIGTERM (Slurm pre-emption) checkpoints after the current step and exits 143; rerun to resume.
"""

from __future__ import annotations

import sys

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.run import CONF_DIR
from nemo_quagmire.plan.grpo import plan_grpo_run
from nemo_quagmire.trainer.build import build_grpo_trainer
from nemo_quagmire.trainer.entry import hydra_entry


def main(argv: list[str] | None = None) -> int:
    """The exit code (see nemo_quagmire/trainer/entry.py): 0 done, 2 bad input, 143 stopped by SIGTERM."""
    return hydra_entry(
        GRPORunConfig,
        config_dir=CONF_DIR,
        config_name="tiny",
        plan=plan_grpo_run,
        build=build_grpo_trainer,
        what="GRPO config",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
