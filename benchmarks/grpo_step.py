"""GRPO step time on this CPU: our trainer against TRL's GRPOTrainer, same model, same work, same run.

Why: the CPU path should run a GRPO step faster than TRL on the same tiny model, and "faster" only means
something when both sides do the same work under the same conditions. This script runs both, one after the
other in one invocation, and shows where each step's time goes.

Same work on both sides (the shape of ../shared/reference/trl-grpo-cpu-anchor):
  - Model: the `tiny` preset = Llama, 4 layers, hidden 128, 4 heads, 2 KV heads, ffn 344, vocab 100, untied,
    fp32, 751,744 parameters. Both sides start from the SAME weights: our model is initialised once (seed
    1234) and exported as a transformers checkpoint. Ours loads it through `checkpoint.load_from`, TRL through
    `LlamaForCausalLM.from_pretrained`. With the same weights, both sample the same completion lengths.
  - Tokenizer: 100 character ids on both sides. Ours is a `CharTokenizer` over the anchor's 96 characters
    (PAD/BOS/EOS + 96 + 1 unused id), and TRL gets a transformers tokenizer with exactly those ids. (The
    `tiny.yaml` run uses the task's 28-id alphabet instead: a random model over 100 ids samples ids that
    alphabet cannot decode, so equal shapes need the larger alphabet.)
  - Prompts: 256 problems `a+b=` (a, b in 10..99) from our synthetic task, 6 tokens each on both sides (no
    BOS; the anchor's tokenizer adds none). Per optimizer step: 16 prompts x G=8 = 128 completions, generated
    in one batch, at most 32 new tokens, temperature 1, top-p 1. Beta 0 (no KL, no reference model), lr 1e-5,
    grad-norm clip 1.0. One policy update per rollout batch, so neither side runs an extra "old log-probs"
    forward pass. No gradient checkpointing, no dropout.
  - Ours: `GRPOTrainer.fit` on `compose_run_config("tiny", ...)` with the overrides above: in-process Megatron
    rollouts, the project's grader (`math_reward`), and `grpo.micro_batch_size` 128 (`--micro-batch-size`; 32
    and 64 measured the same at 1 thread). TRL 1.16: `per_device_train_batch_size=128` (TRL counts
    completions), `gradient_accumulation_steps=1`, and an exact-answer-match reward.
  - Conditions: each (side, threads) row runs in a fresh process. OMP_NUM_THREADS and MKL_NUM_THREADS are set
    before torch is imported, then `torch.set_num_threads(threads)` with one inter-op thread. At each thread
    count, ours runs first, then TRL. With `--rounds R` the whole sequence repeats R times and each row pools
    the steps of all rounds.

Timing: a step is the wall time between consecutive step-end callbacks (both trainers have them), so it
counts everything the loop does per step. The per-step stages, in seconds:
  - generate: ours `timing/generate` (the rollout engine); TRL its "transformers.generate" profiling block.
  - reward: ours `timing/reward` (decoding plus grading); TRL `_calculate_rewards`.
  - logprobs: log-prob passes outside the loss (old or reference policy). Ours `timing/logprobs`; TRL the
    `_get_per_token_logps_and_entropies` calls outside `compute_loss`. It is 0 on both sides in this setting.
  - train: forward, loss, backward, grad clipping, optimizer and LR-scheduler step. Ours `timing/train`
    (`train_step`); TRL the time from the end of `_prepare_inputs` to the step-end callback.
  - other: the step minus the four stages, per step. For TRL: prompt tokenisation, decoding, advantages,
    logging. For ours: advantages, metrics, logging.
  - CPU s/step: the process's CPU time (all threads) per step. At 1 thread, when other jobs load the
    machine, it rises by up to ~25% while wall time rises far more, so on a shared 2-core machine read it
    next to s/step. At 2 threads, a loaded machine makes both sides' OpenMP threads wait for each other, and
    steps take 2-12 s instead of ~0.45 s.
The first `--warmup` steps of each process are not timed (the first two take 2-4x longer on both sides).
Each column is the median over the timed steps, so the columns need not add up exactly.

`--profile N` runs N more steps after the timed ones, in the first round, on both sides, and profiles them
(the table does not include them). The ATen ops come from torch.profiler (self time, wall clock), the Python
functions from cProfile (cumulative CPU time), and the call counts from both. Everything is per step and
includes the profilers' own overhead, which grows with the number of Python calls.

Run:  python benchmarks/grpo_step.py [--steps 10] [--warmup 3] [--threads 1 2] [--rounds 1]
      [--micro-batch-size 128] [--profile N] [--quick]
Defaults take ~80 s on a quiet 2-core machine (several minutes when it is loaded); --quick takes ~45 s.
TRL is optional, not a dependency of the project. Without it only our rows are printed, along with the
command that installs it: pip install -c constraints.txt trl==1.16.0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
PROMPTS_PER_STEP = 16
GROUP_SIZE = 8
MAX_NEW_TOKENS = 32
LEARNING_RATE = 1e-5
GRAD_CLIP = 1.0
NUM_PROMPTS = 256
# The anchor's characters: 96, so PAD/BOS/EOS + 96 + 1 unused = 100 ids, the `tiny` preset's vocabulary.
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
TRL_INSTALL = f"{sys.executable} -m pip install -c {REPO / 'constraints.txt'} trl==1.16.0"
STAGES = ("generate", "reward", "logprobs", "train")
PROFILE_TOP = 25


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one optimizer step by stage (module docstring), and its mean completion length."""

    step: float
    cpu: float
    generate: float
    reward: float
    logprobs: float
    train: float
    completion_tokens: float

    @property
    def other(self) -> float:
        return self.step - sum(getattr(self, stage) for stage in STAGES)


