"""Links instead of bytes, over the app in-process with a fake Generator and a real store: OpenAI's
`response_format: "url"` through the official client, jobs' image URLs (this server's, under a public base
URL, or presigned by the object store), and /readyz reporting the store."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from fake_generation import FakeGenerationService
from harness import load_config
from helpers import decode, pixels, png_bytes
from starlette.testclient import TestClient

from serve_app.api.asgi import create_api
from serve_app.config import AppArgs
from serve_app.job_queue.store import JobStore
from serve_app.service.jobs import JobService

KEYS = ["key-one", "key-two"]


def app_client(store_url: str, api_keys: list[str] | None = None, **jobs) -> TestClient:
    args = load_config()["applications"][0]["args"]
    args["jobs"] = {"store": store_url, **jobs}
    if api_keys:
        args["auth"] = {"api_keys_env": "SD_TEST_KEYS"}
    service = FakeGenerationService(AppArgs.model_validate(args))
    jobs_service = JobService(None, JobStore(service.settings.jobs.store), service)  # no queue: nothing is queued
    return TestClient(create_api(service, api_keys, jobs_service), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path):
    with app_client(str(tmp_path / "store")) as http:
        yield http


def official(http: TestClient, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def test_openai_url_answers_link_to_images_kept_as_a_finished_job(client):
    linked = official(client).images.generate(
        prompt="a fox", n=2, size="64x64", response_format="url", extra_body={"seed": 5}
    )
    inline = official(client).images.generate(prompt="a fox", n=2, size="64x64", extra_body={"seed": 5})
    assert [item.b64_json for item in linked.data] == [None, None]
    job_id = linked.data[0].model_extra["job_id"]
    assert [item.url for item in linked.data] == [f"http://testserver/jobs/{job_id}/images/{i}" for i in (0, 1)]
    for item, same in zip(linked.data, inline.data):
        fetched = client.get(item.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert (pixels(decode(fetched.content)) == pixels(decode(same.b64_json))).all()
        assert "Seed: " in decode(fetched.content).info["parameters"]
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["seeds"] == [5, 6] and job["kind"] == "txt2img"
    assert [i["url"] for i in job["images"]] == [f"/jobs/{job_id}/images/{i}" for i in (0, 1)]
    assert job_id in [j["id"] for j in client.get("/jobs").json()["jobs"]]


def test_a_linked_jpeg_is_served_as_jpeg(client):
    result = official(client).images.generate(prompt="x", response_format="url", extra_body={"output_format": "jpeg"})
    assert result.data[0].url.endswith("/images/0?format=jpeg")
    fetched = client.get(result.data[0].url)
    assert fetched.headers["content-type"] == "image/jpeg" and decode(fetched.content).format == "JPEG"


def test_an_edit_answered_with_a_link_is_an_image_to_image_job(client):
    result = official(client).images.edit(
        image=("in.png", png_bytes((64, 64)), "image/png"), prompt="at night", response_format="url"
    )
    job = client.get(f"/jobs/{result.data[0].model_extra['job_id']}").json()
    assert job["kind"] == "img2img" and job["status"] == "succeeded"


def test_links_to_this_server_check_the_callers_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_TEST_KEYS", ",".join(KEYS))
    with app_client(str(tmp_path), api_keys=KEYS) as http:
        result = official(http, KEYS[0]).images.generate(prompt="mine", response_format="url")
        url = result.data[0].url
        assert http.get(url).status_code == 401
        assert http.get(url, headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 404
        assert http.get(url, headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200


def test_a_public_base_url_starts_every_link(tmp_path):
    with app_client(str(tmp_path), public_url="https://images.example.com/sd/") as http:
        result = official(http).images.generate(prompt="x", response_format="url")
        job_id = result.data[0].model_extra["job_id"]
        assert result.data[0].url == f"https://images.example.com/sd/jobs/{job_id}/images/0"
        job = http.get(f"/jobs/{job_id}").json()
        assert job["images"][0]["url"] == f"https://images.example.com/sd/jobs/{job_id}/images/0"


@pytest.mark.slow  # the S3 server
def test_presigned_links_point_at_the_object_store_and_expire(s3_bucket):
    with app_client(f"{s3_bucket}/jobs", presign_s=120) as http:
        before = time.time()
        result = official(http).images.generate(
            prompt="x", n=2, response_format="url", extra_body={"output_format": "webp", "seed": 3}
        )
        item = result.data[1]
        assert item.url.startswith("http://127.0.0.1:") and "X-Amz-Expires=120" in item.url and "/1.webp?" in item.url
        assert before + 120 <= item.model_extra["expires_at"] <= time.time() + 120
        with urllib.request.urlopen(item.url, timeout=10) as response:  # no key: the signature is the permission
            assert decode(response.read()).format == "WEBP"
        job = http.get(f"/jobs/{item.model_extra['job_id']}").json()
        image = job["images"][0]
        assert "/0.png?" in image["url"] and image["url_expires_at"] >= before + 120
        with urllib.request.urlopen(image["url"], timeout=10) as response:
            assert response.read() == http.get(f"/jobs/{job['id']}/images/0").content


def test_readyz_reports_whether_the_store_answers_without_failing_readiness(client):
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["store"]["reachable"] is True and ready["store"]["latency_ms"] >= 0
    jobs = client.app.state.jobs
    jobs._store_status = None
    jobs.store.root = "/nonexistent/store"
    response = client.get("/readyz")
    assert response.status_code == 200
    store = response.json()["store"]
    assert store["reachable"] is False and "FileNotFoundError" in store["error"] and "\n" not in store["error"]
