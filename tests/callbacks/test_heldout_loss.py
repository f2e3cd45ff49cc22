"""HeldOutLossCallback against a brute-force NLL under a fixed bigram policy; data-parallel shards reduce sums
and counts before dividing; bad files fail at construction naming file:line."""

from __future__ import annotations

import json
import math

import pytest

from nemo_quagmire.callbacks.heldout_loss import HeldOutDataError, HeldOutLossCallback, read_heldout_examples
from tests.callbacks.scripted import BIGRAM, TOKENIZER, handle, run_ranks

# Different response lengths, so that the token mean (long responses weigh more) and the sequence mean (each
# example weighs the same) differ.
EXAMPLES = [
    {"prompt": "12+3=", "response": "\n2+3+0=5 5\n1+0+0=1 15\n\\boxed{15}"},
    {"prompt": "7-2=", "response": "\n\\boxed{5}"},
    {"prompt": "40+41=", "response": "\n0+1+0=1 1\n4+4+0=8 81\n\\boxed{81}"},
    {"prompt": "9-9=", "response": "\n\\boxed{0}"},
    {"prompt": "", "response": "\\boxed{1}"},
]


def _brute_force(examples: list[dict[str, str]]) -> tuple[float, float]:
    """(token mean, sequence mean) of -log p(response token | previous token), EOS included."""
    total, count, per_example = 0.0, 0, []
    for example in examples:
        prompt = [TOKENIZER.bos_id, *TOKENIZER.encode(example["prompt"], add_bos=False)]
        ids = prompt + TOKENIZER.encode(example["response"], add_bos=False, add_eos=True)
        nll = [-float(BIGRAM[ids[t - 1], ids[t]]) for t in range(len(prompt), len(ids))]
        total, count = total + sum(nll), count + len(nll)
        per_example.append(sum(nll) / len(nll))
    return total / count, sum(per_example) / len(per_example)


def test_token_and_sequence_means_match_brute_force():
    metrics = HeldOutLossCallback(EXAMPLES, TOKENIZER, micro_batch_size=2).on_validation(handle())
    token_mean, seq_mean = _brute_force(EXAMPLES)
    assert metrics["val/heldout_loss/token_mean"] == pytest.approx(token_mean, rel=1e-6)
    assert metrics["val/heldout_loss/seq_mean"] == pytest.approx(seq_mean, rel=1e-6)
    assert abs(token_mean - seq_mean) > 1e-3  # the two averages are told apart by this data
    lengths = [len(e["response"]) + 1 for e in EXAMPLES]  # one token per character, plus EOS
    assert metrics["val/heldout_loss/num_tokens"] == sum(lengths)
    assert metrics["val/heldout_loss/num_sequences"] == len(EXAMPLES)


def test_data_parallel_ranks_sum_before_dividing():
    callback = HeldOutLossCallback(EXAMPLES, TOKENIZER, micro_batch_size=1)
    single = callback.on_validation(handle())

    def rank_metrics(rank, group):
        return callback.on_validation(handle(rank=rank, size=3, all_reduce_sum=group.all_reduce_sum(rank)))

    for metrics in run_ranks(3, rank_metrics):  # every rank reports the global value
        for name in ("token_mean", "seq_mean", "num_tokens", "num_sequences"):
            key = f"val/heldout_loss/{name}"
            assert metrics[key] == pytest.approx(single[key], rel=1e-12)
    # Averaging the ranks' own token means (2, 2 and 1 examples of unequal lengths) would be wrong:
    local = [callback.on_validation(handle(rank=r, size=3)) for r in range(3)]
    naive = sum(m["val/heldout_loss/token_mean"] for m in local) / 3
    assert not math.isclose(naive, single["val/heldout_loss/token_mean"], rel_tol=1e-4)


def test_a_file_reads_like_the_records_and_ignores_extra_keys(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), **e}) + "\n" for i, e in enumerate(EXAMPLES)))
    from_file = HeldOutLossCallback(path, TOKENIZER).on_validation(handle())
    from_records = HeldOutLossCallback(EXAMPLES, TOKENIZER).on_validation(handle())
    for name in ("token_mean", "seq_mean"):
        assert from_file[f"val/heldout_loss/{name}"] == from_records[f"val/heldout_loss/{name}"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "1+1="}', r"heldout.jsonl:2: missing field\(s\) \['response'\]"),
        ('{"response": "x"}', r"heldout.jsonl:2: missing field\(s\) \['prompt'\]"),
        ('{"prompt": "1+1=", "response": "  \\n"}', "heldout.jsonl:2: empty response"),
        ('{"prompt": 3, "response": "2"}', r"heldout.jsonl:2: field\(s\) \['prompt'\] must be strings"),
        ("[1, 2]", "heldout.jsonl:2: expected a JSON object"),
        ("{oops", "heldout.jsonl:2: not valid JSON"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
    with pytest.raises(HeldOutDataError, match=message):
        HeldOutLossCallback(path, TOKENIZER)


def test_empty_and_missing_files_and_records_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(HeldOutDataError, match="no examples"):
        read_heldout_examples(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="validation.heldout_file"):
        read_heldout_examples(tmp_path / "absent.jsonl")
    with pytest.raises(HeldOutDataError, match="held-out example 1: empty response"):
        HeldOutLossCallback([EXAMPLES[0], {"prompt": "1", "response": ""}], TOKENIZER)


def test_examples_longer_than_the_context_are_named():
    # Example 2 is BOS + 6 prompt characters + 32 response characters + EOS = 40 tokens; example 0 has 39.
    with pytest.raises(
        HeldOutDataError, match="held-out example 2: 40 tokens exceed the model's context of 39"
    ):
        HeldOutLossCallback(EXAMPLES, TOKENIZER, max_length=39)
    HeldOutLossCallback(EXAMPLES, TOKENIZER, max_length=40)


def test_a_chat_template_needs_a_tokenizer_that_has_one():
    with pytest.raises(ValueError, match="CharTokenizer has none: use 'plain'"):
        HeldOutLossCallback(EXAMPLES, TOKENIZER, prompt_template="chat")
