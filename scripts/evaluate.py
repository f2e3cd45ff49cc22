"""Evaluate one checkpoint on the paper's two predictors of its post-RL score: pass@k on benchmarks and the
held-out loss; or re-grade a saved samples file without any model.

Usage:
    python scripts/evaluate.py --checkpoint runs/sft-tiny/checkpoints/step_00000312 --benchmarks synthetic \
        --n 64 --heldout synthetic --out runs/eval-tiny
    python scripts/evaluate.py --checkpoint /ckpt/sft-hf --benchmarks math500,aime24 --n 256 --k 1,8,64 \
        --max-new-tokens 3072 --heldout data/sft/heldout.jsonl --out runs/eval-sft   # or torchrun (DP)
    python scripts/evaluate.py --regrade runs/sft-tiny/eval/step_00000300 --out runs/regraded

--checkpoint is a checkpoint directory of this project (`<run_dir>/checkpoints/step_N`; its tokenizer is
found in <run_dir>/tokenizer.json unless --tokenizer says) or an HF directory (config.json, safetensors and
its tokenizer). Benchmarks are files of --benchmarks-dir (default $NEMO_QUAGMIRE_BENCHMARKS_DIR) or
`synthetic`, the embedded task's held-out split (--synthetic-seed and --synthetic-heldout must match the
run's seed and data.num_heldout). The evaluation is the training runs' validation callbacks
(`nemo_quagmire.trainer.build.validation_callbacks`), so the numbers are those a run logs.

Output (written atomically):
    OUT/metrics.json     {"checkpoint", "step", "metrics": {"val/<bench>/pass@<k>": ..., ...}} (names as in
                         nemo_quagmire/METRICS.md)
    OUT/report.json      per-benchmark and macro report (nemo_quagmire/eval/samples.py)
    OUT/samples.parquet  every graded sample: benchmark, id, sample, completion, gold, extracted, correct,
                         reason, length, truncated (under torchrun: one part per data-parallel rank,
                         OUT/samples.rank-XXXXX-of-YYYYY.parquet)
Bad input (unknown benchmark, k > n, n > 256, an invalid held-out file, a missing checkpoint) exits with
code 2 before the model is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_quagmire.callbacks.passk import MAX_NUM_SAMPLES, SYNTHETIC, PassAtKCallback
from nemo_quagmire.rewards.pool import check_num_workers, usable_cpus
from nemo_quagmire.utils import errors
from nemo_quagmire.utils.io import atomic_write, check_output_dir
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("scripts.evaluate")

METRICS_FILE = "metrics.json"


class InputError(errors.InputError):
    """An argument or input file is invalid (exit code 2)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory of this project, or HF directory"
    )
    source.add_argument(
        "--regrade", type=Path, help="a samples.parquet, or an evaluation directory, to re-grade (no model)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--benchmarks", default="", help="comma-separated names (and/or 'synthetic')")
    parser.add_argument("--benchmarks-dir", default=None, help="default: $NEMO_QUAGMIRE_BENCHMARKS_DIR")
    parser.add_argument("--num-problems", type=int, default=None, help="first N problems per benchmark")
    parser.add_argument("--n", type=int, default=64, help=f"samples per problem (<= {MAX_NUM_SAMPLES})")
    parser.add_argument("--k", default=None, help="comma-separated ks (default 1, 2, 4, ... <= n)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--prompt-template", choices=["chat", "plain"], default="chat", help="math benchmarks"
    )
    parser.add_argument("--heldout", default=None, help="JSONL of {prompt, response}, or 'synthetic'")
    parser.add_argument("--heldout-template", choices=["raw", "chat"], default="raw")
    parser.add_argument("--heldout-batch-size", type=int, default=32)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (HF or this project's char one)"
    )
    parser.add_argument("--rows-per-batch", type=int, default=256, help="completions per generation call")
    parser.add_argument("--grader-workers", type=int, default=min(2, usable_cpus()), help="<= the CPUs")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--synthetic-seed", type=int, default=1234, help="the SFT/GRPO run's seed")
    parser.add_argument("--synthetic-heldout", type=int, default=256, help="the run's data.num_heldout")
    args = parser.parse_args(argv)
    args.benchmark_names = [name for name in args.benchmarks.split(",") if name]
    args.ks = None if args.k is None else _int_list(args.k, "--k")
    return args


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers") from None


