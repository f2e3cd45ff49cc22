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
  graded while batch i + 1 generates, so a validation costs about max(generation, grading)
  instead of their sum. `MathGrader` is not thread-safe; only that thread touches it.
- Re-grading. Every graded sample of every validation is written (atomically) to
  `<run_dir>/eval/step_XXXXXXXX/samples.parquet` with its gold answer (`nemo_quagmire.eval.samples`), so a
  grader fix or another metric never needs the model again (`scripts/evaluate.py --regrade`); `report.json`
  next to it holds the report.
- Scale. n = 256 on the seven benchmarks is gigabytes of completion text. Ranks exchange only the verdicts
  (what the report needs); each data-parallel rank writes the completions it generated to its own part
  file, so no rank holds all of them. (Every rank of a tensor/pipeline-parallel replica writes the same
  part, atomically.)
- Several engines. An offline evaluation (`scripts/evaluate.py --engine vllm --engines N`) hands `evaluate`
  one generation function per engine; each keeps one call in flight, pulling the next call from a shared
  queue, so N engines generate concurrently while one thread grades.
- Shards and resumption. Each benchmark's problems (sorted by prompt length) are cut into shards of
  `shard_size` problems. Shards are the unit spread over data-parallel ranks and, with a
  `nemo_quagmire.eval.shards.ShardStore`, saved as soon as they are graded, so a killed evaluation re-run
  with the same arguments generates only the missing shards.
- Reproducibility. Each generation call is seeded from (seed, step, benchmark, shard, call within the
  shard), never from the rank or engine that runs it, so a resumed run, a run on more ranks and a run on
  more engines repeat the uninterrupted single-engine samples (given a deterministic engine).
- Bad input fails at construction, before any generation: an unknown benchmark (`select_benchmarks`), k > n,
  n > 256, and a prompt the tokenizer cannot encode (every prompt is built then).

Each rank grades its shards and the verdicts are gathered on every rank before the report is computed.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nemo_quagmire.config.run import MAX_NUM_SAMPLES, SYNTHETIC
from nemo_quagmire.eval.benchmarks import BenchmarkError, Problem, available_benchmarks, load_benchmarks
from nemo_quagmire.eval.passk import default_ks
from nemo_quagmire.eval.samples import SampleRecord, samples_file, summarize, write_report, write_samples
from nemo_quagmire.eval.shards import ShardKey, ShardStore
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle, Tokenizer
from nemo_quagmire.utils.logging import get_logger, global_rank
from nemo_quagmire.utils.progress import SampleProgress

__all__ = [
    "EVAL_SUBDIR",
    "GenerateFn",
    "PassAtKCallback",
    "PromptFn",
    "eval_dir",
    "select_benchmarks",
]

logger = get_logger(__name__)

PromptFn = Callable[[Problem], list[int]]
GenerateFn = Callable[[Sequence[Sequence[int]], int, SamplingParams], RolloutBatch]
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


