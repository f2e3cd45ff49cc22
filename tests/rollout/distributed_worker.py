"""Worker of test_distributed_engine.py, run on 2 gloo ranks by torchrun (tests/megatron/launch.py):
DistributedRolloutEngine with fake-engine servers (tests/rollout/fake_engine.py) at TP=2, DP=2, then PP=2.

Usage: distributed_worker.py OUT_JSON. Rank 0 writes every rank's observations.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.rollout.fake_engine import FAKE_ENGINE, weights_checksum, weights_token

PROMPTS = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]


def _start(places, place, hf_dir, run_dir, *, num_engines=None, fail=None):
    from nemo_quagmire.rollout.distributed import DistributedRolloutEngine, plan_engines
    from nemo_quagmire.rollout.vllm_server import VLLMServerEngine

    slots = plan_engines(places, engine_tp=1, colocated=False, num_engines=num_engines)

    def make(slot):
        if fail == "start" and slot.owner == 1:
            raise ValueError("rank 1 cannot start its engine")
        return VLLMServerEngine(
            hf_dir,
            engine_class=FAKE_ENGINE,
            log_file=Path(run_dir) / f"engine_rank{slot.owner}_{num_engines}_{fail}.log",
            exit_on_generate=fail == "generate" and slot.owner == 1,
        )

    return DistributedRolloutEngine.start(slots, place, places, make, pad_id=0)


def _rows(batch) -> dict:
    return {
        "tokens": batch.tokens.tolist(),
        "logprobs": batch.logprobs.tolist(),
        "index": batch.prompt_index.tolist(),
    }


def _error(call) -> str | None:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def main(out: str) -> None:
    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.megatron.hf import export_hf, iter_hf_weights
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import (
        ParallelConfig,
        data_parallel_rank_and_size,
        destroy_parallel,
        initialize_parallel,
    )
    from nemo_quagmire.rollout.base import SamplingParams
    from nemo_quagmire.rollout.distributed import gather_rank_places

    cfg = get_model_preset("tiny").replace(num_layers=1)
    sampling = SamplingParams(max_new_tokens=3, seed=100)
    mine: dict = {"rank": int(os.environ["RANK"])}
    run_dir = tempfile.mkdtemp(prefix="distributed-worker-") if mine["rank"] == 0 else None
    shared: list = [run_dir]
    initialize_parallel(cfg, ParallelConfig(tensor_model_parallel_size=2), seed=5)
    dist.broadcast_object_list(shared, src=0)
    run_dir = shared[0]

    # --- TP=2: one replica
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=2))
    hf_dir = Path(run_dir) / "hf"
    export_hf(model, hf_dir, cfg)
    place, places = gather_rank_places(data_parallel_rank_and_size()[0])
    for num_engines in (1, 2):
        engine = _start(places, place, hf_dir, run_dir, num_engines=num_engines)
        try:
            mine[f"owner_{num_engines}"] = engine.local is not None
            mine[f"rows_{num_engines}"] = _rows(engine.generate(PROMPTS, 2, sampling))
            with torch.no_grad():
                for param in model[0].parameters():
                    param.add_(0.01 * num_engines)
            engine.update_weights(iter_hf_weights(model, cfg))
            checksum = weights_checksum(iter_hf_weights(model, cfg))  # the same stream, taken again
            mine[f"pushed_token_{num_engines}"] = weights_token(checksum, cfg.vocab_size)
            mine[f"after_push_{num_engines}"] = _rows(engine.generate(PROMPTS, 1, sampling))
        finally:
            engine.close()
    mine["start_failure"] = _error(
        lambda: _start(places, place, hf_dir, run_dir, num_engines=2, fail="start")
    )
    engine = _start(places, place, hf_dir, run_dir, num_engines=2, fail="generate")
    try:
        mine["generate_failure"] = _error(lambda: engine.generate(PROMPTS, 1, sampling))
    finally:
        engine.close()

    # --- DP=2: two replicas, an engine each, each rank with its own prompts and seed
    destroy_parallel(destroy_process_group=False)
    initialize_parallel(cfg, ParallelConfig(), seed=5)
    place, places = gather_rank_places(data_parallel_rank_and_size()[0])
    engine = _start(places, place, hf_dir, run_dir)
    try:
        own = PROMPTS[mine["rank"] :: 2]
        mine["dp_owner"] = engine.local is not None
        mine["dp_rows"] = _rows(
            engine.generate(own, 2, sampling.model_copy(update={"seed": 7 + mine["rank"]}))
        )
    finally:
        engine.close()

    # --- PP=2: one replica, its stages on two ranks; the engine (rank 0) needs the layers of both
    destroy_parallel(destroy_process_group=False)
    cfg = cfg.replace(num_layers=2)
    initialize_parallel(cfg, ParallelConfig(pipeline_model_parallel_size=2), seed=5)
    model = build_model(cfg, ParallelConfig(pipeline_model_parallel_size=2))
    export_hf(model, Path(run_dir) / "hf_pp", cfg)
    place, places = gather_rank_places(data_parallel_rank_and_size()[0])
    engine = _start(places, place, Path(run_dir) / "hf_pp", run_dir)
    try:
        with torch.no_grad():
            for param in model[0].parameters():
                param.mul_(1.5)
        engine.update_weights(iter_hf_weights(model, cfg))
        mine["pp_pushed_token"] = weights_token(weights_checksum(iter_hf_weights(model, cfg)), cfg.vocab_size)
        mine["pp_after_push"] = _rows(engine.generate(PROMPTS, 1, sampling))
    finally:
        engine.close()

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
