"""The tutorials' own routes (GET /generate?prompt=, POST /generate_images, GET /health) over a fake
Generator: their clients' calls, as the guides write them, get what those servers answered."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from fake_generation import fake_pixels
from helpers import pixels, png


def test_get_generate_with_a_query_string_answers_a_png_of_those_parameters(client, generator):
    response = client.get("/generate", params={"prompt": "a lighthouse", "steps": 3, "width": 96, "seed": 7})
    image = png(response)
    [task] = generator.jobs
    assert (task.params.prompt, task.params.num_inference_steps, task.params.width, task.seed) == (
        "a lighthouse",
        3,
        96,
        7,
    )
    assert np.array_equal(pixels(image), fake_pixels(task.with_defaults(generator.defaults)))
    assert response.headers["x-seed"] == "7"


def test_get_generate_refuses_what_it_cannot_honour_naming_the_field(client, generator):
    assert client.get("/generate").json()["error"]["field"] == "prompt"
    unknown = client.get("/generate", params={"prompt": "a", "strength": 0.5}).json()["error"]
    assert unknown["field"] == "strength" and "unknown" in unknown["message"]
    too_many = client.get("/generate", params={"prompt": "a", "steps": 500}).json()["error"]
    assert too_many["field"] == "steps" and "between 1 and 50" in too_many["message"]
    assert generator.jobs == []


def test_generate_images_answers_one_png_per_prompt_in_a_zip_all_in_one_batch(client, generator):
    response = client.post(
        "/generate_images", json={"prompts": ["a cat", "a dog", "a bird"], "chunk_size": 2, "seed": 3}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = sorted(archive.namelist())
    assert len(names) == 3 and all(name.endswith(".png") for name in names)
    assert [task.params.prompt for task in generator.jobs] == ["a cat", "a dog", "a bird"]
    assert [task.seed for task in generator.jobs] == [3, 4, 5]  # image i gets seed + i, as /generate/prompts does
    assert generator.batch_sizes == [3]  # chunk_size does not split the batch
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(archive.read(names[0]))).convert("RGB"))
    assert np.array_equal(first, fake_pixels(generator.jobs[0].with_defaults(generator.defaults)))


def test_generate_images_names_the_bad_entry(client):
    error = client.post("/generate_images", json={"prompts": ["a", ""]}).json()["error"]
    assert error["field"] == "prompts.1"


def test_health_in_the_guides_shape_without_a_gpu(client):
    body = client.get("/health").json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert body["gpu_available"] is False and body["gpu_memory_used"] is None and body["gpu_memory_total"] is None
    assert isinstance(body["uptime_seconds"], int)


def test_health_reports_starting_while_no_generator_replica_runs(client, service):
    service.status = {"status": "UPDATING", "running_replicas": 0, "replica_states": {"STARTING": 1}}
    body = client.get("/health").json()
    assert body["status"] == "starting" and body["model_loaded"] is False
