"""Answer checking in worker processes, with a hard per-item deadline that the parent enforces.

Why a pool of our own: math-verify guards its sympy calls with `signal.alarm`, which takes whole seconds,
works only in a main thread and cannot interrupt a long C call; without it one pathological answer hangs
forever (huggingface/Math-Verify#65; verl and simpleRL-reason lost runs to this). The stdlib pools cannot
recover from that: a future's timeout abandons the result but leaves the worker stuck, and a worker that
dies breaks a `ProcessPoolExecutor` for good. Here the parent owns each worker process and its pipe, waits
on all of them with `multiprocessing.connection.wait` and a timeout, and

- sends a problem's distinct answers as one chunk, so the worker parses the gold once;
- gets the verdicts back item by item, and restarts an item's deadline with every message;
- kills a worker that misses the deadline (item graded "timeout") or dies ("error"), re-sends the rest of
  its chunk to a fresh worker, and so loses nothing else. If the gold itself cannot be parsed in time (or
  kills the worker), every answer of that chunk gets the reason, since none of them can be checked.

Inside a worker, the checker's own timeouts (math-verify's alarms; a worker is a main thread) are the first
line of defence and cost no restart; the parent's deadline is the backstop.

No deadlock: the parent sends a chunk only to an idle worker, which is blocked reading its pipe, so the
send completes and the parent goes back to reading; a worker's writes can only wait for that.

Start method: "forkserver" (the default here): the fastest of the three to start workers that import
math-verify from a parent that imported torch (benchmarks/README.md, "Measurements behind design
choices"; each new worker imports math-verify, so restarts cost the same, plus the checker's warm-up).
Fork is also unsafe
in a trainer: the child copies the parent's memory and the locks of its other threads (torch intra-op pools,
the distributed backend) in whatever state they are; a forkserver child inherits neither.

Lifetime: workers are daemon processes; `close()` (or the context manager) stops and reaps them, and a
`weakref.finalize` does the same at garbage collection or interpreter exit. A worker also dies with a main
process that is killed outright, even while it hangs (see `_die_with_parent`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.logging import get_logger

logger = get_logger(__name__)

Chunk = tuple[str, Sequence[str]]  # (gold, distinct answers of one problem)
ResultCallback = Callable[[int, int, str], None]  # (chunk index, answer index, reason)

# Messages from a worker are (index, payload) pairs: an answer index >= 0 with its reason, or one of these.
_GOLD_PARSED = -1
_READY = -2
_SETUP_FAILED = -3

_STOP_GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_num_workers(num_workers: int, what: str) -> int:
    """`num_workers` if it is in 1..usable CPUs. Each worker is a process with its own math-verify and sympy
    (~100 MB); more of them than CPUs only adds memory and scheduling, and a thousand exhaust the machine.

    Raises:
        InputError: naming `what` (the flag or key), the value and the limit.
    """
    limit = usable_cpus()
    if not 1 <= num_workers <= limit:
        raise InputError(
            f"{what}={num_workers}: grading workers must be in 1..{limit} (the CPUs this process may use); "
            f"use {what}={limit} or fewer"
        )
    return num_workers


class AnswerChecker(Protocol):
    """What a worker runs. Implementations must be picklable (they are sent to the worker processes).

    `parse_gold` and `check` raise TimeoutError when their own time limit fires (the item is graded
    "timeout"); any other exception grades it "error".
    """

    def setup(self) -> None:
        """Called once per worker process before any chunk (imports, logging levels)."""

    def parse_gold(self, gold: str) -> Any:
        """Parse the gold answer once per chunk; the result is passed to `check`."""

    def check(self, parsed_gold: Any, answer: str) -> bool:
        """Whether `answer` (an extracted final answer) is equivalent to the gold."""


def _grade_chunk(checker: AnswerChecker, gold: str, answers: Sequence[str]) -> Iterator[tuple[int, str]]:
    """Check one chunk: yields `(_GOLD_PARSED, "")` once the gold is parsed, then `(i, reason)` per answer.

    Reasons are "correct", "wrong", "timeout" (the checker's own time limit) or "error". If the gold cannot
    be parsed, every answer gets that failure's reason.
    """
    try:
        parsed_gold = checker.parse_gold(gold)
    except TimeoutError:
        failure = "timeout"
    except Exception:
        logger.debug("parsing gold %.200r failed", gold, exc_info=True)
        failure = "error"
    else:
        yield _GOLD_PARSED, ""
        for index, answer in enumerate(answers):
            try:
                reason = "correct" if checker.check(parsed_gold, answer) else "wrong"
            except TimeoutError:
                reason = "timeout"
            except Exception:
                logger.debug("checking answer %.200r failed", answer, exc_info=True)
                reason = "error"
            yield index, reason
        return
    for index in range(len(answers)):
        yield index, failure


class InlineRunner:
    """Runs the checker in this process: for debugging only, as nothing can stop an answer that hangs.

    math-verify's alarms only work in the main thread, so `run` refuses to run in any other thread.
    """

    def __init__(self, checker: AnswerChecker) -> None:
        checker.setup()
        self._checker = checker

    def run(self, chunks: Sequence[Chunk], on_result: ResultCallback) -> None:
        """Check every chunk; `on_result(chunk index, answer index, reason)` per answer."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "in-process grading (num_workers=0) relies on math-verify's signal.alarm timeouts, which "
                "work only in the main thread: call it from the main thread or use num_workers >= 1"
            )
        for chunk_index, (gold, answers) in enumerate(chunks):
            for index, reason in _grade_chunk(self._checker, gold, answers):
                if index >= 0:
                    on_result(chunk_index, index, reason)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class _Task:
    """The part of a chunk a worker is checking: answers `start:` of chunk `chunk`, `next` still to come."""

    chunk: int
    start: int
    next: int
    gold_parsed: bool = False


