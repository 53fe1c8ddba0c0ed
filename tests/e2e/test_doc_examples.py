"""The README's examples, run as written, in order, against the demo server (tests/doc_examples.py).

A reader who follows the README after `make serve` runs these same commands: a failing one here is
a broken instruction there.
"""

from __future__ import annotations

from doc_examples import ExampleRunner, extract_examples
from harness import REPO


def test_every_readme_example_runs_against_the_demo_server(demo_server, tmp_path):
    examples = extract_examples((REPO / "README.md").read_text(), "README.md")
    ran = ExampleRunner(tmp_path, demo_server, repo=REPO).run_all(examples)
    skipped = [e for e in examples if e.skip_reason]
    # Skipping is the exception (a block that starts servers, clusters or minutes of load), each one says why.
    assert len(ran) > 2 * len(skipped), [e.where for e in skipped]
