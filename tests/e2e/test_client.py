"""serve_app.client against the real demo server (configs/cpu-demo.yaml on Ray Serve)."""

from __future__ import annotations

import asyncio

import pytest
from harness import free_port
from helpers import decode, max_diff, png_bytes

from serve_app.client import AsyncSDClient, SDClient, SDServeConnectionError, SDServeError


@pytest.fixture
def sd(demo_server):
    with SDClient(demo_server, timeout_s=60) as client:
        yield client


def test_generate_returns_pil_images_with_their_seeds_and_metadata(sd):
    result = sd.generate("a lighthouse at dawn", seed=42, width=128, num_inference_steps=3)
    assert result.image.size == (128, 64) and result.seeds == [42]
    assert result.metadata.num_inference_steps == 3 and result.metadata.model == "synthetic:tiny"
    assert result.request_id and result.images[0].batch_size == 1  # nothing else was running
    # The bytes are the server's own: the PNG still carries the generation parameters.
    assert "Seed: 42" in result.images[0].image.info["parameters"]
    again = sd.generate("a lighthouse at dawn", seed=42, width=128, num_inference_steps=3)
    assert max_diff(result.image, again.image) <= 1


def test_several_images_in_another_format(sd):
    result = sd.generate("foxes", seed=5, num_images=3, output_format="jpeg", quality=80)
    assert result.seeds == [5, 6, 7] == result.metadata.seeds
    assert {i.media_type for i in result.images} == {"image/jpeg"}
    assert all(i.image.format == "JPEG" for i in result.images)
    assert max_diff(result.images[0].image, result.images[1].image) > 10


def test_img2img_from_a_path_bytes_or_a_pil_image_gives_the_same_image(sd, tmp_path):
    init = png_bytes((128, 64), seed=3)
    path = tmp_path / "init.png"
    path.write_bytes(init)
    results = [sd.img2img("at night", source, strength=0.6, seed=1) for source in (path, init, decode(init))]
    assert all(r.image.size == (128, 64) and r.metadata.strength == 0.6 for r in results)
    assert max(max_diff(results[0].image, r.image) for r in results[1:]) <= 1


def test_many_prompts_and_full_requests_in_one_request(sd):
    results = sd.generate_prompts(["a cat", "a dog"], seed=100)
    assert [r.metadata.prompt for r in results] == ["a cat", "a dog"]
    assert [r.seeds for r in results] == [[100], [101]]
    results = sd.generate_prompts([{"prompt": "a bird", "num_images": 2, "seed": 7}, "a fish"], num_inference_steps=3)
    assert results[0].seeds == [7, 8] and len(results[1].images) == 1
    assert {r.metadata.num_inference_steps for r in results} == {3}
    with pytest.warns(DeprecationWarning, match="batch is now generate_prompts"):
        old_name = sd.batch(["a cat", "a dog"], seed=100)
    assert [r.seeds for r in old_name] == [[100], [101]]


def test_server_errors_become_exceptions_with_the_servers_fields(sd):
    with pytest.raises(SDServeError) as caught:
        sd.generate("too wide", width=512)
    error = caught.value
    assert (error.status, error.code, error.field) == (422, "invalid_request", "width")
    assert "from 64 to 256" in error.message and error.request_id
    with pytest.raises(SDServeError) as caught:
        sd.generate_prompts([{"prompt": "ok"}, {"prompt": "x", "num_images": 9}])
    assert caught.value.field == "requests.1.num_images"


def test_health_and_info(sd):
    report = sd.health()
    assert report.live is True and report.ready is True
    assert report.info["model"] == "synthetic:tiny" and report.info["limits"]["max_width"] == 256
    assert sd.info()["generator"]["device"] == "cpu"


def test_async_client_sends_requests_concurrently(demo_server):
    async def generate_four():
        async with AsyncSDClient(demo_server, timeout_s=60) as sd:
            return await asyncio.gather(*(sd.generate(f"prompt {i}", seed=i) for i in range(4)))

    results = asyncio.run(generate_four())
    assert [r.seeds for r in results] == [[0], [1], [2], [3]]
    assert len({r.request_id for r in results}) == 4


def test_async_client_submits_waits_lists_downloads_and_streams(demo_server):
    async def scenario():
        async with AsyncSDClient(demo_server, timeout_s=60) as sd:
            job = await sd.submit("async job", seed=12, num_images=2, num_inference_steps=3)
            events = []
            done = await sd.wait(job.id, on_event=lambda kind, data: events.append(kind))
            assert done.status == "succeeded", done.error
            image = await sd.download(job.id, 1, "webp")
            listed, _ = await sd.jobs(status="succeeded", limit=5)
            again = [kind async for kind, _ in sd.events(job.id)]  # an ended job's stream: its final event
            streamed = [event async for event in sd.stream("async stream", seed=4, num_inference_steps=3)]
            return job, done, events, image, listed, again, streamed

    job, done, events, image, listed, again, streamed = asyncio.run(scenario())
    assert job.status == "queued" and done.seeds == [12, 13]
    assert events[-1] == "succeeded"  # progress too, unless the job ended before its stream opened
    assert image.seed == 13 and image.media_type == "image/webp" and image.image.format == "WEBP"
    assert image.image.size == (64, 64) and image.batch_size >= 1
    assert job.id in [j.id for j in listed] and again[-1] == "succeeded"
    assert [kind for kind, _ in streamed[:-1]] == ["progress"] * (len(streamed) - 1)
    assert streamed[-1][0] == "succeeded" and streamed[-1][1].seeds == [4]


def test_nothing_listening_is_a_connection_error():
    with SDClient(f"http://127.0.0.1:{free_port()}") as sd, pytest.raises(SDServeConnectionError, match="cannot reach"):
        sd.generate("x")
