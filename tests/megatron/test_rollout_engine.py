"""MegatronRolloutEngine against brute force: generation without a KV cache, the trainer's log-probs, and the
exact sampling distribution; plus TP=2 and DP=2 (one torchrun launch, rollout_worker.py) against TP=1.

The model is the `tiny` preset with random weights (seeded): its next-token distributions are broad, so
sampled completions differ from seed to seed, and greedy completions wander over the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine, sample_tokens
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from tests.megatron import rollout_worker as worker
from tests.megatron.launch import run_two_process_worker

REPO = Path(__file__).resolve().parents[2]
MODEL = worker.MODEL
PAD_ID, EOS_ID = worker.PAD_ID, worker.EOS_ID
PROMPTS = worker.PROMPTS
LOGPROB_ATOL = 1e-5  # float32 log-softmax over 100 logits; cached/left-padded vs. full recomputation


def _build_model():
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed

    set_random_seed(worker.SEED)  # the weights do not depend on which tests ran before
    return build_model(MODEL, ParallelConfig())


@pytest.fixture(scope="module")
def model(megatron_world1):
    return _build_model()


def _engine(model, **kwargs) -> MegatronRolloutEngine:
    return MegatronRolloutEngine(model, MODEL, pad_id=PAD_ID, eos_id=kwargs.pop("eos_id", EOS_ID), **kwargs)


def _greedy_reference(model, prompts, steps, stop_ids=()) -> tuple[list[list[int]], list[list[float]]]:
    """Brute force: for every new token, a full forward pass (no cache, no left padding) over each row's whole
    sequence, argmax of the last position, its log-softmax (T = 1); a row stops after a stop id."""
    from nemo_quagmire.megatron.logprobs import forward_logits

    sequences, logprobs = [list(p) for p in prompts], [[] for _ in prompts]
    running = [True] * len(prompts)
    for _ in range(steps):
        width = max(map(len, sequences))
        tokens = torch.tensor([s + [PAD_ID] * (width - len(s)) for s in sequences])  # right-padded
        with torch.no_grad():
            logits = forward_logits(model[0], tokens)  # [n, width, V]
        for row, sequence in enumerate(sequences):
            if running[row]:
                log_p = torch.log_softmax(logits[row, len(sequence) - 1].float(), dim=-1)
                token = int(log_p.argmax())
                sequence.append(token)
                logprobs[row].append(float(log_p[token]))
                running[row] = token not in stop_ids
    return sequences, logprobs


def _assert_layout(batch: RolloutBatch, prompts, group_size: int) -> None:
    """Rows grouped by prompt, prompt ids first, right padding with PAD_ID and zero log-probs."""
    rows = len(prompts) * group_size
    assert batch.tokens.shape[0] == rows and batch.tokens.shape == batch.logprobs.shape
    assert batch.tokens.shape[1] == int(batch.lengths.max())
    assert batch.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(group_size)]
    assert batch.prompt_lengths.tolist() == [len(prompts[i]) for i in batch.prompt_index.tolist()]
    for row, prompt_id in enumerate(batch.prompt_index.tolist()):
        assert batch.tokens[row, : len(prompts[prompt_id])].tolist() == prompts[prompt_id]
    beyond = torch.arange(batch.tokens.shape[1]) >= batch.lengths[:, None]
    assert (batch.tokens[beyond] == PAD_ID).all()
    assert (batch.logprobs[~batch.completion_mask] == 0).all()
    assert (batch.logprobs[batch.completion_mask] < 0).all()


def test_implements_the_rollout_interface(model):
    engine = _engine(model)
    assert isinstance(engine, RolloutEngine) and engine.shares_policy_weights
    before = [p.detach().clone() for p in model[0].parameters()]
    engine.update_weights([("model.embed_tokens.weight", torch.zeros(MODEL.vocab_size, MODEL.hidden_size))])
    assert all(torch.equal(a, b) for a, b in zip(before, model[0].parameters(), strict=True))


def test_greedy_matches_argmax_recomputed_without_cache(model):
    steps = 10
    batch = _engine(model).generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=steps))
    rows = [p for p in PROMPTS for _ in range(2)]
    expected, expected_logprobs = _greedy_reference(model, rows, steps, stop_ids=(EOS_ID,))
    assert batch.completion_ids() == [s[len(p) :] for s, p in zip(expected, rows, strict=True)]
    assert batch.lengths.tolist() == [len(s) for s in expected]
    assert batch.truncated.tolist() == [s[-1] != EOS_ID for s in expected]
    got = batch.logprobs[batch.completion_mask]
    torch.testing.assert_close(got, torch.tensor(sum(expected_logprobs, [])), atol=LOGPROB_ATOL, rtol=0)
    _assert_layout(batch, PROMPTS, 2)


def test_stop_tokens_end_rows_which_then_stay_padded(model):
    # The stop token is one that prompt 0's greedy completion emits at its 2nd step, so prompt 0's rows stop
    # there (a quarter of the rows: the engine drops them from its batch) while rows whose completion never
    # contains it run to the budget; rows must still match the brute-force continuation cut at the stop.
    steps = 12
    no_stop, _ = _greedy_reference(model, PROMPTS, steps)
    completions = [s[len(p) :] for s, p in zip(no_stop, PROMPTS, strict=True)]
    stop = completions[0][1]
    assert completions[0][0] != stop, "test data: prompt 0 must stop at its 2nd token"
    assert any(stop not in c for c in completions), "test data: some row must run to the budget"
    unused = next(t for t in range(MODEL.vocab_size) if all(t not in c for c in completions))

    for eos_id, extra_stops in ((stop, ()), (unused, (stop,))):  # the tokenizer's EOS, or an extra stop id
        sampling = SamplingParams(temperature=0.0, max_new_tokens=steps, stop_token_ids=extra_stops)
        batch = _engine(model, eos_id=eos_id).generate(PROMPTS, 4, sampling)
        expected = [c[: c.index(stop) + 1] if stop in c else c for c in completions for _ in range(4)]
        assert batch.completion_ids() == expected
        assert batch.lengths[:4].tolist() == [len(PROMPTS[0]) + 2] * 4
        assert batch.truncated.tolist() == [c[-1] != stop for c in expected]
        assert batch.truncated.any() and not batch.truncated.all()
        _assert_layout(batch, PROMPTS, 4)


def test_each_distinct_prompt_is_prefilled_once(model, monkeypatch):
    # 3 prompts x 4 samples, the first prompt given twice: 12 rows, 2 distinct prompts to prefill. (The
    # greedy test above checks that rows copied from a shared prefill generate what a full recompute does.)
    engine = _engine(model)
    forwarded = []
    real_forward = engine._forward

    def recording_forward(tokens, *args):
        forwarded.append(tuple(tokens.shape))
        return real_forward(tokens, *args)

    monkeypatch.setattr(engine, "_forward", recording_forward)
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[0]]
    batch = engine.generate(prompts, 4, SamplingParams(temperature=0.0, max_new_tokens=3))
    longest = max(map(len, prompts))
    assert forwarded[0] == (2, longest)  # the prefill
    assert forwarded[1:] == [(12, 1), (12, 1)]  # every row decodes
    assert batch.completion_ids()[:4] == batch.completion_ids()[8:]  # same prompt, same greedy completion


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_are_the_trainers_tempered_logprobs(model, temperature, top_p):
    from nemo_quagmire.megatron.logprobs import compute_logprobs

    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12, seed=3)
    batch = _engine(model).generate(PROMPTS, 4, sampling)
    _assert_layout(batch, PROMPTS, 4)
    recomputed = compute_logprobs(
        model, batch.tokens, batch.lengths, micro_batch_size=8, temperature=temperature
    )
    mask = batch.completion_mask
    torch.testing.assert_close(batch.logprobs[mask], recomputed.logprobs[mask], atol=LOGPROB_ATOL, rtol=0)


def test_seeds_reproduce_and_differ(model):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    first = _engine(model).generate(PROMPTS, 4, sampling)
    again = _engine(model, seed=99).generate(PROMPTS, 4, sampling)  # the call's seed wins
    other = _engine(model).generate(PROMPTS, 4, sampling.model_copy(update={"seed": 12}))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other.tokens)
    # Rows of one prompt are independent draws: the 4 rows of prompt 0 are not all alike.
    assert len({tuple(c) for c in first.completion_ids()[:4]}) > 1

    unseeded = sampling.model_copy(update={"seed": None})
    engine = _engine(model, seed=5)
    stream = [engine.generate(PROMPTS, 4, unseeded).tokens for _ in range(2)]
    assert not torch.equal(stream[0], stream[1])  # the engine's stream advances from call to call
    assert torch.equal(_engine(model, seed=5).generate(PROMPTS, 4, unseeded).tokens, stream[0])


def test_tiny_top_p_samples_the_argmax(model):
    # A nucleus of mass 1e-6 holds only the most likely token; log-probs are still those of the full
    # distribution at T = 1, i.e. what greedy decoding reports.
    greedy = _engine(model).generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=8))
    nucleus = _engine(model).generate(PROMPTS, 2, SamplingParams(top_p=1e-6, max_new_tokens=8, seed=1))
    assert torch.equal(nucleus.tokens, greedy.tokens)
    torch.testing.assert_close(nucleus.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


def test_small_max_batch_size_splits_into_passes_with_the_same_result(model):
    # 4 prompts x 3 = 12 rows in passes of at most 5 rows (5 + 5 + 2 -> balanced 4 + 4 + 4).
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    whole = _engine(model).generate(PROMPTS, 3, sampling)
    split = _engine(model, max_batch_size=5).generate(PROMPTS, 3, sampling)
    assert torch.equal(split.tokens, whole.tokens) and torch.equal(split.lengths, whole.lengths)
    torch.testing.assert_close(split.logprobs, whole.logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_generation_runs_in_eval_mode_and_leaves_the_model_trainable(megatron_world1):
    from nemo_quagmire.megatron.logprobs import forward_logits

    model = _build_model()
    model[0].train()
    modes = []
    handle = model[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    batch = _engine(model).generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, seed=0))
    handle.remove()
    assert modes and not any(modes) and model[0].training
    fields = (
        batch.tokens,
        batch.prompt_lengths,
        batch.lengths,
        batch.logprobs,
        batch.truncated,
        batch.prompt_index,
    )
    assert not any(t.is_inference() for t in fields)  # the trainer may save them for backward
    # Caches megatron filled under torch.inference_mode (rotary tables, attention buffers) must not leak
    # inference tensors into autograd: same sequence length as the generation above.
    forward_logits(model[0], batch.tokens).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model[0].parameters())


def test_sample_tokens_draws_from_the_tempered_nucleus():
    # 4 tokens with probabilities (T = 0.5) proportional to exp(2 * logits) = [0.6439, 0.2369, 0.0871, 0.0321]
    # (normalised). top_p = 0.85 keeps the smallest prefix reaching 0.85: tokens 0 and 1 (0.881), so the
    # draws follow [0.731, 0.269, 0, 0]; with top_p = 1 they follow the full tempered distribution.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5]).expand(40_000, 4)
    tempered = torch.softmax(logits[0] / 0.5, dim=-1)
    for top_p, expected in (
        (1.0, tempered),
        (0.85, torch.cat([tempered[:2] / tempered[:2].sum(), torch.zeros(2)])),
    ):
        generator = torch.Generator().manual_seed(0)
        tokens, log_probs = sample_tokens(logits, temperature=0.5, top_p=top_p, generator=generator)
        frequencies = torch.bincount(tokens, minlength=4) / len(tokens)
        torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)  # ~4 standard errors
        torch.testing.assert_close(log_probs[0], tempered.log())  # full, not truncated
    greedy, greedy_log_probs = sample_tokens(logits[:2], temperature=0.0, top_p=0.5, generator=generator)
    assert greedy.tolist() == [0, 0]
    torch.testing.assert_close(greedy_log_probs[0], torch.log_softmax(logits[0], dim=-1))


@pytest.mark.parametrize(
    ("prompts", "sampling", "message"),
    [
        ([], SamplingParams(), "prompts is empty"),
        ([[3], []], SamplingParams(), "prompt 1 is empty"),
        ([[3, 100]], SamplingParams(), "outside the vocabulary"),
        ([[3]], SamplingParams(stop_token_ids=(-1,)), "stop_token_ids"),
        ([[3] * 100], SamplingParams(max_new_tokens=29), "max_position_embeddings=128"),
    ],
)
def test_rejects_bad_requests(model, prompts, sampling, message):
    with pytest.raises(ValueError, match=message):
        _engine(model).generate(prompts, 2, sampling)


def test_rejects_bad_construction(model):
    with pytest.raises(ValueError, match="eos_id=100"):
        _engine(model, eos_id=100)
    with pytest.raises(ValueError, match="max_batch_size"):
        _engine(model, max_batch_size=0)


# --- two processes (TP=2, DP=2, PP=2): one torchrun launch -----------------------------------------------


@pytest.fixture(scope="module")
def two_process_runs(megatron_world1, tmp_path_factory) -> dict:
    """The worker's results (weights exported from this process's TP=1 model) and the TP=1 batches."""
    from nemo_quagmire.megatron.hf import export_hf

    workdir = tmp_path_factory.mktemp("rollout_tp2")
    model = _build_model()
    export_hf(model, workdir / "hf", MODEL)
    out = workdir / "results.json"
    results = run_two_process_worker(worker.__file__, [str(workdir / "hf"), str(out)], out)
    engine = MegatronRolloutEngine(model, MODEL, pad_id=PAD_ID, eos_id=EOS_ID, seed=worker.SEED)
    results["tp1_greedy"] = worker.batch_to_json(engine.generate(PROMPTS, worker.GROUP_SIZE, worker.GREEDY))
    results["tp1_sampled"] = worker.batch_to_json(engine.generate(PROMPTS, worker.GROUP_SIZE, worker.SAMPLED))
    return results


@pytest.mark.distributed
def test_tp2_ranks_agree(two_process_runs):
    # Tokens are broadcast from TP rank 0 and every rank gathers the same full logits: identical batches.
    rank0, rank1 = (results["tp2"] for results in two_process_runs["per_rank"])
    for scenario in ("greedy", "sampled", "stream"):
        assert rank0[scenario] == rank1[scenario], f"TP ranks disagree on {scenario}"


@pytest.mark.distributed
def test_tp2_greedy_equals_tp1(two_process_runs):
    tp2, tp1 = two_process_runs["per_rank"][0]["tp2"]["greedy"], two_process_runs["tp1_greedy"]
    for field in ("tokens", "lengths", "prompt_lengths", "truncated", "prompt_index"):
        assert tp2[field] == tp1[field], field
    torch.testing.assert_close(
        torch.tensor(tp2["logprobs"]), torch.tensor(tp1["logprobs"]), atol=LOGPROB_ATOL, rtol=0
    )


@pytest.mark.distributed
def test_tp2_sampling_is_seeded_like_tp1_and_scored_like_the_trainer(two_process_runs):
    # Same seed and weights: the uniforms are the same and the TP=2 logits differ from TP=1 by round-off, so
    # the draws coincide unless a uniform falls within ~1e-6 of a CDF boundary (odds ~1e-4 per batch).
    tp2, tp1 = two_process_runs["per_rank"][0]["tp2"], two_process_runs["tp1_sampled"]
    assert tp2["sampled"]["tokens"] == tp1["tokens"]
    mask = RolloutBatch(**{k: torch.tensor(v) for k, v in tp2["sampled"].items()}).completion_mask
    got, recomputed = (
        torch.tensor(tp2["sampled"]["logprobs"]),
        torch.tensor(tp2["sampled_recomputed_logprobs"]),
    )
    torch.testing.assert_close(got[mask], recomputed[mask], atol=LOGPROB_ATOL, rtol=0)
    assert tp2["stream"]["tokens"] != tp2["sampled"]["tokens"]


@pytest.mark.distributed
def test_dp2_replicas_draw_different_random_numbers(two_process_runs):
    # Same prompts and seed on both replicas: the data-parallel offset of the seed makes their draws differ,
    # and replica 0 (offset 0) repeats the one-process run.
    replica0, replica1 = (results["dp2_sampled"] for results in two_process_runs["per_rank"])
    assert replica0["tokens"] == two_process_runs["tp1_sampled"]["tokens"]
    assert replica1["tokens"] != replica0["tokens"]


@pytest.mark.distributed
def test_pp2_is_refused_with_a_way_out(two_process_runs):
    message = two_process_runs["pp2_error"]
    assert message is not None and "PP=2" in message and "vLLM" in message
