"""`sd-serve bulk` as a user runs it: a file of rows in, images and a manifest out, on Ray Data. (A run cut short
and run again: tests/e2e/test_store_node_loss.py, where the run is lost with a node.)

Every run is `python -m serve_app.bulk` in a child process on the two-node cluster of
deploy/local_cluster.py, started once for the module (`--address`): this pytest process may already
drive the session's Ray, and a bulk run must never join it. The model is synthetic:tiny with the demo
config's options and limits (configs/cpu-demo.yaml), as the demo server runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from harness import DEMO_CONFIG, REPO
from helpers import decode, max_diff, png
from PIL import Image

RUN_TIMEOUT_S = 300


def bulk_command(*args) -> list[str]:
    return [sys.executable, "-m", "serve_app.bulk", *map(str, args), "--config", str(DEMO_CONFIG), "-q"]


def bulk_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    # Both workers up before the first row goes out (Ray Data's own knob): a few tiny rows take less time
    # than a worker takes to load the model, so otherwise the first one ready could take them all.
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, two CPUs each: every run's rows can go to either."""
    sys.path.insert(0, str(REPO / "deploy"))
    from local_cluster import LocalRayCluster

    cluster = LocalRayCluster(Path(tempfile.mkdtemp(prefix="sd-bulk-")))  # short: Ray's socket paths
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker("worker-1", num_cpus=2)
        cluster.nodes = {node["node_id"] for node in cluster.wait_for_nodes(2)}
        yield cluster
    finally:
        assert cluster.stop() == []


def run_bulk(cluster, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*bulk_command(*args), "--address", cluster.gcs_address],
        cwd=REPO,
        env=bulk_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode in (0, 1), f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def image_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / "images").rglob("*") if p.is_file()}


SERVED = [  # also asked of the demo server: the same rows make the same images
    {"prompt": "a lighthouse at dawn", "seed": 42},
    {"prompt": "a red fox", "seed": 7, "num_inference_steps": 3, "scheduler": "euler_a", "width": 128},
    {"prompt": "a tower", "negative_prompt": "fog", "seed": 2**32 - 1, "guidance_scale": 4.0},
]


def test_jsonl_rows_become_images_with_their_own_parameters_on_both_nodes_and_bad_rows_are_recorded(
    cluster, client, tmp_path
):
    rows = [
        {"prompt": "a lighthouse", "seed": 42},
        {"prompt": "a fox"},  # no seed: base seed + row index
        {"prompt": "wide", "width": 128, "height": 64},
        {
            "prompt": "slow",
            "num_inference_steps": 3,
            "scheduler": "euler_a",
            "guidance_scale": 5,
            "negative_prompt": "x",
        },
        {"prompt": "two", "num_images": 2, "seed": 7},
        {"prompt": "as jpeg", "output_format": "jpeg", "quality": 80},
        {"prompt": "as webp", "output_format": "webp"},
        {"prompt": "bad size", "width": 30},
        {"prompt": "not here", "strength": 0.5},
        "not json at all",
        # Slow enough that one worker cannot keep up alone: Ray Data sends a row to the worker on the node
        # that holds it while that worker has room, so quick rows could all stay on one node.
        *({"prompt": f"row {i}", "num_inference_steps": 40} for i in range(10, 16)),
        *SERVED,
    ]
    out = tmp_path / "out"
    done = run_bulk(
        cluster, write_jsonl(tmp_path / "rows.jsonl", rows), out, "--base-seed", 1000, "--batch-size", 2, "--workers", 2
    )
    assert done.returncode == 1  # some rows failed: the manifest says which
    assert "16 rows done, 3 failed, 0 done before" in done.stdout
    assert "rows ran on 2 node(s)" in done.stdout

    entries = manifest(out)
    assert [e["row"] for e in entries] == list(range(len(rows)))  # one entry per row, in row order
    by_row = {e["row"]: e for e in entries}

    failed = {row: e for row, e in by_row.items() if e["status"] == "failed"}
    assert set(failed) == {7, 8, 9}
    assert failed[7]["error_field"] == "width"
    assert failed[7]["error"] == "width: must be a multiple of 8 from 64 to 256 (got 30)"  # the demo config's sizes
    assert failed[8]["error_field"] == "strength" and "image-to-image only" in failed[8]["error"]
    assert failed[9]["error_code"] == "malformed_request" and failed[9]["request"] == "not json at all"
    assert all(e["file"] is None and e["files"] is None for e in failed.values())

    done_entries = [e for e in entries if e["status"] == "done"]
    assert image_files(out) == {f for e in done_entries for f in e["files"]}  # nothing else was written
    for e in done_entries:
        assert json.loads(e["request"]) == rows[e["row"]]
        for index, name in enumerate(e["files"]):
            image = Image.open(out / name)
            assert image.size == (e["width"], e["height"])
            assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[e["output_format"]]
            assert name.endswith(
                f"{e['row']:08d}-{e['seed'] + index}.{'jpg' if image.format == 'JPEG' else e['output_format']}"
            )

    assert by_row[0]["seed"] == 42 and by_row[1]["seed"] == 1001 and by_row[10]["seed"] == 1010
    assert (by_row[2]["width"], by_row[2]["height"]) == (128, 64)
    assert by_row[0]["num_inference_steps"] == 2 and by_row[0]["width"] == 64  # the model's defaults, filled in
    slow = Image.open(out / by_row[3]["file"])
    assert "Steps: 3, Sampler: Euler a, CFG scale: 5, Seed: 1003" in slow.info["parameters"]
    assert slow.info["parameters"].splitlines()[1] == "Negative prompt: x"
    assert by_row[4]["files"] == ["images/0000/00000004-7.png", "images/0000/00000004-8.png"]
    assert by_row[5]["quality"] == 80 and by_row[6]["quality"] == 90
    assert max(e["batch_size"] for e in done_entries) > 1  # rows shared model calls
    assert {e["node_id"] for e in done_entries} == cluster.nodes  # work went to both nodes

    for request, entry in zip(SERVED, entries[-len(SERVED) :]):
        answer = png(client.post("/generate", json=request))
        made = decode((out / entry["file"]).read_bytes())
        assert made.size == answer.size
        assert max_diff(made, answer) <= 1  # batched differently: kernels round differently, within 1/255
        assert made.info["parameters"] == answer.info["parameters"]  # the same metadata, the same model name