@dataclass
class Row:
    """One (side, threads) measurement: the timed steps and what produced them."""

    side: str
    threads: int
    steps: list[StepTimes]
    info: dict[str, Any]

    def median(self, name: str) -> float:
        return statistics.median(getattr(s, name) for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        return cls(data["side"], data["threads"], [StepTimes(**s) for s in data["steps"]], data["info"])


# ----------------------------------------------------------------------------------------------------
# Shared set-up: prompts, tokenizer, initial weights, threads


def benchmark_problems() -> list[tuple[str, str]]:
    """(prompt, answer) of NUM_PROMPTS additions `a+b=` with a, b in 10..99, from our synthetic task."""
    from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_problems

    task = SyntheticTaskConfig(min_digits=2, max_digits=2, operations=("add",))
    return [(p.prompt, str(p.answer)) for p in generate_problems(task, "rl", NUM_PROMPTS, seed=SEED)]


def char_tokenizer() -> Any:
    """Our character tokenizer over ALPHABET: as many ids as the tiny preset's vocabulary (100)."""
    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(ALPHABET)
    vocab = get_model_preset("tiny").vocab_size
    if tokenizer.vocab_size != vocab:
        raise RuntimeError(f"the tokenizer has {tokenizer.vocab_size} ids but the tiny preset {vocab}")
    return tokenizer


def export_initial_weights(out_dir: Path) -> None:
    """Initialise our tiny model (seed SEED) and write it as the transformers checkpoint both sides load."""
    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.hf import export_hf
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import parallel_context

    model_cfg, parallel_cfg = get_model_preset("tiny"), ParallelConfig()
    with parallel_context(model_cfg, parallel_cfg, seed=SEED):
        export_hf(build_model(model_cfg, parallel_cfg), out_dir, model_cfg)


def set_threads(threads: int) -> None:
    """Intra-op threads of this worker; OMP_NUM_THREADS must already say the same (set before torch)."""
    import torch

    omp = os.environ.get("OMP_NUM_THREADS")
    if omp != str(threads):
        raise RuntimeError(f"worker for {threads} thread(s) started with OMP_NUM_THREADS={omp}")
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------------------------------
# Step clock and profilers, shared by both sides


class Profilers:
    """torch.profiler (ATen ops, wall clock) and cProfile (Python functions, CPU time) over some steps."""

    def __init__(self) -> None:
        import cProfile

        from torch.profiler import ProfilerActivity, profile

        self.torch_profiler = profile(activities=[ProfilerActivity.CPU])
        self.python_profiler = cProfile.Profile(time.process_time)
        self.torch_profiler.__enter__()
        self.python_profiler.enable()

    def stop(self, steps: int) -> dict[str, Any]:
        """Per step: the top ATen ops by self ms (and calls), the top Python functions by cumulative CPU ms
        (and own ms, calls), and the numbers of ATen and Python calls."""
        import pstats

        self.python_profiler.disable()
        self.torch_profiler.__exit__(None, None, None)
        ops = sorted(self.torch_profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        aten = [[e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps] for e in ops[:PROFILE_TOP]]
        stats = pstats.Stats(self.python_profiler)
        by_cumulative = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)[:PROFILE_TOP]
        python = [
            [f"{Path(file).name}:{line}:{name}", cum * 1e3 / steps, own * 1e3 / steps, calls / steps]
            for (file, line, name), (calls, _, own, cum, _) in by_cumulative
        ]
        return {
            "aten": aten,
            "python": python,
            "aten_calls": sum(e.count for e in ops if e.key.startswith("aten::")) / steps,
            "python_calls": stats.total_calls / steps,
        }


@dataclass
class StepClock:
    """Wall and CPU time between step ends; profiles `profile_steps` steps after the timed ones.

    A trainer's step-end hook calls `step_end(step_number, make)`; `make(wall_s, cpu_s)` builds the step's
    `StepTimes` from the trainer's own stage timings.
    """

    warmup: int
    steps: int
    profile_steps: int
    recorded: list[StepTimes] = field(default_factory=list)
    profile_report: dict[str, Any] | None = None
    _profilers: Profilers | None = None
    _wall: float = 0.0
    _cpu: float = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def step_end(self, step_number: int, make: Callable[[float, float], StepTimes]) -> None:
        self.recorded.append(make(time.perf_counter() - self._wall, time.process_time() - self._cpu))
        timed_end = self.warmup + self.steps
        if self.profile_steps and step_number == timed_end:
            self._profilers = Profilers()
        if self._profilers is not None and step_number == timed_end + self.profile_steps:
            self.profile_report = self._profilers.stop(self.profile_steps)
            self._profilers = None
        self.start()  # profiler start-up and shut-down are not part of a step

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    def timed(self, recorded: Iterable[StepTimes] | None = None) -> list[StepTimes]:
        """The timed steps of `recorded` (default: of this clock)."""
        return list(self.recorded if recorded is None else recorded)[self.warmup : self.warmup + self.steps]


# ----------------------------------------------------------------------------------------------------
# Ours


def our_run_config(run_dir: Path, init_dir: Path, num_steps: int, micro_batch_size: int) -> Any:
    """The tiny config at the shared shape: vocab 100, 32 new tokens, lr 1e-5, no SFT warm-up, no validation
    or checkpoint until the end."""
    from nemo_quagmire.trainer.entry import compose_run_config

    never = num_steps + 1
    return compose_run_config(
        "tiny",
        [
            f"run_dir={run_dir}",
            f"seed={SEED}",
            f"max_steps={num_steps}",
            "model.vocab_size=100",
            f"grpo.prompts_per_step={PROMPTS_PER_STEP}",
            f"grpo.group_size={GROUP_SIZE}",
            f"grpo.micro_batch_size={micro_batch_size}",
            "grpo.kl_coef=0.0",
            "grpo.num_minibatches=1",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            f"optim.lr={LEARNING_RATE}",
            f"optim.clip_grad={GRAD_CLIP}",
            "sft_warmup.steps=0",
            f"checkpoint.load_from={init_dir}",
            "checkpoint.resume=never",
            f"checkpoint.interval={never}",
            f"validation.interval={never}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
    )


def measure_ours(init_dir: Path, threads: int, clock: StepClock, micro_batch_size: int) -> Row:
    """Run our trainer for `clock.total_steps` steps."""
    import torch

    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.trainer.callbacks import Callback
    from nemo_quagmire.trainer.grpo import GRPOTrainer, Prompt

    set_threads(threads)
    tokenizer = char_tokenizer()
    prompts = [
        Prompt(id=f"add-{i}", token_ids=tuple(tokenizer.encode(text, add_bos=False)), answer=answer)
        for i, (text, answer) in enumerate(benchmark_problems())
    ]

    class ClockCallback(Callback):
        def on_train_start(self, handle: Any) -> None:
            clock.start()

        def on_step_end(self, handle: Any, metrics: Any) -> None:
            def make(wall: float, cpu: float) -> StepTimes:
                stages = {stage: metrics.get(f"timing/{stage}", 0.0) for stage in STAGES}
                return StepTimes(wall, cpu, **stages, completion_tokens=metrics["train/response_length"])

            clock.step_end(handle.step, make)

    with tempfile.TemporaryDirectory(prefix="grpo_step_ours_") as run_dir:
        cfg = our_run_config(Path(run_dir), init_dir, clock.total_steps, micro_batch_size)
        with parallel_context(cfg.model, cfg.parallel, seed=SEED):
            trainer = GRPOTrainer(cfg, prompts=prompts, tokenizer=tokenizer, callbacks=[ClockCallback()])
            trainer.fit()
            parameters = sum(p.numel() for p in trainer.policy.modules()[0].parameters())
    info = {
        "torch": torch.__version__,
        "parameters": parameters,
        "prompt_tokens": len(prompts[0].token_ids),
        "micro_batch_size": micro_batch_size,
        "profile": clock.profile_report,
    }
    return Row("ours", threads, clock.timed(), info)


# ----------------------------------------------------------------------------------------------------
# TRL


def hf_tokenizer(char_tok: Any) -> Any:
    """A transformers tokenizer with the ids of `char_tok`: character-level BPE without merges, as in the
    anchor, padding prompts on the left."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {char_tok.decode([i], skip_special=False): i for i in range(char_tok.vocab_size)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()

    def token(i: int) -> str:
        return char_tok.decode([i], skip_special=False)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=token(char_tok.pad_id),
        bos_token=token(char_tok.bos_id),
        eos_token=token(char_tok.eos_id),
        padding_side="left",
    )


def measure_trl(init_dir: Path, threads: int, clock: StepClock) -> Row:
    """Run TRL's GRPOTrainer for `clock.total_steps` steps from the shared initial weights."""
    for name, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_OFFLINE", "1"),
        ("WANDB_DISABLED", "1"),
    ):
        os.environ.setdefault(name, value)
    import torch
    import transformers
    import trl
    import trl.extras.profiling as trl_profiling
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    set_threads(threads)
    char_tok = char_tokenizer()
    tokenizer = hf_tokenizer(char_tok)
    model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    problems = benchmark_problems()
    first = problems[0][0]
    prompt_ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    if prompt_ids != char_tok.encode(first, add_bos=False):
        raise RuntimeError(f"the two tokenizers disagree on {first!r}: {prompt_ids}")
    dataset = Dataset.from_list([{"prompt": prompt, "answer": answer} for prompt, answer in problems])

    def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]

    # TRL's profiling blocks report only to wandb/mlflow/trackio: record (name, start, seconds) here as well.
    blocks: list[tuple[str, float, float]] = []
    report = trl_profiling.ProfilingContext._log_metrics

    def record(self: Any, duration: float) -> None:
        blocks.append((self.name, self._start_time, duration))
        report(self, duration)

    trl_profiling.ProfilingContext._log_metrics = record

    class ClockCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            end = time.perf_counter()
            step_blocks = list(blocks)
            blocks.clear()
            clock.step_end(state.global_step, lambda wall, cpu: split_trl_step(step_blocks, end, wall, cpu))

    with tempfile.TemporaryDirectory(prefix="grpo_step_trl_") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            use_vllm=False,
            num_generations=GROUP_SIZE,
            per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,  # counted in completions
            gradient_accumulation_steps=1,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            num_iterations=1,
            learning_rate=LEARNING_RATE,
            max_grad_norm=GRAD_CLIP,
            gradient_checkpointing=False,  # TRL 1.16 turns it on by default; ours has none
            max_steps=clock.total_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=SEED,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[exact_answer],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ClockCallback()],
        )
        trainer.train()
    history = trainer.state.log_history
    lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
    steps = clock.timed(
        StepTimes(**{**asdict(s), "completion_tokens": length})
        for s, length in zip(clock.recorded, lengths, strict=True)
    )
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": len(prompt_ids),
        "loss_type": config.loss_type,
        "profile": clock.profile_report,
    }
    return Row("TRL", threads, steps, info)


