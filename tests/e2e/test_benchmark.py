"""`make bench` on a tiny run: the raw pipeline, Serve started from the demo config by `serve run` (a Ray
instance of its own: the module runs last, alone, tests/conftest.py) and the unbatched baseline, in one run."""

from __future__ import annotations

import csv
import json

import pytest

pytestmark = pytest.mark.own_ray


def test_benchmark_compares_raw_server_and_baseline_in_one_run(tmp_path):
    """The whole `make bench` path on a tiny run: raw pipeline, Serve started from the demo config, baseline."""
    from loadtest import benchmark

    out = tmp_path / "bench"
    argv = ["--concurrency", "1,2", "--requests", "4", "--batch-sizes", "1,2", "--raw-seconds", "0.1"]
    assert benchmark.main([*argv, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ceiling_batch_size"] in (1, 2) and summary["ceiling_images_per_s"] > 0
    assert summary["batch_wait_ms"] == 0.0  # read from the running server's /info (configs/cpu-demo.yaml)
    assert [row["concurrency"] for row in summary["ratios"]] == [1, 2]
    for row in summary["ratios"]:
        assert row["server_images_per_s"] > 0 and row["baseline_images_per_s"] > 0
        assert row["server_error_rate"] == 0 and row["baseline_error_rate"] == 0
        assert row["server_cpu_ms_per_image"] > 0 and row["baseline_cpu_ms_per_image"] > 0
        assert row["server_over_baseline"] == pytest.approx(
            row["server_images_per_s"] / row["baseline_images_per_s"], rel=0.01
        )
    assert [row["batch_size"] for row in csv.DictReader((out / "raw.csv").open())] == ["1", "2"]
    sweep_rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert {row["label"] for row in sweep_rows} == {"server", "baseline"}
    server_cpu = [row["server_cpu_ms_per_image_by_process"] for row in sweep_rows if row["label"] == "server"]
    assert all("ImageGenerator:" in text and "Ingress:" in text for text in server_cpu)
    text = (out / "benchmark.md").read_text()
    assert "## Ratios" in text and "serving overhead at concurrency 1" in text
    assert "model: synthetic:tiny" in (out / "config.yaml").read_text()  # what the server ran, kept with the results
