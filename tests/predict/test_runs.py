"""nemo_quagmire.predict.runs on synthetic run directories written the way the trainers write them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nemo_quagmire.predict.runs import (
    feature_name,
    resolve_checkpoint,
    table_from_runs,
    target_column,
    validation_records,
)
from nemo_quagmire.predict.table import PredictInputError, read_table


def _val(p1: float, p4: float, loss: float | str) -> dict:
    return {
        "val/macro/pass@1": p1,
        "val/macro/pass@4": p4,
        "val/math500/pass@1": p1 + 0.01,  # per-benchmark keys are not features
        "val/heldout_loss/token_mean": loss,
        "val/heldout_loss/seq_mean": 2 * loss if isinstance(loss, float) else loss,
    }


def _run(root: Path, name: str, validations: dict[int, dict], init_from: str | None = None) -> Path:
    """A run dir whose metrics.jsonl interleaves training records and validation records of the same step."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step, val in validations.items():
        lines.append({"step": step, "time": 1.0, "train/loss": 0.5})
        lines.append({"step": step, "time": 2.0, **val})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    if init_from is not None:
        (run / "run_info.json").write_text(json.dumps({"init_from": init_from, "seed": 1}), encoding="utf-8")
    return run


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    sft_a = _run(
        tmp_path, "sft-a", {0: _val(0.1, 0.3, 0.9), 100: _val(0.2, 0.5, 0.7), 200: _val(0.3, 0.55, 0.72)}
    )
    sft_b = _run(tmp_path, "sft-b", {0: _val(0.1, 0.3, 0.9), 150: _val(0.25, 0.6, 0.65)})
    (sft_b / "checkpoints" / "step_00000150").mkdir(parents=True)
    target = "val/macro/pass@1"
    checkpoint_150 = str(sft_b / "checkpoints" / "step_00000150")
    return {
        "sft-a": sft_a,
        "sft-b": sft_b,
        # GRPO runs validate at the start and at the end; the target is the last validation
        "rl-1": _run(tmp_path, "rl-1", {0: {target: 0.2}, 50: {target: 0.40}}, init_from=str(sft_a)),
        "rl-4": _run(tmp_path, "rl-4", {50: {target: 0.44}}, init_from=str(sft_a)),  # another seed
        "rl-2": _run(tmp_path, "rl-2", {50: {target: 0.47}}, init_from=checkpoint_150),
        "rl-3": _run(tmp_path, "rl-3", {50: {target: 0.30}}, init_from="../sft-a@100"),
    }


def test_builds_the_same_table_as_the_equivalent_csv(study, tmp_path):
    table = table_from_runs(
        [study["sft-a"], study["sft-b"], f"{study['sft-b']}@0"],
        [study["rl-1"], study["rl-2"], study["rl-3"], study["rl-4"]],
    )
    # sft-a@200 <- rl-1 and rl-4 (mean of 0.40 and 0.44); sft-b@150 <- rl-2 (a checkpoint path);
    # sft-b@0 listed but never RL'd: a candidate; sft-a@100 <- rl-3 (relative DIR@STEP), added by the link.
    csv_text = (
        "run,pass@1,pass@4,heldout_loss,heldout_loss_seq,post_rl_pass@1\n"
        "sft-a@200,0.3,0.55,0.72,1.44,0.42\n"
        "sft-b@150,0.25,0.6,0.65,1.3,0.47\n"
        "sft-b@0,0.1,0.3,0.9,1.8,\n"
        "sft-a@100,0.2,0.5,0.7,1.4,0.30\n"
    )
    (tmp_path / "expected.csv").write_text(csv_text, encoding="utf-8")
    expected = read_table(tmp_path / "expected.csv", "post_rl_pass@1")
    assert table.ids == expected.ids
    assert table.columns == expected.columns and list(table.columns) == list(expected.columns)
    assert table.target_name == "post_rl_pass@1"
    for got, want in zip(table.target, expected.target, strict=True):
        assert got == pytest.approx(want) if not math.isnan(want) else math.isnan(got)


def test_a_run_from_the_rl_link_alone_and_records_merged_per_step(study):
    table = table_from_runs([], [study["rl-2"]])
    assert table.ids == ("sft-b@150",) and table.target == (0.47,)
    records = validation_records(study["sft-a"])
    assert list(records) == [0, 100, 200] and "train/loss" not in records[100]


