"""GRPO training with verifiable math rewards on the Megatron engine.

    python scripts/train_grpo.py                              # embedded default (conf/tiny.yaml), CPU
    python scripts/train_grpo.py --config-name=nemo12b        # Mistral-NeMo-12B on 8xH100 nodes (torchrun)
    python scripts/train_grpo.py --config-name=nemo12b dry_run=true   # plan only: layout and memory, no GPU
    python scripts/train_grpo.py max_steps=20 grpo.group_size=4       # Hydra overrides

Multi-process runs go through torchrun (`torchrun --nproc-per-node 8 scripts/train_grpo.py ...`).
Config errors name the key, the value and the fix, and exit with code 2 before anything starts.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_quagmire.config.errors import validate_or_exit
from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.plan.grpo import plan_grpo_run
from nemo_quagmire.rollout.distributed import check_vllm_rollouts_of
from nemo_quagmire.trainer.build import build_grpo_trainer
from nemo_quagmire.trainer.entry import plan_or_train
from nemo_quagmire.utils.logging import configure_logging


@hydra.main(version_base=None, config_path="../conf", config_name="tiny")
def main(raw: DictConfig) -> None:
    configure_logging()
    cfg = validate_or_exit(GRPORunConfig, OmegaConf.to_container(raw, resolve=True), "GRPO config")
    if cfg.rollout.engine == "vllm" and not cfg.dry_run:
        try:  # before any process group or engine starts
            check_vllm_rollouts_of(cfg)
        except ValueError as error:
            print(f"invalid GRPO config: {error}", file=sys.stderr)
            sys.exit(2)
    sys.exit(plan_or_train(cfg, plan=plan_grpo_run, build=build_grpo_trainer, what="GRPO config"))


if __name__ == "__main__":
    main()
