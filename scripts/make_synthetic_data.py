"""Write the embedded synthetic arithmetic task to disk: SFT, RL and held-out splits, a benchmark file, and
the character tokenizer.

Why files when the embedded default can generate in memory: a run that starts from files can be inspected,
diffed and reproduced by other tools (the grading CLI reads the benchmark file like the 7 math benchmarks).

Usage:
    python scripts/make_synthetic_data.py --out DIR [--seed 0] [--num-sft 20000] [--num-rl 2000] \
        [--num-heldout 500] [--min-digits 2] [--max-digits 4] [--operations add,sub]

Output (each file replaced atomically; see nemo_quagmire/data/synthetic.py for the format and lengths):
    DIR/sft.jsonl                        {"prompt", "response"} per line
    DIR/heldout.jsonl                    {"prompt", "response"} per line (held-out loss)
    DIR/rl.jsonl                         {"id", "prompt", "answer"} per line
    DIR/benchmarks/synthetic_arith.jsonl {"id", "problem", "answer", "solution", "source"}: the held-out
                                         problems, for `--benchmarks-dir DIR/benchmarks`; feed `problem`
                                         to the model verbatim (no instruction template)
    DIR/tokenizer.json                   the CharTokenizer (CharTokenizer.load(DIR))
    DIR/manifest.json                    config, seed, counts and length statistics
Exit code 2 on an invalid configuration (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nemo_quagmire.data.jsonl import write_records
from nemo_quagmire.data.synthetic import (
    BENCHMARK_NAME,
    ArithmeticProblem,
    SyntheticSplits,
    SyntheticTaskConfig,
    generate_splits,
)
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("make_synthetic_data")


def length_stats(problems: Sequence[ArithmeticProblem]) -> dict[str, dict[str, float]]:
    """Min / mean / p50 / p99 / max character lengths of prompts and responses."""
    stats = {}
    for name, lengths in (
        ("prompt_chars", [len(p.prompt) for p in problems]),
        ("response_chars", [len(p.response) for p in problems]),
    ):
        values = np.asarray(lengths)
        stats[name] = {
            "min": int(values.min()),
            "mean": round(float(values.mean()), 2),
            "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)),
            "max": int(values.max()),
        }
    return stats


def write_dataset(out: Path, splits: SyntheticSplits) -> dict:
    """Write every output file (see the module docstring); returns the manifest."""
    counts = {
        "sft": write_records(out / "sft.jsonl", splits.sft_records()),
        "heldout": write_records(out / "heldout.jsonl", splits.heldout_records()),
        "rl": write_records(out / "rl.jsonl", splits.rl_records()),
    }
    write_records(out / "benchmarks" / f"{BENCHMARK_NAME}.jsonl", splits.benchmark_records())
    tokenizer = CharTokenizer()
    tokenizer.save(out)
    manifest = {
        "config": splits.config.model_dump(mode="json"),
        "seed": splits.seed,
        "counts": counts,
        "vocab_size": tokenizer.vocab_size,
        "lengths": length_stats(splits.sft + splits.rl + splits.heldout),
    }
    with atomic_write(out / "manifest.json") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
    return manifest


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SyntheticTaskConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-sft", type=int, default=20_000)
    parser.add_argument("--num-rl", type=int, default=2_000)
    parser.add_argument("--num-heldout", type=int, default=500)
    parser.add_argument("--min-digits", type=int, default=defaults.min_digits)
    parser.add_argument("--max-digits", type=int, default=defaults.max_digits)
    parser.add_argument(
        "--operations", default=",".join(defaults.operations), help="comma-separated: add, sub, mul"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        config = SyntheticTaskConfig(
            min_digits=args.min_digits,
            max_digits=args.max_digits,
            operations=tuple(op.strip() for op in args.operations.split(",")),
        )
        splits = generate_splits(
            config, seed=args.seed, num_sft=args.num_sft, num_rl=args.num_rl, num_heldout=args.num_heldout
        )
    except ValueError as err:  # pydantic's ValidationError included
        logger.error("invalid synthetic task settings: %s", err)
        return 2
    manifest = write_dataset(args.out, splits)
    logger.info("wrote %s to %s (vocab_size %d)", manifest["counts"], args.out, manifest["vocab_size"])
    for name, stats in manifest["lengths"].items():
        logger.info("%s: %s", name, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
