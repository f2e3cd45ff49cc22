"""Supervised fine-tuning on the Megatron engine, logging held-out loss and pass@k at every validation.

    python scripts/train_sft.py                               # embedded default (conf/sft/tiny.yaml), CPU
    python scripts/train_sft.py --config-name=nemo12b         # Mistral-NeMo-12B on 8xH100 (torchrun)
    python scripts/train_sft.py --config-name=nemo12b dry_run=true    # plan only: layout and memory, no GPU
    python scripts/train_sft.py sft.epochs=2 optim.lr=1e-3            # Hydra overrides

Multi-process runs go through torchrun (`torchrun --nproc-per-node 8 scripts/train_sft.py ...`). A run
resumes from the newest intact checkpoint in its run_dir. Config errors name the key, the value and the
fix, and exit with code 2 before anything starts or is written. SIGTERM (Slurm pre-emption) checkpoints
after the current step and exits 143; rerun to resume.
"""

from __future__ import annotations

import sys

from nemo_quagmire.config.sft import SFT_CONF_DIR, SFTRunConfig
from nemo_quagmire.plan.sft import plan_sft_run
from nemo_quagmire.trainer.build import build_sft_trainer
from nemo_quagmire.trainer.entry import hydra_entry


def main(argv: list[str] | None = None) -> int:
    """The exit code (see nemo_quagmire/trainer/entry.py): 0 done, 2 bad input, 143 stopped by SIGTERM."""
    return hydra_entry(
        SFTRunConfig,
        config_dir=SFT_CONF_DIR,
        config_name="tiny",
        plan=plan_sft_run,
        build=build_sft_trainer,
        what="SFT config",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
