"""Silent acceptance: input that used to be accepted with a wrong or unchecked result is refused (or used).

- a data file key set but not read (train_sft data.train_file=<file> without data.task=jsonl);
- a benchmark name that is a path (it loaded a file outside --benchmarks-dir);
- features with huge but finite values (1e300 was zeroed and another feature set ranked best);
- bare NaN in JSONL: see test_json_lines.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from nemo_quagmire.config.run import ValidationConfig
from nemo_quagmire.eval.benchmarks import BenchmarkError, load_benchmark
from nemo_quagmire.megatron import parallel
from nemo_quagmire.predict.regression import fit_feature_set
from tests.faults.conftest import GRADE_FIXTURES, load_script


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(parallel, "parallel_context", refuse)


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [
        (
            "train_sft",
            ["data.train_file={tmp}/missing.jsonl"],
            "data.train_file set but data.task='synthetic'",
        ),
        ("train_sft", ["data.train_file={tmp}/real.jsonl"], "set data.task=jsonl to train on the file"),
        ("train_grpo", ["data.tokenizer={tmp}"], "data.tokenizer set but data.task='synthetic'"),
        (
            "train_sft",
            ["validation.heldout_file={tmp}/real.jsonl", "validation.heldout_loss=false"],
            "ignored",
        ),
        (
            "train_sft",
            [
                "data.task=jsonl",
                "data.train_file={tmp}/missing.jsonl",
                "data.tokenizer={tmp}",
                "validation.benchmarks=[]",
                "validation.heldout_file={tmp}/real.jsonl",
            ],
            "data.train_file='{tmp}/missing.jsonl': no such file",
        ),
        (
            "train_grpo",
            ["validation.heldout_file={tmp}/missing.jsonl"],
            "validation.heldout_file='{tmp}/missing.jsonl': no such file",
        ),
    ],
)
def test_training_data_keys_are_used_or_refused(tmp_path, capsys, no_model, script, overrides, message):
    (tmp_path / "real.jsonl").write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    argv = [f"run_dir={tmp_path}/run", *(o.format(tmp=tmp_path) for o in overrides)]
    code = load_script(script).main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["/etc/passwd", "../alpha", "sub/alpha", "alpha/../../x", ".hidden", ""])
def test_benchmark_names_that_are_paths_are_refused(name):
    with pytest.raises(BenchmarkError, match="not a plain name"):
        load_benchmark(name, GRADE_FIXTURES / "benchmarks")
    with pytest.raises(ValidationError, match="not a plain name"):
        ValidationConfig(benchmarks=(name,))


def test_grade_refuses_a_benchmark_outside_the_directory(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "alpha.jsonl").write_text((GRADE_FIXTURES / "benchmarks" / "alpha.jsonl").read_text())
    samples = tmp_path / "s.jsonl"
    record = {"benchmark": str(outside / "alpha"), "id": "alpha-1", "completion": "\\boxed{12}"}
    samples.write_text(json.dumps(record) + "\n")
    argv = ["--samples", str(samples), "--benchmarks-dir", str(GRADE_FIXTURES / "benchmarks")]
    code = load_script("grade").main([*argv, "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"{samples}:1: benchmark name" in err and "not a plain name" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e150])
def test_huge_or_tiny_finite_features_fit_like_their_rescaled_copy(scale):
    x = np.array([[1.0, 0.3], [2.0, 0.1], [3.0, 0.4], [4.0, 0.1], [5.0, 0.5], [6.0, 0.9]])
    y = np.array([0.10, 0.25, 0.29, 0.42, 0.50, 0.61])
    plain = fit_feature_set(x, y, ["a", "b"], resamples=50)
    scaled = fit_feature_set(x * [scale, 1.0], y, ["a", "b"], resamples=50)
    assert scaled.r2_loo == pytest.approx(plain.r2_loo, rel=1e-9)
    np.testing.assert_allclose(scaled.predicted, plain.predicted, rtol=1e-9)
    assert scaled.coef["a"] * scale == pytest.approx(plain.coef["a"], rel=1e-9) and plain.coef["a"] != 0


def test_predict_report_ranks_the_same_with_a_1e300_feature(tmp_path):
    rows = [(f"r{i}", i + 1.0, ((i * 7) % 5) / 10, 0.1 * i + 0.01 * ((i * 3) % 4)) for i in range(8)]
    for scale, name in ((1.0, "plain"), (1e300, "huge")):
        table = tmp_path / f"{name}.csv"
        table.write_text(
            "run,big,noise,post\n" + "".join(f"{r},{b * scale!r},{n},{p}\n" for r, b, n, p in rows)
        )
        out = tmp_path / name
        assert (
            load_script("predict_report").main(["--table", str(table), "--target", "post", "--out", str(out)])
            == 0
        )
    plain, huge = (json.loads((tmp_path / n / "fit.json").read_text()) for n in ("plain", "huge"))
    assert [f["features"] for f in huge] == [f["features"] for f in plain]
    assert plain[0]["features"] == ["big"]
    assert huge[0]["r2_loo"] == pytest.approx(plain[0]["r2_loo"], rel=1e-9)
