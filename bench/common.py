"""What the CPU benchmarks share: the peak-RSS sampler and the word list their rows are drawn from."""

from __future__ import annotations

import os
import threading
import time

WORDS = ("what fruit is shown in this image the shape red green blue yellow circle square triangle star left "
         "right top bottom small large apple one two three four five describe picture question answer").split()


class PeakRSS:
    """This process's peak resident set size, sampled every millisecond in a background thread while in a
    ``with`` block. ``start_value``: the RSS on entering; ``peak`` may be reset from outside (per step)."""

    def __init__(self) -> None:
        self.start_value = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        self.start_value = self.now()
        self.peak = max(self.peak, self.start_value)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
