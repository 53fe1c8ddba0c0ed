"""The load-test and benchmark tools run from any directory, not only from the repository root."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a Python process per tool, each importing its dependencies

TOOLS = [
    "benchmark",
    "bulk_benchmark",
    "fairness",
    "families_benchmark",
    "jobs_burst",
    "mixed_traffic",
    "overload",
    "run_locust",
    "soak",
    "store_benchmark",
    "sweep",
]


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_starts_outside_the_repository(tool, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", f"loadtest.{tool}", "--help"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no PYTHONPATH: the installed package only
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m loadtest.{tool}")
