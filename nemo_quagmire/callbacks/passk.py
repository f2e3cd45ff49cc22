"""Pass@k evaluator as a training callback: sample n completions per problem, grade, report pass@k / maj@k.

At every validation the policy generates `num_samples` completions for each problem of each benchmark
(through `PolicyHandle.generate`, so it works in any loop and with any rollout engine), the project's grader
scores them, and `nemo_quagmire.eval.grading.compute_metrics` turns the verdicts into the same report as the
offline `scripts/grade.py`: `val/<bench>/pass@<k>`, `val/<bench>/maj@<k>`, `val/<bench>/mean@n`,
`val/<bench>/no_answer`, `val/<bench>/response_length` and the unweighted `val/macro/...`.

Problems are split over data-parallel ranks; each rank grades its share and the graded samples are gathered
on every rank before the report is computed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from nemo_quagmire.eval.benchmarks import Problem
from nemo_quagmire.eval.grading import GradedSample, compute_metrics
from nemo_quagmire.eval.passk import default_ks
from nemo_quagmire.rollout.base import SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle

PromptFn = Callable[[Problem], list[int]]


class PassAtKCallback(Callback):
    """Reports pass@k, maj@k, mean@n and no-answer rates of the policy on benchmarks.

    Args:
        benchmarks: benchmark name -> problems to evaluate.
        prompt_fn: a problem -> its prompt token ids (template and tokenizer applied).
        num_samples: n, samples per problem.
        sampling: temperature / top-p / max new tokens (stop tokens: the tokenizer's EOS is added).
        ks: the ks to report; default powers of two up to n.
        prompts_per_batch: problems per generation call (each yields n rows).
        grader_workers: grading processes.
        seed: sampling seed; each validation draws from (seed, step, batch), so a resumed run repeats the
            uninterrupted run's validations exactly.
    """

    def __init__(
        self,
        benchmarks: Mapping[str, Sequence[Problem]],
        prompt_fn: PromptFn,
        *,
        num_samples: int,
        sampling: SamplingParams,
        ks: Sequence[int] | None = None,
        prompts_per_batch: int = 32,
        grader_workers: int = 1,
        seed: int = 0,
    ) -> None:
        empty = [name for name, problems in benchmarks.items() if not problems]
        if not benchmarks or empty:
            raise ValueError(f"PassAtKCallback needs problems for every benchmark; empty: {empty or 'all'}")
        self.ks = list(ks) if ks is not None else default_ks(num_samples)
        if max(self.ks) > num_samples:
            raise ValueError(
                f"pass@{max(self.ks)} needs at least {max(self.ks)} samples per problem, but num_samples="
                f"{num_samples}; lower the ks or raise num_samples"
            )
        self.benchmarks = {name: list(problems) for name, problems in benchmarks.items()}
        self.prompt_fn = prompt_fn
        self.num_samples = num_samples
        self.sampling = sampling
        self.prompts_per_batch = prompts_per_batch
        self.grader_workers = grader_workers
        self.seed = seed

    def on_validation(self, handle: PolicyHandle) -> dict[str, float]:
        from nemo_quagmire.rewards.math_grader import MathGrader

        problems = [p for items in self.benchmarks.values() for p in items]
        mine = problems[handle.data_parallel_rank :: handle.data_parallel_size]
        sampling = self.sampling.model_copy(
            update={"stop_token_ids": (*self.sampling.stop_token_ids, handle.tokenizer.eos_id)}
        )
        graded: list[tuple[GradedSample, int]] = []
        with MathGrader(num_workers=self.grader_workers) as grader:
            for start in range(0, len(mine), self.prompts_per_batch):
                batch_problems = mine[start : start + self.prompts_per_batch]
                seed = random.Random(f"{self.seed}/{handle.step}/{handle.data_parallel_rank}/{start}")
                rollout = handle.generate(
                    [self.prompt_fn(p) for p in batch_problems],
                    self.num_samples,
                    sampling.model_copy(update={"seed": seed.getrandbits(31)}),
                )
                rows = rollout.prompt_index.tolist()
                completions = [handle.tokenizer.decode(ids) for ids in rollout.completion_ids()]
                results = grader.grade(
                    [batch_problems[i].answer for i in rows],
                    completions,
                    problem_keys=[(batch_problems[i].benchmark, batch_problems[i].id) for i in rows],
                )
                lengths = (rollout.lengths - rollout.prompt_lengths).tolist()
                for i, result, length in zip(rows, results, lengths, strict=True):
                    problem = batch_problems[i]
                    sample = GradedSample(problem.benchmark, problem.id, result.correct, result.extracted)
                    graded.append((sample, length))
        graded = [item for part in handle.all_gather_objects(graded) for item in part]
        report = compute_metrics([sample for sample, _ in graded], ks=self.ks)
        metrics: dict[str, float] = {}
        for name, values in report["per_benchmark"].items():
            lengths = [length for sample, length in graded if sample.benchmark == name]
            metrics[f"val/{name}/response_length"] = sum(lengths) / len(lengths)
            metrics |= {f"val/{name}/{k}": v for k, v in values.items() if isinstance(v, float)}
        metrics |= {f"val/macro/{k}": v for k, v in report["macro"].items()}
        return metrics
