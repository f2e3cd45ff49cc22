"""The worker pool under faults: a hung worker is killed at the deadline ("timeout"), a crashed one is
replaced ("error"), math-verify's own alarm stops a slow parse without a restart, the rest of each batch is
graded as if nothing happened, the pool keeps working afterwards, and closing it leaves no process behind.
Faults come from tests/rewards/faults.py, passed in as the checker (production code has no such hooks)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from nemo_quagmire.rewards import GradeResult, MathGrader
from nemo_quagmire.rewards.pool import WorkerPool
from tests.rewards.faults import CRASH, HANG, HANG_GOLD, SLOW, BrokenSetupChecker, FaultyChecker

TIMEOUT_S = 1.5  # parent deadline; FaultyChecker's own math-verify alarm is 1 s
# Warmed up where the deadline is short, so that a loaded machine is unlikely to push a first check past it.
FAULTY = FaultyChecker(timeout_s=1)
FAULTY_COLD = FaultyChecker(timeout_s=1, warm_up=False)  # starts faster, for long deadlines
REPO = Path(__file__).resolve().parents[2]


def boxed(answer: str) -> str:
    return f"so the answer is $\\boxed{{{answer}}}$."


def right(answer: str) -> GradeResult:
    return GradeResult(True, answer, "correct")


def wrong(answer: str) -> GradeResult:
    return GradeResult(False, answer, "wrong")


def descendants() -> set[int]:
    """Pids of our descendant processes (zombies included), except multiprocessing's forkserver and resource
    tracker: they are shared by every pool and outlive them. The workers are the forkserver's children."""
    me = psutil.Process()
    helpers = set()
    for child in me.children():
        try:
            if "from multiprocessing." in " ".join(child.cmdline()):
                helpers.add(child.pid)
        except psutil.ZombieProcess:
            pass
    return {p.pid for p in me.children(recursive=True)} - helpers


