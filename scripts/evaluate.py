"""Evaluate checkpoints on the paper's two predictors of their post-RL score: pass@k on benchmarks and the
held-out loss; or re-grade a saved samples file without any model.

Usage:
    python scripts/evaluate.py --checkpoint runs/sft-tiny/checkpoints/step_00000312 --benchmarks synthetic \
        --n 64 --heldout synthetic --out runs/eval-tiny
    python scripts/evaluate.py --checkpoint /ckpt/sft-hf --benchmarks math500,aime24 --n 256 --k 1,8,64 \
        --max-new-tokens 3072 --heldout data/sft/heldout.jsonl --out runs/eval-sft   # or torchrun (DP)
    python scripts/evaluate.py --engine vllm --engines 4 --tensor-parallel-size 2 \
        --checkpoints 'runs/sft-*/checkpoints/step_*' --benchmarks math500,aime24,gsm8k --n 256 --k 1,8,64 \
        --max-new-tokens 3072 --heldout data/sft/heldout.jsonl --out runs/sweep   # one 8-GPU node
    python scripts/evaluate.py --regrade runs/sft-tiny/eval/step_00000300 --out runs/regraded

--checkpoint is a checkpoint directory of this project (`<run_dir>/checkpoints/step_N`; its model config and
tokenizer come from the run dir, `<run_dir>/model/`) or an HF directory (config.json, safetensors and its
tokenizer); --tokenizer replaces the tokenizer. Benchmarks are files of --benchmarks-dir (default
$NEMO_QUAGMIRE_BENCHMARKS_DIR) or
`synthetic`, the embedded task's held-out split (--synthetic-seed and --synthetic-heldout must match the
run's seed and data.num_heldout). The evaluation is the training runs' validation callbacks
(`nemo_quagmire.trainer.build.validation_callbacks`), so the numbers are those a run logs.

Engines (where the samples come from):
    --engine megatron    (default) the checkpoint in this process, KV-cached generation on the Megatron model;
                         under torchrun the shards are spread over data-parallel ranks.
    --engine vllm        --engines N vLLM servers (`nemo_quagmire.rollout.vllm_server`), engine i on devices
                         [i*T, (i+1)*T) (T = --tensor-parallel-size, via CUDA_VISIBLE_DEVICES), each keeping
                         one generation call in flight while one thread grades. A checkpoint of this project
                         is first exported to OUT/hf (HF format). The held-out loss is still computed by the
                         Megatron model in this process (a teacher-forced forward pass) on the first device,
                         beside engine 0 from the second checkpoint of a sweep on: leave it room with
                         --vllm-arg gpu_memory_utilization=.... One process only (no torchrun); vLLM may
                         live in another venv (--vllm-python, default $NEMO_QUAGMIRE_VLLM_PYTHON). Other
                         vLLM engine arguments: --vllm-arg key=value (e.g. dtype=bfloat16, max_num_seqs=512).

Resuming: the samples of each shard (--shard-size problems of a benchmark) are written to OUT/shards/ as soon
as they are graded. Re-running a killed evaluation with the same arguments generates only the missing shards
(any --engines count); different sample-deciding arguments are refused (exit 2). OUT/shards/ can be deleted
once metrics.json exists. Progress: a bar per benchmark with samples/s and ETA on a terminal, else a log line
per benchmark every 30 s.

Sweeps: --checkpoints A B C ... (shell-style patterns are expanded, e.g. 'runs/sft-*/checkpoints/step_*')
evaluates each into OUT/<run id>/ (id: `<run name>/step_N` for checkpoints of this project, else the
directory name) and writes OUT/table.csv, one row per checkpoint: `run`, `pass@<k>` and `maj@<k>` (macro over
the benchmarks), `heldout_loss` and `heldout_loss_seq` (with --heldout), and an empty target column
`post_rl_pass@1`. Fill the post-RL pass@1 in for the checkpoints that went through RL (leave the others
empty: they are the candidates to rank), then `python scripts/predict_report.py --table OUT/table.csv
--target post_rl_pass@1 --out DIR`. With --engine vllm one set of engines serves the whole sweep (the next
checkpoint's weights are loaded into the running engines) while the architecture stays the same.

Output (written atomically):
    OUT/metrics.json     {"checkpoint", "step", "arguments", "metrics": {"val/<bench>/pass@<k>": ..., ...}}
                         (names as in nemo_quagmire/METRICS.md)
    OUT/report.json      per-benchmark and macro report (nemo_quagmire/eval/samples.py)
    OUT/samples.parquet  every graded sample: benchmark, id, sample, completion, gold, extracted, correct,
                         reason, length, truncated (under torchrun: one part per data-parallel rank,
                         OUT/samples.rank-XXXXX-of-YYYYY.parquet)
Bad input (unknown benchmark, k > n, n > 256, an invalid held-out file, a missing checkpoint, arguments that
differ from those of the evaluation being resumed) exits with code 2 before any model or engine is built, and
writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.config.run import MAX_NUM_SAMPLES, SYNTHETIC
from nemo_quagmire.eval.shards import ShardStore, ShardStoreError
from nemo_quagmire.predict.runs import DEFAULT_RL_METRIC, feature_name, target_column
from nemo_quagmire.predict.table import ID_COLUMN
from nemo_quagmire.rewards.pool import check_num_workers, usable_cpus
from nemo_quagmire.utils import errors
from nemo_quagmire.utils.io import atomic_write, check_output_dir
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("scripts.evaluate")

METRICS_FILE = "metrics.json"
TABLE_FILE = "table.csv"
SHARDS_SUBDIR = "shards"
HF_SUBDIR = "hf"  # a checkpoint of this project, exported for vLLM
ENGINES = ("megatron", "vllm")
TARGET_COLUMN = target_column(DEFAULT_RL_METRIC)  # post_rl_pass@1: filled in by the user
_ENGINE_SET_ARGS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "seed": "--seed",
    "devices": "--engines / --tensor-parallel-size",
}
_MAJ = re.compile(r"^val/macro/maj@(?!1$)\d+$")  # maj@1 is pass@1: not a feature of its own


class InputError(errors.InputError):
    """An argument or input file is invalid (exit code 2)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory of this project, or HF directory"
    )
    source.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="CKPT",
        help="a sweep: checkpoint directories or shell-style patterns; also writes OUT/table.csv",
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
    parser.add_argument("--heldout-template", choices=["plain", "chat"], default="plain")
    parser.add_argument("--heldout-batch-size", type=int, default=32)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (HF or this project's char one)"
    )
    parser.add_argument("--rows-per-batch", type=int, default=256, help="completions per generation call")
    parser.add_argument(
        "--shard-size", type=int, default=None, help="problems per resumable shard (default: 4 calls' worth)"
    )
    parser.add_argument("--grader-workers", type=int, default=min(2, usable_cpus()), help="<= the CPUs")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--synthetic-seed", type=int, default=1234, help="the SFT/GRPO run's seed")
    parser.add_argument("--synthetic-heldout", type=int, default=256, help="the run's data.num_heldout")
    engines = parser.add_argument_group("engines")
    engines.add_argument("--engine", choices=ENGINES, default="megatron", help="where samples come from")
    engines.add_argument("--engines", type=int, default=1, help="vLLM engines (data parallel over GPUs)")
    engines.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    engines.add_argument(
        "--vllm-python",
        default=None,
        help="Python of the venv with vLLM (default: $NEMO_QUAGMIRE_VLLM_PYTHON, else this)",
    )
    engines.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another vllm.LLM argument (VALUE read as JSON if it parses), e.g. dtype=bfloat16; repeatable",
    )
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
    """--tokenizer, else the checkpoint's own (the HF directory's, or the one its run dir keeps)."""
    from nemo_quagmire.trainer.checkpoint_source import load_tokenizer as load

    directory = Path(args.tokenizer) if args.tokenizer is not None else _source(checkpoint).tokenizer_dir
    if directory is None:
        raise InputError(f"no tokenizer found for {checkpoint} (nor in its run dir); pass --tokenizer")
    return load(directory)