def validation_config(args: argparse.Namespace) -> Any:
    """The `ValidationConfig` of the arguments (the same checks as a training run's config).

    Raises:
        InputError: k > n, n out of range, nothing to evaluate, and other invalid values.
    """
    from pydantic import ValidationError

    from nemo_quagmire.config.errors import format_validation_error
    from nemo_quagmire.config.run import ValidationConfig

    if not args.benchmark_names and args.heldout is None:
        raise InputError("nothing to evaluate: pass --benchmarks and/or --heldout")
    if not 1 <= args.n <= MAX_NUM_SAMPLES:
        raise InputError(f"--n {args.n}: samples per problem must be in 1..{MAX_NUM_SAMPLES}")
    if args.ks and (max(args.ks) > args.n or min(args.ks) < 1):
        raise InputError(f"--k {args.k}: every k must be in 1..n (--n {args.n}); pass@k needs k <= n samples")
    try:
        return ValidationConfig(
            benchmarks=tuple(args.benchmark_names),
            benchmarks_dir=args.benchmarks_dir,
            num_problems=args.num_problems or 10**9,
            num_samples=args.n,
            ks=args.ks,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            rows_per_batch=args.rows_per_batch,
            grader_workers=args.grader_workers,
            heldout_loss=args.heldout is not None,
            heldout_file=None if args.heldout in (None, SYNTHETIC) else args.heldout,
            heldout_prompt_template=args.heldout_template,
            heldout_batch_size=args.heldout_batch_size,
        )
    except ValidationError as error:
        raise InputError(format_validation_error(error, "arguments")) from None


def load_tokenizer(args: argparse.Namespace, checkpoint: Path) -> Any:
    """--tokenizer, else the HF checkpoint's own, else `<run_dir>/tokenizer.json` beside the checkpoints."""
    from nemo_quagmire.data.hf_tokenizer import HFTokenizer
    from nemo_quagmire.data.tokenizer import TOKENIZER_FILE, CharTokenizer

    if args.tokenizer is not None:
        directory = Path(args.tokenizer)
    elif (checkpoint / "config.json").is_file():
        directory = checkpoint
    else:
        directory = checkpoint.parent.parent  # <run_dir>/checkpoints/step_N -> <run_dir>
        if not (directory / TOKENIZER_FILE).is_file():
            raise InputError(f"no tokenizer found for {checkpoint} (looked in {directory}); pass --tokenizer")
    try:
        return CharTokenizer.load(directory)
    except (FileNotFoundError, ValueError):
        return HFTokenizer(directory)


