"""Pass@k evaluator as a training callback: sample n completions per problem, grade, report pass@k / maj@k.

At every validation the policy generates `num_samples` completions for each problem of each benchmark
(through `PolicyHandle.generate`, so it works in any loop and with any rollout engine), the project's grader
scores them, and `nemo_quagmire.eval.grading.compute_metrics` turns the verdicts into the same report as the
offline `scripts/grade.py`: `val/<bench>/pass@<k>`, `val/<bench>/maj@<k>`, `val/<bench>/mean@n`,
`val/<bench>/no_answer`, `val/<bench>/response_length` and the unweighted `val/macro/...`
(names and meanings: nemo_quagmire/METRICS.md).

Why it is built this way:

- Throughput. Pass@64 of n = 256 samples on the 2,866 problems of the seven benchmarks is 734k completions
  per validation. Each generation call carries `rows_per_batch` completions (problems x samples, problems
  sorted by prompt length so that little of the batch is padding), and the engine decodes them together
  with a KV cache. Grading is CPU work in worker processes: it runs on one background thread, batch i being
  graded while the main thread generates batch i + 1, so a validation costs about max(generation, grading)
  instead of their sum. `MathGrader` is not thread-safe; only that thread touches it.
- Re-grading. Every graded sample of every validation is written (atomically) to
  `<run_dir>/eval/step_XXXXXXXX/samples.parquet` with its gold answer (`nemo_quagmire.eval.samples`), so a
  grader fix or another metric never needs the model again (`scripts/evaluate.py --regrade`); `report.json`
  next to it holds the report.
- Scale. n = 256 on the seven benchmarks is gigabytes of completion text. Ranks exchange only the verdicts
  (what the report needs); each data-parallel rank writes the completions it generated to its own part
  file, so no rank holds all of them. (Every rank of a tensor/pipeline-parallel replica writes the same
  part, atomically.)
- Reproducibility. Each generation call is seeded from (seed, step, data-parallel rank, batch), so a resumed
  run repeats the uninterrupted run's validations exactly.
- Bad input fails at construction, before any generation: an unknown benchmark (`select_benchmarks`), k > n,
  n > 256, and a prompt the tokenizer cannot encode (every prompt is built then).

Problems are split over data-parallel ranks; each rank grades its share and the verdicts are gathered on
every rank before the report is computed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nemo_quagmire.eval.benchmarks import BenchmarkError, Problem, available_benchmarks, load_benchmarks
from nemo_quagmire.eval.passk import default_ks
from nemo_quagmire.eval.samples import SampleRecord, samples_file, summarize, write_report, write_samples
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle, Tokenizer
from nemo_quagmire.utils.logging import get_logger, global_rank

__all__ = [
    "EVAL_SUBDIR",
    "MAX_NUM_SAMPLES",
    "SYNTHETIC",
    "PassAtKCallback",
    "PromptFn",
    "eval_dir",
    "select_benchmarks",
]

logger = get_logger(__name__)

PromptFn = Callable[[Problem], list[int]]
MAX_NUM_SAMPLES = 256  # the paper's n; pass@k estimates at k <= 64 are tight well before it
SYNTHETIC = "synthetic"  # the config name of the embedded task's held-out problems
EVAL_SUBDIR = "eval"


def eval_dir(run_dir: str | Path, step: int) -> Path:
    """Where the validation at `step` writes its samples and report: `<run_dir>/eval/step_XXXXXXXX`."""
    return Path(run_dir) / EVAL_SUBDIR / f"step_{step:08d}"


def select_benchmarks(
    names: Sequence[str],
    *,
    benchmarks_dir: str | Path | None,
    synthetic: Sequence[Problem] = (),
    num_problems: int | None = None,
) -> dict[str, list[Problem]]:
    """The problems of each named benchmark (the first `num_problems` of each), in the order named.

    Args:
        names: benchmark names: files `<name>.jsonl` of the benchmarks directory, or `SYNTHETIC` for the
            embedded task's held-out problems (`synthetic`, reported under their own benchmark name).
        benchmarks_dir: the benchmarks directory (None = `$NEMO_QUAGMIRE_BENCHMARKS_DIR`); not needed for
            `SYNTHETIC` alone.
        synthetic: the embedded task's held-out problems.
        num_problems: keep the first N problems of each benchmark; None = all.

    Raises:
        BenchmarkError: a name is unknown (all unknown names are listed with the available ones), repeated,
            or `SYNTHETIC` is asked for without synthetic problems. Raised before anything is loaded.
        FileNotFoundError: the benchmarks directory is missing.
    """
    if not names:
        raise BenchmarkError("no benchmarks named; name at least one (or disable Pass@k)")
    if repeated := sorted({name for name in names if list(names).count(name) > 1}):
        raise BenchmarkError(f"benchmarks {repeated} are named more than once")
    files = [name for name in names if name != SYNTHETIC]
    if SYNTHETIC in names and not synthetic:
        raise BenchmarkError(
            f"benchmark {SYNTHETIC!r} is the embedded task's held-out split, which this run does not have; "
            "use data.task=synthetic or name benchmarks from the benchmarks directory"
        )
    if files:
        available = available_benchmarks(benchmarks_dir)
        if unknown := [name for name in files if name not in available]:
            raise BenchmarkError(
                f"unknown benchmark(s) {unknown}; available: {', '.join([*available, SYNTHETIC])}"
            )
    loaded = load_benchmarks(files, data_dir=benchmarks_dir) if files else {}
    selected: dict[str, list[Problem]] = {}
    for name in names:
        problems = list(synthetic) if name == SYNTHETIC else loaded[name]
        bench = problems[0].benchmark if name == SYNTHETIC else name
        selected[bench] = problems[:num_problems]
    return selected


@dataclass(frozen=True)
class _Batch:
    """One generation call: problems, their prompt ids, and the seed of the call."""

    problems: list[Problem]
    prompts: list[list[int]]
    seed: int


class PassAtKCallback(Callback):
    """Reports pass@k, maj@k, mean@n, no-answer rate and completion length of the policy on benchmarks.

    Args:
        benchmarks: benchmark name -> problems to evaluate (see `select_benchmarks`).
        prompt_fn: a problem -> its prompt token ids (template and tokenizer applied).
        num_samples: n, samples per problem, 1..256.
        sampling: temperature / top-p / max new tokens (stop tokens: the tokenizer's EOS is added).
        ks: the ks to report; default powers of two up to n.
        rows_per_batch: completions per generation call; a call holds max(1, rows_per_batch // n) problems.
        equal_length_batches: put only prompts of equal token length in one call (for engines that cannot
            mask left padding, e.g. the in-process engine under Transformer Engine attention).
        grader_workers: grading processes; 0 grades in this process on the main thread (no overlap).
        grader: a grader to use instead (`MathGrader`-like: `grade(golds, completions, problem_keys)`); by
            default one of `grader_workers` processes is started at the first validation and kept until
            `close()` / the end of training.
        overlap_grading: grade on a background thread while the next batch generates (default); False grades
            each batch right after it is generated (for measuring what the overlap saves).
        save_samples: write samples.parquet and report.json for every validation (rank 0).
        seed: sampling seed; each call draws from (seed, step, data-parallel rank, batch).

    Raises:
        ValueError: no problems for some benchmark, n outside 1..256, a k < 1 or k > n, a bad batch size, or
            a problem `prompt_fn` cannot encode.
    """

    def __init__(
        self,
        benchmarks: Mapping[str, Sequence[Problem]],
        prompt_fn: PromptFn,
        *,
        num_samples: int,
        sampling: SamplingParams,
        ks: Sequence[int] | None = None,
        rows_per_batch: int = 256,
        equal_length_batches: bool = False,
        grader_workers: int = 1,
        overlap_grading: bool = True,
        save_samples: bool = True,
        seed: int = 0,
        grader: Any = None,
    ) -> None:
        empty = [name for name, problems in benchmarks.items() if not problems]
        if not benchmarks or empty:
            raise ValueError(f"PassAtKCallback needs problems for every benchmark; empty: {empty or 'all'}")
        if not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise ValueError(f"num_samples must be in 1..{MAX_NUM_SAMPLES}, got {num_samples}")
        self.ks = sorted(set(ks)) if ks is not None else default_ks(num_samples)
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be integers >= 1, got {list(ks or [])}")
        if self.ks[-1] > num_samples:
            raise ValueError(
                f"pass@{self.ks[-1]} needs at least {self.ks[-1]} samples per problem, but num_samples="
                f"{num_samples}; lower the ks or raise num_samples"
            )
        if rows_per_batch < 1 or grader_workers < 0:
            raise ValueError(
                f"rows_per_batch must be >= 1 and grader_workers >= 0, got {rows_per_batch}, {grader_workers}"
            )
        self.benchmarks = {name: list(problems) for name, problems in benchmarks.items()}
        problems = [p for items in self.benchmarks.values() for p in items]
        self._prompt_ids = {(p.benchmark, p.id): prompt_fn(p) for p in problems}  # bad prompts fail here
        self.num_samples = num_samples
        self.sampling = sampling
        self.rows_per_batch = rows_per_batch
        self.equal_length_batches = equal_length_batches
        self.grader_workers = grader_workers
        self.overlap_grading = overlap_grading and grader_workers > 0
        self.save_samples = save_samples
        self.seed = seed
        self._grader: Any = grader
        self._owns_grader = grader is None

    # ------------------------------------------------------------------ hooks
    def on_validation(self, handle: PolicyHandle) -> dict[str, float]:
        out_dir = eval_dir(handle.run_dir, handle.step) if self.save_samples else None
        return self.evaluate(handle, out_dir)

    def on_train_end(self, handle: PolicyHandle) -> None:
        self.close()

    def close(self) -> None:
        """Stop the grading processes (a later validation starts new ones)."""
        if self._owns_grader and self._grader is not None:
            self._grader.close()
            self._grader = None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, handle: PolicyHandle, out_dir: Path | None = None) -> dict[str, float]:
        """Sample, grade and report; with `out_dir`, rank 0 also writes samples.parquet and report.json.

        Collective over the data-parallel group (every rank calls it).

        Returns:
            The metrics (`val/<bench>/...`, `val/macro/...`, `timing/val_passk*`), the same on every rank.
        """
        start = time.perf_counter()
        batches = self._batches(handle)
        sampling = self.sampling.model_copy(
            update={"stop_token_ids": (*self.sampling.stop_token_ids, handle.tokenizer.eos_id)}
        )
        grader = self._get_grader()
        executor = ThreadPoolExecutor(1, thread_name_prefix="passk-grader") if self.overlap_grading else None
        graded: list[Future[list[SampleRecord]]] = []
        try:
            for batch in batches:
                rollout = handle.generate(
                    batch.prompts, self.num_samples, sampling.model_copy(update={"seed": batch.seed})
                )
                job = _GradeJob(batch.problems, _cpu_rows(rollout), handle.tokenizer, grader)
                graded.append(executor.submit(job) if executor else _done(job()))
            generated = time.perf_counter()
            mine = [record for future in graded for record in future.result()]
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        grade_wait = time.perf_counter() - generated
        mine = self._in_benchmark_order(mine)
        verdicts = [replace(r, completion="") for r in mine]  # what the report needs, without the text
        everyone = self._in_benchmark_order([r for part in handle.all_gather_objects(verdicts) for r in part])
        report, metrics = summarize(everyone, self.ks)
        if out_dir is not None:
            rank, size = handle.data_parallel_rank, handle.data_parallel_size
            write_samples(samples_file(out_dir, rank, size), mine)
            if global_rank() == 0:
                write_report(out_dir, handle.step, report)
                logger.info("wrote %d graded samples to %s", len(everyone), out_dir)
        metrics["timing/val_passk"] = time.perf_counter() - start
        metrics["timing/val_passk_grade_wait"] = grade_wait
        return metrics

    def _batches(self, handle: PolicyHandle) -> list[_Batch]:
        """This rank's problems in generation calls of about `rows_per_batch` completions, shortest prompts
        first (little padding per call), each call with its own seed."""
        problems = [p for items in self.benchmarks.values() for p in items]
        prompt_ids = self._prompt_ids
        mine = problems[handle.data_parallel_rank :: handle.data_parallel_size]
        mine.sort(key=lambda p: len(prompt_ids[(p.benchmark, p.id)]))  # stable: ties keep their order
        per_call = max(1, self.rows_per_batch // self.num_samples)
        groups: list[list[Problem]] = []
        for problem in mine:
            length = len(prompt_ids[(problem.benchmark, problem.id)])
            last = groups[-1] if groups else None
            fits = last is not None and len(last) < per_call
            same_length = last is not None and len(prompt_ids[(last[0].benchmark, last[0].id)]) == length
            if fits and (same_length or not self.equal_length_batches):
                last.append(problem)
            else:
                groups.append([problem])
        return [
            _Batch(
                problems=group,
                prompts=[prompt_ids[(p.benchmark, p.id)] for p in group],
                seed=random.Random(
                    f"{self.seed}/{handle.step}/{handle.data_parallel_rank}/{index}"
                ).getrandbits(31),
            )
            for index, group in enumerate(groups)
        ]

    def _get_grader(self) -> Any:
        if self._grader is None:
            from nemo_quagmire.rewards.math_grader import MathGrader

            self._grader = MathGrader(num_workers=self.grader_workers)
        return self._grader

    def _in_benchmark_order(self, records: list[SampleRecord]) -> list[SampleRecord]:
        """Records ordered by benchmark, problem (as given) and sample index, whatever the rank or batch."""
        problems = [p for items in self.benchmarks.values() for p in items]
        position = {(p.benchmark, p.id): i for i, p in enumerate(problems)}
        return sorted(records, key=lambda r: (position[(r.benchmark, r.problem_id)], r.sample_index))


@dataclass(frozen=True)
class _GradeJob:
    """Decode and grade one generation call's completions (run on the grading thread)."""

    problems: list[Problem]
    rows: list[_Row]
    tokenizer: Tokenizer
    grader: Any

    def __call__(self) -> list[SampleRecord]:
        completions = [self.tokenizer.decode(row.completion_ids) for row in self.rows]
        owners = [self.problems[row.prompt_index] for row in self.rows]
        results = self.grader.grade(
            [p.answer for p in owners], completions, problem_keys=[(p.benchmark, p.id) for p in owners]
        )
        samples_so_far = [0] * len(self.problems)
        records = []
        for row, problem, completion, result in zip(self.rows, owners, completions, results, strict=True):
            records.append(
                SampleRecord(
                    benchmark=problem.benchmark,
                    problem_id=problem.id,
                    sample_index=samples_so_far[row.prompt_index],
                    completion=completion,
                    gold=problem.answer,
                    extracted=result.extracted,
                    correct=result.correct,
                    reason=result.reason,
                    length=len(row.completion_ids),
                    truncated=row.truncated,
                )
            )
            samples_so_far[row.prompt_index] += 1
        return records


@dataclass(frozen=True)
class _Row:
    prompt_index: int
    completion_ids: list[int]
    truncated: bool


def _cpu_rows(rollout: RolloutBatch) -> list[_Row]:
    """Each completion with its prompt and truncation flag, copied to the CPU at once (one device sync)."""
    tokens = rollout.tokens.cpu()
    columns = zip(
        rollout.prompt_index.tolist(),
        rollout.prompt_lengths.tolist(),
        rollout.lengths.tolist(),
        rollout.truncated.tolist(),
        strict=True,
    )
    return [
        _Row(prompt, tokens[row, start:end].tolist(), bool(truncated))
        for row, (prompt, start, end, truncated) in enumerate(columns)
    ]


def _done(value: list[SampleRecord]) -> Future[list[SampleRecord]]:
    future: Future[list[SampleRecord]] = Future()
    future.set_result(value)
    return future