def model_config_of(checkpoint: Path) -> tuple[Any, int]:
    """The checkpoint's model config and step (0 for an HF directory)."""
    source = _source(checkpoint)
    return source.model, source.step


def _source(checkpoint: Path) -> Any:
    """What `--checkpoint` provides; a damaged checkpoint of this project is refused before any model work."""
    from nemo_quagmire.megatron.checkpoint import META_FILE, checkpoint_problems
    from nemo_quagmire.trainer.checkpoint_source import CheckpointSourceError, read_checkpoint_source

    if (checkpoint / META_FILE).is_file() and (problems := checkpoint_problems(checkpoint)):
        raise InputError(f"checkpoint {checkpoint} is damaged: {', '.join(problems)}")
    try:
        return read_checkpoint_source(checkpoint, key="--checkpoint")
    except CheckpointSourceError as error:
        raise InputError(str(error)) from None


def engine_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine arguments of --vllm-arg (empty for --engine megatron), after checking the engine flags.

    Raises:
        InputError: counts below 1, vLLM flags without --engine vllm, more GPUs asked for than the node has,
            --engine vllm under torchrun, a malformed/reserved --vllm-arg, or no vLLM for the servers' Python.
    """
    if args.engines < 1 or args.tensor_parallel_size < 1:
        raise InputError(
            f"--engines {args.engines} --tensor-parallel-size {args.tensor_parallel_size}: both must be >= 1"
        )
    if args.engine != "vllm":
        used = [
            flag
            for flag, value, default in [
                ("--engines", args.engines, 1),
                ("--tensor-parallel-size", args.tensor_parallel_size, 1),
                ("--vllm-python", args.vllm_python, None),
                ("--vllm-arg", args.vllm_arg, []),
            ]
            if value != default
        ]
        if used:
            raise InputError(f"{', '.join(used)} apply to vLLM engines only; add --engine vllm or drop them")
        return {}
    kwargs: dict[str, Any] = {}
    for item in args.vllm_arg:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--vllm-arg {item!r}: expected KEY=VALUE, e.g. dtype=bfloat16")
        if key in _ENGINE_SET_ARGS:
            raise InputError(f"--vllm-arg {key}: set by evaluate.py itself ({_ENGINE_SET_ARGS[key]})")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(
            "--engine vllm runs in one process that drives --engines vLLM servers; start it without torchrun"
        )
    if importlib.util.find_spec("nemo_quagmire.rollout.vllm_server") is None:
        raise InputError("--engine vllm needs nemo_quagmire.rollout.vllm_server, missing from this install")
    from nemo_quagmire.rollout.vllm_server import server_python

    python = server_python(args.vllm_python)
    if not os.access(python, os.X_OK):
        raise InputError(
            f"vLLM's Python {python}: not an executable; give the venv's bin/python (--vllm-python)"
        )
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"  # no vLLM import
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        raise InputError(
            f"vLLM is not installed for {python}; pass --vllm-python (or set $NEMO_QUAGMIRE_VLLM_PYTHON) to "
            "the Python of a venv with vLLM (on CPU: `bash .ci/vllm-stage.sh` builds .venv-vllm)"
        )
    import torch

    wanted = args.engines * args.tensor_parallel_size
    if torch.cuda.is_available() and wanted > torch.cuda.device_count():
        raise InputError(
            f"--engines {args.engines} x --tensor-parallel-size {args.tensor_parallel_size} = {wanted} GPUs, "
            f"but this node has {torch.cuda.device_count()}; lower --engines"
        )
    return kwargs


def resolve_checkpoints(args: argparse.Namespace) -> list[Path]:
    """--checkpoint, or every directory --checkpoints names or matches (patterns sorted), each once.

    Raises:
        InputError: a pattern matching nothing, a missing directory, or a checkpoint named twice.
    """
    if args.checkpoint is not None:
        paths = [args.checkpoint]
    else:
        paths = []
        for pattern in args.checkpoints:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise InputError(f"--checkpoints {pattern!r} matches no directory")
            paths += [Path(match) for match in matches]
    for path in paths:
        if not path.is_dir():
            raise InputError(f"checkpoint directory {path} does not exist")
    resolved = [path.resolve() for path in paths]
    if repeated := sorted({str(p) for p in resolved if resolved.count(p) > 1}):
        raise InputError(f"checkpoint(s) {repeated} named more than once")
    return paths


def run_ids(paths: Sequence[Path]) -> list[str]:
    """Row ids of a sweep: `<run name>/step_N` for `<run>/checkpoints/step_N`, else the directory name, with
    more parent directories where two would be equal."""
    chains = [[part for part in reversed(p.resolve().parts[1:]) if part != "checkpoints"] for p in paths]
    depth = [2 if p.resolve().parent.name == "checkpoints" else 1 for p in paths]
    while True:
        ids = ["/".join(reversed(chain[:d])) for chain, d in zip(chains, depth, strict=True)]
        repeated = {i for i in ids if ids.count(i) > 1}
        grown = [j for j, i in enumerate(ids) if i in repeated and depth[j] < len(chains[j])]
        if not grown:
            return ids
        for j in grown:
            depth[j] += 1


@dataclass
class Job:
    """One checkpoint to evaluate, with everything checked before any model or engine is built."""

    checkpoint: Path
    run_id: str
    out: Path
    model_cfg: Any
    step: int
    tokenizer: Any
    passk: PassAtKCallback | None
    others: list[Any]  # the held-out loss callback
    store: ShardStore | None
    arguments: dict[str, Any]  # what decides the result (stored in metrics.json)

    @property
    def done(self) -> dict[str, Any] | None:
        """The stored result of an earlier run with the same arguments, if any."""
        path = self.out / METRICS_FILE
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return result if result.get("arguments") == self.arguments else None


def plan(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> list[Job]:
    """A job per checkpoint; every input error surfaces here, before anything heavy and before any write.

    Raises:
        InputError: see the module docstring.
    """
    from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
    from nemo_quagmire.eval.benchmarks import BenchmarkError
    from nemo_quagmire.trainer.build import math_prompt_fn, validation_callbacks

    val = validation_config(args)
    if args.shard_size is not None and args.shard_size < 1:
        raise InputError(f"--shard-size {args.shard_size}: problems per shard must be >= 1")
    shard_size = args.shard_size or 4 * max(1, args.rows_per_batch // args.n)
    checkpoints = resolve_checkpoints(args)
    ids = run_ids(checkpoints)
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
    jobs = []
    for checkpoint, run_id in zip(checkpoints, ids, strict=True):
        model_cfg, step = model_config_of(checkpoint)
        tokenizer = load_tokenizer(args, checkpoint)
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
                shard_size=shard_size,
            )
        except (BenchmarkError, FileNotFoundError, ValueError) as error:
            raise InputError(str(error)) from None
        passk = next((c for c in callbacks if isinstance(c, PassAtKCallback)), None)
        out = args.out if args.checkpoint is not None else args.out / run_id
        arguments: dict[str, Any] = {"checkpoint": str(checkpoint.resolve()), "engine": args.engine}
        if args.engine == "vllm":
            arguments |= {"tensor_parallel_size": args.tensor_parallel_size, "vllm_args": engine_kwargs}
        store = None
        if passk is not None:
            store = ShardStore(out / SHARDS_SUBDIR, arguments | passk.plan_arguments(step))
            try:
                store.check()
            except ShardStoreError as error:
                raise InputError(str(error)) from None
            arguments = store.arguments | {"ks": passk.ks}
        if args.heldout is not None:
            arguments |= {"heldout": args.heldout, "heldout_template": args.heldout_template}
        others = [c for c in callbacks if c is not passk]
        jobs.append(Job(checkpoint, run_id, out, model_cfg, step, tokenizer, passk, others, store, arguments))
    return jobs


def evaluate_checkpoints(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate every checkpoint (see the module docstring); returns each one's metrics.json content.

    Raises:
        InputError: bad arguments or inputs, found before any model or engine is built.
    """
    engine_kwargs = engine_arguments(args)
    jobs = plan(args, engine_kwargs)
    if any(job.done is None and _needs_megatron(job, args) for job in jobs):
        needed_by = "evaluate.py (held-out loss, --engine megatron, or an export for vLLM)"
        errors.require_extra("train", errors.TRAIN_MODULES, needed_by=needed_by)
    engines = VLLMEngines(args, engine_kwargs) if args.engine == "vllm" else None
    results = []
    try:
        for job in jobs:
            result = job.done
            if result is not None:
                logger.info("%s: evaluated before with these arguments (%s)", job.run_id, job.out)
            else:
                result = evaluate_job(job, args, engines)
                _write_metrics(job.out, result)
            results.append(result)
    finally:
        if engines is not None:
            engines.close()
    if args.checkpoints is not None:
        with atomic_write(args.out / TABLE_FILE) as handle:
            handle.write(sweep_table([job.run_id for job in jobs], results))
        logger.info("wrote %s", args.out / TABLE_FILE)
    return results


