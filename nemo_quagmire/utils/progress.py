"""Progress of sample generation per benchmark: tqdm bars on a terminal, periodic log lines otherwise.

Why both: an evaluation of n = 256 samples per problem runs for hours, and a silent one cannot be told from a
hung one. On a terminal each benchmark gets a bar with samples/s, tokens/s and the ETA; under a batch system
(stderr redirected to a file) bars would be thousands of carriage returns, so the same numbers go out as a log
line per benchmark every `interval_s` seconds and when the benchmark is done. Only rank 0 reports. Updates
may come from several generation threads at once.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from nemo_quagmire.utils.logging import get_logger, global_rank

__all__ = ["SampleProgress", "format_duration"]

logger = get_logger(__name__)


def format_duration(seconds: float) -> str:
    """12.3 -> "12s", 754 -> "12m34s", 7384 -> "2h03m"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SampleProgress:
    """Generated samples per benchmark against their totals.

    Args:
        totals: benchmark -> samples to generate in all (including those already done).
        done: benchmark -> samples already done before this run (resumed shards); not counted in the rates.
        enabled: report at all (only rank 0 ever does).
        interval_s: seconds between log lines per benchmark when `stream` is not a terminal.
        stream: where bars go (default stderr); a terminal gets bars, anything else log lines.
    """

    def __init__(
        self,
        totals: Mapping[str, int],
        done: Mapping[str, int] | None = None,
        *,
        enabled: bool = True,
        interval_s: float = 30.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.enabled = enabled and global_rank() == 0
        self.totals = dict(totals)
        self.initial = {name: (done or {}).get(name, 0) for name in totals}
        self.samples = dict(self.initial)
        self.tokens = dict.fromkeys(totals, 0)
        self.interval_s = interval_s
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._start: dict[str, float] = {}
        self._last_line = dict.fromkeys(totals, -math.inf)  # the first update is reported at once
        self._bars: dict[str, Any] = {}
        if self.enabled and self._stream.isatty():
            from tqdm.auto import tqdm

            width = max(len(name) for name in totals)
            self._bars = {
                name: tqdm(
                    total=total,
                    initial=self.initial[name],
                    desc=f"{name:<{width}}",
                    unit="samples",
                    position=position,
                    file=self._stream,
                    dynamic_ncols=True,
                )
                for position, (name, total) in enumerate(totals.items())
            }

    def begin(self, benchmark: str) -> None:
        """Generation of `benchmark` starts now (its rates count from the first call)."""
        if self.enabled:
            with self._lock:
                self._start.setdefault(benchmark, time.perf_counter())

    def update(self, benchmark: str, samples: int, tokens: int) -> None:
        """`samples` more completions of `benchmark`, `tokens` generated tokens among them."""
        if not self.enabled:
            return
        with self._lock:
            now = time.perf_counter()
            start = self._start.setdefault(benchmark, now - 1e-9)
            self.samples[benchmark] += samples
            self.tokens[benchmark] += tokens
            if self._bars:
                bar = self._bars[benchmark]
                bar.set_postfix_str(f"{self.tokens[benchmark] / (now - start):.0f} tok/s", refresh=False)
                bar.update(samples)
                return
            complete = self.samples[benchmark] >= self.totals[benchmark]
            if complete or now - self._last_line[benchmark] >= self.interval_s:
                self._last_line[benchmark] = now
                logger.info("%s", self.line(benchmark, now))

    def line(self, benchmark: str, now: float | None = None) -> str:
        """ "gsm8k: 1200/5000 samples (24%), 35.2 samples/s, 4100 tok/s, ETA 1m48s"."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self._start.get(benchmark, now), 1e-9)
        done, total = self.samples[benchmark], self.totals[benchmark]
        rate = (done - self.initial[benchmark]) / elapsed
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        return (
            f"{benchmark}: {done}/{total} samples ({100 * done / max(total, 1):.0f}%), {rate:.1f} samples/s, "
            f"{self.tokens[benchmark] / elapsed:.0f} tok/s, ETA {eta}"
        )

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}
