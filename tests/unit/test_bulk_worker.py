"""The bulk worker in-process (no Ray): rows of a batch become the engine's own images, written where the
manifest says, and batches that Ray Data hands it concurrently all come out whole."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from serve_app.bulk.runner import check_rows
from serve_app.bulk.settings import BulkSettings
from serve_app.bulk.source import _block, _records
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageTask

PIPELINE = {"device": "cpu", "dtype": "float32", "torch_threads": 1}


def checked_rows(rows: list[dict], settings: BulkSettings):
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return check_rows(_block(0, list(_records("jsonl", data))), settings=settings, done=np.empty(0, np.int64))


@pytest.fixture(scope="module", params=["request", "step"])
def maker(request, tmp_path_factory):
    from serve_app.bulk.manifest import Output
    from serve_app.bulk.worker import ImageMaker

    settings = BulkSettings(model="synthetic:tiny", pipeline={**PIPELINE, "engine": request.param}, max_batch_size=4)
    worker = ImageMaker(settings, Output(str(tmp_path_factory.mktemp("out"))), run_id="run-1")
    yield worker
    worker.loop.stop()


def test_rows_become_the_engines_images_written_where_their_entries_say(maker):
    rows = [
        {"prompt": "a lighthouse", "seed": 42},
        {"prompt": "a fox", "num_inference_steps": 3, "scheduler": "euler_a", "num_images": 2},
        {"prompt": "wide", "width": 128, "negative_prompt": "fog"},
    ]
    entries = maker(checked_rows(rows, maker.settings)).to_pylist()
    assert [e["status"] for e in entries] == ["done"] * 3 and [e["row"] for e in entries] == [0, 1, 2]
    assert entries[1]["files"] == ["images/0000/00000001-1.png", "images/0000/00000001-2.png"]
    [reference] = maker.model.generate([ImageTask(ImageParams(prompt="a lighthouse", seed=42))])
    written = np.asarray(Image.open(maker.output.path(entries[0]["file"])).convert("RGB")).astype(int)
    assert np.abs(written - reference.pixels.astype(int)).max() <= 1  # alone vs batched: within 1/255
    assert entries[2]["width"] == 128 and entries[2]["num_inference_steps"] == 2  # the model's default, filled in
    assert (
        entries[0]["run_id"] == "run-1" and entries[0]["node_id"] == maker.node_id
    )  # the node it ran on (None without Ray)


@pytest.mark.slow  # seconds: out of the fast loop
def test_batches_handed_over_concurrently_all_come_out_whole(maker):
    # Ray Data calls a worker with two batches at once: one batch's jobs are checked (their prompts
    # tokenized) on its caller's thread while the engine thread encodes the other's prompts.
    rows = [
        {"prompt": f"row {i} " + "word " * (i % 7), **({"negative_prompt": "blurry, low quality"} if i % 3 else {})}
        for i in range(48)
    ]
    checked = checked_rows(rows, maker.settings)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda start: maker(checked.slice(start, 8)), range(0, 48, 8)))
    entries = [e for table in results for e in table.to_pylist()]
    assert [e["error"] for e in entries if e["status"] != "done"] == []
    assert sorted(e["row"] for e in entries) == list(range(48))
