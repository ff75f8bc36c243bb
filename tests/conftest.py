import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """Say loudly whether the DeepSpeed ZeRO-3 rows of tests/test_compat.py ran, and if not, why."""
    counts: dict[str, int] = {}
    reasons: set[str] = set()
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_compat.py::test_setup_trains_like_eager[deepspeed-" not in nodeid:
                continue
            if outcome == "passed" and getattr(report, "when", "call") != "call":
                continue
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                reasons.add(str(report.longrepr[2]).removeprefix("Skipped: "))
    if not counts:
        return
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    if counts.get("skipped"):
        terminalreporter.write_line(
            f"DeepSpeed ZeRO-3 rows: NOT RUN ({summary}); why: {'; '.join(sorted(reasons))}", yellow=True, bold=True
        )
    else:
        terminalreporter.write_line(f"DeepSpeed ZeRO-3 rows: ran ({summary})", bold=True)