def model_config_of(checkpoint: Path) -> tuple[Any, int]:
    """The checkpoint's model config and step (0 for an HF directory)."""
    from nemo_quagmire.config.model import ModelConfig
    from nemo_quagmire.megatron.checkpoint import META_FILE, checkpoint_problems, read_checkpoint_meta
    from nemo_quagmire.megatron.hf import model_config_from_hf

    if (checkpoint / META_FILE).is_file():
        if problems := checkpoint_problems(checkpoint):  # before the model is built
            raise InputError(f"checkpoint {checkpoint} is damaged: {', '.join(problems)}")
        meta = read_checkpoint_meta(checkpoint)
        return ModelConfig.model_validate(meta["model_config"]), int(meta["step"])
    if (checkpoint / "config.json").is_file():
        try:
            return model_config_from_hf(checkpoint), 0
        except (ValueError, KeyError, OSError) as error:  # an unreadable or unsupported config.json
            raise InputError(f"{checkpoint / 'config.json'}: {error}") from None
    raise InputError(
        f"{checkpoint} is neither a checkpoint of this project ({META_FILE}) nor an HF dir (config.json)"
    )


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Pass@k and held-out loss of `args.checkpoint`; writes OUT/{metrics.json, report.json, samples.parquet}.

    Raises:
        InputError: bad arguments or inputs, found before the model is built.
    """
    from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
    from nemo_quagmire.eval.benchmarks import BenchmarkError
    from nemo_quagmire.megatron.parallel import ParallelConfig, parallel_context
    from nemo_quagmire.trainer.build import math_prompt_fn, validation_callbacks
    from nemo_quagmire.trainer.run import (
        load_initial_weights,
        megatron_policy_handle,
        megatron_rollout_engine,
    )

    checkpoint = args.checkpoint
    if not checkpoint.is_dir():
        raise InputError(f"checkpoint directory {checkpoint} does not exist")
    val = validation_config(args)
    model_cfg, step = model_config_of(checkpoint)
    tokenizer = load_tokenizer(args, checkpoint)
    uses_synthetic = SYNTHETIC in args.benchmark_names or args.heldout == SYNTHETIC
    splits = None
    if uses_synthetic:
        splits = generate_splits(
            SyntheticTaskConfig(),
            seed=args.synthetic_seed,
            num_sft=0,
            num_rl=0,
            num_heldout=args.synthetic_heldout,
        )
    try:
        callbacks = validation_callbacks(
            val,
            tokenizer=tokenizer,
            model=model_cfg,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            heldout_template=args.heldout_template,
            splits=splits,
            math_prompt_ids=math_prompt_fn(args.prompt_template, tokenizer)
            if hasattr(tokenizer, "apply_chat_template")
            else None,
        )
    except (BenchmarkError, FileNotFoundError, ValueError) as error:
        raise InputError(str(error)) from None

    metrics: dict[str, float] = {}
    with parallel_context(model_cfg, ParallelConfig(), seed=args.seed):
        from nemo_quagmire.megatron.model import build_model

        model = build_model(model_cfg, ParallelConfig())
        load_initial_weights(model, checkpoint, model_cfg)
        engine = megatron_rollout_engine(
            model, model_cfg, tokenizer, seed=args.seed, max_batch_size=args.rows_per_batch
        )
        handle = megatron_policy_handle(
            model,
            step=step,
            run_dir=args.out,
            tokenizer=tokenizer,
            generate=engine.generate,
            micro_batch_size=args.heldout_batch_size,
        )
        for callback in callbacks:
            if isinstance(callback, PassAtKCallback):
                metrics |= callback.evaluate(handle, out_dir=args.out)
                callback.close()
            else:
                metrics |= callback.on_validation(handle)
    result = {"checkpoint": str(checkpoint), "step": step, "metrics": metrics}
    _write_metrics(args.out, result)
    return result


def regrade(args: argparse.Namespace) -> dict[str, Any]:
    """Re-grade a samples file with the current grader; writes OUT/{metrics.json, report.json,
    samples.parquet}."""
    from nemo_quagmire.eval.samples import (
        REPORT_FILE,
        read_samples,
        regrade_samples,
        samples_file,
        summarize,
        write_report,
        write_samples,
    )
    from nemo_quagmire.rewards.math_grader import MathGrader

    try:
        records = read_samples(args.regrade)
    except (FileNotFoundError, ValueError) as error:
        raise InputError(str(error)) from None
    with MathGrader(num_workers=args.grader_workers) as grader:
        records = regrade_samples(records, grader)
    try:
        report, metrics = summarize(records, args.ks)
    except ValueError as error:  # a k larger than some problem's n
        raise InputError(str(error)) from None
    eval_dir = args.regrade if args.regrade.is_dir() else args.regrade.parent
    step = (
        json.loads((eval_dir / REPORT_FILE).read_text())["step"] if (eval_dir / REPORT_FILE).is_file() else 0
    )
    write_samples(samples_file(args.out), records)
    write_report(args.out, step, report)
    result = {"regraded": str(args.regrade), "step": step, "metrics": metrics}
    _write_metrics(args.out, result)
    return result


def _write_metrics(out: Path, result: dict[str, Any]) -> None:
    with atomic_write(out / METRICS_FILE) as handle:
        json.dump(result, handle, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """The exit code: 0 done, 2 bad input (message on stderr, nothing written), 130 Ctrl-C."""
    return errors.cli_main(lambda: _evaluate_main(argv))


def _evaluate_main(argv: Sequence[str] | None) -> int:
    configure_logging()
    args = parse_args(argv)
    check_output_dir(args.out, "--out")
    check_num_workers(args.grader_workers, "--grader-workers")
    result = regrade(args) if args.regrade is not None else evaluate_checkpoint(args)
    width = max(len(name) for name in result["metrics"])
    for name, value in sorted(result["metrics"].items()):
        if not name.startswith("timing/"):
            print(f"{name:<{width}}  {value:.4f}")  # the summary is the script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
