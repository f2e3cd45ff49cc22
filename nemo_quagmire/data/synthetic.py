"""The embedded synthetic task: column arithmetic with a written-out trace, small enough for a CPU model.

Why this task: the embedded default runs the whole study (SFT, then GRPO, then pass@k and held-out loss) with
a ~0.75M-parameter character-level GPT on a laptop CPU. The task must be learnable by such a model after a
few hundred SFT steps, yet leave room for RL: the answer is only right if every column of the trace is right,
so per-column accuracy p gives a pass@1 near p^columns, which sampling at temperature 1 spreads out and which
pass@k at large k lifts. Carries, borrows and the length of the numbers set the difficulty.

A problem is `a+b=`, `a-b=` (a >= b) or `a*d=` (d a single digit 2..9). The response works the columns from
the right, one line per column: the operand digits, the carry (or borrow) coming in, the column value, and the
answer digits found so far; then the final answer in `\\boxed{}`::

    prompt    "487+356="            "503-498="             "487*6="
    response  "\\n7+6+0=13 3"         "\\n13-8-0=5 5"          "\\n7*6+0=42 2"
              "\\n8+5+1=14 43"        "\\n10-9-1=0 05"         "\\n8*6+4=52 22"
              "\\n4+3+1=8 843"        "\\n5-4-1=0 005"         "\\n4*6+5=29 2922"
              "\\n\\\\boxed{843}"        "\\n\\\\boxed{5}"           "\\n\\\\boxed{2922}"

Addition: `da+db+carry=s`, s = da + db + carry; its last digit is the answer digit, its tens the next carry (a
shorter operand is padded with 0). Subtraction: `m-db-borrow=r` with m = da, or 10 + da written `1da` when da
< db + borrow (which borrows from the next column). Multiplication: `da*d+carry=s`. The answer digits so far
are each line's digit in front of the previous line's; on the last line the whole column value goes in front
(the final carry), and subtraction's final digits may keep leading zeros that the boxed answer drops. The
running answer makes the box a copy of the last line instead of a reversal a small model finds hard.

Lengths (characters; the tokenizer adds BOS and EOS) for operands of at most n digits: prompt <= 2n + 2;
response <= n^2/2 + 11.5n + 11 (n columns of at most 9 + k characters with k answer digits, one more for a
final carry, n + 1 newlines, and a box of n + 1 digits); `max_prompt_chars` / `max_response_chars` compute
them. Default (2..4 digits, add and sub), measured on 50,000 problems: prompt 6..10 characters (mean 8.1),
response 31..65 (mean 53.5, p99 64; 0.8% are 65), so BOS + prompt + response + EOS <= 77 tokens. A rollout
needs `max_new_tokens >= max_response_chars(config) + 1` (66 by default) to never cut off a box.
`scripts/make_synthetic_data.py` logs these statistics for any configuration.

Splits: every problem belongs to exactly one split, decided by a hash of the problem itself (`assign_split`),
not by the seed or the draw order, so train SFT, RL prompts and held-out never share a problem for any seeds
or sizes; `a+b` and `b+a` (likewise `a*d` and `d*a`) count as the same problem. Generation is deterministic
given (config, seed, split, count), with an independent random stream per split.

Two knobs serve the SFT-variant study (`nemo_quagmire.study`): `sft_max_digits` draws the SFT split from
shorter problems only (short traces) while RL prompts and held-out problems keep the full range, so every
variant is measured on the same held-out problems; `seed` fixes the problem draw apart from the run's
(training) seed, so a study's seeds replicate training on the same data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nemo_quagmire.rewards.extraction import extract_final_answer

__all__ = [
    "BENCHMARK_NAME",
    "SPLITS",
    "ArithmeticProblem",
    "Operation",
    "Split",
    "SyntheticSplits",
    "SyntheticTaskConfig",
    "assign_split",
    "generate_problems",
    "generate_splits",
    "max_prompt_chars",
    "max_response_chars",
    "verify",
]

Operation = Literal["add", "sub", "mul"]
Split = Literal["sft", "rl", "heldout"]
SPLITS: tuple[Split, ...] = ("sft", "rl", "heldout")
BENCHMARK_NAME = "synthetic_arith"
MAX_DIGITS = 9  # longer operands give responses of 160+ characters, beyond a tiny model's context

_SYMBOL: dict[Operation, str] = {"add": "+", "sub": "-", "mul": "*"}
_MULTIPLIERS = (2, 9)  # single-digit multiplier range; 0 and 1 would make trivial problems
_INTEGER = re.compile(r"[+-]?\d+")
_GOLD_INTEGER = re.compile(r"-?\d+")
_HASH_SCALE = 2.0**-64


class SyntheticTaskConfig(BaseModel):
    """Difficulty of the synthetic arithmetic task and the share of problems held out from SFT.

    The default (2-4 digit addition and subtraction; each operand's length is drawn on its own, so 58% of
    problems have a 4-digit operand, 34% a 3-digit one at most, 8% only 2-digit ones) is meant to be learned
    in part by the tiny model (4 layers, hidden 128) in a few hundred SFT steps, leaving room for GRPO.
    Measured at temperature 1 on held-out problems: after 300 SFT steps of 64 examples at lr 2e-3 (the
    engine's tiny run), pass@1 ~0.19 and pass@4 ~0.40, with pass@1 ~0.3 after 20 GRPO steps; at lr 1e-3,
    pass@1 0.04 and pass@16 0.30 (greedy 0.20: 2-digit additions 0.67, 4-digit subtractions 0.04). Fewer
    digits make it easier, 'mul' and more digits harder.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_digits: int = Field(
        default=2, ge=1, le=MAX_DIGITS, description="Fewest digits of an operand (of `a` for 'mul')."
    )
    max_digits: int = Field(
        default=4,
        ge=1,
        le=MAX_DIGITS,
        description="Most digits of an operand (of `a` for 'mul'); each operand's length is drawn uniformly "
        "in [min_digits, max_digits]. Response length grows as max_digits^2 / 2 (see the module docstring).",
    )
    operations: tuple[Operation, ...] = Field(
        default=("add", "sub"),
        min_length=1,
        description="Operations drawn uniformly per problem: 'add' (a+b), 'sub' (a-b with a >= b), 'mul' "
        "(a*d with d in 2..9). 'mul' needs the multiplication table, which takes longer to learn.",
    )
    rl_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of all problems (by hash) reserved for the RL prompts split.",
    )
    heldout_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of all problems (by hash) reserved for the held-out split (held-out loss and "
        "pass@k). The rest is the SFT split.",
    )
    sft_max_digits: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DIGITS,
        description="Most digits of an operand in the SFT split only (short traces only, the paper's "
        "'short examples' contrast); the RL and held-out splits keep max_digits. None = max_digits.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        description="Seed of the problem draw (all splits); None = the run's seed. Fixing it lets runs with "
        "other training seeds share their SFT data, RL prompts and held-out problems (a study's seeds).",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticTaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"min_digits={self.min_digits} > max_digits={self.max_digits}: set min_digits <= max_digits"
            )
        if self.sft_max_digits is not None and not self.min_digits <= self.sft_max_digits <= self.max_digits:
            raise ValueError(
                f"sft_max_digits={self.sft_max_digits} is outside [min_digits, max_digits] = "
                f"[{self.min_digits}, {self.max_digits}]: set it in that range, or None for max_digits"
            )
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"operations={self.operations} lists an operation twice; list each once")
        if self.rl_fraction + self.heldout_fraction >= 1.0:
            raise ValueError(
                f"rl_fraction + heldout_fraction = {self.rl_fraction} + {self.heldout_fraction} >= 1 leaves "
                "no problems for SFT; lower them"
            )
        return self


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem `a <op> b`; for 'sub' a >= b, for 'mul' b is a digit 1..9 (by 0 the running answer of a
    multi-digit `a` would be all zeros, like "00", and the sampler draws 2..9 anyway)."""

    operation: Operation
    a: int
    b: int

    def __post_init__(self) -> None:
        if self.operation not in _SYMBOL:
            raise ValueError(f"unknown operation {self.operation!r}; use one of {sorted(_SYMBOL)}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"operands must be >= 0, got a={self.a}, b={self.b}")
        if self.operation == "sub" and self.a < self.b:
            raise ValueError(f"subtraction needs a >= b (non-negative answers), got {self.a}-{self.b}")
        if self.operation == "mul" and not 1 <= self.b <= 9:
            raise ValueError(f"multiplication is by a single digit 1..9, got b={self.b}")

    @property
    def prompt(self) -> str:
        """The problem as the model sees it, e.g. `487+356=`."""
        return f"{self.a}{_SYMBOL[self.operation]}{self.b}="

    @property
    def answer(self) -> int:
        if self.operation == "add":
            return self.a + self.b
        if self.operation == "sub":
            return self.a - self.b
        return self.a * self.b

    @property
    def key(self) -> str:
        """Identity for splitting: commutative problems written either way share a key."""
        a, b = (self.a, self.b) if self.operation == "sub" else sorted((self.a, self.b))
        return f"{self.operation}:{a}:{b}"

    def trace_lines(self) -> list[str]:
        """One line per column, right to left (see the module docstring for the format)."""
        digits_a = [int(c) for c in reversed(str(self.a))]
        if self.operation == "mul":
            return _multiplication_lines(digits_a, self.b)
        digits_b = [int(c) for c in reversed(str(self.b))]
        width = max(len(digits_a), len(digits_b))
        digits_a += [0] * (width - len(digits_a))
        digits_b += [0] * (width - len(digits_b))
        if self.operation == "add":
            return _addition_lines(digits_a, digits_b)
        return _subtraction_lines(digits_a, digits_b)

    @property
    def response(self) -> str:
        """The SFT target: the trace lines, each after a newline, then `\\n\\boxed{answer}`."""
        return "".join(f"\n{line}" for line in self.trace_lines()) + f"\n\\boxed{{{self.answer}}}"


def _addition_lines(digits_a: list[int], digits_b: list[int]) -> list[str]:
    lines, found, carry = [], "", 0
    for column, (da, db) in enumerate(zip(digits_a, digits_b, strict=True)):
        total = da + db + carry
        last = column == len(digits_a) - 1
        found = (str(total) if last else str(total % 10)) + found
        lines.append(f"{da}+{db}+{carry}={total} {found}")
        carry = total // 10
    return lines


def _subtraction_lines(digits_a: list[int], digits_b: list[int]) -> list[str]:
    lines, found, borrow = [], "", 0
    for da, db in zip(digits_a, digits_b, strict=True):
        borrow_out = int(da < db + borrow)
        minuend = da + 10 * borrow_out
        found = str(minuend - db - borrow) + found
        lines.append(f"{minuend}-{db}-{borrow}={minuend - db - borrow} {found}")
        borrow = borrow_out
    return lines


def _multiplication_lines(digits_a: list[int], multiplier: int) -> list[str]:
    lines, found, carry = [], "", 0
    for column, da in enumerate(digits_a):
        total = da * multiplier + carry
        last = column == len(digits_a) - 1
        found = (str(total) if last else str(total % 10)) + found
        lines.append(f"{da}*{multiplier}+{carry}={total} {found}")
        carry = total // 10
    return lines


def max_prompt_chars(config: SyntheticTaskConfig) -> int:
    """Upper bound on `len(problem.prompt)` under `config` (`a+b=` with two max_digits operands)."""
    n = config.max_digits
    return 2 * n + 2 if config.operations != ("mul",) else n + 3


def max_response_chars(config: SyntheticTaskConfig) -> int:
    """Upper bound on `len(problem.response)` under `config`: n lines of at most 9 + k characters (k = the
    answer digits so far) plus 1 for a final carry, n + 1 newlines, and `\\boxed{}` around n + 1 digits."""
    n = config.max_digits
    return 9 * n + n * (n + 1) // 2 + 1 + (n + 1) + (n + 9)


def assign_split(problem: ArithmeticProblem, config: SyntheticTaskConfig) -> Split:
    """The split `problem` belongs to: a point in [0, 1) from the SHA-256 of its key, cut at
    `heldout_fraction` and `heldout_fraction + rl_fraction`. Independent of any seed."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    point = int.from_bytes(digest[:8], "big") * _HASH_SCALE
    if point < config.heldout_fraction:
        return "heldout"
    if point < config.heldout_fraction + config.rl_fraction:
        return "rl"
    return "sft"


