"""The README's examples, run as written, in order, against the demo server (tests/doc_examples.py).

A reader who follows the README after `make serve` runs these same commands: a failing one here is
a broken instruction there.
"""

from __future__ import annotations

from doc_examples import ExampleRunner, extract_examples
from harness import REPO


def test_every_readme_example_runs_against_the_demo_server(demo_server, tmp_path, record_property):
    examples = extract_examples((REPO / "README.md").read_text(), "README.md")
    runner = ExampleRunner(tmp_path, demo_server, repo=REPO)
    ran = runner.run_all(examples)
    slowest = sorted(runner.seconds.items(), key=lambda item: -item[1])[:3]
    record_property("README examples: slowest (line: s)", ", ".join(f"{line}: {s:.1f}" for line, s in slowest))
    skipped = [e for e in examples if e.skip_reason]
    # Skipping is the exception (a block that starts servers, clusters or minutes of load), each one says why.
    assert len(ran) > 2 * len(skipped), [e.where for e in skipped]
