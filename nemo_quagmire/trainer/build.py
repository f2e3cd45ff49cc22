"""From a validated `GRPORunConfig` to a ready `GRPOTrainer`: data, tokenizer, validation callbacks.

Kept apart from the loop so that the loop never reads files or parses task formats, and from the entry
script so that tests build the same run in-process.
"""

from __future__ import annotations

from collections.abc import Sequence

from nemo_quagmire.callbacks.passk import PassAtKCallback, PromptFn
from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.data.hf_tokenizer import HFTokenizer
from nemo_quagmire.data.synthetic import BENCHMARK_NAME, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.benchmarks import Problem, format_prompt, load_benchmarks, parse_benchmark
from nemo_quagmire.rollout.base import SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.grpo import GRPOTrainer, Prompt
from nemo_quagmire.utils.logging import get_logger

logger = get_logger(__name__)


def build_grpo_trainer(cfg: GRPORunConfig, extra_callbacks: Sequence[Callback] = ()) -> GRPOTrainer:
    """The trainer of `cfg` with its prompts, SFT warm-up data and Pass@k validation callback."""
    if cfg.data.task == "jsonl":
        return _build_math_trainer(cfg, extra_callbacks)
    tokenizer = CharTokenizer()
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the synthetic task's tokenizer "
            f"({tokenizer.vocab_size} ids); set model.vocab_size={tokenizer.vocab_size}"
        )
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
    validation = _passk_callback(cfg, tokenizer, splits.benchmark_records())
    return GRPOTrainer(
        cfg,
        prompts=prompts,
        tokenizer=tokenizer,
        sft_examples=splits.sft_records(),
        callbacks=[validation, *extra_callbacks],
    )


def _build_math_trainer(cfg: GRPORunConfig, extra_callbacks: Sequence[Callback]) -> GRPOTrainer:
    """Math RL prompts from `data.train_file` (benchmark schema), tokenized by the checkpoint's tokenizer."""
    if cfg.sft_warmup.steps:
        raise ValueError(
            "sft_warmup applies to the synthetic task only; with data.task=jsonl start from an SFT "
            "checkpoint (checkpoint.load_from) and set sft_warmup.steps=0"
        )
    tokenizer = HFTokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer in {cfg.data.tokenizer} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{cfg.model.vocab_size}; use the tokenizer of the checkpoint being trained"
        )
    prompt_ids = _math_prompt_fn(cfg, tokenizer)
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
    validation = _passk_callback(cfg, tokenizer, [], prompt_ids)
    return GRPOTrainer(cfg, prompts=prompts, tokenizer=tokenizer, callbacks=[validation, *extra_callbacks])


def _math_prompt_fn(cfg: GRPORunConfig, tokenizer: HFTokenizer) -> PromptFn:
    template = cfg.data.prompt_template

    def prompt_ids(problem: Problem) -> list[int]:
        if template == "chat":
            text = format_prompt(problem, template="chat", tokenizer=tokenizer)
            return tokenizer.encode(text, add_bos=False)  # the chat template writes its own BOS
        return tokenizer.encode(format_prompt(problem, template="plain"), add_bos=True)

    return prompt_ids


def _passk_callback(
    cfg: GRPORunConfig,
    tokenizer: Tokenizer,
    synthetic_rows: list[dict],
    math_prompt_ids: PromptFn | None = None,
) -> PassAtKCallback:
    val = cfg.validation
    benchmarks: dict[str, list[Problem]] = {}
    names = [name for name in val.benchmarks if name != "synthetic"]
    if "synthetic" in val.benchmarks:
        if not synthetic_rows:
            raise ValueError("validation.benchmarks lists 'synthetic', but data.task is not synthetic")
        benchmarks[BENCHMARK_NAME] = [
            Problem(BENCHMARK_NAME, r["id"], r["problem"], r["answer"], r["solution"])
            for r in synthetic_rows[: val.num_problems]
        ]
    if names:
        loaded = load_benchmarks(names, data_dir=val.benchmarks_dir)
        benchmarks |= {name: problems[: val.num_problems] for name, problems in loaded.items()}

    def prompt_ids(problem: Problem) -> list[int]:
        if problem.benchmark == BENCHMARK_NAME:
            return tokenizer.encode(problem.problem, add_bos=True)
        if math_prompt_ids is None:
            raise ValueError(
                f"validation.benchmarks lists {problem.benchmark!r}, but the synthetic task's character "
                "tokenizer cannot encode math benchmarks; validate on [synthetic] or use data.task=jsonl"
            )
        return math_prompt_ids(problem)

    return PassAtKCallback(
        benchmarks,
        prompt_ids,
        num_samples=val.num_samples,
        sampling=SamplingParams(temperature=val.temperature, max_new_tokens=cfg.rollout.max_new_tokens),
        seed=cfg.seed,
    )