def _sample_operand(rng: np.random.Generator, config: SyntheticTaskConfig, max_digits: int) -> int:
    digits = int(rng.integers(config.min_digits, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def _sample_problem(
    rng: np.random.Generator, config: SyntheticTaskConfig, max_digits: int
) -> ArithmeticProblem:
    operation = config.operations[int(rng.integers(len(config.operations)))]
    a = _sample_operand(rng, config, max_digits)
    if operation == "mul":
        return ArithmeticProblem("mul", a, int(rng.integers(_MULTIPLIERS[0], _MULTIPLIERS[1] + 1)))
    b = _sample_operand(rng, config, max_digits)
    if operation == "sub" and a < b:
        a, b = b, a
    return ArithmeticProblem(operation, a, b)


def generate_problems(
    config: SyntheticTaskConfig, split: Split, num: int, seed: int
) -> list[ArithmeticProblem]:
    """`num` distinct problems of `split`, drawn from `config`'s distribution with the stream (seed, split).

    Draws problems and keeps those whose hash puts them in `split` (so each split follows the same
    distribution), skipping repeats. The SFT split draws operands of at most `config.sft_max_digits` digits
    when that is set.

    Raises:
        ValueError: `split`, `num` or `seed` is invalid, or the problem space of `config` has too few
            problems in `split` to find `num` distinct ones.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if num < 0:
        raise ValueError(f"number of {split} problems must be >= 0, got {num}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (a numpy SeedSequence entropy), got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),)))
    rl, heldout = config.rl_fraction, config.heldout_fraction
    share = {"sft": 1.0 - rl - heldout, "rl": rl, "heldout": heldout}[split]
    max_draws = int(20 * num / share) + 10_000  # 20x the draws the split's share needs, without repeats
    max_digits = config.sft_max_digits if split == "sft" and config.sft_max_digits else config.max_digits
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    for _ in range(max_draws):
        if len(problems) == num:
            break
        problem = _sample_problem(rng, config, max_digits)
        if problem.key not in seen and assign_split(problem, config) == split:
            seen.add(problem.key)
            problems.append(problem)
    if len(problems) < num:
        raise ValueError(
            f"found only {len(problems)} distinct {split!r} problems of the {num} requested in {max_draws} "
            f"draws: digits {config.min_digits}..{max_digits} with operations {config.operations} "
            "have too few; raise max_digits, add operations, or ask for fewer problems"
        )
    return problems


@dataclass(frozen=True)
class SyntheticSplits:
    """Problems of the three splits and the records built from them (JSON-ready dicts of strings)."""

    config: SyntheticTaskConfig
    seed: int
    sft: tuple[ArithmeticProblem, ...]
    rl: tuple[ArithmeticProblem, ...]
    heldout: tuple[ArithmeticProblem, ...]

    def sft_records(self) -> list[dict[str, str]]:
        """`{"prompt", "response"}` per SFT problem; the SFT loss covers the response (and EOS)."""
        return [{"prompt": p.prompt, "response": p.response} for p in self.sft]

    def heldout_records(self) -> list[dict[str, str]]:
        """The held-out split in the SFT schema, for the held-out-loss callback."""
        return [{"prompt": p.prompt, "response": p.response} for p in self.heldout]

    def rl_records(self) -> list[dict[str, str]]:
        """`{"id", "prompt", "answer"}` per RL prompt; `answer` is the gold integer as a string."""
        return [
            {"id": f"rl-{i:06d}", "prompt": p.prompt, "answer": str(p.answer)} for i, p in enumerate(self.rl)
        ]

    def benchmark_records(self) -> list[dict[str, str]]:
        """The held-out split in the benchmark schema of `nemo_quagmire.eval.benchmarks`.

        `problem` is the raw prompt: the tiny model must see it verbatim, without an instruction template.
        """
        source = f"nemo_quagmire.data.synthetic seed={self.seed} {self.config.model_dump_json()}"
        return [
            {
                "id": f"{BENCHMARK_NAME}-{i:06d}",
                "problem": p.prompt,
                "answer": str(p.answer),
                "solution": p.response,
                "source": source,
            }
            for i, p in enumerate(self.heldout)
        ]


def generate_splits(
    config: SyntheticTaskConfig, *, seed: int, num_sft: int, num_rl: int, num_heldout: int
) -> SyntheticSplits:
    """All three splits; each depends only on (config, seed, its own count), never on the other counts.
    `config.seed`, when set, replaces `seed` (the run's)."""
    seed = seed if config.seed is None else config.seed
    return SyntheticSplits(
        config=config,
        seed=seed,
        sft=tuple(generate_problems(config, "sft", num_sft, seed)),
        rl=tuple(generate_problems(config, "rl", num_rl, seed)),
        heldout=tuple(generate_problems(config, "heldout", num_heldout, seed)),
    )


def verify(completion: str, answer: str) -> bool:
    """Whether the final answer of `completion` (its last `\\boxed{}`) is the integer `answer`.

    The boxed text must be a plain integer (optional sign, leading zeros allowed) of the same value, which
    is the project grader's verdict (`plain_number_verdict`) on every string over the task's alphabet. It
    is stricter than math-verify on answers that are not plain numbers, which the grader hands to math-verify
    (e.g. `\\boxed{800+43}` is wrong here, correct there); the task's traces never box such an answer.

    Raises:
        ValueError: `answer` is not an integer (it must come from this task's records).
    """
    if not _GOLD_INTEGER.fullmatch(answer):
        raise ValueError(f"gold answer {answer!r} is not an integer; pass the `answer` of a synthetic record")
    extracted = extract_final_answer(completion)
    if extracted is None or not _INTEGER.fullmatch(extracted):
        return False
    return int(extracted) == int(answer)
