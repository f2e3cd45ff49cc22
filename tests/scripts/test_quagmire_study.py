"""The study script end to end (--quick, the CI run of the whole chain): interrupted once and continued, then
every artefact checked against the runs' own metrics; a rerun skips every stage; bad arguments and a
study directory of other settings stop before anything starts."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_quagmire.study.plan import STUDY_CONF_DIR, load_study_config, plan_jobs
from nemo_quagmire.study.results import verify_study

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "quagmire_study.py"

_spec = importlib.util.spec_from_file_location("quagmire_study", SCRIPT)
quagmire_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quagmire_study)


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """--quick, stopped with SIGTERM once its first stage is done, then run again to the end."""
    out = tmp_path_factory.mktemp("study")
    first = subprocess.Popen(
        _command(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not any((out / "stages" / "sft").glob("*.json")) or not _done_markers(out):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
    result = subprocess.run(_command(out), env=ENV, capture_output=True, text=True, timeout=1200)
    return out, first.returncode, first_err, result


def _done_markers(out: Path) -> list[Path]:
    return [p for p in (out / "stages").rglob("*.json") if '"state": "done"' in p.read_text()]


@pytest.mark.slow
def test_an_interrupted_quick_study_continues_and_every_artefact_agrees(quick_study):
    out, first_status, first_err, result = quick_study
    assert first_status == 130 and "rerun the same command to continue" in first_err
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stages already done" in result.stderr  # the second run skipped what the first finished
    cfg = load_study_config(STUDY_CONF_DIR / "quick.yaml")
    assert verify_study(out, cfg, plan_jobs(cfg, out)) == []
    stdout = result.stdout
    ranking = stdout.split("actual = after GRPO):\n")[1].split("\n\n")[0].splitlines()
    assert len(ranking) == 1 + len(cfg.variants) and [line.split()[0] for line in ranking[1:]] == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert "Best proxy: " in stdout and f"Report: {out / 'report' / 'report.html'}" in stdout
    assert "Every artefact present and consistent" in stdout


@pytest.mark.slow
def test_a_finished_study_skips_every_stage(quick_study):
    out = quick_study[0]
    logs = {p: p.stat().st_size for p in (out / "logs").rglob("*.log")}
    result = subprocess.run(_command(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "9 stages (9 done before)" in result.stdout
    assert {p: p.stat().st_size for p in (out / "logs").rglob("*.log")} == logs  # nothing was launched


@pytest.mark.slow
def test_status_lists_every_stage_as_done(quick_study, capsys):
    assert quagmire_study.main(["--quick", "--out", str(quick_study[0]), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and all(" done in " in line for line in lines)


@pytest.mark.slow
def test_a_table_that_disagrees_with_the_runs_is_reported(quick_study):
    out = quick_study[0]
    cfg = load_study_config(STUDY_CONF_DIR / "quick.yaml")
    table = out / "report" / "table.csv"
    original = table.read_text()
    header, first, *rest = original.splitlines()
    cells = first.split(",")
    cells[-1] = "0.987654"  # the post-RL target of the first row
    try:
        table.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
        problems = verify_study(out, cfg, plan_jobs(cfg, out))
    finally:
        table.write_text(original)
    assert len(problems) == 1 and "post_rl_pass@1 = 0.987654, but the run logged" in problems[0]


@pytest.mark.slow
def test_other_settings_in_the_same_directory_stop_before_anything_starts(quick_study, capsys):
    out = quick_study[0]
    assert quagmire_study.main(["--quick", "--out", str(out), "--grpo-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings (4 job(s))" in err and "max_steps=4" in err


@pytest.mark.slow
def test_a_study_cut_short_reports_on_its_finished_pairs(quick_study, capsys, tmp_path):
    out = quick_study[0]
    # Seed 1 never ran: the report covers seed 0's four pairs (the same report as the finished 1-seed study).
    assert quagmire_study.main(["--quick", "--out", str(out), "--seeds", "2", "--report-finished"]) == 0
    stdout = capsys.readouterr().out
    assert "9 stages (9 done before)" in stdout and "Every artefact present and consistent" in stdout
    assert quagmire_study.main(["--quick", "--out", str(tmp_path), "--report-finished"]) == 1
    assert "0 finished SFT -> GRPO pair(s); the report needs 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "full-1ep,half-2ep,nope"], "unknown variant(s) ['nope']"),
        (["--samples", "1"], "samples = 1: Input should be greater than or equal to 2"),
        (["--variants", "full-1ep,half-2ep"], "variants"),
        (["--plan", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_arguments_exit_2_and_start_nothing(argv, message, tmp_path, capsys):
    assert quagmire_study.main(["--quick", "--out", str(tmp_path / "study"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
