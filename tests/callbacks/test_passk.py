"""PassAtKCallback with a scripted policy (see scripted.py): metrics against brute force over k-subsets, every
graded sample saved and re-gradable, grading overlapping generation, batching, data-parallel gathering, bad
input refused before any generation, shards resumed after a kill, several engines at once, and progress."""

from __future__ import annotations

import itertools
import json
import re
import statistics
import threading
from math import comb

import pytest

from nemo_quagmire.callbacks.passk import PassAtKCallback, eval_dir, select_benchmarks
from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.eval.benchmarks import BenchmarkError, Problem
from nemo_quagmire.eval.samples import read_samples, regrade_samples, summarize
from nemo_quagmire.eval.shards import ShardStore, ShardStoreError, ShardStoreMismatch
from nemo_quagmire.rewards.extraction import extract_final_answer
from nemo_quagmire.rewards.math_grader import GradeResult, MathGrader
from nemo_quagmire.rollout.base import SamplingParams
from tests.callbacks.scripted import TOKENIZER, handle, run_ranks, scripted_completions, scripted_generate

N = 4
SAMPLING = SamplingParams(max_new_tokens=32)
# Seed 3: the scripted samples of these problems hold 0, 4, 3, 2, 3 and 1 correct answers of 4.
_RECORDS = generate_splits(
    SyntheticTaskConfig(), seed=3, num_sft=0, num_rl=0, num_heldout=6
).benchmark_records()
_PROBLEMS = [Problem("x", r["id"], r["problem"], r["answer"], r["solution"]) for r in _RECORDS]
BENCHMARKS = {
    "alpha": [Problem("alpha", p.id, p.problem, p.answer, p.solution) for p in _PROBLEMS[:4]],
    "beta": [Problem("beta", p.id, p.problem, p.answer, p.solution) for p in _PROBLEMS[4:]],
}


def prompt_ids(problem: Problem) -> list[int]:
    return TOKENIZER.encode(problem.problem, add_bos=True)


@pytest.fixture(scope="module")
def grader():
    with MathGrader(num_workers=1) as grader:
        yield grader


def _callback(grader, **kwargs) -> PassAtKCallback:
    return PassAtKCallback(BENCHMARKS, prompt_ids, num_samples=N, sampling=SAMPLING, grader=grader, **kwargs)


