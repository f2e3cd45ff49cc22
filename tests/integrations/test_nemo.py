"""A real NeMo 2 `llm.finetune` on CPU with both callbacks attached (runs in CI's NeMo stage,
.ci/nemo-stage.sh; skipped where nemo-toolkit is not installed).

The run: a 2-layer `QuagmireGPTModel` (NeMo's `llm.GPTModel` with the quagmire hooks) fine-tunes 4 steps on
the synthetic task's SFT examples through NeMo's own `FineTuningDataModule`, `MegatronStrategy`, optimizer and
trainer, tokenized by a real BPE tokenizer of 300 ids that NeMo pads to 384 logits. Validation runs at steps 2
and 4. What is checked against an independent computation:

- the logged held-out loss equals, within 1e-6, a float64 NLL of a plain forward of the megatron module at
  that moment, one unpadded example at a time (no pipeline schedule, no project log-prob code);
- the logged pass@k equal the unbiased estimator recomputed with `math.comb` from a fresh grading of the
  samples the callback saved;
- generation samples only the tokenizer's ids, even when the 84 padding logits dominate.

CPU-only shims of NeMo internals: tests/integrations/nemo_cpu_shims.py (each named and explained there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.nemo, pytest.mark.slow]
llm = pytest.importorskip("nemo.collections.llm", reason="nemo-toolkit is not installed (.ci/nemo-stage.sh)")

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback  # noqa: E402
from nemo_quagmire.callbacks.passk import PassAtKCallback  # noqa: E402
from nemo_quagmire.data.batching import encode_example  # noqa: E402
from nemo_quagmire.data.hf_tokenizer import HFTokenizer  # noqa: E402
from nemo_quagmire.data.synthetic import BENCHMARK_NAME, SyntheticTaskConfig, generate_splits  # noqa: E402
from nemo_quagmire.eval.benchmarks import Problem  # noqa: E402
from nemo_quagmire.integrations.lightning import (  # noqa: E402
    HeldOutLossLightningCallback,
    PassAtKLightningCallback,
)
from nemo_quagmire.integrations.nemo import QuagmireGPTModel  # noqa: E402
from nemo_quagmire.predict.runs import validation_records  # noqa: E402
from nemo_quagmire.rollout.base import SamplingParams  # noqa: E402
from tests.integrations.nemo_cpu_shims import cpu_data_step, nemo_on_cpu  # noqa: E402
from tests.integrations.pass_at_k_reference import regraded_pass_at_k  # noqa: E402
from tests.integrations.tiny_tokenizer import VOCAB_SIZE, write_tokenizer  # noqa: E402

SPLITS = generate_splits(SyntheticTaskConfig(), seed=3, num_sft=64, num_rl=0, num_heldout=8)
NUM_SAMPLES = 4
SEQ_LENGTH = 128
PADDED_VOCAB = 384  # 300 rounded up to NeMo's make_vocab_size_divisible_by=128


def _config():
    """A 2-layer Llama-shaped GPT for CPU: local (non-Transformer-Engine) layers, no fused kernels, fp32."""
    config = llm.GPTConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        seq_length=SEQ_LENGTH,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        position_embedding_type="rope",
        add_bias_linear=False,
        share_embeddings_and_output_weights=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        bf16=False,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    config.data_step_fn = cpu_data_step(config.data_step_fn)  # shim 3 of nemo_cpu_shims
    return config


class _Record:
    """Lightning callback: after each validation, what was logged and an independent held-out NLL."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        import lightning.pytorch as pl

        class Recorder(pl.Callback):
            def on_validation_end(inner, trainer, pl_module) -> None:  # noqa: N805 - closure over self
                if not trainer.sanity_checking:
                    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
                    self.seen.append((trainer.global_step, logged, _independent_nll(pl_module, tokenizer)))

        self.seen: list[tuple[int, dict[str, float], float]] = []
        self.callback = Recorder()


