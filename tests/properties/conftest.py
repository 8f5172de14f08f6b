"""The property suite's report: with ``DEQHESS_PROPERTIES_REPORT=path``, the examples run
per test and the worst relative error per quantity are written there as JSON at the end
of the session (``benchmarks/properties.py`` reads it)."""

from __future__ import annotations

import json
import os

from random_cells import EXAMPLES, PROFILE, WORST


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DEQHESS_PROPERTIES_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump({"profile": PROFILE, "examples": EXAMPLES, "worst": WORST}, out, indent=1)
