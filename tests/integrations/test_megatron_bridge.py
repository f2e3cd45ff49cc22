"""The Megatron-Bridge adapters, on CPU against a faithful fake of Bridge's callback machinery, and for real
(`gpu`) where CUDA and megatron-bridge exist.

The fake is modelled on NVIDIA-NeMo/Megatron-Bridge@067f987df03b8355b03192d88d70f1709fedf51a:

- src/megatron/bridge/training/callbacks.py: `CallbackContext` (its fields), `Callback` (no-op methods for
  every event) and `CallbackManager.add` / `fire` (a method is registered when it is not the base class's:
  `method.__func__ is not base_method`), reproduced below;
- src/megatron/bridge/training/state.py: `GlobalState.train_state.step`, and `tensorboard_logger` /
  `wandb_logger` (None unless configured, and on ranks other than the last);
- src/megatron/bridge/training/eval.py `evaluate`: every chunk to eval mode, the eval loop, `total_loss_dict`
  of averaged losses, `on_eval_end` fired with it, every chunk back to train mode.

The model chunks are megatron-core `GPTModel`s wrapped in megatron's `DistributedDataParallel`, as Bridge's
`get_model` returns them, with a vocabulary padded to 128 past the tokenizer's 28 ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.data.batching import encode_example
from nemo_quagmire.data.synthetic import BENCHMARK_NAME, SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.benchmarks import Problem
from nemo_quagmire.eval.samples import read_samples
from nemo_quagmire.integrations.megatron_bridge import HeldOutLossBridgeCallback, PassAtKBridgeCallback
from nemo_quagmire.integrations.megatron_policy import MegatronChunksPolicy
from nemo_quagmire.predict.runs import validation_records
from nemo_quagmire.rollout.base import SamplingParams
from tests.integrations.pass_at_k_reference import regraded_pass_at_k

TOKENIZER = CharTokenizer()
PADDED_VOCAB = 128
SPLITS = generate_splits(SyntheticTaskConfig(), seed=5, num_sft=0, num_rl=0, num_heldout=6)
PROBLEMS = [
    Problem(BENCHMARK_NAME, r["id"], r["problem"], r["answer"], r["solution"])
    for r in SPLITS.benchmark_records()
]
NUM_SAMPLES = 4

# --- the fake of Megatron-Bridge's callback machinery (see the module docstring) ---------------------------
VALID_EVENTS = frozenset(
    {
        "on_data_init_start",
        "on_train_start",
        "on_train_step_start",
        "on_train_step_end",
        "on_train_end",
        "on_eval_start",
        "on_eval_step_start",
        "on_eval_step_end",
        "on_eval_end",
        "on_test_start",
        "on_test_step_start",
        "on_test_step_end",
        "on_test_end",
        "on_checkpoint_save",
    }
)


class BridgeCallback:
    """Bridge's `Callback`: a no-op method per event."""


for _event in VALID_EVENTS:
    setattr(BridgeCallback, _event, lambda self, context: None)


@dataclass
class CallbackContext:
    state: Any
    model: list[torch.nn.Module]
    user_state: dict = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    loss_dict: dict | None = None
    grad_norm: float | None = None
    skipped_iter: bool | None = None
    total_loss_dict: dict | None = None


