"""Progress of long work: a tqdm bar on a terminal; elsewhere (a log file, CI) one plain line at
most every ``LOG_INTERVAL_S`` seconds, so a long search is never silent for long (tqdm alone
prints nothing when stderr is not a terminal, and a bar's carriage returns make one endless line
of a log)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 30.0

# When the last line was logged, by any bar: one that starts after a quiet one still keeps the pace.
_last_line = time.monotonic()


class LogLines:
    """The part of tqdm's interface used here (``update``, ``set_postfix``, ``close``), as lines."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.started = time.monotonic()

    def update(self, n: int = 1) -> None:
        global _last_line
        self.n += n
        now = time.monotonic()
        if now - _last_line >= LOG_INTERVAL_S:
            _last_line = now
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}{self.postfix} ({now - self.started:.0f} s)",
                  file=sys.stderr, flush=True)

    def set_postfix(self, values: dict) -> None:
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm | LogLines:
    """A bar for ``total`` steps: tqdm on a terminal, ``LogLines`` otherwise, nothing if not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LogLines(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
