"""What an accepted job survives: two ingress replicas sharing one store, API keys that see only their
own jobs, and the Generator replica, an ingress replica or the queue holder killed mid-job. Every
accepted job still ends in a final state with its images stored once. (Retention through real Serve, expired jobs
answering 410 with nothing of them left: tests/e2e/test_store_s3.py; the sweep on either store: tests/unit/
test_store.py.)
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harness import deployment, wait_until

KEYS = ("alice-key", "bob-key")
# The config's most steps: the kill lands while jobs still run (the next /info call is all that comes between).
SLOW = {"num_inference_steps": 50, "width": 128, "height": 128}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("durable-store")


@pytest.fixture(scope="module")
def server(deployed_variant, store_dir, tmp_path_factory) -> str:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text("\n".join(KEYS) + "\n")

    def durable(config):
        config["applications"][0]["args"].update(
            jobs={"store": str(store_dir), "max_running": 2}, auth={"api_keys_file": str(keys_file)}
        )
        deployment(config, "Ingress")["num_replicas"] = 2

    return deployed_variant(durable)


def client(url: str, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def submit(http: httpx.Client, count: int, **body) -> list[str]:
    ids = []
    for i in range(count):
        response = http.post("/jobs", json={"prompt": f"durable {i}", "seed": i, **body})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def all_final(http: httpx.Client, ids: list[str], timeout_s: float = 180) -> list[dict]:
    def read():
        jobs = []
        for job_id in ids:
            response = http.get(f"/jobs/{job_id}")
            if response.status_code != 200:  # the ingress replica that answered is being replaced
                return None
            jobs.append(response.json())
        return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None

    return wait_until(read, timeout_s, f"{len(ids)} jobs end")


def stored_once(store_dir, jobs: list[dict]) -> None:
    for job in jobs:
        assert job["status"] == "succeeded", job
        files = sorted(p.name for p in (store_dir / "images" / job["id"]).iterdir())
        assert files == [f"{i}.png" for i in range(len(job["seeds"]))], files
    assert not list(store_dir.rglob("*.part"))


def test_a_job_submitted_through_one_ingress_replica_is_seen_through_the_other(server):
    with client(server) as http:
        job_id = submit(http, 1)[0]
        answered_by = set()
        for _ in range(40):
            response = http.get(f"/jobs/{job_id}")
            assert response.status_code == 200
            answered_by.add(response.headers["x-ingress-replica"])
            if len(answered_by) == 2:
                break
        assert len(answered_by) == 2, "both ingress replicas should have answered for the job"


def test_an_api_key_sees_only_its_own_jobs(server):
    with client(server, KEYS[0]) as alice, client(server, KEYS[1]) as bob:
        job_id = submit(alice, 1)[0]
        assert bob.get(f"/jobs/{job_id}").status_code == 404
        assert bob.delete(f"/jobs/{job_id}").status_code == 404
        assert job_id not in [j["id"] for j in bob.get("/jobs", params={"limit": 200}).json()["jobs"]]
        assert job_id in [j["id"] for j in alice.get("/jobs", params={"limit": 200}).json()["jobs"]]


def _kill_mid_job(server, store_dir, victim) -> list[dict]:
    """Submit jobs, kill `victim(info)`'s process once one runs, and return the jobs once all ended."""
    with client(server) as http:
        ids = submit(http, 6, num_images=2, **SLOW)
        wait_until(lambda: any(http.get(f"/jobs/{i}").json().get("progress") for i in ids), 60, "a job runs")
        info = http.get("/info").json()
        os.kill(victim(info), signal.SIGKILL)  # a replica process this test's Serve instance started
        jobs = all_final(http, ids)
    stored_once(store_dir, jobs)
    return jobs


def test_killing_the_generator_mid_job_runs_its_jobs_again(server, store_dir):
    jobs = _kill_mid_job(server, store_dir, lambda info: info["generator"]["pid"])
    assert max(j["attempts"] for j in jobs) >= 2  # those running on the dead replica ran again


def test_killing_an_ingress_replica_loses_no_job(server, store_dir):
    _kill_mid_job(server, store_dir, lambda info: info["ingress"]["pid"])


def test_killing_the_queue_holder_mid_job_hands_its_jobs_to_the_next(server, store_dir):
    old = None

    def manager_pid(info):
        nonlocal old
        old = info["job_manager"]["pid"]
        return old

    _kill_mid_job(server, store_dir, manager_pid)
    with client(server) as http:
        assert http.get("/info").json()["job_manager"]["pid"] != old


def test_a_burst_of_submissions_is_answered_at_once_and_every_job_ends(server, store_dir):
    with client(server) as http, ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: http.post("/jobs", json={"prompt": f"burst {i}", "seed": i}), range(48)))
        assert {r.status_code for r in responses} == {202}
        stored_once(store_dir, all_final(http, [r.json()["id"] for r in responses]))