def _needs_megatron(job: Job, args: argparse.Namespace) -> bool:
    """Whether `evaluate_job` builds the model on megatron-core (held-out loss, in-process sampling, an
    export for vLLM)."""
    in_process = job.passk is not None and args.engine == "megatron"
    export = job.passk is not None and args.engine == "vllm" and not (_hf_dir(job) / "config.json").is_file()
    return bool(job.others) or in_process or export


def _hf_dir(job: Job) -> Path:
    """Where vLLM loads the job's weights: the checkpoint if it is an HF directory, else its export."""
    from nemo_quagmire.megatron.checkpoint import META_FILE

    return job.out / HF_SUBDIR if (job.checkpoint / META_FILE).is_file() else job.checkpoint


def evaluate_job(job: Job, args: argparse.Namespace, engines: VLLMEngines | None) -> dict[str, Any]:
    """Held-out loss on the Megatron model; pass@k on it or on the vLLM engines (after an HF export)."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.megatron.policy import MegatronPolicy
    from nemo_quagmire.trainer.callbacks import PolicyHandle

    metrics: dict[str, float] = {}
    hf_dir = _hf_dir(job)
    passk_here = job.passk is not None and engines is None
    export = engines is not None and job.passk is not None and not (hf_dir / "config.json").is_file()
    if _needs_megatron(job, args):
        with parallel_context(job.model_cfg, ParallelConfig(), seed=args.seed):
            policy = MegatronPolicy(job.model_cfg, ParallelConfig(), seed=None)  # seeded by parallel_context
            policy.load_weights(job.checkpoint)
            if export:
                export_for_vllm(policy, hf_dir)
            engine = None
            if passk_here:
                engine = policy.rollout_engine(
                    job.tokenizer, seed=args.seed, max_batch_size=args.rows_per_batch
                )
            handle = policy.handle(
                step=job.step,
                run_dir=job.out,
                tokenizer=job.tokenizer,
                generate=None if engine is None else engine.generate,
                micro_batch_size=args.heldout_batch_size,
            )
            for callback in job.others:
                metrics |= callback.on_validation(handle)
            if passk_here:
                metrics |= _evaluate_passk(job, handle, None)
            del policy, engine, handle
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the engines get the memory back
    if engines is not None and job.passk is not None:
        generators = engines.serve(hf_dir)
        handle = PolicyHandle(
            step=job.step,
            run_dir=job.out,
            tokenizer=job.tokenizer,
            logprobs=_no_logprobs,
            generate=generators[0],
            all_reduce_sum=lambda tensor: tensor.clone(),
        )
        metrics |= _evaluate_passk(job, handle, generators)
    return {
        "checkpoint": str(job.checkpoint),
        "step": job.step,
        "arguments": job.arguments,
        "metrics": metrics,
    }


def _evaluate_passk(job: Job, handle: Any, generators: list[Any] | None) -> dict[str, float]:
    try:
        return job.passk.evaluate(handle, job.out, generators=generators, store=job.store, progress=True)
    finally:
        job.passk.close()


def _no_logprobs(tokens: Any, lengths: Any) -> Any:
    raise RuntimeError("log-probs come from the Megatron model; the vLLM engines only generate")


def export_for_vllm(policy: Any, hf_dir: Path) -> None:
    """The policy as an HF directory vLLM loads, written beside `hf_dir` and renamed into place (a killed
    export leaves no directory that looks complete)."""
    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    policy.export_hf(partial)
    partial.rename(hf_dir)


def make_vllm_engine(hf_dir: Path, *, index: int, args: argparse.Namespace, engine_kwargs: dict) -> Any:
    """vLLM server `index` of --engines: devices [index*T, (index+1)*T), its log in OUT/logs/."""
    from nemo_quagmire.rollout.vllm_server import VLLMServerEngine

    size = args.tensor_parallel_size
    return VLLMServerEngine(
        hf_dir,
        python=args.vllm_python,
        devices=list(range(index * size, (index + 1) * size)),
        log_file=args.out / "logs" / f"vllm-engine-{index}.log",
        tensor_parallel_size=size,
        seed=args.seed,
        **engine_kwargs,
    )


class VLLMEngines:
    """--engines vLLM engines, started together and kept for the whole sweep: the next checkpoint's weights
    are loaded into them while its architecture is the one they were built for, else they are rebuilt.

    Engines are started (and closed) from threads that live as long as the engines: a server process is
    killed by the kernel when the thread that started it ends (Linux parent-death signal, see
    `nemo_quagmire.rollout.vllm_server`).
    """

    def __init__(self, args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> None:
        self.args = args
        self.engine_kwargs = engine_kwargs
        self.engines: list[Any] = []
        self.model_cfg: Any = None
        self._threads = ThreadPoolExecutor(args.engines, thread_name_prefix="vllm-engine")

    def serve(self, hf_dir: Path) -> list[Any]:
        """The engines' generate functions, serving the weights of `hf_dir`."""
        from nemo_quagmire.megatron.hf import model_config_from_hf

        model_cfg = model_config_from_hf(hf_dir)
        if self.engines and not model_cfg.architecture_mismatches(self.model_cfg):
            list(self._threads.map(lambda engine: engine.load_checkpoint(hf_dir), self.engines))
            logger.info("loaded %s into the %d running engine(s)", hf_dir, len(self.engines))
        else:
            self._close_engines()
            futures = [
                self._threads.submit(
                    make_vllm_engine, hf_dir, index=i, args=self.args, engine_kwargs=self.engine_kwargs
                )
                for i in range(self.args.engines)
            ]
            wait(futures)
            self.engines = [f.result() for f in futures if f.exception() is None]
            if failed := [f.exception() for f in futures if f.exception() is not None]:
                self._close_engines()
                raise failed[0]
            logger.info("started %d vLLM engine(s) on %s", len(self.engines), hf_dir)
        self.model_cfg = model_cfg
        return [engine.generate for engine in self.engines]

    def close(self) -> None:
        self._close_engines()
        self._threads.shutdown(wait=True)

    def _close_engines(self) -> None:
        engines, self.engines = self.engines, []
        list(self._threads.map(lambda engine: engine.close(), engines))  # a server takes seconds to exit