@torch.no_grad()
def _independent_nll(pl_module, tokenizer: HFTokenizer) -> float:
    """Token-mean NLL of the held-out responses (and EOS): the megatron module's logits for each example
    alone (no padding), log-softmax in float64 over all 384 logits (the distribution NeMo trains)."""
    module = pl_module.module
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for record in SPLITS.heldout_records():
        example = encode_example(record, tokenizer)
        tokens = torch.tensor([example.ids])  # [1, T]
        logits = module(tokens, torch.arange(len(example))[None], None)  # [1, T, 384]
        assert logits.shape[-1] == PADDED_VOCAB
        logp = torch.log_softmax(logits[0].double(), dim=-1)  # [T, 384]
        for t in range(example.prompt_length, len(example)):
            total -= float(logp[t - 1, example.ids[t]])
            count += 1
    module.train(was_training)
    return total / count


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Run `llm.finetune` once; return (run dir, recorder, tokenizer, trained model)."""
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    root = tmp_path_factory.mktemp("nemo-finetune")
    tokenizer_dir = write_tokenizer(root / "tokenizer")
    data_dir = root / "data"
    data_dir.mkdir()
    for name, records in (("training", SPLITS.sft_records()), ("validation", SPLITS.sft_records()[:16])):
        lines = [json.dumps({"input": r["prompt"], "output": r["response"]}) for r in records]
        (data_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    nemo_tokenizer = AutoTokenizer(str(tokenizer_dir))
    tokenizer = HFTokenizer(tokenizer_dir)
    problems = [
        Problem(BENCHMARK_NAME, r["id"], r["problem"], r["answer"], r["solution"])
        for r in SPLITS.benchmark_records()
    ]
    passk = PassAtKCallback(
        {BENCHMARK_NAME: problems},
        lambda p: tokenizer.encode(p.problem, add_bos=True),
        num_samples=NUM_SAMPLES,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=48),
        grader_workers=0,
    )
    record = _Record(tokenizer)
    run_dir = root / "run"
    trainer = nl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        strategy=nl.MegatronStrategy(ckpt_async_save=False),
        plugins=nl.MegatronMixedPrecision(precision="32"),
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        callbacks=[
            HeldOutLossLightningCallback(HeldOutLossCallback(SPLITS.heldout_records(), tokenizer), tokenizer),
            PassAtKLightningCallback(passk, tokenizer),
            record.callback,
        ],
    )
    model = QuagmireGPTModel(_config(), tokenizer=nemo_tokenizer)
    data = llm.FineTuningDataModule(
        dataset_root=data_dir,
        seq_length=SEQ_LENGTH,
        tokenizer=nemo_tokenizer,
        micro_batch_size=4,
        global_batch_size=8,
        num_workers=0,
        pin_memory=False,
    )
    optim = nl.MegatronOptimizerModule(
        config=OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=False)
    )
    with nemo_on_cpu():
        llm.finetune(
            model=model, data=data, trainer=trainer, optim=optim, log=nl.NeMoLogger(log_dir=str(run_dir))
        )
        yield Path(trainer.default_root_dir), record, tokenizer, model


def test_the_logged_heldout_loss_equals_an_independent_forward(finetuned):
    _, record, _, _ = finetuned
    assert [step for step, _, _ in record.seen] == [2, 4]
    for _, logged, expected in record.seen:
        assert logged["val/heldout_loss/token_mean"] == pytest.approx(expected, abs=1e-6)
        assert logged["val/heldout_loss/num_sequences"] == len(SPLITS.heldout_records())
    first, last = (logged["val/heldout_loss/token_mean"] for _, logged, _ in record.seen)
    assert first != last  # the weights changed between validations, and so did the loss


def test_the_logged_values_reach_the_run_metrics_file_the_predictor_reads(finetuned):
    run_dir, record, _, _ = finetuned
    on_disk = validation_records(run_dir)
    assert list(on_disk) == [2, 4]
    for step, logged, _ in record.seen:
        assert {k: v for k, v in logged.items() if k.startswith("val/")} == pytest.approx(on_disk[step])


def test_the_logged_pass_at_k_equals_grading_the_saved_samples(finetuned):
    run_dir, record, _, _ = finetuned
    logged = record.seen[-1][1]
    expected, num_read = regraded_pass_at_k(run_dir / "eval" / "step_00000004", NUM_SAMPLES, (1, 2, 4))
    assert num_read == len(SPLITS.heldout_records()) * NUM_SAMPLES
    for k, value in expected.items():
        assert logged[f"val/{BENCHMARK_NAME}/pass@{k}"] == pytest.approx(value, abs=1e-9)


def test_generation_samples_only_the_tokenizers_ids(finetuned):
    _, _, tokenizer, model = finetuned
    output = model.module.output_layer.weight
    saved = output.detach().clone()
    with torch.no_grad():
        output[VOCAB_SIZE:] = 10.0 * output[:VOCAB_SIZE].abs().max()  # padding logits would win everywhere
    try:
        prompts = [tokenizer.encode(r["prompt"], add_bos=True) for r in SPLITS.heldout_records()[:2]]
        sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1)
        batch = model.quagmire_generate(prompts, 8, sampling)
    finally:
        with torch.no_grad():
            output.copy_(saved)
    assert bool((batch.lengths > batch.prompt_lengths).all())  # every row generated something
    assert int(batch.tokens.max()) < VOCAB_SIZE  # prompts, completions and right padding alike
