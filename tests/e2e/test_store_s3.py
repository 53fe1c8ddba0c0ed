"""Jobs on an S3 store through real Serve: a local S3-protocol server (moto, the session's `s3_server`) and
the demo config with `jobs.store: s3://...`, the replicas finding the server through the standard AWS
variables of the application's runtime_env, as a deployment would set them. Jobs, refine by id, OpenAI's
`response_format: "url"` through the official client, /readyz and the store metrics; retention and the byte
cap emptying the bucket; a store that cannot be reached failing the deploy with one line."""

from __future__ import annotations

import fsspec
import httpx
import openai
import pytest
from harness import job_when_final as final
from harness import load_config, wait_until
from helpers import decode, max_diff, png

from loadtest.servers import s3_env


def on_s3(config: dict, s3_server, **jobs) -> None:
    app = config["applications"][0]
    app["args"]["jobs"] = jobs
    app["runtime_env"] = {"env_vars": s3_env(s3_server)}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    fsspec.filesystem("s3").mkdir("e2e-jobs")
    return "s3://e2e-jobs"


@pytest.fixture(scope="module")
def server(deployed_variant, s3_server, bucket) -> str:
    return deployed_variant(lambda config: on_s3(config, s3_server, store=f"{bucket}/store", max_running=2))


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def stored_files(prefix: str) -> list[str]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    try:
        return sorted(fs.find(prefix))
    except FileNotFoundError:
        return []


def test_jobs_are_stored_in_the_bucket_and_read_back_from_it(http, bucket):
    ids = [http.post("/jobs", json={"prompt": f"s3 {i}", "seed": i, "num_images": 2}).json()["id"] for i in range(3)]
    jobs = [final(http, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    for job in jobs:
        files = stored_files(f"{bucket}/store/images/{job['id']}")
        assert [f.rsplit("/", 1)[1] for f in files] == ["0.png", "1.png"]
        assert png(http.get(job["images"][1]["url"])).size == (64, 64)
    sync = png(http.post("/generate", json={"prompt": "s3 2", "seed": 3}))
    assert max_diff(png(http.get(jobs[2]["images"][1]["url"])), sync) <= 1
    first, second = (http.get("/jobs", params={"limit": 2, "cursor": c}).json() for c in (None, ids[1]))
    assert [j["id"] for j in first["jobs"]][:2] == ids[::-1][:2] and first["next_cursor"] == ids[1]
    assert second["jobs"][0]["id"] == ids[0]
    assert not [f for f in stored_files(f"{bucket}/store") if f.endswith(".part")]


def test_refine_by_id_reads_the_source_image_from_the_bucket(http):
    source = final(http, http.post("/jobs", json={"prompt": "a tower", "seed": 9}).json()["id"])
    refined = http.post("/refine", json={"id": source["id"], "image": 0, "strength": 0.5, "prompt": "a tower at night"})
    assert refined.status_code == 202, refined.text
    done = final(http, refined.json()["id"])
    assert done["status"] == "succeeded" and done["kind"] == "img2img" and done["refined_from"] == f"{source['id']}/0"
    assert max_diff(png(http.get(done["images"][0]["url"])), png(http.get(source["images"][0]["url"]))) > 0


def test_openai_url_answers_with_the_official_client_link_to_stored_images(server, http, bucket):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    linked = client.images.generate(prompt="a fox", n=2, size="64x64", response_format="url", extra_body={"seed": 4})
    inline = client.images.generate(prompt="a fox", n=2, size="64x64", extra_body={"seed": 4})
    job_id = linked.data[0].model_extra["job_id"]
    assert [item.url for item in linked.data] == [f"{server}/jobs/{job_id}/images/{i}" for i in (0, 1)]
    for item, same in zip(linked.data, inline.data):
        assert max_diff(png(httpx.get(item.url, timeout=60)), decode(same.b64_json)) <= 1
    assert len(stored_files(f"{bucket}/store/images/{job_id}")) == 2
    assert http.get(f"/jobs/{job_id}").json()["status"] == "succeeded"


def test_readyz_reports_the_store_and_its_operations_are_on_the_metrics_endpoint(http, serve_cluster, bucket):
    store = http.get("/readyz").json()["store"]
    assert store["url"] == f"{bucket}/store" and store["reachable"] is True

    def scraped():
        text = httpx.get(serve_cluster.metrics_url, timeout=10).text
        ops = {'op="put_record"', 'op="get_record"', 'op="put_image"', 'op="get_image"', 'op="list"'}
        lines = [line for line in text.splitlines() if line.startswith("ray_sd_store_seconds_count")]
        return all(any(op in line and 'backend="s3"' in line for line in lines) for op in ops) and lines

    wait_until(scraped, 60, "the store's operations are scraped", interval_s=1)


def test_retention_and_the_byte_cap_empty_the_bucket(deployed_variant, s3_server, bucket):
    url = deployed_variant(
        lambda config: on_s3(config, s3_server, store=f"{bucket}/short", retention_s=3, max_store_bytes=1)
    )
    with httpx.Client(base_url=url, timeout=60) as http:
        job_id = http.post("/jobs", json={"prompt": "ephemeral"}).json()["id"]
        wait_until(lambda: http.get(f"/jobs/{job_id}").status_code in (404, 410), 60, "the job is swept")
        gone = wait_until(lambda: (r := http.get(f"/jobs/{job_id}")).status_code == 410 and r, 30, "it expires")
        assert gone.json()["error"]["code"] == "job_expired"
    left = [f for f in stored_files(f"{bucket}/short") if not f.endswith("layout.json")]
    assert left == [], left  # record, images, markers: nothing of the job is left


def test_a_store_that_cannot_be_reached_fails_the_deploy_in_one_line(serve_cluster, s3_server):
    config = load_config()
    on_s3(config, s3_server, store="s3://no-such-bucket/jobs")
    with pytest.raises(RuntimeError) as info:
        serve_cluster.deploy(config, timeout_s=120)
    [line] = [line for line in str(info.value).splitlines() if "no-such-bucket" in line]
    assert "args.jobs.store: job store s3://no-such-bucket/jobs cannot be reached" in line
    assert "bucket does not exist" in line