class PassAtKCallback(Callback):
    """Reports pass@k, maj@k, mean@n, no-answer rate and completion length of the policy on benchmarks.

    Args:
        benchmarks: benchmark name -> problems to evaluate (see `select_benchmarks`).
        prompt_fn: a problem -> its prompt token ids (template and tokenizer applied).
        num_samples: n, samples per problem, 1..256.
        sampling: temperature / top-p / max new tokens (stop tokens: the tokenizer's EOS is added).
        ks: the ks to report; default powers of two up to n.
        rows_per_batch: completions per generation call; a call holds max(1, rows_per_batch // n) problems.
        shard_size: problems per shard, the unit spread over data-parallel ranks and saved (and resumed) at
            once by `evaluate(store=...)`; default one generation call's problems.
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
        shard_size: int | None = None,
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
        if rows_per_batch < 1 or grader_workers < 0 or (shard_size is not None and shard_size < 1):
            raise ValueError(
                f"rows_per_batch and shard_size must be >= 1 and grader_workers >= 0, got {rows_per_batch}, "
                f"{shard_size}, {grader_workers}"
            )
        self.benchmarks = {name: list(problems) for name, problems in benchmarks.items()}
        problems = [p for items in self.benchmarks.values() for p in items]
        self._prompt_ids = {(p.benchmark, p.id): prompt_fn(p) for p in problems}  # bad prompts fail here
        self.num_samples = num_samples
        self.sampling = sampling
        self.rows_per_batch = rows_per_batch
        self.shard_size = shard_size or max(1, rows_per_batch // num_samples)
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
    def plan_arguments(self, step: int) -> dict[str, Any]:
        """What decides the samples of an evaluation at `step` (for a `ShardStore`): sampling, n, seed,
        batching and a digest of every problem's id, gold answer and prompt ids."""
        digest = hashlib.sha256()
        for problem in (p for items in self.benchmarks.values() for p in items):
            prompt = self._prompt_ids[(problem.benchmark, problem.id)]
            digest.update(json.dumps([problem.benchmark, problem.id, problem.answer, prompt]).encode())
        return {
            "step": step,
            "num_samples": self.num_samples,
            "sampling": self.sampling.model_dump(mode="json"),
            "seed": self.seed,
            "rows_per_batch": self.rows_per_batch,
            "equal_length_batches": self.equal_length_batches,
            "shard_size": self.shard_size,
            "problems": {name: len(items) for name, items in self.benchmarks.items()},
            "problems_sha256": digest.hexdigest(),
        }

    def evaluate(
        self,
        handle: PolicyHandle,
        out_dir: Path | None = None,
        *,
        generators: Sequence[GenerateFn] | None = None,
        store: ShardStore | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """Sample, grade and report; with `out_dir`, rank 0 also writes samples.parquet and report.json.

        Collective over the data-parallel group (every rank calls it). Shards (see the module docstring) are
        spread over data-parallel ranks; within a rank, their generation calls over `generators`.

        Args:
            handle: the policy (its `generate` unless `generators` is given, tokenizer, collectives, step).
            out_dir: where to write samples and report; None = nowhere.
            generators: generation functions of engines to use concurrently, one call in flight each (the
                first runs on this thread); default `[handle.generate]`.
            store: finished shards to resume from and to save every shard into as soon as it is graded
                (`store.begin()` is called here); None = no resume.
            progress: report generated samples per benchmark (bars on a terminal, else log lines; rank 0).

        Returns:
            The metrics (`val/<bench>/...`, `val/macro/...`, `timing/val_passk*`), the same on every rank.

        Raises:
            ShardStoreError: the store holds other arguments or a damaged shard (before any generation).
        """
        start = time.perf_counter()
        shards = self._shards(handle.step)
        if store is not None:
            store.begin()
            finished_here = store.finished([shard.key for shard in shards])
        else:
            finished_here = []
        finished = {key for part in handle.all_gather_objects(finished_here) for key in part}  # + a barrier
        rank, size = handle.data_parallel_rank, handle.data_parallel_size
        todo = [shard for shard in shards if shard.key not in finished][rank::size]
        resumed = [shard for shard in shards if shard.key in finished][rank::size]
        mine = [record for shard in resumed for record in store.read(shard.key, shard.sample_keys())]
        if resumed:
            logger.info("resumed %d finished shard(s) from %s", len(resumed), store.directory)
        sampling = self.sampling.model_copy(
            update={"stop_token_ids": (*self.sampling.stop_token_ids, handle.tokenizer.eos_id)}
        )
        bar = SampleProgress(
            {
                name: sum(s.num_samples for s in [*todo, *resumed] if s.key.benchmark == name)
                for name in self.benchmarks
            },
            {
                name: sum(s.num_samples for s in resumed if s.key.benchmark == name)
                for name in self.benchmarks
            },
            enabled=progress,
        )
        run = _Generation(
            todo,
            generators=list(generators) if generators else [handle.generate],
            num_samples=self.num_samples,
            sampling=sampling,
            tokenizer=handle.tokenizer,
            grader=self._get_grader(),
            overlap_grading=self.overlap_grading,
            store=store,
            progress=bar,
        )
        try:
            mine += run()
        finally:
            bar.close()
        mine = self._in_benchmark_order(mine)
        verdicts = [replace(r, completion="") for r in mine]  # what the report needs, without the text
        everyone = self._in_benchmark_order([r for part in handle.all_gather_objects(verdicts) for r in part])
        report, metrics = summarize(everyone, self.ks)
        if out_dir is not None:
            write_samples(samples_file(out_dir, rank, size), mine)
            if global_rank() == 0:
                write_report(out_dir, handle.step, report)
                logger.info("wrote %d graded samples to %s", len(everyone), out_dir)
        metrics["timing/val_passk"] = time.perf_counter() - start
        metrics["timing/val_passk_grade_wait"] = run.grade_wait
        return metrics

    def _shards(self, step: int) -> list[_Shard]:
        """Every benchmark's problems, shortest prompts first (little padding per call), cut into shards of
        `shard_size` problems, each cut into generation calls of about `rows_per_batch` completions, each
        call with a seed of its own (from the seed, step, benchmark, shard and position: not from the rank or
        engine that runs it)."""
        prompt_ids = self._prompt_ids
        per_call = max(1, self.rows_per_batch // self.num_samples)
        shards = []
        for name, problems in self.benchmarks.items():
            ordered = sorted(problems, key=lambda p: len(prompt_ids[(p.benchmark, p.id)]))  # stable
            for index in range(0, len(ordered), self.shard_size):
                key = ShardKey(name, index // self.shard_size)
                groups: list[list[Problem]] = []
                for problem in ordered[index : index + self.shard_size]:
                    length = len(prompt_ids[(problem.benchmark, problem.id)])
                    last = groups[-1] if groups else None
                    fits = last is not None and len(last) < per_call
                    same_length = (
                        last is not None and len(prompt_ids[(last[0].benchmark, last[0].id)]) == length
                    )
                    if fits and (same_length or not self.equal_length_batches):
                        last.append(problem)
                    else:
                        groups.append([problem])
                batches = [
                    _Batch(
                        problems=group,
                        prompts=[prompt_ids[(p.benchmark, p.id)] for p in group],
                        seed=random.Random(f"{self.seed}/{step}/{name}/{key.index}/{position}").getrandbits(
                            31
                        ),
                    )
                    for position, group in enumerate(groups)
                ]
                shards.append(_Shard(key, batches, self.num_samples))
        return shards

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
class _Batch:
    """One generation call: problems, their prompt ids, and the seed of the call."""

    problems: list[Problem]
    prompts: list[list[int]]
    seed: int


@dataclass(frozen=True)
class _Shard:
    """A benchmark's problems saved (and resumed) together, in generation calls."""

    key: ShardKey
    batches: list[_Batch]
    n: int

    @property
    def num_samples(self) -> int:
        return self.n * sum(len(batch.problems) for batch in self.batches)

    def sample_keys(self) -> list[tuple[str, int]]:
        return [(p.id, j) for batch in self.batches for p in batch.problems for j in range(self.n)]


class _Generation:
    """Generate the calls of `shards` on several engines at once and grade beside them (one evaluation).

    Each generator (one engine, one call in flight) pulls the next call from a shared queue; generator 0 runs
    on the calling thread, the others on threads of their own. Grading runs on one background thread
    (`MathGrader` is not thread-safe), call i being graded while later calls generate; without overlap it
    runs right after each call, under a lock. When the last call of a shard is graded, the shard goes to the
    store. The first error anywhere stops every generator after its current call and is re-raised.
    """

    def __init__(
        self,
        shards: Sequence[_Shard],
        *,
        generators: Sequence[GenerateFn],
        num_samples: int,
        sampling: SamplingParams,
        tokenizer: Tokenizer,
        grader: Any,
        overlap_grading: bool,
        store: ShardStore | None,
        progress: SampleProgress,
    ) -> None:
        self.queue = deque((shard, batch) for shard in shards for batch in shard.batches)
        self.generators = generators
        self.num_samples = num_samples
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.grader = grader
        self.overlap_grading = overlap_grading
        self.store = store
        self.progress = progress
        self.pending = {shard.key: len(shard.batches) for shard in shards}
        self.records: dict[ShardKey, list[SampleRecord]] = {shard.key: [] for shard in shards}
        self.grade_wait = 0.0
        self._lock = threading.Lock()
        self._grade_lock = threading.Lock()
        self._failed = threading.Event()

    def __call__(self) -> list[SampleRecord]:
        grading = ThreadPoolExecutor(1, thread_name_prefix="passk-grader") if self.overlap_grading else None
        helpers = (
            ThreadPoolExecutor(len(self.generators) - 1, thread_name_prefix="passk-engine")
            if len(self.generators) > 1
            else None
        )
        graded: list[Future[None]] = []
        try:
            others = (
                [helpers.submit(self._drain, g, grading, graded) for g in self.generators[1:]]
                if helpers
                else []
            )
            try:
                self._drain(self.generators[0], grading, graded)
            finally:
                for future in others:
                    future.exception()  # wait for every engine's current call
            for future in others:
                future.result()
            generated = time.perf_counter()
            for future in graded:
                future.result()
            self.grade_wait = time.perf_counter() - generated
        finally:
            self._failed.set()
            for pool in (helpers, grading):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        return [record for records in self.records.values() for record in records]

    def _drain(
        self, generate: GenerateFn, grading: ThreadPoolExecutor | None, graded: list[Future[None]]
    ) -> None:
        try:
            while not self._failed.is_set():
                with self._lock:
                    if not self.queue:
                        return
                    shard, batch = self.queue.popleft()
                self.progress.begin(shard.key.benchmark)
                rollout = generate(
                    batch.prompts, self.num_samples, self.sampling.model_copy(update={"seed": batch.seed})
                )
                rows = _cpu_rows(rollout)
                self.progress.update(shard.key.benchmark, len(rows), sum(len(r.completion_ids) for r in rows))
                job = _GradeJob(batch.problems, rows, self.tokenizer, self.grader)
                if grading is None:
                    with self._grade_lock:
                        self._collect(shard, job)
                else:
                    with self._lock:
                        graded.append(grading.submit(self._collect, shard, job))
        except BaseException:
            self._failed.set()
            raise

    def _collect(self, shard: _Shard, job: _GradeJob) -> None:
        """Grade one call; store its shard when it was the shard's last (one thread at a time; nothing after
        a failure elsewhere)."""
        if self._failed.is_set():
            return
        try:
            records = self.records[shard.key]
            records += job()
            self.pending[shard.key] -= 1
            if self.pending[shard.key] == 0 and self.store is not None:
                order = {key: i for i, key in enumerate(shard.sample_keys())}
                self.store.write(
                    shard.key, sorted(records, key=lambda r: order[(r.problem_id, r.sample_index)])
                )
        except BaseException:
            self._failed.set()
            raise


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
