"""Datasets: the embedded synthetic arithmetic task, its character tokenizer, strict JSONL record files."""

from nemo_quagmire.data.jsonl import RL_FIELDS, SFT_FIELDS, RecordFileError, read_records, write_records
from nemo_quagmire.data.synthetic import (
    BENCHMARK_NAME,
    SPLITS,
    ArithmeticProblem,
    SyntheticSplits,
    SyntheticTaskConfig,
    assign_split,
    generate_problems,
    generate_splits,
    max_prompt_chars,
    max_response_chars,
    verify,
)
from nemo_quagmire.data.tokenizer import TASK_ALPHABET, CharTokenizer, EncodedBatch

__all__ = [
    "BENCHMARK_NAME",
    "RL_FIELDS",
    "SFT_FIELDS",
    "SPLITS",
    "TASK_ALPHABET",
    "ArithmeticProblem",
    "CharTokenizer",
    "EncodedBatch",
    "RecordFileError",
    "SyntheticSplits",
    "SyntheticTaskConfig",
    "assign_split",
    "generate_problems",
    "generate_splits",
    "max_prompt_chars",
    "max_response_chars",
    "read_records",
    "verify",
    "write_records",
]
