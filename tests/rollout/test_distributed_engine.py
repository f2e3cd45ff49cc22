"""DistributedRolloutEngine on 2 real gloo processes, with fake-engine servers (base venv; the vLLM version of
the whole GRPO run is test_grpo_vllm_multirank.py). One torchrun launch (distributed_worker.py) at TP=2 (one
replica: 1 engine, then 2), at DP=2 (2 replicas, an engine each) and at PP=2 (weights from both stages).

Expected rows are computed here from the fake engine's rule (completion of prompt i, group member m:
``expected_completion((seed + i) * 1000 + m, checksum, ...)``), so seeds or weights that go astray show up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.megatron.launch import run_two_process_worker
from tests.rollout.distributed_worker import PROMPTS
from tests.rollout.fake_engine import FIRST_FREE_ID

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed") / "out.json"
    return run_two_process_worker(WORKER, [str(out)], out)


def _completions(rows: dict) -> list[list[int]]:
    return [tokens[len(PROMPTS[i]) :] for tokens, i in zip(rows["tokens"], rows["index"], strict=True)]


def test_rows_do_not_depend_on_the_number_of_engines(ranks):
    """TP=2, one replica: 1 engine (rank 0), then 2 (ranks 0 and 1, each generating a part of the prompts):
    both TP ranks get the same rows, and the same rows either way."""
    first, second = ranks
    assert (first["owner_1"], second["owner_1"]) == (True, False)
    assert (first["owner_2"], second["owner_2"]) == (True, True)
    for rank in ranks:
        assert rank["rows_1"] == rank["rows_2"] == first["rows_1"]
    rows = first["rows_1"]
    assert rows["index"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for tokens, i in zip(rows["tokens"], rows["index"], strict=True):
        assert tokens[: len(PROMPTS[i])] == PROMPTS[i]
    completions = _completions(rows)
    assert len({tuple(c[1:]) for c in completions}) == len(completions)  # every row has its own seed


def test_pushed_tp_sharded_weights_reach_every_engine(ranks):
    for num_engines in (1, 2):
        for rank in ranks:
            token = rank[f"pushed_token_{num_engines}"]
            assert token >= FIRST_FREE_ID
            # the first completion token of every row encodes the checksum of the weights the engine holds
            assert {c[0] for c in _completions(rank[f"after_push_{num_engines}"])} == {token}
    assert ranks[0]["pushed_token_1"] != ranks[0]["pushed_token_2"]  # the second push changed the weights


def test_pushed_pp_staged_weights_reach_the_engine(ranks):
    """PP=2: rank 0 owns the engine and holds only the first stage; iter_hf_weights broadcasts the rest."""
    for rank in ranks:
        assert {c[0] for c in _completions(rank["pp_after_push"])} == {rank["pp_pushed_token"]}
    assert ranks[0]["pp_pushed_token"] == ranks[1]["pp_pushed_token"]


def test_failures_reach_every_rank_of_the_replica(ranks):
    first, second = ranks
    cause = "ValueError: rank 1 cannot start its engine"
    assert first["start_failure"] == f"RuntimeError: the rollout engine of rank 1 did not start: {cause}"
    assert second["start_failure"] == cause
    assert first["generate_failure"].startswith(
        "RuntimeError: generate failed on the rollout engine of rank 1: EngineServerError: the vLLM server"
    )
    assert second["generate_failure"].startswith("EngineServerError: the vLLM server")
    assert "exiting on purpose" in second["generate_failure"]


def test_data_parallel_replicas_generate_their_own_prompts(ranks):
    for rank in ranks:
        assert rank["dp_owner"]
        own = PROMPTS[rank["rank"] :: 2]
        rows = rank["dp_rows"]
        assert rows["index"] == [i for i in range(len(own)) for _ in range(2)]
        for tokens, i in zip(rows["tokens"], rows["index"], strict=True):
            assert tokens[: len(own[i])] == own[i]
