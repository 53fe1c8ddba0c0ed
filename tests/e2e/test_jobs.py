"""The jobs API against real Serve: submit, watch, download, cancel, refine, webhooks.

One variant of the demo config for the module: its own store in a temporary directory, one job
sent to the Generator at a time (so a second job is reliably queued), webhooks allowed to a
receiver on 127.0.0.1.

Tests that need a job waiting, or cancel one, hold the queue with the longest job the config allows
(`DEMO_LONGEST`), seen running before they act, and cancel it themselves; they count the Generator's
work from a baseline taken once the server is quiet, never from its counters' totals.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from harness import DEMO_LONGEST, counted_since, free_port, job_when_final, quiet, wait_until
from helpers import decode, png, png_bytes


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first delivery, 204 after."""

    def __init__(self):
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(500 if len(receiver.bodies) == 1 else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


# A variant of the demo config (its own store, one job at a time, webhooks allowed): replicas restart.


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs-store")


@pytest.fixture(scope="module")
def server(deployed_variant, store_dir, receiver) -> str:
    def jobs_variant(config):
        config["applications"][0]["args"]["jobs"] = {
            "store": str(store_dir),
            "max_running": 1,
            "webhook_hosts": [f"127.0.0.1:{receiver.port}"],
            "webhook_backoff_s": 0.1,
        }

    return deployed_variant(jobs_variant)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def running(http: httpx.Client, job_id: str) -> dict:
    """The job once it reports progress: its image is in the Generator's step loop."""
    return wait_until(
        lambda: (job := http.get(f"/jobs/{job_id}").json()).get("progress") and job, 60, f"job {job_id} runs"
    )


@contextmanager
def queue_held(http: httpx.Client) -> Iterator[str]:
    """A job that holds the queue (one job runs at a time here) while the block runs: seen running before
    the block starts, too long to end by itself before the block does, cancelled when it ends. Jobs
    submitted in the block are queued until then, deterministically."""
    job_id = http.post("/jobs", json={"prompt": "ahead", **DEMO_LONGEST}).json()["id"]
    running(http, job_id)
    try:
        yield job_id
    finally:
        assert http.delete(f"/jobs/{job_id}").json()["status"] == "canceled"


def job_events(http: httpx.Client, job_id: str) -> Iterator[tuple[str, dict]]:
    """The job's events as they come, (kind, data), until its final one (the stream ends there)."""
    with http.stream("GET", f"/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


def events_of_a_queued_job(http: httpx.Client, body: dict) -> tuple[dict, list[tuple[str, dict]]]:
    """Submit `body` while the queue is held, open its events while it waits, let it run: the 202's job and
    every event of it, from its first (`queued`) to its final one."""
    with queue_held(http):
        submitted = http.post("/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        events = job_events(http, submitted.json()["id"])
        first = next(events)  # read while it waits: the stream is open before the job can run
    return submitted, [first, *events]


def test_submit_watch_and_download_make_the_same_image_as_a_synchronous_request(http, store_dir):
    body = {"prompt": "a harbour", "seed": 21, "num_images": 2, "num_inference_steps": 8}
    submitted, events = events_of_a_queued_job(http, body)
    job = submitted.json()
    assert submitted.headers["location"] == f"/jobs/{job['id']}" == job["urls"]["self"]
    assert job["status"] == "queued" and job["seeds"] == [21, 22]

    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "progress" in kinds, kinds
    steps = [data["step"] for kind, data in events if kind == "progress"]
    assert steps == sorted(steps)

    done = http.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and [i["seed"] for i in done["images"]] == [21, 22]
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    stored = png(http.get(done["images"][1]["url"]))
    sync = png(http.post("/generate", json={"prompt": "a harbour", "seed": 22, "num_inference_steps": 8}))
    assert np.abs(np.asarray(stored, int) - np.asarray(sync, int)).max() <= 1
    assert "Seed: 22" in stored.info["parameters"]
    webp = http.get(done["images"][0]["url"], params={"format": "webp"})
    assert webp.headers["content-type"] == "image/webp" and decode(webp.content).size == (64, 64)
    assert sorted(p.name for p in (store_dir / "images" / job["id"]).iterdir()) == ["0.png", "1.png"]


def test_prefer_respond_async_turns_generate_and_img2img_into_jobs(http):
    text = http.post("/generate", json={"prompt": "async", "seed": 3}, headers={"Prefer": "respond-async"})
    assert text.status_code == 202 and text.json()["kind"] == "txt2img"
    image = http.post(
        "/img2img",
        files={"init_image": ("in.png", png_bytes((64, 64)), "image/png")},
        data={"prompt": "async edit", "strength": "0.5", "seed": "4"},
        headers={"Prefer": "respond-async"},
    )
    assert image.status_code == 202, image.text
    edited = job_when_final(http, image.json()["id"])
    assert edited["status"] == "succeeded" and edited["kind"] == "img2img"
    assert edited["images"][0]["metadata"]["strength"] == 0.5
    assert job_when_final(http, text.json()["id"])["status"] == "succeeded"


def test_refine_runs_image_to_image_on_a_stored_image(http):
    source = job_when_final(http, http.post("/jobs", json={"prompt": "a fox", "seed": 5}).json()["id"])
    refined = http.post(f"/jobs/{source['id']}/refine", json={"prompt": "a fox, sharper", "strength": 0.4})
    assert refined.status_code == 202, refined.text
    job = job_when_final(http, refined.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "img2img" and job["refined_from"] == f"{source['id']}/0"
    assert job["params"]["num_inference_steps"] == 3  # the source's 2 steps, raised so that 40% leaves one
    assert job["params"]["prompt"] == "a fox, sharper" and job["seeds"] == [5]
    by_body = http.post("/refine", json={"id": source["id"], "prompt": "again", "strength": 0.3})
    assert by_body.status_code == 202 and job_when_final(http, by_body.json()["id"])["status"] == "succeeded"
    missing = http.post(f"/jobs/{source['id']}/refine", json={"image": 3})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "image"


def test_cancel_a_queued_job_and_a_running_one(http):
    before = quiet(http)
    first = http.post("/jobs", json={"prompt": "long", **DEMO_LONGEST}).json()
    queued = http.post("/jobs", json={"prompt": "waits", **DEMO_LONGEST}).json()
    running(http, first["id"])
    assert http.get(f"/jobs/{queued['id']}").json()["position"] == 1

    cancelled = http.delete(f"/jobs/{queued['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "canceled"
    stopped = http.delete(f"/jobs/{first['id']}")
    assert stopped.status_code == 200 and stopped.json()["status"] == "canceled"
    # What cancelling guarantees: the running job's image left the engine at its next step, unfinished;
    # the queued one never reached the Generator.
    done = counted_since(before, quiet(http))
    assert (done["received"], done["cancelled_in_flight"], done["succeeded"]) == (1, 1, 0), done
    assert done["cancelled_before_start"] == 0 and done["failed"] == 0, done
    again = http.delete(f"/jobs/{first['id']}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert job_when_final(http, queued["id"])["started_at"] is None
    assert job_when_final(http, first["id"])["images"] == []


def test_unknown_malformed_and_unfinished_jobs_answer_clearly(http):
    unknown = http.get("/jobs/" + "f" * 36)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
    assert http.get("/jobs/not-an-id").status_code == 404
    assert http.delete("/jobs/../../etc").status_code == 404
    job = http.post("/jobs", json={"prompt": "later", **DEMO_LONGEST}).json()
    early = http.get(f"/jobs/{job['id']}/images/0")
    assert early.status_code == 409 and early.json()["error"]["code"] == "job_not_finished"
    assert http.delete(f"/jobs/{job['id']}").json()["status"] == "canceled"  # it had not ended: no image yet
    bad = http.post("/jobs", json={"prompt": "x", "strength": 0.5})
    assert bad.status_code == 422 and "init_image" in bad.json()["error"]["message"]


def test_list_pages_newest_first_and_filters_by_status(http):
    ids = [http.post("/jobs", json={"prompt": f"list {i}"}).json()["id"] for i in range(3)]
    for job_id in ids:
        job_when_final(http, job_id)
    first = http.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2] and first["next_cursor"]
    second = http.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["jobs"][0]["id"] == ids[0]
    succeeded = http.get("/jobs", params={"status": "succeeded", "limit": 200}).json()["jobs"]
    assert succeeded and all(j["status"] == "succeeded" for j in succeeded)


def test_generate_streams_progress_then_the_images_as_server_sent_events(http):
    body = {"prompt": "streamed", "seed": 8, "num_inference_steps": 6, "num_images": 2}
    events = []
    with http.stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}) as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "succeeded" and {k for k, _ in events[:-1]} == {"progress"}
    result = events[-1][1]
    assert [i["seed"] for i in result["images"]] == [8, 9]
    sync = http.post("/generate", json={**body, "num_images": 1, "seed": 9}).content
    assert np.abs(np.asarray(decode(result["images"][1]["b64"]), int) - np.asarray(decode(sync), int)).max() <= 1


def test_automatic1111_progress_and_interrupt_map_onto_the_running_job(http):
    quiet(http)  # no other job of this caller runs: the progress and the interrupt are about this one
    job = http.post("/jobs", json={"prompt": "a1111 watched", **DEMO_LONGEST}).json()
    progress = wait_until(
        lambda: (p := http.get("/sdapi/v1/progress").json())["state"]["sampling_step"] > 0 and p,
        30,
        "A1111 progress reports steps",
    )
    assert progress["state"]["job"] == job["id"] and 0 < progress["progress"] < 1
    assert http.post("/sdapi/v1/interrupt").json()["interrupted"] == job["id"]
    assert job_when_final(http, job["id"])["status"] == "canceled"
    assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_webhooks_reach_allowed_hosts_and_are_retried_after_a_500(http, receiver):
    hook = {"url": f"http://127.0.0.1:{receiver.port}/done"}
    job = http.post("/jobs", json={"prompt": "hooked", "webhook": hook}).json()
    wait_until(lambda: len(receiver.bodies) >= 2, 30, "the webhook is delivered again after a 500")
    assert [b["id"] for b in receiver.bodies[:2]] == [job["id"], job["id"]]
    assert receiver.bodies[-1]["status"] == "succeeded"
    refused = http.post("/jobs", json={"prompt": "x", "webhook": {"url": "http://169.254.169.254/latest"}})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook.url"


def test_job_images_carry_the_init_image_through_json_too(http):
    init = base64.b64encode(png_bytes((64, 64), seed=9)).decode()
    job = http.post("/jobs", json={"prompt": "from json", "init_image": init, "strength": 0.6, "seed": 2}).json()
    done = job_when_final(http, job["id"])
    assert done["kind"] == "img2img" and done["images"][0]["metadata"]["strength"] == 0.6


def test_the_python_client_submits_follows_downloads_cancels_and_streams(server):
    from serve_app.client import AsyncSDClient, SDClient, SDServeError

    with SDClient(server) as sd:
        job = sd.submit("client job", seed=12, num_images=2, num_inference_steps=6)
        assert job.status == "queued" and job.seeds == [12, 13]
        updates = []
        done = sd.wait(job.id, on_progress=updates.append)
        assert done.status == "succeeded" and updates and updates[-1]["images_done"] == 2
        image = sd.download(job.id, 1, "jpeg")
        assert image.media_type == "image/jpeg" and image.seed == 13 and image.image.size == (64, 64)
        assert sd.jobs(limit=1)[0][0].id == job.id
        long = sd.submit("client long", **DEMO_LONGEST)
        assert sd.cancel(long.id).status == "canceled"  # queued or running: it cannot have ended yet
        with pytest.raises(SDServeError) as info:
            sd.cancel(long.id)
        assert info.value.status == 409 and info.value.code == "job_finished"
        events = list(sd.stream("client stream", seed=4, num_inference_steps=4))
        assert [kind for kind, _ in events][-1] == "succeeded" and events[-1][1].seeds == [4]
        assert all(kind == "progress" for kind, _ in events[:-1])

    async def follow_async():
        async with AsyncSDClient(server) as sd:
            job = await sd.submit("async client", seed=1)
            return await sd.wait(job.id)

    import asyncio

    assert asyncio.run(follow_async()).status == "succeeded"


def test_a_job_can_ask_for_latent_previews_as_events(http):
    # Watched from before it runs, so that its stream has its previews (the latest when several come at once).
    _, events = events_of_a_queued_job(http, {"prompt": "previewed", "num_inference_steps": 6, "preview_every": 2})
    previews = [data for kind, data in events if kind == "preview"]
    assert previews and all(decode(p["image"]).size == (8, 8) for p in previews)
    assert events[-1][0] == "succeeded"
    invalid = http.post("/jobs", json={"prompt": "x", "preview_every": 0})
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "preview_every"
