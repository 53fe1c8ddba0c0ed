"""Sweep results, report writers and the benchmark's ratios, on results made up here (no server)."""

import csv
import math
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from loadtest import report
from loadtest.benchmark import CPU_CONFIG, REPO, Comparison, ServedModel, best_per_batch_size, served_config
from loadtest.raw_pipeline import RawResult
from loadtest.servers import process_name
from loadtest.sweep import LevelResult, read_outcome


def level(concurrency, images, seconds=10.0, latencies=(0.1, 0.2, 0.3, 0.4), errors=0, batches=None):
    return LevelResult(
        concurrency=concurrency,
        requests=len(latencies) + errors,
        errors=errors,
        images=images,
        seconds=seconds,
        latencies_s=list(latencies),
        batch_sizes=Counter(batches or {1: images}),
    )


SERIES = {
    "server": [level(1, 100), level(16, 600, batches={8: 560, 4: 40})],
    "baseline": [level(1, 200), level(16, 250, errors=1)],
}


def test_level_summary_numbers():
    result = level(16, 600, batches={8: 560, 4: 40}, errors=2)
    assert result.images_per_s == 60.0
    assert result.error_rate == pytest.approx(2 / 6)
    assert result.latency_s(50) == pytest.approx(0.25)
    assert result.mean_batch_size == pytest.approx((8 * 560 + 4 * 40) / 600)
    assert math.isnan(level(1, 0, batches={0: 3}).mean_batch_size)  # sizes not reported


def test_cpu_per_image_counts_every_image_returned_and_names_processes():
    result = level(8, 90, batches={8: 90})
    assert math.isnan(result.cpu_ms_per_image())  # no probe, no number
    result.images_returned = 100  # 10 more came back after the window closed
    result.cpu_s = {"ImageGenerator": 1.5, "Ingress": 0.5, "raylet": 0.0}
    assert result.cpu_ms_per_image() == pytest.approx(20.0)
    assert result.cpu_ms_per_image("Ingress") == pytest.approx(5.0)
    assert report.cpu_by_process_text(result) == "ImageGenerator:15.00 Ingress:5.00"


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("ray::ServeReplica:sd:ImageGenerator", "ImageGenerator"),
        ("ray::ServeReplica:sd:Ingress.handle_request", "Ingress"),
        ("ray::ProxyActor", "ProxyActor"),
        ("/venv/lib/ray/core/src/ray/raylet/raylet --node-ip-address=127.0.0.1", "raylet"),
        ("/venv/bin/python3 -u /venv/lib/ray/_private/log_monitor.py --session-dir=/tmp", "log_monitor"),
        ("/venv/bin/python -m loadtest.serve_local configs/cpu-demo.yaml --port 8123", "loadtest.serve_local"),
        ("", "?"),
    ],
)
def test_process_names_are_short_and_stable(command, name):
    assert process_name(command) == name


def test_outcomes_read_batch_sizes_from_headers_or_json():
    png = read_outcome(200, "image/png", {"X-Batch-Size": "6"}, b"\x89PNG", 0.1, 1.0)
    assert (png.images, png.batch_sizes, png.error) == (1, [6], None)
    body = {"images": [{"b64": "", "batch_size": 3}, {"b64": "", "batch_size": 3}]}
    js = read_outcome(200, "application/json", {}, body, 0.1, 1.0)
    assert (js.images, js.batch_sizes) == (2, [3, 3])
    openai = read_outcome(200, "application/json", {}, {"data": [{"b64_json": "", "seed": 1}]}, 0.1, 1.0)
    assert (openai.images, openai.batch_sizes) == (1, [0])  # OpenAI answers do not carry batch sizes
    a1111 = read_outcome(200, "application/json", {}, {"images": ["iVBOR", "iVBOR"], "info": "{}"}, 0.1, 1.0)
    assert (a1111.images, a1111.batch_sizes) == (2, [0, 0])
    failed = read_outcome(503, "application/json", {}, {"error": {}}, 0.1, 1.0)
    assert (failed.images, failed.error) == (0, "HTTP 503")


