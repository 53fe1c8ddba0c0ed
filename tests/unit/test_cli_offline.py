"""sd-serve's parts that need no server: arguments, batch planning, synth. Commands against a server: tests/e2e."""

from __future__ import annotations

import argparse
import json

import pytest
from harness import free_port

from serve_app.cli import build_parser, main, parse_size, plan_batch, read_prompts


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


def test_batch_names_files_by_line_and_seed_so_a_rerun_finds_them(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# a comment\n  a dog  \na bird\n")
    assert read_prompts(prompts) == [(1, "a cat"), (4, "a dog"), (5, "a bird")]
    entries = plan_batch(read_prompts(prompts), tmp_path, base_seed=10, num_images=2, extension="png")
    assert [e.seeds for e in entries] == [[10, 11], [16, 17], [18, 19]]
    assert [p.name for p in entries[1].paths] == ["00004-16.png", "00004-17.png"]
    # Editing one line changes neither the seeds nor the names of the others.
    prompts.write_text("a cat\n\n# a comment\n  a wolf  \na bird\n")
    again = plan_batch(read_prompts(prompts), tmp_path, base_seed=10, num_images=2, extension="png")
    assert [e.paths for e in again] == [e.paths for e in entries]
    (tmp_path / "00004-16.png").write_bytes(b"x")
    assert not entries[1].done()
    (tmp_path / "00004-17.png").write_bytes(b"x")
    assert entries[1].done()


def test_batch_of_an_empty_file_is_a_usage_error(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing here\n\n")
    with pytest.raises(SystemExit) as exited:
        main(["batch", str(prompts), "--out-dir", str(tmp_path / "out")])
    assert exited.value.code == 2 and "holds no prompts" in capsys.readouterr().err


def test_batch_stops_when_the_server_cannot_be_reached(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    url = f"http://127.0.0.1:{free_port()}"
    status = main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--url", url, "--quiet"])
    out, err = capsys.readouterr()
    assert status == 1 and "0 images written" in out
    assert err.strip().splitlines()[-1].startswith(f"sd-serve: error: cannot reach {url}")
    assert list((tmp_path / "out").iterdir()) == []


def test_synth_writes_a_model_diffusers_can_load(tmp_path, capsys):
    assert main(["synth", "tiny", str(tmp_path / "tiny")]) == 0
    assert "wrote synthetic:tiny (seed 0)" in capsys.readouterr().out
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
