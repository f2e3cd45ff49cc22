"""The non-finite guard of `RunLoop` (shared by SFT and GRPO): a step counts when every update it attempted
was skipped, a step with an applied update resets the count, a step with nothing to train on does neither."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nemo_quagmire.trainer.run import NonFiniteLossError, RunLoop, StepResult


def _loop(limit: int) -> RunLoop:
    loop = RunLoop.__new__(RunLoop)  # the guard reads the limit, the step and its own count only
    loop.cfg = SimpleNamespace(optim=SimpleNamespace(max_consecutive_nonfinite=limit))
    loop.step, loop.nonfinite_in_a_row = 0, 0
    return loop


def _step(loop: RunLoop, updates: int, skipped: int) -> int:
    loop.step += 1
    loop._guard_nonfinite(StepResult({}, tokens=0.0, updates=updates, skipped_updates=skipped))
    return loop.nonfinite_in_a_row


def test_only_steps_without_an_applied_update_count_and_the_limit_stops_the_run():
    loop = _loop(limit=3)
    assert [_step(loop, 2, 2), _step(loop, 0, 0), _step(loop, 2, 2)] == [1, 1, 2]  # no update: no change
    assert _step(loop, 2, 1) == 0  # one of two updates applied: the run is making progress again
    assert [_step(loop, 1, 1), _step(loop, 1, 1)] == [1, 2]
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*max_consecutive_nonfinite=3"):
        _step(loop, 1, 1)