class CallbackManager:
    """Bridge's `CallbackManager.add` / `fire`, line for line in behaviour."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list] = {event: [] for event in VALID_EVENTS}
        self.user_state: dict = {}

    def add(self, callback) -> None:
        for cb in callback if isinstance(callback, list) else [callback]:
            for event_name in VALID_EVENTS:
                method = getattr(cb, event_name, None)
                base_method = getattr(BridgeCallback, event_name, None)
                if method is not None and method.__func__ is not base_method:
                    self._callbacks[event_name].append(method)

    def fire(self, event_name: str, context: CallbackContext) -> None:
        for fn in self._callbacks[event_name]:
            fn(context)


class TensorBoardLogger:
    """Records `add_scalar` calls (Bridge hands a `SummaryWriter`)."""

    def __init__(self) -> None:
        self.scalars: dict[tuple[str, int], float] = {}

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars[(name, step)] = value


@dataclass
class TrainState:
    step: int = 0


@dataclass
class GlobalState:
    train_state: TrainState = field(default_factory=TrainState)
    tensorboard_logger: TensorBoardLogger | None = field(default_factory=TensorBoardLogger)
    wandb_logger: Any = None


def bridge_evaluate(state: GlobalState, model: list[torch.nn.Module], manager: CallbackManager) -> None:
    """eval.py `evaluate` around the callbacks: eval mode, (the loss loop), on_eval_end, train mode."""
    for chunk in model:
        chunk.eval()
    total_loss_dict = {"lm loss": torch.tensor(1.0)}  # what Bridge's own eval loop averaged
    manager.fire(
        "on_eval_end", CallbackContext(state, model, manager.user_state, total_loss_dict=total_loss_dict)
    )
    for chunk in model:
        chunk.train()


# --- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture
def chunks(megatron_world1):
    """Bridge-style model chunks: a GPTModel of 128 logits (28 real ids), in megatron DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    from nemo_quagmire.megatron.model import build_model

    model = build_model(get_model_preset("tiny").replace(vocab_size=PADDED_VOCAB), ParallelConfig())
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    return [DistributedDataParallel(get_model_config(c), ddp, module=c) for c in model]


def _passk() -> PassAtKCallback:
    return PassAtKCallback(
        {BENCHMARK_NAME: PROBLEMS},
        lambda p: TOKENIZER.encode(p.problem, add_bos=True),
        num_samples=NUM_SAMPLES,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=24),
        grader_workers=0,
    )


@torch.no_grad()
def _independent_nll(chunk: torch.nn.Module) -> float:
    """Token-mean NLL of the held-out responses: each example alone through the unwrapped GPTModel,
    float64 log-softmax over all 128 logits."""
    model = chunk.module
    model.eval()
    total, count = 0.0, 0
    for record in SPLITS.heldout_records():
        example = encode_example(record, TOKENIZER)
        logits = model(torch.tensor([example.ids]), torch.arange(len(example))[None], None)  # [1, T, 128]
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        total -= sum(float(logp[t - 1, example.ids[t]]) for t in range(example.prompt_length, len(example)))
        count += len(example) - example.prompt_length
    return total / count


# --- tests -----------------------------------------------------------------------------------------------
def test_a_bridge_validation_logs_both_predictors_checked_independently(chunks, tmp_path):
    adapters = [
        HeldOutLossBridgeCallback(
            HeldOutLossCallback(SPLITS.heldout_records(), TOKENIZER), TOKENIZER, run_dir=tmp_path
        ),
        PassAtKBridgeCallback(_passk(), TOKENIZER, run_dir=tmp_path),
    ]
    manager = CallbackManager()
    manager.add(adapters)
    assert [len(manager._callbacks[e]) for e in ("on_eval_end", "on_train_end", "on_train_start")] == [
        2,
        2,
        0,
    ]
    state = GlobalState(TrainState(step=5))
    bridge_evaluate(state, chunks, manager)
    manager.fire("on_train_end", CallbackContext(state, chunks, manager.user_state))

    logged = {name: value for (name, step), value in state.tensorboard_logger.scalars.items() if step == 5}
    assert logged["val/heldout_loss/token_mean"] == pytest.approx(_independent_nll(chunks[0]), abs=1e-6)
    assert all(chunk.training for chunk in chunks)  # evaluate() put them back

    expected, num_read = regraded_pass_at_k(tmp_path / "eval" / "step_00000005", NUM_SAMPLES, (1, 2, 4))
    assert num_read == len(PROBLEMS) * NUM_SAMPLES
    for k, value in expected.items():
        assert logged[f"val/{BENCHMARK_NAME}/pass@{k}"] == pytest.approx(value, abs=1e-9)

    on_disk = validation_records(tmp_path)  # what scripts/predict_report.py --sft-runs reads
    assert list(on_disk) == [5]
    assert {k: v for k, v in logged.items() if k.startswith("val/")} == pytest.approx(on_disk[5])


