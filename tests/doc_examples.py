"""Run a Markdown document's shell and Python examples, in order, as a reader would.

Every ```bash / ```sh / ```python block runs in one working directory shared by the
document's examples (a later example may read what an earlier one wrote, as a reader's
terminal does), with `http://127.0.0.1:8000` pointed at the server under test. A block
fails the document on a non-zero exit and on any error answer from the server: `curl`
runs with `--fail-with-body`, and httpx's module-level calls (`httpx.post(...)`) raise on
4xx/5xx. Each Python block runs alone in a fresh interpreter, so it must import what it
uses, as it must for a reader who copies just that block.

A block that cannot run here says so on the line right before its fence:

    <!-- example: skip (starts a server; CI starts its own) -->

Other languages (json, yaml, console, plain) are output or configuration, never run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DOCUMENTED_URL = "http://127.0.0.1:8000"
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SKIP_MARKER = re.compile(r"<!--\s*example:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
TIMEOUT_S = 240
EARLY_EXIT_READER = re.compile(r"\|\s*head\b")
# Links in the working directory, so examples' repository paths (configs/cpu-demo.yaml,
# .venv/bin/sd-serve) work as they do from a checkout.
REPO_PATHS = ("configs", "deploy", "loadtest")

SITECUSTOMIZE = '''\
"""Installed by tests/doc_examples.py: an error answer to httpx.get/post/... fails the example."""
try:
    import httpx
    from httpx import _api
except ImportError:
    pass
else:
    _request = _api.request

    def _raising_request(*args, **kwargs):
        response = _request(*args, **kwargs)
        response.raise_for_status()
        return response

    _api.request = httpx.request = _raising_request
'''


@dataclass(frozen=True)
class Example:
    source: str  # the document's name, for messages
    line: int  # of the opening fence, 1-based
    language: str  # bash or python
    code: str
    skip_reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line} ({self.language})"


class ExampleFailed(AssertionError):
    pass


def extract_examples(markdown: str, source: str = "document") -> list[Example]:
    """The runnable blocks of a document, in order, each with its skip reason if it has one."""
    examples = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = start + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{source} line {start + 1}: a code block that never ends")
        language = RUNNABLE.get(match["lang"].lower())
        if language:
            before = lines[start - 1] if start else ""
            skip = SKIP_MARKER.search(before)
            examples.append(
                Example(
                    source=source,
                    line=start + 1,
                    language=language,
                    code="\n".join(lines[start + 1 : end]) + "\n",
                    skip_reason=skip["reason"].strip() if skip else None,
                )
            )
        index = end + 1
    return examples


class ExampleRunner:
    """Runs examples in `workdir` against `base_url` with the repository's tools on PATH."""

    def __init__(self, workdir: Path, base_url: str, repo: Path | None = None):
        self.workdir = workdir
        self.base_url = base_url.rstrip("/")
        self.seconds: dict[int, float] = {}  # example's line -> how long it ran
        self.shims = workdir / ".example-shims"
        self.shims.mkdir(parents=True, exist_ok=True)
        curl = shutil.which("curl")
        if curl is None:
            raise RuntimeError("the documents' examples need curl (apt-get install curl)")
        shim = self.shims / "curl"
        shim.write_text(f'#!/bin/sh\nexec {curl} --fail-with-body "$@"\n')
        shim.chmod(0o755)
        (self.shims / "sitecustomize.py").write_text(SITECUSTOMIZE)
        venv = Path(sys.prefix)
        if repo is not None:
            for name in REPO_PATHS:
                if not (workdir / name).exists():
                    (workdir / name).symlink_to(repo / name)
            if not (workdir / ".venv").exists():
                (workdir / ".venv").symlink_to(venv)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        self.env = {
            **env,
            "PATH": os.pathsep.join([str(self.shims), str(venv / "bin"), env.get("PATH", "")]),
            "PYTHONPATH": str(self.shims),
            "SD_SERVE_URL": self.base_url,
            "RAY_AUTH_MODE": "disabled",
        }

    def run(self, example: Example) -> subprocess.CompletedProcess:
        code = example.code.replace(DOCUMENTED_URL, self.base_url)
        script = self.workdir / f".example-{example.line}.{'py' if example.language == 'python' else 'sh'}"
        if example.language == "python":
            script.write_text(code)
            command = [sys.executable, script.name]
        else:
            if EARLY_EXIT_READER.search(code):
                raise ExampleFailed(
                    f"{example.where}: pipes into head, which may exit before the writer is done; under pipefail "
                    "the writer's SIGPIPE (curl: exit 23) then fails the example at random. Use `cut -c 1-N` "
                    f"or `sed -n 1,Np`, which read all their input\n{example.code}"
                )
            script.write_text("set -euo pipefail\n" + code)
            command = ["bash", script.name]
        try:
            result = subprocess.run(
                command,
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ExampleFailed(f"{example.where}: still running after {TIMEOUT_S} s\n{example.code}") from exc
        if result.returncode != 0:
            raise ExampleFailed(
                f"{example.where}: exit status {result.returncode}\n--- example ---\n{example.code}"
                f"--- stdout (end) ---\n{result.stdout[-2000:]}\n--- stderr (end) ---\n{result.stderr[-3000:]}"
            )
        return result

    def run_all(self, examples: list[Example]) -> list[Example]:
        """Run every example not marked skip, in order; the examples that ran (their times in `self.seconds`)."""
        ran = []
        for example in examples:
            if example.skip_reason is None:
                started = time.perf_counter()
                self.run(example)
                self.seconds[example.line] = time.perf_counter() - started
                ran.append(example)
        return ran
