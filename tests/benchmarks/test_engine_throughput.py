"""Smoke test of benchmarks/engine_throughput.py: its single-process part on tiny shapes (no torchrun), so the
script does not rot when the engine's API moves. No timing assertions: speeds are the script's business."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_throughput.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engine_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world1(bench: ModuleType) -> Iterator[None]:
    """A one-process megatron world; an existing one (another test module's) is reused, not torn down."""
    from megatron.core import parallel_state as ps

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import parallel_context

    if ps.model_parallel_is_initialized():
        assert ps.get_tensor_model_parallel_world_size() == ps.get_pipeline_model_parallel_world_size() == 1
        yield
        return
    with parallel_context(bench.model_config(16), ParallelConfig(), seed=bench.SEED):
        yield


def test_single_process_rows_run_and_both_engines_compute_the_same_model(bench, world1):
    shapes = bench.Shapes(batch_size=4, seq_len=16, micro_batch_size=2, warmup=0, steps=1)
    rows, parity = bench.run_in_process(shapes, thread_counts=(1,), profile_repeats=1)

    assert [(r.engine, r.layout, r.processes, r.threads) for r in rows] == [
        ("transformers", "-", 1, 1),
        ("GPTModel, plain loop", "-", 1, 1),
        ("engine", "TP1", 1, 1),
    ]
    # Same weights, same tokens: float32 round-off only. A shape, RoPE or norm mismatch between the
    # transformers model and the preset gives differences of order 1e-2 and more.
    assert parity < 1e-4
    for row in rows:
        assert row.train_s > 0 and row.logprob_s > 0
        (train,) = row.train_profiles
        assert train.aten_ops > 0 and train.optimizer_ms > 0  # the optimizer step was labelled and seen
        assert sum(train.aten_by_kind_ms.values()) == pytest.approx(train.aten_ms)
        assert train.aten_by_kind_ms["matmul"] > 0
        assert row.logprob_profiles[0].optimizer_ms == 0
    table = bench.render_table(rows, shapes).splitlines()
    assert len(table) == 2 + len(rows)  # header, rule, one line per row
    # Rows other than transformers carry a ratio against transformers on the same number of cores.
    assert table[-1].startswith("| engine | TP1 | 1 x 1 |") and table[-1].count("**") == 4
    assert table[2].count("**") == 0


def test_measure_gives_a_contender_over_budget_fewer_steps_but_at_least_one(bench):
    def step(seconds: float):
        def run() -> torch.Tensor:
            time.sleep(seconds)
            return torch.ones(4).sum()

        return run

    fast = bench.Contender("fast", "-", processes=1, threads=1, train=step(0.0), logprobs=step(0.0))
    slow = bench.Contender("slow", "-", processes=1, threads=1, train=step(0.03), logprobs=step(0.0))
    shapes = bench.Shapes(batch_size=2, seq_len=2, micro_batch_size=1, warmup=2, steps=5)
    fast_row, slow_row = bench.measure([fast, slow], shapes, None, profile_repeats=1, budget_s=0.05)
    # The slow train step has spent >= 0.06 s > 0.05 s after its two warm-ups, so it gets exactly one timed
    # step; its log-prob steps and the fast contender stay within the budget and get all five.
    assert (fast_row.train_steps, slow_row.train_steps) == (5, 1)
    assert (fast_row.logprob_steps, slow_row.logprob_steps) == (5, 5)
    assert slow_row.train_s >= 0.03


def test_union_length_matches_brute_force(bench):
    intervals = [(0.0, 3.0), (2.0, 5.0), (7.0, 8.0), (7.5, 7.75), (10.0, 10.0), (4.0, 4.5)]
    # Unit cells [k, k+0.25) covered by at least one interval, counted on a fine grid.
    grid = [k / 4 for k in range(0, 48)]
    covered = sum(any(s <= x < e for s, e in intervals) for x in grid) / 4
    assert bench._union_length(intervals) == pytest.approx(covered) == 6.0
    for perm in itertools.islice(itertools.permutations(intervals), 20):
        assert bench._union_length(list(perm)) == pytest.approx(6.0)


def test_batch_must_split_into_equal_micro_batches_per_dp_rank(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-size", "12", "--micro-batch-size", "4"])
    args = bench.parse_args(["--quick"])
    assert (args.batch_size, args.seq_len) == (8, 64)
