"""sd-serve against the real demo server: commands in-process through main(argv), one through the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import free_port, wait_until
from helpers import decode, max_diff

from serve_app.cli import main
from serve_app.job_queue.records import is_job_id, new_job_id


@pytest.fixture
def sd_serve(demo_server, capsys, monkeypatch, tmp_path):
    """Run `sd-serve ARGS` against the demo server in tmp_path; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_SERVE_URL", demo_server)

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_generate_writes_the_image(sd_serve, tmp_path):
    status, out, _ = sd_serve(
        "generate", "a lighthouse", "--seed", "42", "--size", "128x64", "--steps", "3", "-o", "a.png"
    )
    assert status == 0 and "wrote a.png (seed 42, 128x64" in out
    image = decode((tmp_path / "a.png").read_bytes())
    assert image.size == (128, 64) and "Seed: 42" in image.info["parameters"] and "Steps: 3" in image.info["parameters"]


def test_generate_applies_lora_adapters_and_the_png_says_so(sd_serve, tmp_path):
    status, _, _ = sd_serve(
        "generate", "a lighthouse", "--seed", "1", "--lora", "ink:0.5", "--lora", "neon", "-o", "l.png"
    )
    assert status == 0
    assert "LoRA: ink:0.5 neon:1" in decode((tmp_path / "l.png").read_bytes()).info["parameters"]
    status, _, err = sd_serve("generate", "a lighthouse", "--lora", "nope", "-o", "n.png")
    assert status != 0 and "unknown LoRA adapter nope; available: flux-ink, ink, neon" in err


def test_generate_several_images_names_them_by_seed_and_takes_the_format_from_the_suffix(sd_serve, tmp_path):
    status, out, _ = sd_serve("generate", "foxes", "--seed", "7", "--num-images", "2", "-o", "fox.webp")
    assert status == 0
    assert decode((tmp_path / "fox-7.webp").read_bytes()).format == "WEBP"
    assert decode((tmp_path / "fox-8.webp").read_bytes()).format == "WEBP"
    status, out, _ = sd_serve("generate", "unnamed", "--seed", "3", "--format", "jpeg")
    assert status == 0 and decode((tmp_path / "sd-3.jpg").read_bytes()).format == "JPEG"


def test_errors_exit_non_zero_with_the_servers_message_on_one_line(sd_serve, tmp_path):
    status, out, err = sd_serve("generate", "too wide", "--size", "512x64")
    assert status == 1 and out == ""
    assert err.startswith(
        "sd-serve: error: 422 invalid_request: width: must be a multiple of 8 from 64 to 256 (got 512)"
    )
    assert err.count("\n") == 1
    status, _, err = sd_serve("--url", f"http://127.0.0.1:{free_port()}", "health")
    assert status == 1 and "cannot reach" in err and "is the server running?" in err


def test_img2img_writes_the_image(sd_serve, tmp_path):
    sd_serve("generate", "a house", "--seed", "1", "--size", "128x64", "-o", "house.png")
    status, out, _ = sd_serve("img2img", "house.png", "at night", "--strength", "0.5", "--seed", "2", "-o", "n.png")
    assert status == 0 and decode((tmp_path / "n.png").read_bytes()).size == (128, 64)


def test_health_shows_liveness_readiness_and_what_is_served(sd_serve):
    status, out, _ = sd_serve("health")
    assert status == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["live"] == "yes" and lines["ready"] == "yes"
    assert lines["model"].startswith("synthetic:tiny") and "cpu" in lines["device"]
    status, out, _ = sd_serve("health", "--json")
    report = json.loads(out)
    assert report["live"] is True and report["info"]["limits"]["max_width"] == 256