@dataclass
class _Worker:
    process: Any  # a multiprocessing Process of the pool's context
    conn: Connection
    deadline: float  # of its startup until ready, then of its current item
    ready: bool = False
    task: _Task | None = None


class WorkerPool:
    """`num_workers` checker processes with a hard per-item deadline of `timeout_s` seconds.

    Not thread-safe: call `run` from one thread at a time. An exception escaping `run` (a worker that cannot
    start, a raising callback, KeyboardInterrupt) closes the pool, since its workers' state is then unknown.

    Args:
        checker: run in every worker (see `AnswerChecker`).
        num_workers: worker processes, >= 1.
        timeout_s: per-item deadline in seconds: the gold parse and each answer each get this long.
        start_method: multiprocessing start method (see the module docstring for why "forkserver").
        startup_timeout_s: how long a worker may take to import and set up before the pool gives up.
    """

    def __init__(
        self,
        checker: AnswerChecker,
        num_workers: int,
        timeout_s: float,
        *,
        start_method: str = "forkserver",
        startup_timeout_s: float = 60.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 for a WorkerPool, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self._checker = checker
        self._timeout_s = float(timeout_s)
        self._startup_timeout_s = float(startup_timeout_s)
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        """Stop the workers (idle ones get a stop message, busy ones are killed) and reap them. Idempotent."""
        self._finalizer()

    def run(self, chunks: Sequence[Chunk], on_result: ResultCallback) -> None:
        """Check every answer of every chunk; `on_result(chunk index, answer index, reason)` per answer.

        Reasons: "correct", "wrong", "timeout", "error". Returns when every answer has a reason.
        """
        if self.closed:
            raise RuntimeError("this WorkerPool is closed")
        try:
            self._run(chunks, on_result)
        except BaseException:
            self.close()
            raise

    def _run(self, chunks: Sequence[Chunk], on_result: ResultCallback) -> None:
        pending = deque(_Task(index, 0, 0) for index, (_, answers) in enumerate(chunks) if answers)
        outstanding = sum(len(answers) for _, answers in chunks)

        def report(task: _Task, index: int, reason: str) -> None:
            nonlocal outstanding
            outstanding -= 1
            on_result(task.chunk, index, reason)

        while outstanding:
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    gold, answers = chunks[pending[0].chunk]
                    try:
                        worker.conn.send((gold, list(answers[pending[0].start :])))
                    except OSError:
                        continue  # it died while idle: found and replaced below, the task stays queued
                    worker.task = pending.popleft()
                    worker.deadline = time.monotonic() + self._timeout_s
            next_deadline = min(w.deadline for w in self._workers if w.task is not None or not w.ready)
            wait(
                [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                timeout=max(0.0, next_deadline - time.monotonic()),
            )
            for slot, worker in enumerate(self._workers):
                connected = self._receive(worker, chunks, report)
                if not connected or worker.process.exitcode is not None:
                    self._receive(worker, chunks, report)  # whatever it sent before it died
                    self._replace(slot, "error", chunks, pending, report)
                elif (worker.task is not None or not worker.ready) and time.monotonic() >= worker.deadline:
                    self._replace(slot, "timeout", chunks, pending, report)

    def _receive(self, worker: _Worker, chunks: Sequence[Chunk], report: Callable[..., None]) -> bool:
        """Handle every message waiting from `worker`; False if its pipe is closed (the worker is gone)."""
        try:
            while worker.conn.poll():
                index, payload = worker.conn.recv()
                if index == _READY:
                    worker.ready = True
                elif index == _SETUP_FAILED:
                    raise RuntimeError(f"a grading worker failed to start:\n{payload}")
                else:
                    task = worker.task
                    assert task is not None, f"message {index, payload} from an idle worker"
                    if index == _GOLD_PARSED:
                        task.gold_parsed = True
                    else:
                        task.next = task.start + index + 1
                        report(task, task.start + index, payload)
                        if task.next == len(chunks[task.chunk][1]):
                            worker.task = None
                worker.deadline = time.monotonic() + self._timeout_s
        except (EOFError, OSError):
            return False
        return True

    def _replace(
        self,
        slot: int,
        reason: str,
        chunks: Sequence[Chunk],
        pending: deque[_Task],
        report: Callable[..., None],
    ) -> None:
        """Kill the worker in `slot`, grade its current item (or, before the gold parsed, its whole chunk)
        with `reason`, queue the rest of its chunk first, and start a fresh worker in its place."""
        worker = self._workers[slot]
        if not worker.ready:
            if reason == "timeout":
                raise RuntimeError(f"a grading worker did not start within {self._startup_timeout_s:.0f} s")
            worker.process.join(_STOP_GRACE_S)
            raise RuntimeError(
                f"a grading worker died while starting (exit code {worker.process.exitcode}); its "
                "traceback is on stderr. With the forkserver start method, a script that creates a grader "
                "must do so under `if __name__ == '__main__':`"
            )
        task = worker.task
        if task is not None:
            gold, answers = chunks[task.chunk]
            failed = range(task.next, task.next + 1 if task.gold_parsed else len(answers))
            where = f"answer {answers[task.next]!r:.200}" if task.gold_parsed else "the gold"
            logger.warning(
                "grading worker %d: %s on %s (gold %.100r): %d answer(s) graded %r, replacing the worker",
                worker.process.pid,
                reason,
                where,
                gold,
                len(failed),
                reason,
            )
            for index in failed:
                report(task, index, reason)
            if failed.stop < len(answers):
                pending.appendleft(_Task(task.chunk, failed.stop, failed.stop))
        else:
            logger.warning("idle grading worker %d exited (%s); replacing it", worker.process.pid, reason)
        _stop(worker, kill=True)
        self._workers[slot] = self._start_worker()

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._checker), name="nemo-quagmire-grader", daemon=True
        )
        process.start()
        child_conn.close()  # keep only the worker's copy, so its death reads as EOF here
        return _Worker(process, parent_conn, deadline=time.monotonic() + self._startup_timeout_s)


