"""The load-test tools on short runs (seconds) against real servers: the demo on Ray Serve and the baseline.

No timing assertions: these check that requests flow, results are counted
and the report files carry the numbers measured.
"""

from __future__ import annotations

import asyncio
import csv
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtest import run_locust, sweep
from loadtest.servers import baseline_server
from loadtest.sweep import run_sweep
from loadtest.traffic import RequestMix


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The unbatched baseline under uvicorn, a child process on a free port."""
    with baseline_server("synthetic:tiny", "cpu", tmp_path_factory.mktemp("baseline"), threads=1) as server:
        yield server


def test_a_short_sweep_counts_every_request_and_image(demo_server):
    results = asyncio.run(
        run_sweep(demo_server, [1, 4], RequestMix.from_specs(), requests=8, warmup_requests=1, progress=False)
    )
    assert [r.concurrency for r in results] == [1, 4]
    for result in results:
        assert (result.requests, result.errors, result.images) == (8, 0, 8)
        # Every request's latency lies inside the level's measured window.
        assert len(result.latencies_s) == 8 and 0 < min(result.latencies_s) <= max(result.latencies_s) <= result.seconds
        assert sum(result.batch_sizes.values()) == 8
        assert set(result.batch_sizes) <= set(range(1, 9))  # the demo's max_batch_size is 8
        assert result.images_per_s == pytest.approx(8 / result.seconds)


def test_json_responses_count_their_images_and_report_batch_sizes(demo_server):
    mix = RequestMix.from_specs(endpoints="json", sizes="64x64,96x64")
    [result] = asyncio.run(run_sweep(demo_server, [2], mix, requests=6, warmup_requests=0, progress=False))
    assert (result.errors, result.images) == (0, 6)
    assert 0 not in result.batch_sizes  # each JSON image says its batch size


def test_every_endpoint_of_the_mix_answers_with_an_image(demo_server):
    mix = RequestMix.from_specs(endpoints="png:1,json:1,openai:1,a1111:1", sizes="64x64,128x64", steps="2,3")
    [result] = asyncio.run(run_sweep(demo_server, [4], mix, requests=24, warmup_requests=0, progress=False))
    assert (result.errors, result.images) == (0, 24), result.error_kinds


def test_sweep_command_writes_csv_markdown_and_plot_with_the_measured_numbers(demo_server, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--url", demo_server, "--concurrency", "1,2", "--requests", "4", "--out", str(out), "--no-progress"]
    assert sweep.main(argv) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["concurrency"], r["requests"], r["errors"], r["images"]) for r in rows] == [
        ("1", "4", "0", "4"),
        ("2", "4", "0", "4"),
    ]
    table = (out / "sweep.md").read_text()
    for row in rows:
        assert f"| server | {row['concurrency']} | " in table
        assert float(row["images_per_s"]) > 0 and float(row["latency_p95_ms"]) >= float(row["latency_p50_ms"])
    assert Image.open(out / "sweep.png").format == "PNG"
    assert "| server | 2 |" in capsys.readouterr().out


def test_locust_runs_headless_in_its_own_process_and_writes_its_reports(demo_server, tmp_path):
    out = tmp_path / "locust"
    argv = ["--url", demo_server, "--load-profile", "hold", "--peak-users", "2", "--stage-seconds", "1"]
    assert run_locust.main([*argv, "--endpoints", "png:1,json:1,openai:1,a1111:1", "--out", str(out)]) == 0
    stats = run_locust.aggregated_stats(out)
    assert int(stats["Request Count"]) > 0 and stats["Failure Count"] == "0"
    names = {row["Name"] for row in csv.DictReader((out / "locust_stats.csv").open())} - {"Aggregated"}
    known = {"POST /generate [png]", "POST /generate [json]"}
    known |= {"POST /v1/images/generations [openai]", "POST /sdapi/v1/txt2img [a1111]"}
    assert names <= known and len(names) >= 2, names
    assert "<html" in (out / "report.html").read_text()[:2000].lower()


def test_baseline_answers_with_the_servers_image_for_the_same_seed(baseline, client):
    body = {"prompt": "a boat", "negative_prompt": "fog", "seed": 77}
    answer = httpx.post(baseline.url + "/generate", json=body, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert (answer.headers["x-seed"], answer.headers["x-batch-size"]) == ("77", "1")
    served = client.post("/generate", json=body)
    pixels = [np.asarray(Image.open(io.BytesIO(r.content))).astype(int) for r in (answer, served)]
    assert pixels[0].shape == (64, 64, 3)
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # same weights, same defaults, same seed


def test_baseline_serves_concurrent_requests_one_at_a_time_without_errors(baseline):
    [result] = asyncio.run(
        run_sweep(baseline.url, [4], RequestMix.from_specs(endpoints="png:1,json:1"), requests=8, progress=False)
    )
    assert (result.errors, result.images) == (0, 8)
    assert set(result.batch_sizes) == {1}
