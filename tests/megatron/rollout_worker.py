"""Two-process rollout scenarios (gloo, CPU), run by test_rollout_engine.py through one torchrun launch.

Launch start-up costs ~10 s of imports, so every scenario runs in the same two processes: at TP=2, greedy
and seeded sampled generation (plus the engine's own stream) from weights the test exported from its TP=1
model, and the log-probs ``compute_logprobs`` gives the sampled batch; at DP=2, seeded sampling on both
replicas; at PP=2, the engine's refusal.
Rank 0 writes the results as JSON, each rank's batches included (gathered), so the test can check that the
TP ranks agree and compare with TP=1. The shared definitions (model, prompts, sampling) live here.

    python -m torch.distributed.run --nproc_per_node 2 tests/rollout/rollout_worker.py HF_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams

MODEL = get_model_preset("tiny")
SEED = 1234
PAD_ID = 0
EOS_ID = 1
PROMPTS = [[5, 17, 42], [60, 2, 33, 71, 8, 9, 10], [99], [23, 45, 67, 89, 12]]  # ragged, incl. 1 token
GROUP_SIZE = 3
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)


def batch_to_json(batch: RolloutBatch) -> dict[str, list]:
    return {
        "tokens": batch.tokens.tolist(),
        "prompt_lengths": batch.prompt_lengths.tolist(),
        "lengths": batch.lengths.tolist(),
        "logprobs": batch.logprobs.tolist(),
        "truncated": batch.truncated.tolist(),
        "prompt_index": batch.prompt_index.tolist(),
    }


def run(hf_dir: Path) -> dict:
    import torch.distributed as dist

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.hf import load_hf_weights
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import destroy_parallel, initialize_parallel
    from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine

    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    initialize_parallel(MODEL, tp2, seed=SEED)
    model = build_model(MODEL, tp2)
    load_hf_weights(model, hf_dir, MODEL)
    engine = MegatronRolloutEngine(model, MODEL, pad_id=PAD_ID, eos_id=EOS_ID, seed=SEED)
    greedy = engine.generate(PROMPTS, GROUP_SIZE, GREEDY)
    sampled = engine.generate(PROMPTS, GROUP_SIZE, SAMPLED)
    from_stream = engine.generate(PROMPTS, GROUP_SIZE, SAMPLED.model_copy(update={"seed": None}))
    recomputed = compute_logprobs(
        model, sampled.tokens, sampled.lengths, micro_batch_size=len(sampled.tokens), temperature=1.0
    )
    tp2_results = {
        "greedy": batch_to_json(greedy),
        "sampled": batch_to_json(sampled),
        "stream": batch_to_json(from_stream),
        "sampled_recomputed_logprobs": recomputed.logprobs.tolist(),
    }
    destroy_parallel(destroy_process_group=False)

    dp2 = ParallelConfig()
    initialize_parallel(MODEL, dp2, seed=SEED)
    model = build_model(MODEL, dp2)
    load_hf_weights(model, hf_dir, MODEL)
    engine = MegatronRolloutEngine(model, MODEL, pad_id=PAD_ID, eos_id=EOS_ID, seed=SEED)
    dp2_sampled = batch_to_json(engine.generate(PROMPTS, GROUP_SIZE, SAMPLED))
    destroy_parallel(destroy_process_group=False)

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_parallel(MODEL, pp2, seed=SEED)
    try:
        MegatronRolloutEngine(build_model(MODEL, pp2), MODEL, pad_id=PAD_ID, eos_id=EOS_ID)
        pp2_error = None
    except NotImplementedError as error:
        pp2_error = str(error)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"tp2": tp2_results, "dp2_sampled": dp2_sampled})
    destroy_parallel(destroy_process_group=True)
    return {"per_rank": per_rank, "pp2_error": pp2_error}


def main() -> None:
    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = run(hf_dir)
    if os.environ["RANK"] == "0":
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
