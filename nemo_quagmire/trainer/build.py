"""From a validated run config to a ready trainer: data, tokenizer, validation callbacks (SFT and GRPO).

Kept apart from the loops so that the loops never read files or parse task formats, and from the entry
scripts so that tests build the same runs in-process. Both runs get the same validation callbacks from the
same `validation` section: Pass@k on the benchmarks and the held-out loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback, PromptFn, select_benchmarks
from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.run import SYNTHETIC, ValidationConfig
from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.data.hf_tokenizer import HFTokenizer
from nemo_quagmire.data.jsonl import SFT_FIELDS, read_records
from nemo_quagmire.data.synthetic import BENCHMARK_NAME, SyntheticSplits, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.benchmarks import Problem, PromptTemplate, format_prompt, parse_benchmark
from nemo_quagmire.rollout.base import SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.grpo import GRPOTrainer, Prompt
from nemo_quagmire.trainer.sft import SFTTrainer
from nemo_quagmire.utils.logging import get_logger

__all__ = ["build_grpo_trainer", "build_sft_trainer", "math_prompt_fn", "validation_callbacks"]

logger = get_logger(__name__)


def build_grpo_trainer(cfg: GRPORunConfig, extra_callbacks: Sequence[Callback] = ()) -> GRPOTrainer:
    """The trainer of `cfg` with its prompts, SFT warm-up data and validation callbacks."""
    if cfg.data.task == "jsonl":
        return _build_math_trainer(cfg, extra_callbacks)
    tokenizer = _char_tokenizer(cfg.model)
    splits = generate_splits(
        cfg.data.synthetic,
        seed=cfg.seed,
        num_sft=cfg.data.num_sft,
        num_rl=cfg.data.num_rl,
        num_heldout=cfg.data.num_heldout,
    )
    prompts = [
        Prompt(id=r["id"], token_ids=tuple(tokenizer.encode_prompt(r["prompt"])), answer=r["answer"])
        for r in splits.rl_records()
    ]
    validation = validation_callbacks(
        cfg.validation,
        tokenizer=tokenizer,
        model=cfg.model,
        seed=cfg.seed,
        max_new_tokens=cfg.validation_max_new_tokens,
        heldout_template="plain",
        splits=splits,
    )
    return GRPOTrainer(
        cfg,
        prompts=prompts,
        tokenizer=tokenizer,
        sft_examples=splits.sft_records(),
        callbacks=[*validation, *extra_callbacks],
    )


def _build_math_trainer(cfg: GRPORunConfig, extra_callbacks: Sequence[Callback]) -> GRPOTrainer:
    """Math RL prompts from `data.train_file` (benchmark schema), tokenized by the checkpoint's tokenizer."""
    tokenizer = _hf_tokenizer(cfg.data.tokenizer, cfg.model)
    prompt_ids = math_prompt_fn(cfg.data.prompt_template, tokenizer)
    problems = parse_benchmark(cfg.data.train_file, "train")
    prompts = []
    for problem in problems:
        ids = prompt_ids(problem)
        if len(ids) <= cfg.rollout.max_prompt_tokens:
            prompts.append(Prompt(id=problem.id, token_ids=tuple(ids), answer=problem.answer))
    if len(prompts) < len(problems):
        logger.warning(
            "%d of %d prompts of %s are longer than rollout.max_prompt_tokens=%d and are skipped",
            len(problems) - len(prompts),
            len(problems),
            cfg.data.train_file,
            cfg.rollout.max_prompt_tokens,
        )
    if not prompts:
        raise ValueError(
            f"every prompt of {cfg.data.train_file} is longer than rollout.max_prompt_tokens="
            f"{cfg.rollout.max_prompt_tokens}; raise it"
        )
    validation = validation_callbacks(
        cfg.validation,
        tokenizer=tokenizer,
        model=cfg.model,
        seed=cfg.seed,
        max_new_tokens=cfg.validation_max_new_tokens,
        heldout_template=cfg.data.prompt_template,
        math_prompt_ids=prompt_ids,
    )
    return GRPOTrainer(cfg, prompts=prompts, tokenizer=tokenizer, callbacks=[*validation, *extra_callbacks])


def build_sft_trainer(cfg: SFTRunConfig, extra_callbacks: Sequence[Callback] = ()) -> SFTTrainer:
    """The SFT trainer of `cfg` with its examples and validation callbacks."""
    data = cfg.data
    splits: SyntheticSplits | None = None
    math_prompt_ids: PromptFn | None = None
    if data.task == "synthetic":
        tokenizer: Tokenizer = _char_tokenizer(cfg.model)
        splits = generate_splits(
            data.synthetic, seed=cfg.seed, num_sft=data.num_sft, num_rl=0, num_heldout=data.num_heldout
        )
        examples: list[Mapping[str, str]] = splits.sft_records()
    else:
        tokenizer = _hf_tokenizer(data.tokenizer, cfg.model)
        examples = read_records(data.train_file, SFT_FIELDS)
        math_prompt_ids = math_prompt_fn(data.prompt_template, tokenizer)
    validation = validation_callbacks(
        cfg.validation,
        tokenizer=tokenizer,
        model=cfg.model,
        seed=cfg.seed,
        max_new_tokens=cfg.validation.max_new_tokens,
        heldout_template=data.prompt_template,
        splits=splits,
        math_prompt_ids=math_prompt_ids,
    )
    return SFTTrainer(cfg, examples=examples, tokenizer=tokenizer, callbacks=[*validation, *extra_callbacks])


