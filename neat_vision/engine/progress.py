"""Progress reporting: a tqdm bar when stderr is a terminal, else periodic log lines with an ETA."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "format_seconds", "log_to_stdout"]

logger = logging.getLogger("neat_vision.engine")


def log_to_stdout() -> None:
    """What a runner's ``main`` does first: log lines (progress with ETA, epochs) on stdout, from rank 0 only."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def format_seconds(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """Optimizer steps of one epoch: ``update(step, info)`` after each step, ``close()`` at the end.

    Args:
        desc: prefix, e.g. ``epoch 3/10``.
        total: optimizer steps in the epoch; ``initial``: steps already done (resumed mid-epoch).
        interval: steps between log lines (when stderr is not a terminal).
        enabled: ``False`` on ranks other than 0.
    """

    def __init__(self, desc: str, total: int, initial: int, interval: int, enabled: bool) -> None:
        self.desc, self.total, self.initial, self.interval = desc, total, initial, interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, step: int, info: dict[str, str]) -> None:
        """Report that ``step`` (1-based, within the epoch) is done."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(info, refresh=False)
            return
        if step % self.interval and step != self.total:
            return
        per_step = (time.perf_counter() - self.start) / max(step - self.initial, 1)
        details = " ".join(f"{k} {v}" for k, v in info.items())
        logger.info(
            "%s step %d/%d (%3.0f%%) %s | eta %s",
            self.desc,
            step,
            self.total,
            100.0 * step / self.total,
            details,
            format_seconds(per_step * (self.total - step)),
        )

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
