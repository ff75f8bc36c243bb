"""A runner (``train``, ``glue``, ``instruct``) that pauses after optimizer step ``PAUSE_STEP`` (a test helper).

``python tests/preempt_worker.py RUNNER ARGS...``: at that step the process (on rank ``PAUSE_RANK`` only) prints
``PAUSED pid=<pid>`` and waits (at most 120 s) until it receives a stop signal, so a test signals it mid-epoch
without racing the run, or kills it there.
"""

from __future__ import annotations

import os
import sys
import time

import neat_vision.engine.loop as loop_module

PAUSE_STEP = int(os.environ.get("PAUSE_STEP", "0"))
PAUSE_RANK = int(os.environ.get("PAUSE_RANK", "0"))
_step = loop_module.TrainLoop._optimizer_step


def _paused_step(self, terms: int) -> None:
    _step(self, terms)
    if self.progress.global_step + 1 == PAUSE_STEP and self.env.rank == PAUSE_RANK:
        print(f"PAUSED pid={os.getpid()}", flush=True)
        deadline = time.monotonic() + 120
        while self.signal is None and time.monotonic() < deadline:
            time.sleep(0.01)


loop_module.TrainLoop._optimizer_step = _paused_step

if __name__ == "__main__":
    runner, argv = sys.argv[1], sys.argv[2:]
    if runner == "train":
        from neat_vision.engine import main

        main(argv)
        sys.exit(0)
    if runner == "glue":
        from neat_vision.nlp.glue import main
    else:
        from neat_vision.nlp.instruct import main
    sys.exit(main(argv))