def _worker_main(conn: Connection, checker: AnswerChecker) -> None:
    """Worker process: set up, then check chunks until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    _die_with_parent()
    try:
        checker.setup()
    except BaseException:
        conn.send((_SETUP_FAILED, traceback.format_exc()))
        return
    try:
        conn.send((_READY, ""))
        while (task := conn.recv()) is not None:
            gold, answers = task
            for message in _grade_chunk(checker, gold, answers):
                conn.send(message)
    except (EOFError, OSError):
        pass  # the parent closed the pipe or died


def _die_with_parent() -> None:
    """Make sure this worker cannot outlive a killed main process, even while stuck in a C call.

    Idle workers exit on their own (EOF on the pipe), but a busy one never reads it. So Linux is asked to
    SIGKILL this process when its OS parent exits (PR_SET_PDEATHSIG). That parent is the forkserver, which
    exits when its "main process alive" pipe reaches EOF, that is, once every process holding a copy of the
    pipe's write end is gone: the main process and the forkserver's children, which inherit one. The worker
    starts no processes, so it closes its copy.
    """
    if not sys.platform.startswith("linux"):
        return
    import multiprocessing.forkserver

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    server = multiprocessing.forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        os.close(alive_fd)
        server._forkserver_alive_fd = None


def _stop(worker: _Worker, *, kill: bool) -> None:
    if kill:
        worker.process.kill()
    worker.process.join()
    worker.process.close()
    worker.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    """Stop idle workers by message and busy or starting ones by SIGKILL; reap all (no zombies)."""
    idle = [w for w in workers if w.ready and w.task is None]
    for worker in idle:
        try:
            worker.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for worker in idle:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        _stop(worker, kill=worker.process.exitcode is None)
    workers.clear()
