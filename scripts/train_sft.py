"""Supervised fine-tuning on the Megatron engine, logging held-out loss and pass@k at every validation.

    python scripts/train_sft.py                               # embedded default (conf/sft/tiny.yaml), CPU
    python scripts/train_sft.py --config-name=nemo12b         # Mistral-NeMo-12B on 8xH100 (torchrun)
    python scripts/train_sft.py --config-name=nemo12b dry_run=true    # plan only: layout and memory, no GPU
    python scripts/train_sft.py sft.epochs=2 optim.lr=1e-3            # Hydra overrides

Multi-process runs go through torchrun (`torchrun --nproc-per-node 8 scripts/train_sft.py ...`). A run
resumes from the newest checkpoint in its run_dir. Config errors name the key, the value and the fix, and
exit with code 2 before anything starts.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.plan.sft import plan_sft_run
from nemo_quagmire.trainer.build import build_sft_trainer
from nemo_quagmire.trainer.entry import plan_or_train, run_config_or_exit
from nemo_quagmire.utils.logging import configure_logging


@hydra.main(version_base=None, config_path="../conf/sft", config_name="tiny")
def main(raw: DictConfig) -> None:
    configure_logging()
    cfg = run_config_or_exit(SFTRunConfig, raw, "SFT config")
    sys.exit(plan_or_train(cfg, plan=plan_sft_run, build=build_sft_trainer, what="SFT config"))


if __name__ == "__main__":
    main()
