import os
import sys
from pathlib import Path

# Ray 2.60 turns on token auth once ~/.ray/auth_token exists; local test clusters run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    """Times that tests measure (record_property) but never assert, listed at the end of the run."""
    measured = [
        (report.nodeid.split("::")[-1], name, value)
        for report in terminalreporter.stats.get("passed", [])
        for name, value in report.user_properties
    ]
    if measured:
        terminalreporter.section("measurements")
        for test, name, value in measured:
            terminalreporter.write_line(f"{name}: {value}    [{test}]")