def test_prompts_writes_every_prompt_and_a_rerun_only_fills_the_gaps(sd_serve, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n# skipped\na dog\na bird\na fish\n")
    prompts = ("prompts", "prompts.txt", "--out-dir", "out", "--concurrency", "3", "--seed", "100")
    status, out, err = sd_serve(*prompts)
    assert status == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00001-100.png", "00004-103.png", "00005-104.png", "00006-105.png"]
    assert "4 images written to out in" in out and "images/s" in out
    assert "0 already there, skipped; 0 prompts failed" in out
    assert "4/4" in err  # the progress bar ran to the end

    files = {name: tmp_path / "out" / name for name in names}
    first = {name: path.read_bytes() for name, path in files.items()}
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    files["00004-103.png"].unlink()
    status, out, err = sd_serve(*prompts)
    assert status == 0 and "1 image written" in out and "3 already there, skipped" in out and "1/1" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert all(files[n].stat().st_mtime_ns == stamps[n] for n in names if n != "00004-103.png")
    assert max_diff(decode(files["00004-103.png"].read_bytes()), decode(first["00004-103.png"])) <= 1

    status, out, _ = sd_serve(*prompts, "--quiet")
    assert status == 0 and "0 images written" in out and "4 already there" in out


def test_batch_is_the_old_name_of_prompts_and_says_so(sd_serve, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    status, out, err = sd_serve("batch", "prompts.txt", "--out-dir", "out", "--seed", "3", "--quiet")
    assert status == 0 and "2 images written to out" in out
    assert err == "sd-serve batch is now sd-serve prompts; the old name will go\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001-3.png", "00002-4.png"]


def test_prompts_reports_failed_prompts_and_exits_non_zero(sd_serve, tmp_path):
    too_long = "x" * 3000  # over the server's max_prompt_chars: 422 for that line only
    (tmp_path / "prompts.txt").write_text(f"a cat\n{too_long}\na dog\n")
    status, out, err = sd_serve("prompts", "prompts.txt", "--out-dir", "out", "--num-images", "2", "--format", "jpeg")
    assert status == 1
    assert "4 images written" in out and "1 prompt failed" in out
    assert "line 2" in err and "422 invalid_request" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00001-0.jpg",
        "00001-1.jpg",
        "00003-4.jpg",
        "00003-5.jpg",
    ]


def finished_bar(stderr: str) -> bool:
    """The progress bar ended with all its steps (model evaluations) done: 'generating: 100%|...| N/N [...'."""
    last = stderr.rstrip("\n").split("\r")[-1]
    return bool(re.match(r"generating: 100%\|.*\| (\d+)/\1 \[", last))


def test_generate_and_img2img_show_step_progress_and_make_the_same_images(sd_serve, tmp_path):
    common = ("--seed", "5", "--size", "128x64", "--steps", "4")
    status, out, err = sd_serve("generate", "a tower", *common, "--progress", "-o", "p.png")
    assert status == 0 and out.startswith("wrote p.png (seed 5, 128x64, batch of ") and out.count("\n") == 1
    assert finished_bar(err) and "1/1 images" in err
    status, out, err = sd_serve("generate", "a tower", *common, "-o", "q.png")  # no terminal, no --progress: no bar
    assert status == 0 and err == ""
    assert max_diff(decode((tmp_path / "p.png").read_bytes()), decode((tmp_path / "q.png").read_bytes())) <= 1

    img2img = ("img2img", "p.png", "at night", "--strength", "0.5", *common)
    status, out, err = sd_serve(*img2img, "--progress", "-o", "n.png")
    assert status == 0 and out.startswith("wrote n.png (seed 5, 128x64, batch of ") and out.count("\n") == 1
    assert finished_bar(err) and "1/1 images" in err
    status, out, _ = sd_serve(*img2img, "-o", "m.png")
    assert status == 0
    assert max_diff(decode((tmp_path / "n.png").read_bytes()), decode((tmp_path / "m.png").read_bytes())) <= 1