def test_generation_on_bridge_chunks_samples_only_the_tokenizers_ids(chunks):
    output = chunks[0].module.output_layer.weight
    with torch.no_grad():
        output[TOKENIZER.vocab_size :] = (
            10.0 * output[: TOKENIZER.vocab_size].abs().max()
        )  # padding would win
    policy = MegatronChunksPolicy(
        chunks, vocab_size=TOKENIZER.vocab_size, pad_id=TOKENIZER.pad_id, eos_id=TOKENIZER.eos_id
    )
    prompts = [TOKENIZER.encode(p.problem, add_bos=True) for p in PROBLEMS[:2]]
    batch = policy.generate(prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
    assert bool((batch.lengths > batch.prompt_lengths).all())
    assert int(batch.tokens.max()) < TOKENIZER.vocab_size
    # The same draw over all 128 logits would pick padding ids: the restriction is what keeps them out.
    unrestricted = MegatronChunksPolicy(chunks, vocab_size=PADDED_VOCAB, pad_id=0, eos_id=TOKENIZER.eos_id)
    assert (
        int(unrestricted.generate(prompts, 8, SamplingParams(max_new_tokens=12, seed=3)).tokens.max())
        >= TOKENIZER.vocab_size
    )


def test_a_tokenizer_without_a_vocabulary_size_is_refused(tmp_path):
    class NoVocab:
        pad_id, eos_id = 0, 1

    with pytest.raises(TypeError, match="NoVocab has no integer vocab_size"):
        PassAtKBridgeCallback(_passk(), NoVocab(), run_dir=tmp_path)


@pytest.mark.gpu
def test_bridge_finetune_logs_both_predictors_at_every_validation(tmp_path):
    """A real Megatron-Bridge `finetune` (2-layer GPT, mock data) with both adapters; needs CUDA and
    megatron-bridge (its wheels are Python 3.12 + Transformer Engine: an NGC container)."""
    pytest.importorskip("megatron.bridge", reason="megatron-bridge is not installed")
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        LoggerConfig,
        MockGPTDatasetConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    train_iters, eval_interval, seq_length = 6, 3, 128
    config = ConfigContainer(
        model=GPTModelProvider(
            num_layers=2,
            hidden_size=128,
            ffn_hidden_size=256,
            num_attention_heads=4,
            normalization="RMSNorm",
            activation_func=F.silu,
            gated_linear_unit=True,
            position_embedding_type="rope",
            add_bias_linear=False,
            share_embeddings_and_output_weights=False,
            seq_length=seq_length,
            make_vocab_size_divisible_by=128,
            vocab_size=None,
            bf16=True,
            pipeline_dtype=torch.bfloat16,
        ),
        train=TrainingConfig(train_iters=train_iters, global_batch_size=8, micro_batch_size=2),
        validation=ValidationConfig(eval_interval=eval_interval, eval_iters=1),
        optimizer=OptimizerConfig(optimizer="adam", bf16=True, lr=1e-3, use_distributed_optimizer=True),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=True),
        dataset=MockGPTDatasetConfig(
            random_seed=1234,
            reset_attention_mask=False,
            reset_position_ids=False,
            eod_mask_loss=False,
            seq_length=seq_length,
            num_dataset_builder_threads=1,
            dataloader_type="single",
            num_workers=1,
        ),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=TOKENIZER.vocab_size),
        checkpoint=CheckpointConfig(save=str(tmp_path / "ckpt"), save_interval=train_iters),
        rng=RNGConfig(seed=1234),
    )
    finetune(
        config,
        forward_step,
        callbacks=[
            HeldOutLossBridgeCallback(
                HeldOutLossCallback(SPLITS.heldout_records(), TOKENIZER), TOKENIZER, run_dir=tmp_path
            ),
            PassAtKBridgeCallback(_passk(), TOKENIZER, run_dir=tmp_path),
        ],
    )
    records = validation_records(tmp_path)
    assert list(records) == list(range(eval_interval, train_iters + 1, eval_interval))
    for metrics in records.values():
        assert math.isfinite(metrics["val/heldout_loss/token_mean"])
        assert 0.0 <= metrics[f"val/{BENCHMARK_NAME}/pass@1"] <= 1.0
    assert len(read_samples(tmp_path / "eval" / f"step_{train_iters:08d}")) == len(PROBLEMS) * NUM_SAMPLES
