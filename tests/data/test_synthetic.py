"""The synthetic arithmetic task: every trace is checked column by column against the true answer by an
independent parser; splits, determinism, lengths, the verifier's agreement with the project's grader, and
the data script (run in-process) with the strict JSONL reader it pairs with."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.data.jsonl import RL_FIELDS, SFT_FIELDS, RecordFileError, read_records, write_records
from nemo_quagmire.data.synthetic import (
    BENCHMARK_NAME,
    SPLITS,
    ArithmeticProblem,
    SyntheticTaskConfig,
    assign_split,
    generate_problems,
    generate_splits,
    max_prompt_chars,
    max_response_chars,
    verify,
)
from nemo_quagmire.data.tokenizer import TASK_ALPHABET, CharTokenizer
from nemo_quagmire.eval.benchmarks import FIELDS, available_benchmarks, load_benchmark
from nemo_quagmire.rewards.extraction import extract_final_answer
from nemo_quagmire.rewards.math_grader import plain_number_verdict

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "make_synthetic_data", REPO_ROOT / "scripts" / "make_synthetic_data.py"
)
make_data = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = make_data
_spec.loader.exec_module(make_data)

DEFAULT = SyntheticTaskConfig()
ALL_OPS = SyntheticTaskConfig(min_digits=1, max_digits=6, operations=("add", "sub", "mul"))

# ---- an independent reader of the trace: every column re-derived from a, b and the true answer ----------

_LINE = {
    "add": re.compile(r"(\d)\+(\d)\+(\d)=(\d+) (\d+)"),
    "sub": re.compile(r"(\d+)-(\d)-(\d)=(\d) (\d+)"),
    "mul": re.compile(r"(\d)\*(\d)\+(\d)=(\d+) (\d+)"),
}
_TRUE_ANSWER = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def check_trace(operation: str, a: int, b: int, response: str) -> None:
    """Assert `response` is a correct column-by-column trace of `a <op> b` ending in the boxed answer."""
    answer = _TRUE_ANSWER[operation](a, b)
    first, *columns, box = response.split("\n")
    assert first == "" and box == f"\\boxed{{{answer}}}"
    width = len(str(a)) if operation == "mul" else max(len(str(a)), len(str(b)))
    assert len(columns) == width
    carry = 0  # carry (add, mul) or borrow (sub) into the column
    for i, line in enumerate(columns):
        match = _LINE[operation].fullmatch(line)
        assert match, f"line {i} of {response!r} is malformed"
        x, y, incoming, value = map(int, match.groups()[:4])
        found = match.group(5)
        digit_a, digit_b = a // 10**i % 10, b // 10**i % 10
        assert incoming == carry
        if operation == "sub":
            borrows = digit_a < digit_b + carry
            assert (x, y) == (digit_a + 10 * borrows, digit_b) and value == x - y - incoming
            carry = int(borrows)
        else:
            assert (x, y) == ((digit_a, digit_b) if operation == "add" else (digit_a, b))
            assert value == (x + y + incoming if operation == "add" else x * y + incoming)
            carry = value // 10
        if i < width - 1:  # the answer's lowest i + 1 digits, zero-padded
            assert found == f"{answer % 10 ** (i + 1):0{i + 1}d}"
        elif operation == "sub":  # all `width` digits, leading zeros kept; no borrow out of the top column
            assert found == f"{answer:0{width}d}" and carry == 0
        else:  # the whole answer, final carry in front
            assert found == str(answer)


operands = st.integers(0, 10**9 - 1)
problems = st.one_of(
    st.builds(lambda a, b: ArithmeticProblem("add", a, b), operands, operands),
    st.builds(lambda a, b: ArithmeticProblem("sub", max(a, b), min(a, b)), operands, operands),
    st.builds(lambda a, b: ArithmeticProblem("mul", a, b), operands, st.integers(1, 9)),
)


@given(problems)
@settings(max_examples=300, deadline=None)
def test_every_trace_is_right_column_by_column(problem):
    check_trace(problem.operation, problem.a, problem.b, problem.response)
    assert verify(problem.response, str(problem.answer))


def test_generated_traces_are_right_and_verify():
    for config in (DEFAULT, ALL_OPS):
        for problem in generate_problems(config, "sft", 2000, seed=1):
            check_trace(problem.operation, problem.a, problem.b, problem.response)
            assert verify(problem.response, str(problem.answer))


def test_worked_examples_from_the_docstring():
    assert (
        ArithmeticProblem("add", 487, 356).response == "\n7+6+0=13 3\n8+5+1=14 43\n4+3+1=8 843\n\\boxed{843}"
    )
    assert ArithmeticProblem("sub", 503, 498).response == "\n13-8-0=5 5\n10-9-1=0 05\n5-4-1=0 005\n\\boxed{5}"
    assert (
        ArithmeticProblem("mul", 487, 6).response == "\n7*6+0=42 2\n8*6+4=52 22\n4*6+5=29 2922\n\\boxed{2922}"
    )
    assert ArithmeticProblem("add", 987, 356).trace_lines()[-1] == "9+3+1=13 1343"  # final carry in front


def test_the_checker_catches_a_wrong_trace():
    good = ArithmeticProblem("add", 487, 356).response
    for bad in (good.replace("8+5+1=14", "8+5+0=14"), good.replace("14 43", "14 44"), good + "0"):
        with pytest.raises(AssertionError):
            check_trace("add", 487, 356, bad)


# ---- splits and determinism ------------------------------------------------------------------------------


def test_generation_is_deterministic_by_seed():
    a = generate_splits(DEFAULT, seed=7, num_sft=300, num_rl=50, num_heldout=50)
    b = generate_splits(DEFAULT, seed=7, num_sft=300, num_rl=50, num_heldout=50)
    c = generate_splits(DEFAULT, seed=8, num_sft=300, num_rl=50, num_heldout=50)
    assert a == b
    assert a.sft != c.sft and a.rl != c.rl and a.heldout != c.heldout


def test_each_split_depends_only_on_its_own_count():
    small = generate_splits(DEFAULT, seed=3, num_sft=10, num_rl=20, num_heldout=30)
    large = generate_splits(DEFAULT, seed=3, num_sft=500, num_rl=40, num_heldout=60)
    assert large.sft[:10] == small.sft and large.rl[:20] == small.rl and large.heldout[:30] == small.heldout


def test_pinned_problems_of_seed_0():
    # Changing the sampler, the hash or the stream layout changes every dataset; this makes it visible.
    assert generate_problems(DEFAULT, "heldout", 3, seed=0) == [
        ArithmeticProblem("sub", 135, 67),
        ArithmeticProblem("add", 974, 50),
        ArithmeticProblem("add", 1194, 6497),
    ]
    assert generate_problems(DEFAULT, "rl", 2, seed=0) == [
        ArithmeticProblem("add", 8702, 751),
        ArithmeticProblem("sub", 622, 219),
    ]


def test_splits_are_disjoint_and_problems_distinct():
    splits = generate_splits(ALL_OPS, seed=0, num_sft=4000, num_rl=1000, num_heldout=1000)
    keys = {name: [p.key for p in getattr(splits, name)] for name in SPLITS}
    for name, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), f"repeated problem in {name}"
        assert all(assign_split(p, ALL_OPS) == name for p in getattr(splits, name))
    assert not set(keys["sft"]) & set(keys["rl"])
    assert not set(keys["sft"]) & set(keys["heldout"])
    assert not set(keys["rl"]) & set(keys["heldout"])


def test_commuted_problems_share_a_split_and_differences_do_not_commute():
    assert ArithmeticProblem("add", 12, 345).key == ArithmeticProblem("add", 345, 12).key
    assert ArithmeticProblem("mul", 7, 3).key == ArithmeticProblem("mul", 3, 7).key
    assert ArithmeticProblem("sub", 345, 12).key != ArithmeticProblem("add", 345, 12).key
    for a in range(200):
        for b in range(0, 1000, 37):
            add, commuted = ArithmeticProblem("add", a, b), ArithmeticProblem("add", b, a)
            assert assign_split(add, ALL_OPS) == assign_split(commuted, ALL_OPS)


def test_split_shares_match_the_configured_fractions():
    config = SyntheticTaskConfig(rl_fraction=0.3, heldout_fraction=0.2)
    num = 20_000
    counts = dict.fromkeys(SPLITS, 0)
    for a in range(num):
        counts[assign_split(ArithmeticProblem("add", a, 10**6), config)] += 1
    for name, expected in (("sft", 0.5), ("rl", 0.3), ("heldout", 0.2)):
        sigma = (expected * (1 - expected) / num) ** 0.5
        assert abs(counts[name] / num - expected) < 5 * sigma, counts


def test_sampling_covers_the_configured_problems():
    config = SyntheticTaskConfig(min_digits=1, max_digits=3, operations=("add", "sub", "mul"))
    drawn = generate_problems(config, "sft", 3000, seed=0)
    assert {p.operation for p in drawn} == {"add", "sub", "mul"}
    assert {len(str(p.a)) for p in drawn} == {1, 2, 3}
    assert {len(str(p.b)) for p in drawn if p.operation != "mul"} == {1, 2, 3}
    assert {p.b for p in drawn if p.operation == "mul"} == set(range(2, 10))
    assert all(p.a >= p.b for p in drawn if p.operation == "sub")


def test_a_split_too_small_for_the_request_is_an_error():
    config = SyntheticTaskConfig(min_digits=1, max_digits=1, operations=("mul",))  # 10 x 8 problems in all
    with pytest.raises(ValueError, match="found only .* distinct 'heldout' problems of the 50 requested"):
        generate_problems(config, "heldout", 50, seed=0)


def test_short_sft_traces_leave_rl_and_heldout_unchanged():
    short = SyntheticTaskConfig(sft_max_digits=2)
    drawn = generate_problems(short, "sft", 500, seed=0)
    assert {max(len(str(p.a)), len(str(p.b))) for p in drawn} == {2}
    assert max(len(p.response) for p in drawn) <= max_response_chars(SyntheticTaskConfig(max_digits=2))
    assert all(assign_split(p, short) == "sft" for p in drawn)
    for split in ("rl", "heldout"):
        assert generate_problems(short, split, 50, seed=0) == generate_problems(DEFAULT, split, 50, seed=0)


def test_a_fixed_problem_seed_replaces_the_runs_seed():
    fixed = SyntheticTaskConfig(seed=7)
    a = generate_splits(fixed, seed=1, num_sft=20, num_rl=5, num_heldout=5)
    b = generate_splits(fixed, seed=2, num_sft=20, num_rl=5, num_heldout=5)
    assert a == b and a.seed == 7
    assert a.heldout == generate_splits(DEFAULT, seed=7, num_sft=1, num_rl=1, num_heldout=5).heldout
    assert generate_splits(DEFAULT, seed=1, num_sft=20, num_rl=5, num_heldout=5).sft != a.sft


@pytest.mark.parametrize(
    ("split", "num", "seed", "message"),
    [("test", 1, 0, "unknown split"), ("rl", -1, 0, "must be >= 0"), ("rl", 1, -1, "seed must be >= 0")],
)
def test_bad_generation_arguments(split, num, seed, message):
    with pytest.raises(ValueError, match=message):
        generate_problems(DEFAULT, split, num, seed)


# ---- lengths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        DEFAULT,
        ALL_OPS,
        SyntheticTaskConfig(min_digits=3, max_digits=3, operations=("sub",)),
        SyntheticTaskConfig(min_digits=5, max_digits=5, operations=("mul",)),
    ],
    ids=["default", "all_ops", "sub3", "mul5"],
)
def test_lengths_stay_within_the_documented_bounds(config):
    drawn = generate_problems(config, "sft", 2000, seed=0)
    assert max(len(p.prompt) for p in drawn) <= max_prompt_chars(config)
    assert max(len(p.response) for p in drawn) <= max_response_chars(config)


@pytest.mark.parametrize("digits", range(1, 10))
def test_length_bounds_are_reached_by_all_nines(digits):
    nines = 10**digits - 1  # every column sum has two digits and the final carry adds an answer digit
    config = SyntheticTaskConfig(min_digits=digits, max_digits=digits, operations=("add",))
    assert len(ArithmeticProblem("add", nines, nines).response) == max_response_chars(config)
    assert len(ArithmeticProblem("add", nines, nines).prompt) == max_prompt_chars(config)
    mul_only = SyntheticTaskConfig(min_digits=digits, max_digits=digits, operations=("mul",))
    assert len(ArithmeticProblem("mul", nines, 9).response) == max_response_chars(mul_only)
    assert len(ArithmeticProblem("mul", nines, 9).prompt) == max_prompt_chars(mul_only)


def test_default_lengths_are_short_and_fit_the_tiny_model():
    # The documented bounds: prompt <= 2*4 + 2, response <= 4^2/2 + 11.5*4 + 11 = 65 characters.
    assert (max_prompt_chars(DEFAULT), max_response_chars(DEFAULT)) == (10, 65)
    bos_and_eos = 2
    assert bos_and_eos + 10 + 65 <= get_model_preset("tiny").max_position_embeddings


# ---- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_digits": 4, "max_digits": 2}, "min_digits=4 > max_digits=2"),
        ({"min_digits": 0}, "greater than or equal to 1"),
        ({"max_digits": 10}, "less than or equal to 9"),
        ({"operations": ()}, "at least 1 item"),
        ({"operations": ("add", "add")}, "lists an operation twice"),
        ({"operations": ("div",)}, "'add', 'sub' or 'mul'"),
        ({"rl_fraction": 0.6, "heldout_fraction": 0.4}, "leaves no problems for SFT"),
        ({"rl_fraction": 0.0}, "greater than 0"),
        ({"max_digit": 3}, "Extra inputs are not permitted"),
        ({"sft_max_digits": 5}, r"sft_max_digits=5 is outside \[min_digits, max_digits\] = \[2, 4\]"),
        ({"sft_max_digits": 1}, "sft_max_digits=1 is outside"),
        ({"seed": -1}, "greater than or equal to 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SyntheticTaskConfig(**kwargs)


def test_config_is_frozen_and_round_trips():
    with pytest.raises(ValidationError, match="frozen"):
        DEFAULT.max_digits = 5
    assert SyntheticTaskConfig.model_validate_json(ALL_OPS.model_dump_json()) == ALL_OPS
    assert SyntheticTaskConfig(operations=["mul", "add"]).operations == ("mul", "add")  # YAML lists work


@pytest.mark.parametrize(
    ("operation", "a", "b", "message"),
    [
        ("sub", 3, 5, "needs a >= b"),
        ("mul", 12, 10, "single digit 1..9"),
        ("mul", 12, 0, "single digit 1..9"),
        ("add", -1, 5, ">= 0"),
        ("div", 6, 3, "unknown operation"),
    ],
)
def test_problem_rejects_bad_operands(operation, a, b, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticProblem(operation, a, b)


# ---- verifier --------------------------------------------------------------------------------------------


def test_verify():
    response = ArithmeticProblem("add", 487, 356).response
    assert verify(response, "843")
    assert not verify(response, "842")
    assert not verify(response.replace("\\boxed{843}", "843"), "843")  # no box, no answer
    assert not verify(response.replace("843}", "843"), "843")  # cut off inside the box
    assert verify("\\boxed{5} then \\boxed{843}", "843") and not verify("\\boxed{843} \\boxed{5}", "843")
    assert verify("\\boxed{0843}", "843") and verify("\\boxed{+843}", "843")  # as the grader reads them
    assert not verify("\\boxed{800+43}", "843")  # an expression is not a plain integer (see the docstring)
    with pytest.raises(ValueError, match="is not an integer"):
        verify(response, "8.43")


integer_spellings = st.builds(
    lambda sign, zeros, value: sign + "0" * zeros + str(value),
    st.sampled_from(["", "+", "-"]),
    st.integers(0, 3),
    st.integers(0, 10**6),
)


@given(
    gold=st.integers(0, 10**6),
    boxed=st.one_of(integer_spellings, st.text(alphabet=TASK_ALPHABET, max_size=10)),
    same_value=st.booleans(),
)
@settings(max_examples=500, deadline=None)
def test_verify_agrees_with_the_graders_fast_path_over_the_task_alphabet(gold, boxed, same_value):
    if same_value and re.fullmatch(r"[+-]?\d+", boxed):
        gold = abs(int(boxed))  # make equal values common, not a one-in-a-million accident
    completion = f"\n7+6+0=13 3\n\\boxed{{{boxed}}}"
    extracted = extract_final_answer(completion)
    verdict = None if extracted is None else plain_number_verdict(str(gold), extracted)
    # The grader decides plain numbers itself and sends the rest to math-verify; verify calls those wrong.
    assert verify(completion, str(gold)) == (verdict is True)
    if extracted is not None and re.fullmatch(r"[+-]?\d+", extracted):
        assert verdict is not None  # every integer the model can box is on the grader's fast path


# ---- records, the data script and the JSONL reader --------------------------------------------------------


def test_records_follow_their_schemas():
    splits = generate_splits(DEFAULT, seed=0, num_sft=20, num_rl=20, num_heldout=20)
    assert splits.sft_records()[0] == {"prompt": splits.sft[0].prompt, "response": splits.sft[0].response}
    assert [set(r) for r in splits.heldout_records()] == [set(SFT_FIELDS)] * 20
    rl = splits.rl_records()
    assert [set(r) for r in rl] == [set(RL_FIELDS)] * 20 and len({r["id"] for r in rl}) == 20
    assert all(r["answer"] == str(p.answer) for r, p in zip(rl, splits.rl, strict=True))
    bench = splits.benchmark_records()
    assert [tuple(r) for r in bench] == [FIELDS] * 20
    assert all(
        r["problem"] == p.prompt and verify(r["solution"], r["answer"])
        for r, p in zip(bench, splits.heldout, strict=True)
    )


def _run_script(out: Path, *extra: str) -> int:
    return make_data.main(
        ["--out", str(out), "--num-sft", "200", "--num-rl", "50", "--num-heldout", "30", *extra]
    )


def test_script_writes_every_file(tmp_path):
    out = tmp_path / "data"
    assert _run_script(out, "--seed", "5") == 0
    expected = generate_splits(DEFAULT, seed=5, num_sft=200, num_rl=50, num_heldout=30)
    assert read_records(out / "sft.jsonl", SFT_FIELDS) == expected.sft_records()
    assert read_records(out / "heldout.jsonl", SFT_FIELDS) == expected.heldout_records()
    assert read_records(out / "rl.jsonl", RL_FIELDS) == expected.rl_records()
    assert available_benchmarks(out / "benchmarks") == [BENCHMARK_NAME]
    problems = load_benchmark(BENCHMARK_NAME, out / "benchmarks")
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        (r["id"], r["problem"], r["answer"]) for r in expected.benchmark_records()
    ]
    assert CharTokenizer.load(out) == CharTokenizer()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"sft": 200, "heldout": 30, "rl": 50} and manifest["seed"] == 5
    assert SyntheticTaskConfig.model_validate(manifest["config"]) == DEFAULT
    assert manifest["lengths"]["response_chars"]["max"] <= max_response_chars(DEFAULT)
    assert not list(out.rglob("*.tmp"))

    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _run_script(out, "--seed", "5") == 0  # rerun: byte-identical files
    assert first == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_script_passes_difficulty_flags(tmp_path):
    args = ("--min-digits", "1", "--max-digits", "2", "--operations", "mul, add")
    assert _run_script(tmp_path, *args) == 0
    config = SyntheticTaskConfig.model_validate(
        json.loads((tmp_path / "manifest.json").read_text())["config"]
    )
    assert config == SyntheticTaskConfig(min_digits=1, max_digits=2, operations=("mul", "add"))
    assert {r["prompt"][-2] for r in read_records(tmp_path / "rl.jsonl", RL_FIELDS)} <= set("0123456789")


@pytest.mark.parametrize(
    "args", [("--operations", "add,pow"), ("--min-digits", "5"), ("--num-rl", "-1")], ids=str
)
def test_script_rejects_bad_settings_and_writes_nothing(tmp_path, caplog, args):
    assert _run_script(tmp_path / "data", *args) == 2
    assert not (tmp_path / "data").exists()
    assert "invalid synthetic task settings" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"rows\.jsonl:2: not valid JSON"),
        ('["prompt", "response"]', r"rows\.jsonl:2: expected an object with keys \['prompt', 'response'\]"),
        ('{"prompt": "1+1="}', r"rows\.jsonl:2: expected an object .* got \['prompt'\]"),
        ('{"prompt": "1+1=", "response": 2}', r"rows\.jsonl:2: values of \['response'\] must be strings"),
    ],
)
def test_read_records_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n" + line + "\n")
    with pytest.raises(RecordFileError, match=message):
        read_records(path, SFT_FIELDS)


def test_read_records_rejects_an_empty_file_and_round_trips(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecordFileError, match="no records"):
        read_records(tmp_path / "empty.jsonl", SFT_FIELDS)
    rows = [{"id": "rl-0", "prompt": "1+1=", "answer": "2"}, {"id": "é", "prompt": "\n", "answer": "\\"}]
    assert write_records(tmp_path / "rows.jsonl", rows) == 2
    assert read_records(tmp_path / "rows.jsonl", RL_FIELDS) == rows
