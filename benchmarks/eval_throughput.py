"""Pass@k evaluation throughput on the tiny model: problems x samples per second at n = 16, 64, 256.

Why: the paper's predictor is pass@64 from n = 256 samples per problem, so the evaluator's cost is
dominated by generation (in large KV-cached batches through the in-process Megatron engine) and grading
(math-verify in worker processes, on a background thread that overlaps generation). This script runs the
Pass@k callback exactly as a validation does, on held-out problems of the synthetic task, and prints per n:
wall time, samples per second, generated tokens per second, the time spent waiting for grading after the
last generation call, and the same with grading after each batch instead of overlapping (`overlap off`).
Each row is the fastest of `--repeats` runs, and the load average is printed: other processes on the
machine slow generation and grading unevenly.

The tiny model is first SFT-trained for `--sft-steps` steps (the tiny SFT config's settings) so that
completions end with EOS at realistic lengths and carry answers to grade; an untrained model writes
`--max-new-tokens` tokens of noise.

Run:  OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py [--problems 32] [--sft-steps 200] \
          [--ns 16,64,256]          (3-8 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.data.synthetic import BENCHMARK_NAME, SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.benchmarks import Problem
from nemo_quagmire.rollout.base import SamplingParams

if TYPE_CHECKING:
    from nemo_quagmire.megatron.policy import MegatronPolicy

MODEL = get_model_preset("tiny").replace(vocab_size=28, max_position_embeddings=128)
SEED = 1234


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=32, help="held-out problems evaluated")
    parser.add_argument("--ns", default="16,64,256", help="samples per problem to measure")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT steps before measuring (0 = random)")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--rows-per-batch", type=int, default=256, help="completions per generation call")
    parser.add_argument("--grader-workers", type=int, default=1)
    parser.add_argument("--no-overlap-rows", action="store_true", help="skip the overlap-off comparison")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the fastest is shown")
    return parser.parse_args()


def warm_up(policy: MegatronPolicy, tokenizer: CharTokenizer, steps: int) -> float:
    """SFT the policy for `steps` steps (batches of 64, lr 2e-3, packed rows); returns the last loss."""
    from nemo_quagmire.config.optim import OptimConfig
    from nemo_quagmire.data.batching import encode_example
    from nemo_quagmire.trainer.sft import sft_step

    splits = generate_splits(SyntheticTaskConfig(), seed=SEED, num_sft=steps * 64, num_rl=0, num_heldout=0)
    examples = [encode_example(r, tokenizer) for r in splits.sft_records()]
    policy.attach_optimizer(OptimConfig(lr=2e-3, weight_decay=0.0, lr_warmup_steps=10))
    loss = float("nan")
    for step in range(steps):
        batch = examples[step * 64 : (step + 1) * 64]
        loss = sft_step(policy, batch, packing="packed", capacity=128, micro_batch_size=64, pad_id=0)["loss"]
    return loss


def measure(
    policy: MegatronPolicy,
    tokenizer: CharTokenizer,
    problems: list[Problem],
    n: int,
    *,
    overlap: bool,
    max_new_tokens: int = 72,
    rows_per_batch: int = 256,
    grader_workers: int = 1,
    repeats: int = 2,
) -> dict[str, float]:
    """One validation's metrics (the fastest of `repeats`, after one untimed warm-up run)."""
    callback = PassAtKCallback(
        {BENCHMARK_NAME: problems},
        lambda p: tokenizer.encode(p.problem, add_bos=True),
        num_samples=n,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens),
        rows_per_batch=rows_per_batch,
        grader_workers=grader_workers,
        overlap_grading=overlap,
        save_samples=False,
        seed=random.Random(n).getrandbits(31),
    )
    engine = policy.rollout_engine(tokenizer, seed=SEED, max_batch_size=rows_per_batch)
    handle = policy.handle(
        step=0, run_dir=Path("."), tokenizer=tokenizer, generate=engine.generate, micro_batch_size=64
    )
    try:
        callback.evaluate(handle)  # warm-up: grader start-up and first-call allocations
        runs = [callback.evaluate(handle) for _ in range(repeats)]
    finally:
        callback.close()
    return min(runs, key=lambda m: m["timing/val_passk"])  # the run least disturbed by other load


def held_out_problems(count: int) -> list[Problem]:
    splits = generate_splits(SyntheticTaskConfig(), seed=SEED, num_sft=0, num_rl=0, num_heldout=count)
    return [
        Problem(BENCHMARK_NAME, r["id"], r["problem"], r["answer"], r["solution"])
        for r in splits.benchmark_records()
    ]


def main() -> None:
    args = parse_args()
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.megatron.policy import MegatronPolicy

    tokenizer = CharTokenizer()
    problems = held_out_problems(args.problems)
    with parallel_context(MODEL, ParallelConfig(), seed=SEED):
        policy = MegatronPolicy(MODEL, ParallelConfig(), seed=None)  # seeded by parallel_context
        start = time.perf_counter()
        loss = warm_up(policy, tokenizer, args.sft_steps) if args.sft_steps else float("nan")
        parameters = sum(p.numel() for p in policy.modules()[0].parameters())
        print(
            f"tiny model ({parameters:,} parameters), torch threads "
            f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; SFT {args.sft_steps} steps in "
            f"{time.perf_counter() - start:.0f} s (loss {loss:.3f})"
        )
        header = f"{'n':>4} {'overlap':>7} {'problems':>8} {'samples':>7} {'seconds':>8} {'samples/s':>9} "
        header += f"{'tokens/s':>8} {'grade wait s':>12} {'pass@1':>6} {'pass@n':>6} {'length':>6}"
        print(f"load average {os.getloadavg()[0]:.2f}\n{header}", flush=True)
        for n in [int(x) for x in args.ns.split(",")]:
            for overlap in (True, False) if not args.no_overlap_rows else (True,):
                metrics = measure(
                    policy,
                    tokenizer,
                    problems,
                    n,
                    overlap=overlap,
                    max_new_tokens=args.max_new_tokens,
                    rows_per_batch=args.rows_per_batch,
                    grader_workers=args.grader_workers,
                    repeats=args.repeats,
                )
                seconds = metrics["timing/val_passk"]
                samples = len(problems) * n
                length = metrics[f"val/{BENCHMARK_NAME}/response_length"]
                largest_k = 1 << (n.bit_length() - 1)
                print(
                    f"{n:>4} {'on' if overlap else 'off':>7} {len(problems):>8} {samples:>7} {seconds:>8.2f} "
                    f"{samples / seconds:>9.0f} {samples * length / seconds:>8.0f} "
                    f"{metrics['timing/val_passk_grade_wait']:>12.2f} "
                    f"{metrics[f'val/{BENCHMARK_NAME}/pass@1']:>6.3f} "
                    f"{metrics[f'val/{BENCHMARK_NAME}/pass@{largest_k}']:>6.3f} {length:>6.1f}",
                    flush=True,
                )
        print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
