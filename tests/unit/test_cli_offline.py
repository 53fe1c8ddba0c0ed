"""sd-serve's parts that need no server: arguments, prompt-file planning, synth; and how commands lean on
the client (retries, following jobs) against scripted answers. Commands against a real server: tests/e2e."""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json

import httpx
import pytest
from harness import free_port
from PIL import Image

from serve_app import cli
from serve_app.cli import build_parser, main, parse_size, plan_prompts, read_prompts
from serve_app.client import REFOLLOW_PAUSE_S, SDClient

DEPRECATED_BATCH = "sd-serve batch is now sd-serve prompts; the old name will go"


def test_size_is_width_x_height():
    assert parse_size("512x768") == (512, 768) and parse_size("256") == (256, 256)
    for bad in ("big", "0x8", "8x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_connection_options_work_before_or_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--url", "http://a:1", "--api-key", "k", "health"])
    after = parser.parse_args(["health", "--url", "http://b:2"])
    assert (before.url, before.api_key) == ("http://a:1", "k")
    assert (after.url, after.api_key) == ("http://b:2", None)


def test_prompts_names_files_by_line_and_seed_so_a_rerun_finds_them(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# a comment\n  a dog  \na bird\n")
    assert read_prompts(prompts) == [(1, "a cat"), (4, "a dog"), (5, "a bird")]
    entries = plan_prompts(read_prompts(prompts), tmp_path, base_seed=10, num_images=2, extension="png")
    assert [e.seeds for e in entries] == [[10, 11], [16, 17], [18, 19]]
    assert [p.name for p in entries[1].paths] == ["00004-16.png", "00004-17.png"]
    # Editing one line changes neither the seeds nor the names of the others.
    prompts.write_text("a cat\n\n# a comment\n  a wolf  \na bird\n")
    again = plan_prompts(read_prompts(prompts), tmp_path, base_seed=10, num_images=2, extension="png")
    assert [e.paths for e in again] == [e.paths for e in entries]
    (tmp_path / "00004-16.png").write_bytes(b"x")
    assert not entries[1].done()
    (tmp_path / "00004-17.png").write_bytes(b"x")
    assert entries[1].done()


@pytest.mark.parametrize("command", ["prompts", "batch"])
def test_prompts_of_an_empty_file_is_a_usage_error(tmp_path, capsys, command):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing here\n\n")
    with pytest.raises(SystemExit) as exited:
        main([command, str(prompts), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "holds no prompts" in err
    assert (err.splitlines()[0] == DEPRECATED_BATCH) == (command == "batch")


@pytest.mark.parametrize("command", ["prompts", "batch"])
def test_prompts_stops_when_the_server_cannot_be_reached(tmp_path, capsys, command):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    url = f"http://127.0.0.1:{free_port()}"
    status = main([command, str(prompts), "--out-dir", str(tmp_path / "out"), "--url", url, "--quiet"])
    out, err = capsys.readouterr()
    assert status == 1 and "0 images written" in out
    assert err.strip().splitlines()[-1].startswith(f"sd-serve: error: cannot reach {url}")
    assert err.count(DEPRECATED_BATCH) == (command == "batch")
    assert list((tmp_path / "out").iterdir()) == []


def test_the_old_name_batch_is_not_listed_but_prompts_is():
    usage = build_parser().format_help()
    assert "prompts" in usage and "batch" not in usage


# -- commands that lean on the client: scripted answers --------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sse(*events: tuple[str, dict]) -> httpx.Response:
    body = "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in events)
    return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


def _job(status: str) -> httpx.Response:
    images = [{"index": 0, "seed": 5, "url": "/jobs/job-1/images/0", "metadata": {"batch_size": 2}}]
    view = {
        "id": "job-1", "status": status, "created_at": 1.0, "kind": "txt2img", "model": "m",
        "params": {"prompt": "p"}, "seeds": [5], "urls": {}, "images": images if status == "succeeded" else [],
    }  # fmt: skip
    return httpx.Response(200, json=view)


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    """scripted({path: [answers in order]}): sd-serve's client talks to these answers; returns the requests
    made ("METHOD /path") and the pauses the client took (not waited)."""
    monkeypatch.chdir(tmp_path)

    def script(routes: dict[str, list[httpx.Response]]) -> tuple[list[str], list[float]]:
        sent, slept = [], []

        def answer(request: httpx.Request) -> httpx.Response:
            sent.append(f"{request.method} {request.url.path}")
            return routes[request.url.path].pop(0)

        client = functools.partial(SDClient, transport=httpx.MockTransport(answer), sleep=slept.append)
        monkeypatch.setattr(cli, "SDClient", client)
        return sent, slept

    return script


def test_job_wait_follows_the_job_again_when_its_stream_ends_first(scripted, capsys):
    sent, slept = scripted(
        {
            "/jobs/job-1": [_job("running"), _job("running"), _job("succeeded"), _job("succeeded")],
            "/jobs/job-1/events": [_sse(("running", {})), _sse(("progress", {"step": 2}), ("succeeded", {}))],
            "/jobs/job-1/images/0": [httpx.Response(200, content=_png(), headers={"Content-Type": "image/png"})],
        }
    )
    assert main(["job", "job-1", "--wait", "--no-progress", "-o", "x.png"]) == 0
    assert capsys.readouterr().out == "wrote x.png (seed 5, 8x8, batch of 2)\n"
    assert slept == [REFOLLOW_PAUSE_S]
    events, job = "GET /jobs/job-1/events", "GET /jobs/job-1"
    assert sent == [job, events, job, events, job, "GET /jobs/job-1/images/0", job]


def test_generate_with_progress_retries_a_busy_server_through_the_client(scripted, capsys):
    busy = httpx.Response(503, json={"error": {"code": "overloaded", "message": "busy"}}, headers={"Retry-After": "2"})
    generated = {
        "images": [{"b64": base64.b64encode(_png()).decode(), "seed": 5, "media_type": "image/png", "batch_size": 1}],
        "metadata": {"prompt": "p", "seeds": [5], "model": "m", "batch_size": 1, "generation_time_s": 0.1,
                     "request_id": "r"},
    }  # fmt: skip
    sent, slept = scripted({"/generate": [busy, _sse(("progress", {"step": 1}), ("succeeded", generated))]})
    assert main(["generate", "p", "--seed", "5", "--progress", "-o", "p.png"]) == 0
    assert capsys.readouterr().out.startswith("wrote p.png (seed 5, 8x8, batch of 1)")
    assert sent == ["POST /generate"] * 2 and len(slept) == 1 and 2 <= slept[0] <= 2.2


def test_synth_writes_a_model_diffusers_can_load(tmp_path, capsys):
    assert main(["synth", "tiny", str(tmp_path / "tiny")]) == 0
    assert "wrote synthetic:tiny (seed 0)" in capsys.readouterr().out
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
