"""The README harness itself: it finds the blocks, honours skip markers, and a broken example fails it."""

from __future__ import annotations

import http.server
import threading

import pytest
from doc_examples import ExampleFailed, ExampleRunner, extract_examples

DOCUMENT = """\
# A document

```bash
echo one > first.txt
```

```json
{"not": "run"}
```

<!-- example: skip (starts a server) -->
```bash
exit 3
```

```python
print(open("first.txt").read().strip() + " two")
```
"""


class RefusingServer(http.server.BaseHTTPRequestHandler):
    """Answers every request 422, as the server does for a bad example."""

    def do_GET(self):
        self._refuse()

    def do_POST(self):
        self._refuse()

    def _refuse(self):
        body = b'{"error": {"code": "invalid_request", "message": "width: must be between 64 and 256"}}'
        self.send_response(422)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_extracts_shell_and_python_blocks_in_order_with_skip_markers():
    examples = extract_examples(DOCUMENT, "doc.md")
    assert [(e.line, e.language, e.skip_reason) for e in examples] == [
        (3, "bash", None),
        (12, "bash", "starts a server"),
        (16, "python", None),
    ]
    assert examples[0].code == "echo one > first.txt\n"


def test_examples_run_in_order_in_one_directory_and_skipped_ones_never_run(tmp_path, refusing_url):
    runner = ExampleRunner(tmp_path, refusing_url)
    ran = runner.run_all(extract_examples(DOCUMENT, "doc.md"))
    assert [e.line for e in ran] == [3, 16]
    assert runner.run(ran[1]).stdout == "one two\n"


def test_a_failing_command_fails_with_the_example_and_its_output(tmp_path, refusing_url):
    broken = extract_examples("```bash\necho about to fail\nfalse\necho never\n```\n", "README.md")
    with pytest.raises(ExampleFailed, match=r"README.md line 1 \(bash\): exit status 1") as failure:
        ExampleRunner(tmp_path, refusing_url).run_all(broken)
    stdout = str(failure.value).split("--- stdout (end) ---")[1].split("--- stderr")[0]
    assert stdout.strip() == "about to fail"


def test_a_pipe_into_head_is_refused_before_it_can_fail_at_random(tmp_path, refusing_url):
    racy = extract_examples("```bash\nseq 100000 | head -c 20\n```\n", "README.md")
    with pytest.raises(ExampleFailed, match=r"README.md line 1 \(bash\): pipes into head.*cut -c 1-N"):
        ExampleRunner(tmp_path, refusing_url).run_all(racy)
    steady = extract_examples("```bash\nseq 100000 | cut -c 1-20 | sed -n 1,3p\n```\n", "README.md")
    assert ExampleRunner(tmp_path, refusing_url).run(steady[0]).stdout == "1\n2\n3\n"


def test_an_error_answer_to_curl_fails_the_example(tmp_path, refusing_url):
    """A documented request that the server refuses (here: 422) is a broken example, even with -o."""
    broken = extract_examples(
        "```bash\ncurl -s -X POST http://127.0.0.1:8000/generate -d '{\"width\": 512}' -o image.png\n```\n"
    )
    with pytest.raises(ExampleFailed, match="exit status 22"):
        ExampleRunner(tmp_path, refusing_url).run_all(broken)


def test_an_error_answer_to_httpx_fails_a_python_example(tmp_path, refusing_url):
    broken = extract_examples(
        '```python\nimport httpx\nr = httpx.post("http://127.0.0.1:8000/generate", json={"width": 512})\n'
        'print("carried on", r.status_code)\n```\n'
    )
    with pytest.raises(ExampleFailed, match="HTTPStatusError") as failure:
        ExampleRunner(tmp_path, refusing_url).run_all(broken)
    stdout = str(failure.value).split("--- stdout (end) ---")[1].split("--- stderr")[0]
    assert "carried on" not in stdout


def test_a_python_example_must_import_what_it_uses(tmp_path, refusing_url):
    """Each block runs in a fresh interpreter: one that leans on an earlier block's imports fails."""
    examples = extract_examples("```python\nimport json\n```\n\n```python\nprint(json.dumps(1))\n```\n")
    with pytest.raises(ExampleFailed, match="NameError: name 'json' is not defined"):
        ExampleRunner(tmp_path, refusing_url).run_all(examples)


def test_a_block_that_never_ends_is_an_error():
    with pytest.raises(ValueError, match="line 2: a code block that never ends"):
        extract_examples("text\n```bash\necho\n")