def test_generate_async_prints_the_job_id_then_job_wait_writes_its_images(sd_serve, tmp_path):
    status, out, err = sd_serve(
        "generate", "a lighthouse", "--async", "--seed", "42", "--size", "128x64", "--steps", "3"
    )
    job_id = out.strip()
    assert status == 0 and is_job_id(job_id) and out == job_id + "\n"  # the id alone: ID=$(sd-serve ...)
    assert f"sd-serve job {job_id} --wait" in err

    status, out, err = sd_serve("job", job_id, "--wait", "-o", "x.png")
    assert status == 0 and out.startswith("wrote x.png (seed 42, 128x64, batch of ") and out.count("\n") == 1
    image = decode((tmp_path / "x.png").read_bytes())
    assert image.size == (128, 64) and "Seed: 42" in image.info["parameters"] and "Steps: 3" in image.info["parameters"]
    sd_serve("generate", "a lighthouse", "--seed", "42", "--size", "128x64", "--steps", "3", "-o", "sync.png")
    assert max_diff(image, decode((tmp_path / "sync.png").read_bytes())) <= 1

    status, out, _ = sd_serve("job", job_id)
    rows = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("image "))
    assert status == 0 and rows["id"] == job_id and rows["status"] == "succeeded" and rows["prompt"] == "a lighthouse"
    assert rows["seeds"] == "42" and f"image 0   seed 42, /jobs/{job_id}/images/0" in out
    status, out, _ = sd_serve("job", job_id, "--json")
    assert status == 0 and json.loads(out)["images"][0]["seed"] == 42

    status, out, _ = sd_serve("jobs", "--limit", "3")
    first = out.splitlines()[0].split()
    assert status == 0 and len(out.splitlines()) <= 3
    assert first[:2] == [job_id, "succeeded"] and first[-4:] == ["1", "image", "a", "lighthouse"]
    status, out, _ = sd_serve("jobs", "--status", "succeeded", "--json")
    listed = json.loads(out)
    assert status == 0 and listed[0]["id"] == job_id and {j["status"] for j in listed} == {"succeeded"}
    status, out, _ = sd_serve("jobs", "--status", "failed", "--json")
    assert status == 0 and job_id not in out


def test_job_writes_several_images_by_seed_in_the_format_asked(sd_serve, tmp_path):
    status, out, _ = sd_serve("generate", "foxes", "--async", "--seed", "7", "--num-images", "2", "--steps", "2")
    job_id = out.strip()
    status, out, _ = sd_serve("job", job_id, "--wait", "-o", "fox.webp")
    assert status == 0 and out.count("wrote ") == 2
    assert decode((tmp_path / "fox-7.webp").read_bytes()).format == "WEBP"
    assert decode((tmp_path / "fox-8.webp").read_bytes()).format == "WEBP"
    status, out, _ = sd_serve("job", job_id, "--save", "--format", "jpeg")
    assert status == 0 and "wrote sd-7.jpg (seed 7, 64x64" in out and "wrote sd-8.jpg (seed 8, 64x64" in out
    assert decode((tmp_path / "sd-8.jpg").read_bytes()).format == "JPEG"


def test_cancel_stops_a_running_job_and_job_then_exits_non_zero(sd_serve, client):
    slow = ("--steps", "50", "--size", "256x256", "--num-images", "4")
    status, out, _ = sd_serve("generate", "a slow one", "--async", *slow)
    job_id = out.strip()
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "running", 30, "the job runs")
    status, out, _ = sd_serve("cancel", job_id)
    assert status == 0 and out.split()[:2] == [job_id, "canceled"]
    status, out, err = sd_serve("job", job_id, "--wait", "-o", "never.png")
    assert status == 1 and out == "" and err == f"sd-serve: error: job {job_id} canceled\n"
    assert not Path("never.png").exists()


def test_cancel_of_a_finished_or_unknown_job_exits_non_zero_with_the_servers_message(sd_serve):
    status, out, _ = sd_serve("generate", "done soon", "--async", "--steps", "2")
    job_id = out.strip()
    assert sd_serve("job", job_id, "--wait")[0] == 0
    status, out, err = sd_serve("cancel", job_id)
    assert status == 1 and out == ""
    assert err.startswith(f"sd-serve: error: 409 job_finished: job {job_id} already ended: succeeded")
    assert err.count("\n") == 1
    unknown = new_job_id()
    status, out, err = sd_serve("cancel", unknown)
    assert status == 1 and out == ""
    assert err.startswith(f"sd-serve: error: 404 job_not_found: no job {unknown}") and err.count("\n") == 1
    status, _, err = sd_serve("job", unknown, "--wait")
    assert status == 1 and "404 job_not_found" in err


def test_console_script_is_installed(demo_server, tmp_path):
    sd_serve_script = Path(sys.executable).with_name("sd-serve")
    done = subprocess.run(
        [str(sd_serve_script), "generate", "x", "--url", demo_server, "--seed", "9", "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert decode((tmp_path / "x.png").read_bytes()).size == (64, 64)
    done = subprocess.run([str(sd_serve_script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "sd-serve prompts prompts.txt" in done.stdout
    done = subprocess.run(
        [str(sd_serve_script), "generate", "x", "--url", demo_server, "--async"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and is_job_id(done.stdout.strip()), done.stderr