def _majority_correct(answers: list[str | None], gold: str) -> float:
    """Probability that a vote over `answers` (no vote without an answer, uniform tie-break) is right."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return 0.0
    top = [a for a, c in counts.items() if c == max(counts.values())]
    return (gold in top) / len(top)


def _expected(ks: list[int]) -> dict[str, float]:
    """Brute force from the scripted completions: pass@k from binomials, maj@k over every k-subset."""
    per_bench: dict[str, dict[str, float]] = {}
    for name, problems in BENCHMARKS.items():
        rows: dict[str, list[float]] = {}
        for problem in problems:
            completions = scripted_completions(problem.problem, N)
            answers = [extract_final_answer(c) for c in completions]
            c = sum(a == problem.answer for a in answers)
            values = {f"pass@{k}": 1 - comb(N - c, k) / comb(N, k) for k in ks}
            for k in ks:
                subsets = list(itertools.combinations(answers, k))
                values[f"maj@{k}"] = statistics.fmean(
                    _majority_correct(list(s), problem.answer) for s in subsets
                )
            values["mean@n"] = c / N
            values["no_answer"] = sum(a is None for a in answers) / N
            values["response_length"] = statistics.fmean(len(c) + 1 for c in completions)  # chars + EOS
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
        per_bench[name] = {key: statistics.fmean(values) for key, values in rows.items()}
    expected = {f"val/{b}/{k}": v for b, metrics in per_bench.items() for k, v in metrics.items()}
    for key in per_bench["alpha"]:
        expected[f"val/macro/{key}"] = statistics.fmean(m[key] for m in per_bench.values())
    return expected


def test_metrics_match_brute_force_and_every_sample_is_saved(tmp_path, grader):
    metrics = _callback(grader, rows_per_batch=8).on_validation(handle(tmp_path, step=3))
    expected = _expected([1, 2, 4])
    assert {k for k in metrics if k.startswith("val/")} == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < expected["val/macro/pass@1"] < expected["val/macro/pass@4"] < 1  # the script is not trivial

    out = eval_dir(tmp_path, 3)
    records = read_samples(out / "samples.parquet")
    assert len(records) == 6 * N
    problems = {p.id: p for items in BENCHMARKS.values() for p in items}
    for record in records:
        problem = problems[record.problem_id]
        completion = scripted_completions(problem.problem, N)[record.sample_index]
        assert (record.benchmark, record.gold, record.completion) == (
            problem.benchmark,
            problem.answer,
            completion,
        )
        assert record.correct == (extract_final_answer(completion) == problem.answer)
        assert record.reason == (
            "no_answer" if record.extracted is None else "correct" if record.correct else "wrong"
        )
        assert record.length == len(completion) + 1 and not record.truncated
    assert sorted((r.problem_id, r.sample_index) for r in records) == sorted(
        (p.id, j) for p in problems.values() for j in range(N)
    )
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 3 and report["macro"]["pass@4"] == pytest.approx(metrics["val/macro/pass@4"])

    # The saved samples are enough to re-grade and recompute the metrics without the model.
    regraded = regrade_samples(records, grader)
    assert [(r.correct, r.extracted) for r in regraded] == [(r.correct, r.extracted) for r in records]
    _, again = summarize(regraded, [1, 2, 4])
    assert again == {k: v for k, v in metrics.items() if k.startswith("val/")}


class _WaitingGrader:
    """Grades like the real grader, but its first call waits until the next batch is being generated: it
    returns only if grading runs beside generation, and records the threads it ran on."""

    def __init__(self) -> None:
        self.next_batch_started = threading.Event()
        self.threads: list[threading.Thread] = []

    def grade(self, golds, completions, problem_keys=None):
        self.threads.append(threading.current_thread())
        if len(self.threads) == 1 and not self.next_batch_started.wait(timeout=20):
            raise AssertionError("batch 2 was not generated while batch 1 was being graded")
        answers = [extract_final_answer(c) for c in completions]
        return [
            GradeResult(a == g, a, "no_answer" if a is None else "correct" if a == g else "wrong")
            for a, g in zip(answers, golds, strict=True)
        ]


def test_grading_runs_on_one_background_thread_beside_generation(tmp_path):
    grader = _WaitingGrader()
    calls = []

    def generate(prompts, group_size, sampling):
        calls.append(len(prompts))
        if len(calls) == 2:
            grader.next_batch_started.set()
        return scripted_generate(prompts, group_size, sampling)

    callback = _callback(grader, rows_per_batch=8, save_samples=False)
    metrics = callback.on_validation(handle(tmp_path, generate=generate))
    assert calls == [2, 2, 2]  # 8 rows per call = 2 problems x 4 samples
    assert len(set(grader.threads)) == 1 and grader.threads[0] is not threading.main_thread()
    assert metrics["val/macro/pass@4"] == pytest.approx(_expected([1, 2, 4])["val/macro/pass@4"])


def test_equal_length_batches_hold_one_prompt_length(tmp_path, grader):
    lengths_per_call = []

    def generate(prompts, group_size, sampling):
        lengths_per_call.append([len(p) for p in prompts])
        return scripted_generate(prompts, group_size, sampling)

    callback = _callback(grader, rows_per_batch=64, equal_length_batches=True, save_samples=False)
    callback.on_validation(handle(tmp_path, generate=generate))
    assert all(len(set(lengths)) == 1 for lengths in lengths_per_call)
    flat = [length for lengths in lengths_per_call for length in lengths]
    alpha, beta = flat[:4], flat[4:]  # benchmark by benchmark, each problem once, shortest prompts first
    assert len(flat) == 6 and alpha == sorted(alpha) and beta == sorted(beta)
    assert len(lengths_per_call) == len(set(alpha)) + len(set(beta))


def test_data_parallel_ranks_gather_verdicts_and_write_their_own_samples(tmp_path, grader):
    single = _callback(grader, save_samples=False).on_validation(handle(tmp_path / "single"))

    def rank_metrics(rank, group):
        callback = _callback(None)  # a grader per rank: MathGrader is not thread-safe
        try:
            return callback.on_validation(
                handle(tmp_path, step=1, rank=rank, size=2, all_gather_objects=group.all_gather_objects(rank))
            )
        finally:
            callback.close()

    for metrics in run_ranks(2, rank_metrics):
        assert {k: v for k, v in metrics.items() if k.startswith("val/")} == {
            k: v for k, v in single.items() if k.startswith("val/")
        }
    parts = sorted(p.name for p in eval_dir(tmp_path, 1).glob("samples*.parquet"))
    assert parts == ["samples.rank-00000-of-00002.parquet", "samples.rank-00001-of-00002.parquet"]
    first = {r.problem_id for r in read_samples(eval_dir(tmp_path, 1) / parts[0])}
    assert first == {p.id for p in _PROBLEMS[:4]}  # shards alternate over ranks: alpha's one shard, beta's
    records = read_samples(eval_dir(tmp_path, 1))
    assert len(records) == 6 * N and all(r.completion for r in records)


def test_bad_settings_are_refused_before_anything_is_generated():
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples per problem, but num_samples=4"):
        PassAtKCallback(BENCHMARKS, prompt_ids, num_samples=4, ks=[1, 8], sampling=SAMPLING)
    with pytest.raises(ValueError, match=r"num_samples must be in 1\.\.256, got 512"):
        PassAtKCallback(BENCHMARKS, prompt_ids, num_samples=512, sampling=SAMPLING)
    with pytest.raises(ValueError, match="empty: \\['beta'\\]"):
        PassAtKCallback({**BENCHMARKS, "beta": []}, prompt_ids, num_samples=4, sampling=SAMPLING)

    def unencodable(problem: Problem) -> list[int]:
        return TOKENIZER.encode(problem.problem + "%")

    with pytest.raises(ValueError, match="character '%'"):  # at construction, not at the first validation
        PassAtKCallback(BENCHMARKS, unencodable, num_samples=4, sampling=SAMPLING)


def test_select_benchmarks_names_unknown_ones_before_loading(tmp_path):
    row = {"id": "a-1", "problem": "1+1=", "answer": "2", "solution": "", "source": "test"}
    (tmp_path / "alpha.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        BenchmarkError, match=r"unknown benchmark\(s\) \['nope', 'math5000'\]; available: alpha"
    ):
        select_benchmarks(["alpha", "nope", "math5000"], benchmarks_dir=tmp_path)
    with pytest.raises(BenchmarkError, match="named more than once"):
        select_benchmarks(["alpha", "alpha"], benchmarks_dir=tmp_path)
    with pytest.raises(BenchmarkError, match="'synthetic' is the embedded task's held-out split"):
        select_benchmarks(["synthetic"], benchmarks_dir=None)
    selected = select_benchmarks(
        ["synthetic", "alpha"], benchmarks_dir=tmp_path, synthetic=_PROBLEMS, num_problems=2
    )
    assert list(selected) == ["x", "alpha"] and len(selected["x"]) == 2 and selected["alpha"][0].answer == "2"


class _Killed(RuntimeError):
    """Stands in for the evaluation being killed."""


class _KilledAfter(ShardStore):
    """A store whose process 'dies' right after writing its k-th shard."""

    def __init__(self, directory, arguments, shards: int) -> None:
        super().__init__(directory, arguments)
        self.left = shards

    def write(self, key, records) -> None:
        super().write(key, records)
        self.left -= 1
        if self.left == 0:
            raise _Killed(f"killed after shard {key}")


def test_a_killed_evaluation_resumes_from_its_shards_and_equals_an_uninterrupted_one(tmp_path, grader):
    def callback():  # 1 problem per call, 2 problems per shard: alpha 2 shards, beta 1
        return _callback(grader, rows_per_batch=N, shard_size=2)

    calls = []

    def generate(prompts, group_size, sampling):
        calls.append(sampling.seed)
        return scripted_generate(prompts, group_size, sampling)

    whole = callback().evaluate(handle(tmp_path / "whole", generate=generate), tmp_path / "whole")
    seeds = list(calls)
    arguments = callback().plan_arguments(0)
    with pytest.raises(_Killed):
        callback().evaluate(
            handle(generate=generate), tmp_path / "out", store=_KilledAfter(tmp_path / "s", arguments, 2)
        )
    written = sorted(str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("shard-*.parquet"))
    assert written == ["alpha/shard-00000.parquet", "alpha/shard-00001.parquet"]
    calls.clear()
    resumed = callback().evaluate(
        handle(generate=generate), tmp_path / "out", store=ShardStore(tmp_path / "s", arguments)
    )
    assert calls == seeds[4:]  # only the last shard's 2 calls were generated again, with their own seeds
    assert {k: v for k, v in resumed.items() if k.startswith("val/")} == {
        k: v for k, v in whole.items() if k.startswith("val/")
    }
    assert read_samples(tmp_path / "out" / "samples.parquet") == read_samples(
        tmp_path / "whole" / "samples.parquet"
    )


def test_a_store_of_other_arguments_or_a_damaged_shard_is_refused_before_generating(tmp_path, grader):
    def generate(prompts, group_size, sampling):
        raise AssertionError("nothing may be generated")

    callback = _callback(grader, rows_per_batch=N, shard_size=2)
    ShardStore(tmp_path / "s", callback.plan_arguments(0)).begin()
    other = _callback(grader, rows_per_batch=N, shard_size=2, seed=7)
    with pytest.raises(ShardStoreMismatch, match="seed: stored 0, now 7"):
        other.evaluate(handle(generate=generate), store=ShardStore(tmp_path / "s", other.plan_arguments(0)))
    damaged = tmp_path / "s" / "alpha" / "shard-00001.parquet"
    damaged.parent.mkdir()
    damaged.write_bytes(b"PAR1 not really")
    with pytest.raises(ShardStoreError, match="shard-00001.parquet is damaged .* delete it"):
        callback.evaluate(
            handle(generate=generate), store=ShardStore(tmp_path / "s", callback.plan_arguments(0))
        )


def test_engines_generate_concurrently_and_give_the_single_engine_result(tmp_path, grader):
    """Three engines whose calls each wait until all three are in flight: the evaluation completes only if
    the engines generate at the same time."""
    in_flight = threading.Barrier(3, timeout=20)
    used: list[int] = []

    def engine(index):
        def generate(prompts, group_size, sampling):
            used.append(index)
            if len(used) <= 3:
                in_flight.wait()
            return scripted_generate(prompts, group_size, sampling)

        return generate

    single = _callback(grader, rows_per_batch=N).evaluate(handle(tmp_path))
    callback = _callback(grader, rows_per_batch=N)
    metrics = callback.evaluate(handle(tmp_path), generators=[engine(i) for i in range(3)])
    assert sorted(set(used)) == [0, 1, 2] and len(used) == 6
    assert {k: v for k, v in metrics.items() if k.startswith("val/")} == {
        k: v for k, v in single.items() if k.startswith("val/")
    }


def test_progress_is_logged_per_benchmark_when_stderr_is_not_a_terminal(tmp_path, grader, caplog):
    with caplog.at_level("INFO", logger="nemo_quagmire"):
        _callback(grader, rows_per_batch=N).evaluate(handle(tmp_path), progress=True)
    lines = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
    assert any(line.startswith("alpha: 16/16 samples (100%)") for line in lines), lines
    assert any(line.startswith("beta: 8/8 samples (100%)") for line in lines), lines
    assert all(re.search(r"[\d.]+ samples/s, \d+ tok/s, ETA \S+$", line) for line in lines), lines
