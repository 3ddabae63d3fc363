"""A pytest plugin: one JSON line per test as it ends, to ``$PYFAST_TUNE_GPU_PYTEST_LOG``.

The kit's pytest part runs under a time budget; a line written when each test ends means a
run killed for time still reports every test it finished (a JUnit file is written at the end
only). Loaded with ``-p pyfast_tune.gpu_check.pytest_log``.
"""

from __future__ import annotations

import json
import os

LOG_ENV = "PYFAST_TUNE_GPU_PYTEST_LOG"


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(LOG_ENV)
    # One line per test: its call phase, or the setup/teardown phase that failed or skipped it.
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    line = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
            "seconds": round(report.duration, 3)}  # fmt: skip
    if report.skipped and isinstance(report.longrepr, tuple):
        line["reason"] = report.longrepr[2]
    elif report.failed:
        line["error"] = str(report.longreprtext)[-3000:]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