def sweep_table(ids: Sequence[str], results: Sequence[dict[str, Any]]) -> str:
    """The predictor's table (nemo_quagmire/predict/table.py) of a sweep: `run`, the macro pass@k and maj@k
    (k > 1), the held-out losses, and the empty target column for the post-RL score."""
    columns: dict[str, None] = {}
    rows = []
    for result in results:
        row = {}
        for metric, value in result["metrics"].items():
            name = feature_name(metric) or (metric.removeprefix("val/macro/") if _MAJ.match(metric) else None)
            if name is not None:
                row[name] = value
                columns.setdefault(name)
        rows.append(row)
    ordered = sorted(columns, key=lambda name: (name.startswith("heldout"), name.split("@")[0], _k(name)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([ID_COLUMN, *ordered, TARGET_COLUMN])
    for run_id, row in zip(ids, rows, strict=True):
        writer.writerow([run_id, *(repr(row[name]) if name in row else "" for name in ordered), ""])
    return buffer.getvalue()


def _k(name: str) -> int:
    return int(name.split("@")[1]) if "@" in name else 0


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
    try:
        results = [regrade(args)] if args.regrade is not None else evaluate_checkpoints(args)
    except ShardStoreError as error:  # a damaged shard, found at resumption
        raise InputError(str(error)) from None
    if args.checkpoints is not None:
        print((args.out / TABLE_FILE).read_text(encoding="utf-8"), end="")  # the summary is the table
        return 0
    metrics = results[0]["metrics"]
    width = max(len(name) for name in metrics)
    for name, value in sorted(metrics.items()):
        if not name.startswith("timing/"):
            print(f"{name:<{width}}  {value:.4f}")  # the summary is the script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