def test_checkpoint_specs_resolve_to_run_and_step(study):
    sft_b = study["sft-b"]
    assert resolve_checkpoint(sft_b) == (sft_b.resolve(), None)
    assert resolve_checkpoint(f"{sft_b}@150") == (sft_b.resolve(), 150)
    assert resolve_checkpoint(sft_b / "checkpoints" / "step_00000150") == (sft_b.resolve(), 150)
    assert resolve_checkpoint("sft-b", base=sft_b.parent) == (sft_b.resolve(), None)
    with pytest.raises(PredictInputError, match="not an SFT run directory"):
        resolve_checkpoint(sft_b / "checkpoints")


def test_feature_and_target_names():
    assert feature_name("val/macro/pass@64") == "pass@64"
    assert feature_name("val/heldout_loss/token_mean") == "heldout_loss"
    assert feature_name("val/heldout_loss/seq_mean") == "heldout_loss_seq"
    assert feature_name("val/math500/pass@1") is None and feature_name("train/loss") is None
    assert target_column("val/macro/pass@1") == "post_rl_pass@1"
    assert target_column("val/aime24/pass@1") == "post_rl_aime24_pass@1"


def test_features_missing_from_some_checkpoints_are_left_out_with_a_warning(tmp_path, caplog):
    full = _run(tmp_path, "full", {10: _val(0.2, 0.4, 0.8)})
    partial = _run(tmp_path, "partial", {10: {"val/macro/pass@1": 0.3, "val/macro/pass@4": 0.5}})
    rl = _run(tmp_path, "rl", {5: {"val/macro/pass@1": 0.5}}, init_from=str(full))
    table = table_from_runs([partial], [rl])
    assert list(table.columns) == ["pass@1", "pass@4"]
    assert "heldout_loss" in caplog.text and "partial@10" in caplog.text


def test_every_problem_in_the_run_directories_is_reported_at_once(study, tmp_path):
    no_info = _run(tmp_path, "rl-no-info", {5: {"val/macro/pass@1": 0.5}})
    bad_link = _run(tmp_path, "rl-bad-link", {5: {"val/macro/pass@1": 0.5}}, init_from="/nonexistent/sft")
    no_target = _run(tmp_path, "rl-no-target", {5: {"val/macro/pass@4": 0.5}}, init_from=str(study["sft-a"]))
    wrong_step = _run(
        tmp_path, "rl-wrong-step", {5: {"val/macro/pass@1": 0.5}}, init_from=f"{study['sft-a']}@7"
    )
    with pytest.raises(PredictInputError) as err:
        table_from_runs([], [no_info, bad_link, no_target, wrong_step])
    message = str(err.value)
    assert message.startswith("4 problem(s) in the run directories")
    assert f"GRPO run {no_info}: cannot read {no_info / 'run_info.json'}" in message
    assert "'/nonexistent/sft' (as /nonexistent/sft) is not an SFT run directory" in message
    assert (
        "'val/macro/pass@1' = None, not a finite number (val/macro keys there: ['val/macro/pass@4'])"
        in message
    )
    assert "has no validation at step 7; validated steps: [0, 100, 200]" in message


def test_non_finite_metrics_and_duplicate_ids_are_errors(tmp_path):
    nan_run = _run(tmp_path, "nan-run", {10: _val(0.2, 0.4, "nan")})  # metrics.jsonl stores NaN as "nan"
    rl = _run(tmp_path, "rl", {5: {"val/macro/pass@1": 0.5}}, init_from=str(nan_run))
    with pytest.raises(
        PredictInputError, match=r"step 10 \(nan-run@10\): heldout_loss = 'nan' is not finite"
    ):
        table_from_runs([], [rl])
    twin_a = _run(tmp_path / "x", "sft", {10: _val(0.2, 0.4, 0.8)})
    twin_b = _run(tmp_path / "y", "sft", {10: _val(0.3, 0.4, 0.8)})
    with pytest.raises(PredictInputError, match="run id 'sft@10' appears 2 times"):
        table_from_runs([twin_a, twin_b], [rl])


def test_malformed_metrics_lines_are_named_by_line(tmp_path):
    run = _run(tmp_path, "broken", {10: _val(0.2, 0.4, 0.8)})
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(PredictInputError, match=r"broken/metrics.jsonl:3: not valid JSON"):
        validation_records(run)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    with pytest.raises(PredictInputError, match="has no validation records"):
        table_from_runs([tmp_path / "empty"], [])