def wait_until_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    """The pids among `pids` still present (zombies included) after waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (alive := {pid for pid in pids if psutil.pid_exists(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_hang_and_crash_lose_only_their_own_item_and_the_pool_keeps_working():
    before = descendants()
    # One problem per gold; the faulty answers sit in the middle of their problem's chunk, so the answers
    # after them must be re-sent to the replacement worker.
    golds = ["\\frac{1}{2}"] * 4 + ["x+1"] * 4 + ["\\sqrt{2}"] * 2
    answers = ["0.5", HANG, "1/2", "0.6"] + ["1+x", CRASH, "x+2", "x+1"] + ["2^{1/2}", "1.414"]
    with MathGrader(num_workers=2, timeout_s=TIMEOUT_S, checker=FAULTY) as grader:
        workers = descendants() - before
        assert len(workers) == 2
        results = grader.grade(golds, [boxed(a) for a in answers])
        assert results == [
            right("0.5"),
            GradeResult(False, HANG, "timeout"),
            right("1/2"),
            wrong("0.6"),
            right("1+x"),
            GradeResult(False, CRASH, "error"),
            wrong("x+2"),
            right("x+1"),
            right("2^{1/2}"),
            wrong("1.414"),
        ]
        stats = grader.last_stats
        assert (stats.num_timeout, stats.num_error) == (1, 1)
        assert not wait_until_gone(workers)  # both original workers were killed and reaped...
        assert len(descendants() - before) == 2  # ... and replaced

        # The pool still grades, and a second hang in a later call is handled the same way.
        again = grader.grade(["x+1", "x+1", "7"], [boxed("x+1"), boxed(HANG), boxed("7")])
        assert again == [right("x+1"), GradeResult(False, HANG, "timeout"), right("7")]
        workers = descendants() - before
    assert not wait_until_gone(workers), "worker processes outlived the grader"
    assert descendants() == before


def test_math_verify_alarm_stops_a_slow_parse_without_a_restart():
    # The parent deadline (3 s) is longer than math-verify's own alarm (1 s): the worker survives.
    before = descendants()
    with MathGrader(num_workers=1, timeout_s=3.0, checker=FAULTY_COLD) as grader:
        worker = descendants() - before
        results = grader.grade(["x"] * 3, [boxed("x"), boxed(f"\\text{{{SLOW}}}"), boxed("2x")])
        assert results == [right("x"), GradeResult(False, f"\\text{{{SLOW}}}", "timeout"), wrong("2x")]
        assert descendants() - before == worker


def test_gold_that_hangs_times_out_its_problem_only():
    golds = [HANG_GOLD] * 3 + ["y"] * 2
    answers = ["a", "b", "c", "y", "z"]
    with MathGrader(num_workers=2, timeout_s=TIMEOUT_S, checker=FAULTY) as grader:
        results = grader.grade(golds, [boxed(a) for a in answers])
    # No answer of the first problem can be checked without its gold.
    assert results == [GradeResult(False, a, "timeout") for a in "abc"] + [right("y"), wrong("z")]


def test_worker_that_cannot_start_raises_with_its_traceback():
    grader = MathGrader(num_workers=1, timeout_s=TIMEOUT_S, checker=BrokenSetupChecker())
    with pytest.raises(RuntimeError, match="(?s)failed to start.*ImportError: math-verify is missing"):
        grader.grade(["x"], [boxed("x")])
    with pytest.raises(RuntimeError, match="closed"):
        grader.grade(["x"], [boxed("x")])  # a failed run closes the pool: its workers' state is unknown


def test_close_reaps_busy_and_idle_workers():
    before = descendants()
    pool = WorkerPool(FAULTY_COLD, num_workers=2, timeout_s=60.0)
    pool.run([("x", ["x"]), ("y", ["y"])], lambda *result: None)  # both workers are up
    workers = set(pool.pids())
    assert workers == descendants() - before

    class Stop(Exception):
        pass

    def stop(*result: object) -> None:
        raise Stop

    # The first worker hangs on its chunk; the other's result makes the callback raise, which closes the
    # pool with one worker busy (killed) and one idle (told to stop).
    with pytest.raises(Stop):
        pool.run([("x", [HANG]), ("y", ["y"])], stop)
    assert pool.closed
    assert not wait_until_gone(workers)
    assert descendants() == before
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([("x", ["x"])], lambda *result: None)


def test_pool_validates_its_arguments():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        WorkerPool(FAULTY_COLD, num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        WorkerPool(FAULTY_COLD, num_workers=1, timeout_s=0.0)


def _start_script(body: str) -> subprocess.Popen:
    """Run `body` (under a main guard) in a fresh interpreter; it prints "ready" when its workers are up."""
    script = "from nemo_quagmire.rewards import MathGrader\nfrom tests.rewards.faults import *\n"
    script += "if __name__ == '__main__':\n" + textwrap.indent(textwrap.dedent(body), "    ")
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready", child.communicate()
    return child


def test_workers_stop_at_interpreter_exit_without_close():
    child = _start_script(
        """
        grader = MathGrader(num_workers=2)
        assert grader.grade(["x"], ["\\\\boxed{x}"])[0].correct
        print("ready", flush=True)
        input()  # then exit without closing the grader
        """
    )
    processes = {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
    _, stderr = child.communicate("\n", timeout=30)
    assert child.returncode == 0 and not stderr, stderr
    assert not wait_until_gone(processes)


def test_a_hung_worker_dies_with_a_killed_parent():
    child = _start_script(
        f"""
        grader = MathGrader(num_workers=2, timeout_s=600, checker={FAULTY_COLD!r})
        grader.grade(["x", "y"], ["\\\\boxed{{x}}", "\\\\boxed{{y}}"])
        print("ready", flush=True)
        grader.grade(["x"], ["\\\\boxed{{{HANG}}}"])
        """
    )
    processes = {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
    assert child.stdout.readline().strip() == "hanging"  # printed by the worker
    child.send_signal(signal.SIGKILL)  # no atexit, no close(): only the kernel can stop the hung worker
    child.communicate(timeout=30)
    assert not wait_until_gone(processes)
