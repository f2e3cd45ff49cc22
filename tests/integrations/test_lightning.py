"""The Lightning adapters in a real `lightning.pytorch.Trainer` on CPU: a small LightningModule (a bigram
language model with the quagmire hooks) trains two epochs; at each validation the held-out loss equals a
brute-force NLL of its current weights, Pass@k equals the callback's own result, and samples are saved."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback, eval_dir
from nemo_quagmire.data.batching import encode_example
from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.eval.benchmarks import Problem
from nemo_quagmire.eval.samples import read_samples
from nemo_quagmire.predict.runs import validation_records
from nemo_quagmire.rollout.base import SamplingParams
from tests.callbacks.scripted import TOKENIZER, handle, scripted_generate

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install lightning)")
from nemo_quagmire.integrations.lightning import (  # noqa: E402 - needs lightning
    HeldOutLossLightningCallback,
    PassAtKLightningCallback,
)

SPLITS = generate_splits(SyntheticTaskConfig(), seed=3, num_sft=32, num_rl=0, num_heldout=6)
HELDOUT = SPLITS.heldout_records()
PROBLEMS = {
    "synthetic_arith": [
        Problem("synthetic_arith", r["id"], r["problem"], r["answer"], r["solution"])
        for r in SPLITS.benchmark_records()
    ]
}
V = TOKENIZER.vocab_size


def _padded(records) -> torch.utils.data.TensorDataset:
    encoded = [encode_example(r, TOKENIZER) for r in records]
    tokens = torch.full((len(encoded), max(len(e) for e in encoded)), TOKENIZER.pad_id)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e.ids)
        mask[i, e.prompt_length : len(e)] = True
    return torch.utils.data.TensorDataset(tokens, mask)


class BigramLM(pl.LightningModule):
    """Next-token logits from the current token alone; provides the hooks the adapters call."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(V, V)

    def _next_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.table(tokens[:, :-1]).float(), dim=-1)  # [B, T-1, V]
        return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, T-1]

    def training_step(self, batch, batch_idx):
        tokens, mask = batch
        return -(self._next_logprobs(tokens) * mask[:, 1:]).sum() / mask[:, 1:].sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def quagmire_logprobs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = torch.cat([torch.zeros(len(tokens), 1), self._next_logprobs(tokens)], dim=1)  # [B, T]
        return out.masked_fill(torch.arange(tokens.shape[1]) >= lengths[:, None], 0.0)

    def quagmire_generate(self, prompts, group_size: int, sampling: SamplingParams):
        return scripted_generate(prompts, group_size, sampling)


def _brute_force_nll(module: BigramLM) -> float:
    """Token-mean NLL of the held-out responses (and EOS), read off the embedding table directly."""
    table = torch.log_softmax(module.table.weight.detach().double(), dim=-1)  # [V, V]
    total, count = 0.0, 0
    for record in HELDOUT:
        e = encode_example(record, TOKENIZER)
        total -= sum(float(table[e.ids[t - 1], e.ids[t]]) for t in range(e.prompt_length, len(e)))
        count += len(e) - e.prompt_length
    return total / count


class _Record(pl.Callback):
    """After each validation: what was logged, and the brute-force held-out loss of the current weights."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float], float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.seen.append((trainer.global_step, logged, _brute_force_nll(pl_module)))


def _passk() -> PassAtKCallback:
    return PassAtKCallback(
        PROBLEMS,
        lambda p: TOKENIZER.encode(p.problem, add_bos=True),
        num_samples=4,
        sampling=SamplingParams(max_new_tokens=32),
    )


def _trainer(tmp_path, callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_lightning_run_logs_both_predictors_at_every_validation(tmp_path):
    record = _Record()
    adapters = [
        HeldOutLossLightningCallback(HeldOutLossCallback(HELDOUT, TOKENIZER), TOKENIZER),
        PassAtKLightningCallback(_passk(), TOKENIZER),
    ]
    train = torch.utils.data.DataLoader(_padded(SPLITS.sft_records()), batch_size=8)
    val = torch.utils.data.DataLoader(_padded(HELDOUT), batch_size=8)
    _trainer(tmp_path, [*adapters, record]).fit(BigramLM(), train, val)

    assert [step for step, _, _ in record.seen] == [2, 4]  # one validation per epoch; no sanity check
    losses = [logged["val/heldout_loss/token_mean"] for _, logged, _ in record.seen]
    for (_, logged, expected), loss in zip(record.seen, losses, strict=True):
        assert loss == pytest.approx(expected, rel=1e-5)
        assert logged["val/heldout_loss/num_sequences"] == len(HELDOUT)
    assert losses[1] < losses[0]  # the weights changed between validations, and so did the loss

    reference = _passk().on_validation(handle(tmp_path / "reference"))  # same scripted policy, no Lightning
    logged = record.seen[-1][1]
    for name, value in reference.items():
        if name.startswith("val/"):
            assert logged[name] == pytest.approx(value, abs=1e-6), name
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_00000002", "step_00000004"]
    # Both adapters' numbers reach the run's metrics.jsonl, where the predictor report reads them.
    on_disk = validation_records(tmp_path)
    assert list(on_disk) == [2, 4]
    for step, logged, _ in record.seen:
        assert {k: v for k, v in logged.items() if k.startswith("val/")} == pytest.approx(on_disk[step])
    assert len(read_samples(eval_dir(tmp_path, 4) / "samples.parquet")) == 6 * 4


def test_a_module_without_the_hooks_is_refused_when_training_starts(tmp_path):
    class NoGenerate(BigramLM):
        quagmire_generate = None

    train = torch.utils.data.DataLoader(_padded(SPLITS.sft_records()), batch_size=8)
    trainer = _trainer(tmp_path, [PassAtKLightningCallback(_passk(), TOKENIZER)])
    with pytest.raises(
        TypeError, match=r"PassAtKLightningCallback needs .*\['quagmire_generate'\]; NoGenerate"
    ):
        trainer.fit(NoGenerate(), train)