def test_sweep_report_files_hold_the_numbers(tmp_path):
    paths = report.write_sweep_report(tmp_path, SERIES, title="made up", ceiling=80.0)
    assert [p.name for p in paths] == ["sweep.csv", "sweep.md", "sweep.png"]

    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["label"], r["concurrency"], r["images_per_s"]) for r in rows] == [
        ("server", "1", "10.0"),
        ("server", "16", "60.0"),
        ("baseline", "1", "20.0"),
        ("baseline", "16", "25.0"),
    ]
    assert rows[1]["batch_sizes"] == "4:40 8:560" and rows[3]["errors"] == "1"

    table = (tmp_path / "sweep.md").read_text()
    assert table.startswith("# made up")
    assert "| server | 16 | 60.0 | 250.0 |" in table and "4:40 8:560" in table

    with Image.open(tmp_path / "sweep.png") as image:
        assert image.format == "PNG" and image.width > 400


def test_comparison_ratios_overhead_and_targets():
    raw = [RawResult(1, 10, 10, 0.3), RawResult(8, 10, 80, 1.0)]  # batch 1: 30 ms a call; best 80 images/s
    server = [level(1, 100, latencies=(0.09, 0.1, 0.11)), level(16, 700)]
    baseline = [level(1, 250), level(16, 300)]
    comparison = Comparison(raw, server, baseline, batch_wait_s=0.05)
    assert comparison.ceiling == 80.0 and comparison.best_raw.batch_size == 8
    assert comparison.overhead_s == pytest.approx(0.1 - 0.03)
    rows = {row["concurrency"]: row for row in comparison.ratio_rows()}
    assert rows[16]["server_over_ceiling"] == pytest.approx(70 / 80, abs=1e-3)
    assert rows[16]["server_over_baseline"] == pytest.approx(70 / 30, abs=1e-3)
    assert rows[1]["server_over_baseline"] == pytest.approx(0.4)
    ceiling_line, baseline_line, overhead_line = comparison.targets()
    assert "0.88" in ceiling_line and "met" in ceiling_line
    assert "2.33" in baseline_line and "met" in baseline_line
    assert "70.0 ms" in overhead_line and "target <= 75 ms" in overhead_line and "met" in overhead_line
    slow = Comparison(raw, [level(1, 10, latencies=(0.2,)), level(16, 300)], baseline, batch_wait_s=0.05)
    assert all("MISSED" in line for line in slow.targets())
    assert "| 16 | 70.0 | 30.0 | 0.88 | 2.33 |" in comparison.ratio_table()


def test_the_faster_raw_pass_counts_at_each_batch_size():
    first = [RawResult(1, 10, 10, 0.3), RawResult(8, 10, 80, 2.0)]
    second = [RawResult(1, 10, 10, 0.5), RawResult(8, 10, 80, 1.0)]
    assert best_per_batch_size(first, second) == [first[0], second[1]]


def test_http_side_of_the_load_tools_loads_neither_torch_nor_ray():
    """The sweep and its reports run on any client machine: HTTP only (DESIGN.md, edges)."""
    code = "import sys, loadtest.sweep, loadtest.report, loadtest.traffic; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not {"torch", "ray", "serve_app"} & set(done.stdout.split())


def test_the_benchmark_loads_what_the_config_serves_with_its_overrides():
    demo = ServedModel.of(served_config(CPU_CONFIG, None, None))
    assert (demo.model, demo.device, demo.threads, demo.defaults) == ("synthetic:tiny", "cpu", 1, {})
    gpu = ServedModel.of(served_config(CPU_CONFIG, "synthetic:sd-turbo", "cuda"))
    assert (gpu.model, gpu.device, gpu.pipeline["dtype"]) == ("synthetic:sd-turbo", "cuda", "float32")
    production = ServedModel.of(served_config(REPO / "serve_config.yaml", None, None))
    assert production.defaults["num_inference_steps"] == 1  # the raw pipeline and baseline get the same defaults
