"""Unwritable and full outputs: found before the work (a path that is a file, a read-only location), and a
disk that fills up during the writing leaves nothing partial. Read-only and full file systems are real
tmpfs mounts where the machine allows them; simulated errors cover the same paths everywhere."""

from __future__ import annotations

import errno
import io
import json
import os

import pytest

from nemo_quagmire.utils import io as io_utils
from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.io import check_output_dir, write_outputs
from tests.faults.conftest import GRADE_FIXTURES, REPO, load_script, tree

PREDICT_TABLE = REPO / "scripts" / "examples" / "predict" / "checkpoints.csv"
PREPARE_SOURCES = REPO / "tests" / "scripts" / "fixtures" / "prepare_benchmarks"


def _commands(out):
    """Each CLI with valid input and `out` as its output location: (script, argv)."""
    grade = ["--samples", str(GRADE_FIXTURES / "samples.jsonl"), "--benchmarks-dir"]
    return {
        "grade": ("grade", [*grade, str(GRADE_FIXTURES / "benchmarks"), "--workers", "1", "--out", str(out)]),
        "predict_report": (
            "predict_report",
            [
                "--table",
                str(PREDICT_TABLE),
                "--target",
                "post_rl_pass@1",
                "--bootstrap",
                "50",
                "--out",
                str(out),
            ],
        ),
        "evaluate": ("evaluate", ["--regrade", str(out.parent), "--out", str(out), "--grader-workers", "1"]),
        "prepare_benchmarks": (
            "prepare_benchmarks",
            ["--source-dir", str(PREPARE_SOURCES), "--no-blob-check", "--out", str(out)],
        ),
        "train_sft": ("train_sft", [f"run_dir={out}"]),
        "train_grpo": ("train_grpo", [f"run_dir={out}"]),
    }


@pytest.fixture
def no_model(monkeypatch):
    from nemo_quagmire.megatron import parallel

    monkeypatch.setattr(parallel, "parallel_context", lambda *a, **k: pytest.fail("the run started"))


@pytest.mark.parametrize("command", sorted(_commands(REPO)))
def test_output_path_that_is_a_file_is_refused_before_the_work(tmp_path, capsys, no_model, command):
    out = tmp_path / "taken"
    out.write_text("keep me")
    script, argv = _commands(out)[command]
    assert load_script(script).main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} is a file, not a directory" in err and "Traceback" not in err
    assert out.read_text() == "keep me" and tree(tmp_path) == ["taken"]


@pytest.mark.parametrize("command", sorted(_commands(REPO)))
def test_read_only_output_is_refused_before_the_work(tmpfs, capsys, no_model, command):
    read_only = tmpfs(read_only=True)
    script, argv = _commands(read_only / "out")[command]
    assert load_script(script).main(argv) == 2
    err = capsys.readouterr().err
    assert f"{read_only / 'out'}: cannot create files in {read_only} (Read-only file system)" in err, err


def test_unwritable_output_is_refused_without_a_mount(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io_utils.tempfile, "mkstemp", read_only)
    with pytest.raises(InputError, match=r"--out .*: cannot create files in .* \(Read-only file system\)"):
        check_output_dir(tmp_path / "a" / "b", "--out")
    assert tree(tmp_path) == []


def test_a_full_disk_while_writing_leaves_nothing(tmpfs, capsys):
    small = tmpfs(size="4k")  # one page: the probe and the first file fit, the second does not
    script, argv = _commands(small / "out")["grade"]
    assert load_script(script).main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert tree(small) == []


def test_a_failure_on_the_second_file_removes_the_first(tmp_path, monkeypatch):
    real_fdopen, calls = os.fdopen, []

    def fill_up_on_second(fd, mode, *args, **kwargs):
        calls.append(fd)
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if len(calls) == 2:
            handle.write = lambda data: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")
            )
        return handle

    monkeypatch.setattr(io_utils.os, "fdopen", fill_up_on_second)
    with pytest.raises(OSError, match="No space left"):
        write_outputs(tmp_path / "out", {"a.json": "{}", "b.json": "{}"})
    assert tree(tmp_path) == []  # neither file, no temporary, and the directory this call created is gone

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a.json").write_text("old")
    calls.clear()
    with pytest.raises(OSError):
        write_outputs(tmp_path / "kept", {"a.json": "new", "b.json": "{}"})
    assert tree(tmp_path / "kept") == ["a.json"] and (tmp_path / "kept" / "a.json").read_text() == "old"


def test_outputs_appear_together(tmp_path):
    paths = write_outputs(tmp_path / "out", {"m.json": json.dumps({"x": 1}), "raw.bin": b"\x00"})
    assert [p.name for p in paths] == ["m.json", "raw.bin"] and tree(tmp_path / "out") == [
        "m.json",
        "raw.bin",
    ]
    assert io.BytesIO((tmp_path / "out" / "raw.bin").read_bytes()).read() == b"\x00"
