"""Two-process megatron scenarios (gloo, CPU), run by test_multiprocess.py through one torchrun launch.

Launch start-up costs ~10 s of imports, so every layout runs in the same two processes, one after the other:
TP=2, then TP=1 x DP=2, then PP=2. Rank 0 writes the raw results (log-probs, losses, messages) as JSON; the
test compares them with a TP=1 reference computed in its own process from the same seed and data, which this
module also provides (``reference_*`` helpers), so both sides share one definition of the data and the loss.

    python -m torch.distributed.run --nproc_per_node 2 tests/megatron/multiprocess_worker.py OUT.json WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from nemo_quagmire.algorithms.losses import Metric
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.optim import OptimConfig

MODEL = get_model_preset("tiny")
SEED = 1234
STEPS = 3
RESUME_AT = 1  # the interrupted run saves before this step and resumes from there
NUM_MICRO_BATCHES = 3  # odd: the DP=2 ranks run 2 and 1 micro-batches (as packed GRPO rows can)
MICRO_BATCH_SIZE = 2
SEQ_LEN = 16
OPTIM = OptimConfig(lr=1e-3, use_distributed_optimizer=True)


def eval_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[5, SEQ_LEN]`` with ragged lengths (including 0 and 1) for log-prob comparisons."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (5, SEQ_LEN), generator=generator)
    return tokens, torch.tensor([SEQ_LEN, 9, 1, 0, 12])


def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """The step's global batch: NUM_MICRO_BATCHES micro-batches with ragged lengths, each carrying the loss
    mask (positions 1..length-1) and the global number of loss tokens (over all micro-batches)."""
    generator = torch.Generator().manual_seed(100 + step)
    batches = []
    for _ in range(NUM_MICRO_BATCHES):
        tokens = torch.randint(0, MODEL.vocab_size, (MICRO_BATCH_SIZE, SEQ_LEN), generator=generator)
        lengths = torch.randint(2, SEQ_LEN + 1, (MICRO_BATCH_SIZE,), generator=generator)
        positions = torch.arange(SEQ_LEN)
        mask = ((positions >= 1) & (positions < lengths[:, None])).float()
        batches.append({"tokens": tokens, "loss_mask": mask})
    global_tokens = sum(batch["loss_mask"].sum() for batch in batches)
    for batch in batches:
        batch["global_tokens"] = global_tokens
    return batches


def masked_nll(
    logprobs: torch.Tensor, batch: dict[str, torch.Tensor], entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """Token-mean NLL normalised by the global token count: micro-batch losses sum to the batch loss. Its
    metrics exercise every reduction: ``tokens`` (a sum), ``logprob_max`` (the largest log-prob of a loss
    token, a max) and, when train_step passes the entropy, its token mean."""
    mask = batch["loss_mask"]
    nll_sum = -(logprobs * mask).sum()
    metrics = {
        "tokens": mask.sum(),
        "logprob_max": Metric(logprobs.detach().masked_fill(mask == 0, -torch.inf).amax(), "max"),
    }
    if entropy is not None:
        metrics["entropy"] = Metric((entropy * mask).sum() / mask.sum(), "mean", mask.sum())
    return nll_sum / batch["global_tokens"], metrics


TRAIN_METRICS = ("loss", "grad_norm", "entropy", "logprob_max")


def train(trainer, steps: range, shard: tuple[int, int] = (0, 1)) -> dict[str, list[float]]:
    """Loss, grad-norm, entropy and max log-prob series of ``steps`` optimizer steps; ``shard = (rank,
    size)`` picks this DP rank's micro-batches. (Adam is nearly blind to the gradient's scale, so the grad
    norm is what checks it.)"""
    from nemo_quagmire.megatron.train_step import train_step

    rank, size = shard
    metrics = [
        train_step(trainer, micro_batches(step)[rank::size], masked_nll, with_entropy=True) for step in steps
    ]
    return {key: [m[key] for m in metrics] for key in TRAIN_METRICS}


def _logprobs(model) -> tuple[list, list]:
    from nemo_quagmire.megatron.logprobs import compute_logprobs

    tokens, lengths = eval_batch()
    out = compute_logprobs(model, tokens, lengths, micro_batch_size=2, with_entropy=True)
    return out.logprobs.tolist(), out.entropy.tolist()


def _gathered_logprobs(model) -> list:
    """Log-probs from the full logits all-gathered over TP: brute-force check of the vocab-parallel path."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_quagmire.megatron.logprobs import forward_logits

    tokens, lengths = eval_batch()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(forward_logits(model[0], tokens))  # [B, T, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    aligned = torch.cat([torch.zeros(len(tokens), 1), logprobs], dim=1)
    return aligned.masked_fill(torch.arange(SEQ_LEN) >= lengths[:, None], 0.0).tolist()


