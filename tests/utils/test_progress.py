"""SampleProgress: a bar per benchmark on a terminal, log lines elsewhere, nothing off rank 0."""

from __future__ import annotations

import io
import logging

import pytest

from nemo_quagmire.utils.progress import SampleProgress, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_per_benchmark_with_rates():
    stream = _Terminal()
    progress = SampleProgress({"gsm8k": 100, "aime24": 30}, {"gsm8k": 40}, stream=stream)
    progress.begin("gsm8k")
    progress.update("gsm8k", 20, 700)
    progress.close()
    text = stream.getvalue()
    assert "gsm8k " in text and "aime24" in text  # names padded to one width
    assert "60/100" in text and "0/30" in text  # resumed samples count from the start
    assert "samples/s" in text and "tok/s" in text


def test_log_lines_report_progress_rate_and_eta(caplog):
    progress = SampleProgress({"gsm8k": 100}, {"gsm8k": 40}, stream=io.StringIO(), interval_s=3600)
    with caplog.at_level(logging.INFO, logger="nemo_quagmire"):
        progress.begin("gsm8k")
        progress.update("gsm8k", 20, 700)  # the first line comes at once, the next after interval_s
        progress.update("gsm8k", 20, 700)
        progress.update("gsm8k", 20, 700)  # complete: always reported
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("gsm8k: 60/100 samples (60%), ") and lines[0].endswith("s")
    assert lines[1].startswith("gsm8k: 100/100 samples (100%), ") and lines[1].endswith("ETA 0s")


def test_only_rank_0_reports(monkeypatch, caplog):
    monkeypatch.setattr("nemo_quagmire.utils.progress.global_rank", lambda: 1)
    stream = _Terminal()
    progress = SampleProgress({"gsm8k": 10}, stream=stream)
    with caplog.at_level(logging.INFO, logger="nemo_quagmire"):
        progress.update("gsm8k", 10, 10)
    progress.close()
    assert stream.getvalue() == "" and not caplog.records


@pytest.mark.parametrize(("seconds", "text"), [(12.3, "12s"), (754, "12m34s"), (7384, "2h03m"), (-1, "0s")])
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text