def split_trl_step(
    blocks: Sequence[tuple[str, float, float]], end: float, wall: float, cpu: float
) -> StepTimes:
    """One TRL step's stages from its profiling blocks `(name, start, seconds)`, the step ending at `end`
    (module docstring). The completion length is filled in later, from TRL's logs."""

    def total(suffix: str) -> float:
        return sum(seconds for name, _, seconds in blocks if name.endswith(suffix))

    losses = [(start, start + s) for name, start, s in blocks if name.endswith(".compute_loss")]
    logprob_passes = [
        seconds
        for name, start, seconds in blocks
        if name.endswith("._get_per_token_logps_and_entropies")
        and not any(lo <= start and start + seconds <= hi for lo, hi in losses)
    ]
    prepared = max((start + s for name, start, s in blocks if name.endswith("._prepare_inputs")), default=end)
    return StepTimes(
        step=wall,
        cpu=cpu,
        generate=total(".transformers.generate"),
        reward=total("._calculate_rewards"),
        logprobs=sum(logprob_passes),
        train=end - prepared,
        completion_tokens=float("nan"),
    )


# ----------------------------------------------------------------------------------------------------
# Orchestration and report


def run_worker(side: str, threads: int, init_dir: Path, args: argparse.Namespace, profile_steps: int) -> Any:
    """Run one worker (`init`, `ours` or `TRL`) in a fresh process with the OMP/MKL thread counts set before
    torch starts; returns the JSON it wrote."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="grpo_step_worker_") as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable,
            __file__,
            f"--worker={side}",
            f"--worker-threads={threads}",
            f"--init-dir={init_dir}",
            f"--out={out}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--micro-batch-size={args.micro_batch_size}",
            f"--profile={profile_steps}",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-10000:])
            raise RuntimeError(f"the {side} worker at {threads} thread(s) failed (exit {done.returncode})")
        return json.loads(out.read_text())


def run_in_worker(args: argparse.Namespace) -> None:
    """The worker side of `run_worker`."""
    result: dict[str, Any] = {}
    if args.worker == "init":
        export_initial_weights(args.init_dir)
    else:
        clock = StepClock(args.warmup, args.steps, args.profile)
        if args.worker == "ours":
            row = measure_ours(args.init_dir, args.worker_threads, clock, args.micro_batch_size)
        else:
            row = measure_trl(args.init_dir, args.worker_threads, clock)
        result = row.to_json()
    args.out.write_text(json.dumps(result))


def pooled(rows: Sequence[Row]) -> list[Row]:
    """One row per (side, threads), in first-seen order, holding the steps of every round."""
    merged: dict[tuple[str, int], Row] = {}
    for r in rows:
        if (r.side, r.threads) in merged:
            merged[r.side, r.threads].steps.extend(r.steps)
        else:
            merged[r.side, r.threads] = Row(r.side, r.threads, list(r.steps), r.info)
    return list(merged.values())


def table(rows: Sequence[Row]) -> str:
    """Markdown table of the medians, with TRL's s/step over ours at the same thread count."""
    ours = {r.threads: r.median("step") for r in rows if r.side == "ours"}
    lines = [
        "| side | threads | s/step | generate | reward | logprobs | train (fwd+bwd+opt) | other | CPU s/step "
        "| completion tokens | TRL/ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = r.median("step")
        ratio = f"{step / ours[r.threads]:.2f}" if r.side == "TRL" and r.threads in ours else ""
        stages = " | ".join(f"{r.median(name):.3f}" for name in (*STAGES, "other"))
        lines.append(
            f"| {r.side} | {r.threads} | {step:.3f} | {stages} | {r.median('cpu'):.3f} | "
            f"{r.median('completion_tokens'):.1f} | {ratio} |"
        )
    return "\n".join(lines)


def profile_report(rows: Sequence[Row]) -> str:
    lines = []
    for r in rows:
        report = r.info.get("profile")
        if not report:
            continue
        lines.append(
            f"\nProfile of {r.side} at {r.threads} thread(s), per step (profiler overhead included): "
            f"{report['aten_calls']:.0f} ATen calls, {report['python_calls']:.0f} Python calls"
        )
        lines.append("  ATen op (self ms, wall clock; calls):")
        lines += [f"    {name:<58} {ms:8.1f} {calls:8.0f}" for name, ms, calls in report["aten"]]
        lines.append("  Python function (cumulative CPU ms, own CPU ms, calls):")
        lines += [
            f"    {name:<58} {cum:8.1f} {own:8.1f} {calls:6.0f}" for name, cum, own, calls in report["python"]
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each process")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every row, interleaved; steps pooled")
    parser.add_argument("--micro-batch-size", type=int, default=128, help="ours: grpo.micro_batch_size")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile N more steps after the timed ones (round 1)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 timed steps, 1 warm-up, 1 thread")
    parser.add_argument("--worker", choices=["init", "ours", "TRL"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.threads, args.rounds = 3, 1, [1], 1
    if args.worker is not None:
        run_in_worker(args)
        return

    sides = ["ours", "TRL"]
    if importlib.util.find_spec("trl") is None:
        print(f"TRL is not installed: only our rows are measured. Install it with\n  {TRL_INSTALL}\n")
        sides = ["ours"]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo_step_init_") as init_dir:
        run_worker("init", 1, Path(init_dir), args, profile_steps=0)
        for round_index in range(args.rounds):
            for threads in args.threads:
                for side in sides:
                    profile_steps = args.profile if round_index == 0 else 0
                    row = Row.from_json(run_worker(side, threads, Path(init_dir), args, profile_steps))
                    median = row.median("step")
                    print(f"round {round_index + 1}: {side}, {threads} thread(s): {median:.3f} s/step")
                    rows.append(row)
    rows = pooled(rows)
    versions = {r.side: {k: v for k, v in r.info.items() if k != "profile"} for r in rows}
    print(
        f"\nGRPO step: {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} completions of <= {MAX_NEW_TOKENS} tokens, "
        f"tiny Llama; medians of {args.rounds} x {args.steps} steps per row after {args.warmup} warm-up "
        f"steps per process; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
        f"{json.dumps(versions)}\n"
    )
    print(table(rows))
    print(profile_report(rows))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