def run(workdir: Path) -> dict:
    import torch.distributed as dist

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron import compat
    from nemo_quagmire.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import destroy_parallel, initialize_parallel
    from nemo_quagmire.megatron.train_step import setup_training

    results: dict = {}

    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    initialize_parallel(MODEL, tp2, seed=SEED)
    model = build_model(MODEL, tp2)
    results["tp2_logprobs"], results["tp2_entropy"] = _logprobs(model)
    results["tp2_gathered_logprobs"] = _gathered_logprobs(model)
    save_checkpoint(workdir / "init", 0, model, model_cfg=MODEL)
    trainer = setup_training(model, OPTIM)
    first = train(trainer, range(RESUME_AT))
    save_checkpoint(
        workdir / "run",
        RESUME_AT,
        trainer.model,
        model_cfg=MODEL,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        client_state={"next_step": RESUME_AT},
    )
    rest = train(trainer, range(RESUME_AT, STEPS))
    results["tp2_train"] = {key: first[key] + rest[key] for key in first}
    save_checkpoint(
        workdir / "trained",
        STEPS,
        trainer.model,
        model_cfg=MODEL,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
    )
    results["tp2_trained_logprobs"], _ = _logprobs(trainer.model)
    resumed = setup_training(build_model(MODEL, tp2), OPTIM)
    state = load_checkpoint(
        latest_checkpoint(workdir / "run"),
        resumed.model,
        model_cfg=MODEL,
        optimizer=resumed.optimizer,
        scheduler=resumed.scheduler,
    )
    results["tp2_resumed_train"] = train(resumed, range(state["next_step"], STEPS))
    destroy_parallel(destroy_process_group=False)

    dp2 = ParallelConfig()
    initialize_parallel(MODEL, dp2, seed=SEED)
    trainer = setup_training(build_model(MODEL, dp2), OPTIM)
    results["dp2_train"] = train(trainer, range(STEPS), shard=(dist.get_rank(), 2))
    destroy_parallel(destroy_process_group=False)

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_parallel(MODEL, pp2, seed=SEED)
    model = build_model(MODEL, pp2)
    load_checkpoint(workdir / "init" / "step_00000000", model, model_cfg=MODEL)
    results["pp2_logprobs"], _ = _logprobs(model)
    trainer = setup_training(model, OPTIM)
    results["pp2_train"] = train(trainer, range(STEPS))
    trained = latest_checkpoint(workdir / "trained")
    load_checkpoint(
        trained, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer, load_optimizer_state=False
    )
    results["pp2_trained_logprobs"], _ = _logprobs(trainer.model)
    try:
        load_checkpoint(trained, trainer.model, model_cfg=MODEL, optimizer=trainer.optimizer)
        results["pp2_optimizer_load_error"] = None
    except ValueError as error:
        results["pp2_optimizer_load_error"] = str(error)
    destroy_parallel(destroy_process_group=True)
    results["compat_sites"] = compat.redirected_call_sites()
    return results


def main() -> None:
    out, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    results = run(workdir)
    if os.environ["RANK"] == "0":
        out.write_text(json.dumps(results))


if __name__ == "__main__":  # required: torch_dist checkpoint saving starts a spawn-context Manager
    main()
