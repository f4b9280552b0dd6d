"""Logging and progress: a tqdm bar on a terminal, plain periodic log lines in batch jobs."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process (stage entry points call this)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    else:
        root.setLevel(level)


class Progress:
    """``update(n, **stats)`` counts work; on a TTY it drives tqdm, otherwise it logs a line
    every ``log_every_s`` seconds (Slurm logs stay readable, no carriage-return spam)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", log_every_s: float = 30.0,
                 logger: logging.Logger | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self.stats: dict[str, Any] = {}
        self._log = logger or logging.getLogger("progress")
        self._every = log_every_s
        self._start = self._last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **stats: Any) -> None:
        self.count += n
        self.stats.update(stats)
        if self._bar is not None:
            self._bar.update(n)
            if stats:
                self._bar.set_postfix(self.stats, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        extra = " ".join(f"{k}={v}" for k, v in self.stats.items())
        return f"{self.desc}: {self.count}{total} {self.unit} ({self.count / elapsed:.2f} {self.unit}/s) {extra}".rstrip()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log.info("%s (done)", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
