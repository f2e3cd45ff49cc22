"""Export a checkpoint of this project as a Hugging Face directory that transformers and vLLM load.

Usage:
    python scripts/export_hf.py --checkpoint runs/grpo-llama/checkpoints/step_00000500 --out /ckpt/grpo-hf
    python scripts/export_hf.py --checkpoint ... --out DIR --dtype bfloat16   # cast the weights on the way

The output holds the weights (safetensors, split above 5 GB with an index), config.json,
generation_config.json and the tokenizer files with the chat template. They come from the run dir
(`<run_dir>/model/`, written when the run started): when the run started from an HF directory, its
config.json is the template (token ids, RoPE key format and other keys are kept; the architecture keys are
rewritten from the checkpoint's model config), and its generation config and tokenizer are the source's.
Exporting the import of an HF checkpoint gives back its tensors bit for bit.

The model is loaded whole in one process (CPU is enough; memory: the model in its dtype, twice while
writing a shard). Bad input (not a checkpoint of this project, a run dir without its model files, an existing
--out) exits with code 2 and writes nothing; the output appears only when complete (written beside it, then
renamed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from nemo_quagmire.utils.errors import TRAIN_MODULES, InputError, cli_main, require_extra
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("scripts.export_hf")

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="<run_dir>/checkpoints/step_N")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weight dtype; default: the model's params_dtype"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="HF tokenizer directory to include, for runs whose run dir has no model/ files (older runs)",
    )
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace):
    """The checkpoint's source description, after every input check (nothing written yet).

    Raises:
        InputError: naming the argument, the value and the fix.
    """
    from nemo_quagmire.trainer.checkpoint_source import CheckpointSourceError, read_checkpoint_source

    try:
        source = read_checkpoint_source(args.checkpoint, key="--checkpoint")
    except CheckpointSourceError as error:
        raise InputError(str(error)) from None
    if source.kind != "run":
        raise InputError(
            f"--checkpoint {args.checkpoint} is already an HF directory; pass a checkpoint of this project "
            "(<run_dir>/checkpoints/step_N)"
        )
    if args.out.exists():
        raise InputError(f"--out {args.out} exists; choose a new directory (nothing is overwritten)")
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer_config.json").is_file():
        raise InputError(f"--tokenizer {args.tokenizer} holds no HF tokenizer (tokenizer_config.json)")
    if source.files_dir is None and args.tokenizer is None:
        raise InputError(
            f"the run dir of {args.checkpoint} has no model/ directory (tokenizer and HF config, written by "
            "runs since this script exists); pass --tokenizer DIR to include a tokenizer"
        )
    return source


def export(args: argparse.Namespace) -> Path:
    """Load the checkpoint's weights and write `args.out` atomically; returns it."""
    source = check_inputs(args)  # before the heavy imports: bad input fails fast
    require_extra("train", TRAIN_MODULES, needed_by="export_hf.py (the checkpoint loads on megatron-core)")

    import torch

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.megatron.policy import MegatronPolicy

    dtype = getattr(torch, args.dtype) if args.dtype else None
    partial = args.out.parent / f".{args.out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with parallel_context(source.model, ParallelConfig()):
            policy = MegatronPolicy(source.model, ParallelConfig(), seed=None)
            policy.load_weights(source.path)
            # The run's model/ directory is the template: config.json, generation config, tokenizer.
            policy.export_hf(partial, source.files_dir, dtype=dtype)
        if args.tokenizer is not None:
            from nemo_quagmire.data.hf_tokenizer import HFTokenizer

            HFTokenizer(args.tokenizer).save(partial)
        partial.rename(args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return args.out


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()

    def run() -> None:
        print(export(parse_args(argv)))  # the script's output: where the export is

    return cli_main(run)


if __name__ == "__main__":
    sys.exit(main())
