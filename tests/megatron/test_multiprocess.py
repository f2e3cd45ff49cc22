"""Tensor, pipeline and data parallelism, resharding and resume, checked on 2 gloo processes against TP=1.

One torchrun launch runs every 2-process scenario (multiprocess_worker.py); the TP=1 reference runs in this
process from the same seed, data and loss. With ``use_cpu_initialization`` a TP=2 or DP=2 model starts from
the TP=1 weights, so log-probs and losses must agree to float32 round-off (different reduction orders);
PP=2 starts from the TP=2 initial checkpoint, which also exercises resharding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron import multiprocess_worker as worker
from tests.megatron.launch import run_two_process_worker

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
LOGPROB_ATOL = 1e-5  # float32 log-softmax over 100 logits, summed in another order
TRAIN_RTOL = 1e-5  # losses and grad norms over three Adam steps at lr 1e-3


@pytest.fixture(scope="module")
def runs(megatron_world1, tmp_path_factory) -> dict:
    """The worker's results plus the TP=1 reference and a TP=1 load of the worker's TP=2 checkpoint."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import latest_checkpoint, load_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed
    from nemo_quagmire.megatron.train_step import setup_training

    workdir = tmp_path_factory.mktemp("multiprocess")
    out = workdir / "results.json"
    results = run_two_process_worker(
        worker.__file__, [str(out), str(workdir)], out, extra_env={"NEMO_QUAGMIRE_COMPAT_TRACE": "1"}
    )

    set_random_seed(worker.SEED)  # the seed a fresh TP=1 start would have
    model = build_model(worker.MODEL, ParallelConfig())
    results["ref_logprobs"], results["ref_entropy"] = worker._logprobs(model)
    results["ref_train"] = worker.train(setup_training(model, worker.OPTIM), range(worker.STEPS))
    load_checkpoint(latest_checkpoint(workdir / "trained"), model, model_cfg=worker.MODEL)
    results["tp1_trained_logprobs"], _ = worker._logprobs(model)
    return results


def _max_diff(a: list, b: list) -> float:
    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


# (scenario, worker result, value it must equal, tolerance)
MATCHES = [
    ("tp2_logprobs_match_tp1", "tp2_logprobs", "ref_logprobs", LOGPROB_ATOL),
    (
        "tp2_vocab_parallel_logprobs_match_gathered_logits",
        "tp2_logprobs",
        "tp2_gathered_logprobs",
        LOGPROB_ATOL,
    ),
    ("tp2_vocab_parallel_entropy_matches_tp1", "tp2_entropy", "ref_entropy", LOGPROB_ATOL),
    ("pp2_logprobs_from_tp2_checkpoint_match_tp1", "pp2_logprobs", "ref_logprobs", LOGPROB_ATOL),
    ("tp2_trained_checkpoint_loads_at_pp2", "pp2_trained_logprobs", "tp2_trained_logprobs", LOGPROB_ATOL),
    ("tp2_trained_checkpoint_loads_at_tp1", "tp1_trained_logprobs", "tp2_trained_logprobs", LOGPROB_ATOL),
]


@pytest.mark.parametrize(("name", "got", "expected", "atol"), MATCHES, ids=[m[0] for m in MATCHES])
def test_matches_reference(runs, name, got, expected, atol):
    assert len(runs[got]) == len(runs[expected])
    assert _max_diff(runs[got], runs[expected]) <= atol, f"{got}={runs[got]}\n{expected}={runs[expected]}"


TRAININGS = ["tp2", "dp2", "pp2"]


@pytest.mark.parametrize("metric", worker.TRAIN_METRICS)
@pytest.mark.parametrize("layout", TRAININGS, ids=[f"{t}_training_matches_tp1" for t in TRAININGS])
def test_training_matches_reference(runs, layout, metric):
    # grad_norm checks the gradient's scale: each micro-batch loss is globally normalised, so summing over
    # micro-batches and DP ranks (not averaging) must give the TP=1 full-batch gradient. The entropy (a
    # token mean, vocab-parallel at TP=2) and logprob_max (a max: summed over the DP=2 ranks it would be
    # twice as negative) must combine over micro-batches and ranks to the full-batch values.
    got, expected = runs[f"{layout}_train"][metric], runs["ref_train"][metric]
    assert got == pytest.approx(expected, rel=TRAIN_RTOL), f"{layout} {metric}: {got} vs {expected}"


def test_training_changes_the_model(runs):
    # Guards the comparisons above against a no-op optimizer: the losses and log-probs must move.
    assert _max_diff(runs["tp2_trained_logprobs"], runs["tp2_logprobs"]) > 1e-3
    assert runs["ref_train"]["loss"][0] != runs["ref_train"]["loss"][-1]


def test_resume_repeats_the_uninterrupted_run_exactly(runs):
    # Same layout, model + optimizer + scheduler + RNG restored: the float32 arithmetic is replayed exactly.
    resumed, uninterrupted = runs["tp2_resumed_train"], runs["tp2_train"]
    assert resumed["loss"] == uninterrupted["loss"][worker.RESUME_AT :]
    assert resumed["grad_norm"] == uninterrupted["grad_norm"][worker.RESUME_AT :]


def test_optimizer_state_refuses_another_tp_pp(runs):
    message = runs["pp2_optimizer_load_error"]
    assert message is not None and "TP=2, PP=1" in message and "TP=1, PP=2" in message
    assert "load_optimizer_state=False" in message


def test_compat_redirects_the_multiprocess_call_sites(runs):
    sites = "\n".join(runs["compat_sites"])
    for expected in (
        "p2p_communication.py",
        "mappings.py",
        "schedules.py",
        "param_and_grad_buffer.py",
        "state_dict_saver.py",
        "Tensor.type() at megatron/core/optimizer/clip_grads.py",
    ):
        assert expected in sites, f"{expected} not redirected; sites:\n{sites}"