def validation_callbacks(
    val: ValidationConfig,
    *,
    tokenizer: Tokenizer,
    model: ModelConfig,
    seed: int,
    max_new_tokens: int | None,
    heldout_template: PromptTemplate,
    splits: SyntheticSplits | None = None,
    math_prompt_ids: PromptFn | None = None,
    shard_size: int | None = None,
) -> list[Callback]:
    """The Pass@k and held-out-loss callbacks the `validation` section asks for.

    Args:
        val: the validation section.
        tokenizer: the policy's tokenizer.
        model: the policy's architecture (its context bounds held-out examples).
        seed: the run's seed (Pass@k sampling).
        max_new_tokens: completion budget of Pass@k sampling.
        heldout_template: how held-out prompts are tokenized unless `val.heldout_prompt_template` says.
        splits: the synthetic task's splits (its held-out problems serve 'synthetic' and the held-out loss).
        math_prompt_ids: the prompt of a math benchmark problem; None where the tokenizer cannot encode them.
        shard_size: Pass@k problems per shard (`PassAtKCallback`); None = its default.

    Raises:
        BenchmarkError: an unknown benchmark name (before any model work).
        HeldOutDataError: an invalid held-out file.
    """
    callbacks: list[Callback] = []
    if val.benchmarks:
        synthetic = [] if splits is None else _synthetic_problems(splits)
        benchmarks = select_benchmarks(
            val.benchmarks,
            benchmarks_dir=val.benchmarks_dir,
            synthetic=synthetic,
            num_problems=val.num_problems,
        )

        def prompt_ids(problem: Problem) -> list[int]:
            if problem.benchmark == BENCHMARK_NAME:
                return tokenizer.encode(problem.problem, add_bos=True)  # the task's raw prompt, no template
            if math_prompt_ids is None:
                raise ValueError(
                    f"validation.benchmarks lists {problem.benchmark!r}, but the synthetic task's character "
                    f"tokenizer cannot encode math benchmarks; validate on [{SYNTHETIC}] or use a jsonl task"
                )
            return math_prompt_ids(problem)

        callbacks.append(
            PassAtKCallback(
                benchmarks,
                prompt_ids,
                num_samples=val.num_samples,
                ks=val.ks,
                sampling=SamplingParams(
                    temperature=val.temperature, top_p=val.top_p, max_new_tokens=max_new_tokens
                ),
                rows_per_batch=val.rows_per_batch,
                shard_size=shard_size,
                equal_length_batches=val.equal_length_batches,
                grader_workers=val.grader_workers,
                save_samples=val.save_samples,
                seed=seed,
            )
        )
    if val.heldout_loss:
        examples = val.heldout_file if val.heldout_file is not None else splits.heldout_records()
        callbacks.append(
            HeldOutLossCallback(
                examples,
                tokenizer,
                micro_batch_size=val.heldout_batch_size,
                prompt_template=val.heldout_prompt_template or heldout_template,
                max_length=model.max_position_embeddings,
            )
        )
    return callbacks


def math_prompt_fn(template: PromptTemplate, tokenizer: HFTokenizer) -> PromptFn:
    """Prompt ids of a math problem: the chat template's user turn, or the plain "Problem: ... Solution:"."""

    def prompt_ids(problem: Problem) -> list[int]:
        if template == "chat":
            text = format_prompt(problem, template="chat", tokenizer=tokenizer)
            return tokenizer.encode(text, add_bos=False)  # the chat template writes its own BOS
        return tokenizer.encode(format_prompt(problem, template="plain"), add_bos=True)

    return prompt_ids


def _synthetic_problems(splits: SyntheticSplits) -> list[Problem]:
    return [
        Problem(BENCHMARK_NAME, r["id"], r["problem"], r["answer"], r["solution"])
        for r in splits.benchmark_records()
    ]


def _char_tokenizer(model: ModelConfig) -> CharTokenizer:
    tokenizer = CharTokenizer()
    if model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} is smaller than the synthetic task's tokenizer "
            f"({tokenizer.vocab_size} ids); set model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def _hf_tokenizer(directory: str | None, model: ModelConfig) -> HFTokenizer:
    tokenizer = HFTokenizer(directory)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model.vocab_size}; use the tokenizer of the checkpoint being trained"
        )
    return tokenizer
