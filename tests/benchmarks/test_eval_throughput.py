"""Smoke test of benchmarks/eval_throughput.py on tiny shapes, so the script does not rot when the callback
or the engine moves. No timing assertions: speeds are the script's business."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_throughput.py"

_spec = importlib.util.spec_from_file_location("eval_throughput", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_a_warmed_up_model_is_measured_with_and_without_overlap(megatron_world1):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.policy import MegatronPolicy

    model = MegatronPolicy(bench.MODEL, ParallelConfig(), seed=None)
    tokenizer = bench.CharTokenizer()
    assert bench.warm_up(model, tokenizer, steps=2) > 0
    problems = bench.held_out_problems(3)
    for overlap in (True, False):
        metrics = bench.measure(model, tokenizer, problems, 4, overlap=overlap, max_new_tokens=8, repeats=1)
        assert metrics["timing/val_passk"] > 0
        assert 0 < metrics[f"val/{bench.BENCHMARK_NAME}/response_length"] <= 8
