"""Smoke test of benchmarks/eval_engines.py's measurement on the in-process engine (the vLLM half needs the
vLLM venv), so the script does not rot when the callback moves. No timing assertions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_engines.py"

_spec = importlib.util.spec_from_file_location("eval_engines", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_an_engine_is_measured_through_the_pass_at_k_evaluation(megatron_world1):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.policy import MegatronPolicy

    tokenizer = bench.CharTokenizer()
    engine = MegatronPolicy(bench.MODEL, ParallelConfig(), seed=None).rollout_engine(
        tokenizer, seed=0, max_batch_size=8
    )
    problems = bench.held_out_problems(3)
    result = bench.measure(engine.generate, tokenizer, problems, 4, max_new_tokens=8, rows_per_batch=8)
    assert result["samples"] == 12 and 12 <= result["tokens"] <= 12 * 8
    assert 0 < result["generate_seconds"] <= result["seconds"] and 0 <= result["pass@1"] <= 1
