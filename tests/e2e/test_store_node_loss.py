"""No job lost with a node: the two-node cluster of deploy/local_cluster.py with the job store on a local
S3-protocol server (the session's `s3_server`), and the worker node killed mid-burst.

Placement is chosen, not hoped for: the worker node carries the Ray node label `sd-role=jobs`; the JobManager
asks for it (`label_selector`) and falls back to any other node (`fallback_strategy`), so it starts on the
worker and its replacement starts on the head once the worker is gone. The ImageGenerator runs one replica
per node (`max_replicas_per_node: 1`). The Ingress stays off the worker (it sits beside the head's HTTP proxy:
a lost ingress loses no job either, tests/e2e/test_jobs_durability.py, but this test is about the queue
holder and the images). Killing the worker's process group takes the JobManager and a Generator replica, with
the jobs they were running: every accepted job still ends succeeded, its images readable from the bucket.

Then bulk output to the same bucket: a run is cut by the loss of a node that runs a bulk worker (the run's
driver stopped with it, as a run lost with its machine), and the same command, run again on what is left,
finishes it: every row done once, every image readable.

Everything started here is stopped here by its process group; the module takes a few minutes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from harness import DEMO_CONFIG, FINAL_JOB_STATES, REPO, wait_until
from helpers import decode

from loadtest.servers import s3_env
from serve_app.bulk.manifest import Output, done_rows, read_entries

sys.path.insert(0, str(REPO / "deploy"))
from local_cluster import LocalRayCluster, free_port, two_replica_config  # noqa: E402

pytestmark = pytest.mark.own_ray  # a cluster of its own: runs last, alone (tests/conftest.py)

JOBS_NODE = {"sd-role": "jobs"}
ELSEWHERE = {"sd-role": "!jobs"}
BUCKET = "node-loss"
JOB = {"num_images": 2, "num_inference_steps": 30, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def cluster(s3_server):
    fsspec.filesystem("s3").mkdir(BUCKET)
    cluster = LocalRayCluster(Path(tempfile.mkdtemp(prefix="sd-loss-")))  # short: Ray's socket paths
    # Workers read and write the bucket (bulk's actors inherit the node's environment); a dead node is noticed
    # in about ten seconds instead of Ray's default (a heavily loaded machine must not look dead).
    cluster.env.update(s3_env(s3_server))
    cluster.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="10")
    try:
        cluster.start_head(num_cpus=2)
        cluster.head_id = next(n["node_id"] for n in cluster.wait_for_nodes(1) if n["is_head_node"])
        yield cluster
    finally:
        assert cluster.stop() == []


def add_jobs_node(cluster: LocalRayCluster, name: str, num_cpus: int) -> tuple[int, str]:
    """A worker node labelled for the JobManager: its process group and node id."""
    before = {n["node_id"] for n in cluster.nodes()}
    group = cluster.add_worker(name, num_cpus=num_cpus, labels={"sd-role": "jobs"})
    nodes = wait_until(
        lambda: [n for n in cluster.nodes() if n["node_id"] not in before], 120, f"{name} joins", interval_s=0.5
    )
    return group, nodes[0]["node_id"]


def config_on_s3(http_port: int, s3_server) -> dict:
    config = two_replica_config(http_port)
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": s3_env(s3_server)}
    app["args"]["jobs"] = {"store": f"s3://{BUCKET}/jobs", "max_running": 4, "max_attempts": 5}
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["ImageGenerator"]["max_replicas_per_node"] = 1
    ingress = deployments["Ingress"].setdefault("ray_actor_options", {})
    ingress["label_selector"] = ELSEWHERE
    app["deployments"].append(
        {
            "name": "JobManager",
            "ray_actor_options": {
                "num_cpus": 0,
                "label_selector": JOBS_NODE,
                "fallback_strategy": [{"label_selector": ELSEWHERE}],
            },
        }
    )
    return config


def placement(cluster: LocalRayCluster, deployment: str) -> set[str]:
    """Node ids of the deployment's running replicas (what `serve status` reads)."""
    app = cluster.serve_details()["applications"]["sd"]
    replicas = app["deployments"][deployment]["replicas"]
    return {r["node_id"] for r in replicas if r["state"] == "RUNNING"}


def jobs_of(http: httpx.Client, ids: list[str]) -> list[dict] | None:
    jobs = []
    for job_id in ids:
        try:
            response = http.get(f"/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        jobs.append(response.json())
    return jobs


@pytest.mark.timeout(900)
def test_killing_the_node_of_the_job_manager_and_a_generator_mid_burst_loses_no_job(
    cluster, s3_server, record_property
):
    group, worker = add_jobs_node(cluster, "worker-1", num_cpus=1)
    http_port = free_port()
    path = cluster.root / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config_on_s3(http_port, s3_server), sort_keys=False))
    cluster.serve("deploy", str(path))
    cluster.wait_until_running(timeout_s=400)
    assert placement(cluster, "JobManager") == {worker}
    assert placement(cluster, "ImageGenerator") == {worker, cluster.head_id}
    assert placement(cluster, "Ingress") == {cluster.head_id}

    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
        accepted = []
        for i in range(16):
            response = http.post("/jobs", json={"prompt": f"before {i}", "seed": i, **JOB})
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        wait_until(
            lambda: (
                (jobs := jobs_of(http, accepted))
                and sum(j["status"] == "succeeded" for j in jobs) >= 1
                and sum(j["status"] == "running" for j in jobs) >= 2
            ),
            300,
            "jobs have succeeded and others run",
            interval_s=0.5,
        )

        # Keep submitting while the node goes: what is answered 202 is accepted and must end succeeded.
        stop, during = threading.Event(), []

        def submit_meanwhile():
            with httpx.Client(base_url=http.base_url, timeout=30) as other:
                i = 0
                while not stop.is_set():
                    try:
                        response = other.post("/jobs", json={"prompt": f"during {i}", "seed": 100 + i, **JOB})
                        if response.status_code == 202:
                            during.append(response.json()["id"])
                    except httpx.HTTPError:
                        pass  # refused while the queue holder restarts: not accepted
                    i += 1
                    time.sleep(0.5)

        submitter = threading.Thread(target=submit_meanwhile)
        submitter.start()
        killed_at = time.monotonic()
        cluster.kill_node(group)
        wait_until(lambda: len(cluster.nodes()) == 1, 120, "the worker node is marked dead", interval_s=0.5)
        wait_until(lambda: placement(cluster, "JobManager") == {cluster.head_id}, 180, "a new JobManager runs")
        record_property("node loss: kill to a new JobManager (s)", round(time.monotonic() - killed_at, 1))
        wait_until(lambda: len(during) >= 3, 120, "jobs are accepted again after the loss", interval_s=0.5)
        stop.set()
        submitter.join()

        ids = accepted + during
        jobs = wait_until(
            lambda: (jobs := jobs_of(http, ids)) and all(j["status"] in FINAL_JOB_STATES for j in jobs) and jobs,
            420,
            f"{len(ids)} accepted jobs end",
            interval_s=1,
        )
        record_property("node loss: accepted jobs", len(ids))
        assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), [(j["id"], j["status"]) for j in jobs]
        assert max(j["attempts"] for j in jobs) >= 2  # those running on the lost node ran again
        for job in jobs:
            for image in job["images"]:
                fetched = http.get(image["url"])
                assert fetched.status_code == 200 and decode(fetched.content).size == (64, 64)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    for job in jobs:
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/jobs/images/{job['id']}")) == ["0.png", "1.png"]
    cluster.serve_shutdown()


def bulk_command(cluster: LocalRayCluster, rows: Path, out: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serve_app.bulk",
        str(rows),
        out,
        "--config",
        str(DEMO_CONFIG),
        "--address",
        cluster.gcs_address,
        "--workers",
        str(workers),
        "--steps",
        "50",
        # Small calls and tasks: rows are recorded done a couple at a time, so the loss comes mid-run.
        "--batch-size",
        "2",
        "--rows-per-task",
        "2",
        "-q",
    ]


def image_of(row: int) -> str:
    """Where a row's one image goes, seeded base seed (0) + row as the row gives none."""
    return f"images/0000/{row:08d}-{row}.png"


def bulk_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}


@pytest.mark.timeout(900)
def test_bulk_output_on_the_bucket_resumes_after_a_node_is_lost(cluster, tmp_path, record_property):
    if "sd" in cluster.serve_details().get("applications", {}):
        cluster.serve_shutdown()  # its replicas' CPUs go to the bulk workers
    group, worker = add_jobs_node(cluster, "worker-2", num_cpus=2)
    # Parquet in: its nulls mean "not given", so a row without a seed gets base seed (0) + row.
    rows = tmp_path / "rows.parquet"
    count = 32
    pq.write_table(pa.Table.from_pylist([{"prompt": f"row {i}", "seed": None} for i in range(count)]), rows)
    out = f"s3://{BUCKET}/bulk"
    output = Output(out)

    def done() -> int:
        output.fs.invalidate_cache()
        return len(done_rows(read_entries(output)[0]))

    # Three workers on three CPUs of four: at least one of them on the worker node (the head has two).
    log = (tmp_path / "first-run.log").open("w")
    first = subprocess.Popen(
        bulk_command(cluster, rows, out, workers=3),
        cwd=REPO,
        env=bulk_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: done() > 0 or first.poll() is not None, 400, "rows are recorded done", interval_s=0.5)
        assert first.poll() is None, f"the first run ended before the node loss:\n{Path(log.name).read_text()[-3000:]}"
        cluster.kill_node(group)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the run's driver, lost with the node as with its machine
        first.wait()
    wait_until(lambda: worker not in {n["node_id"] for n in cluster.nodes()}, 120, "the node is marked dead")
    before = done()
    assert 0 < before < count, before
    record_property("bulk node loss: rows done before the loss", before)
    fs = fsspec.filesystem("s3")
    output.fs.invalidate_cache()
    recorded = done_rows(read_entries(output)[0]).tolist()
    written = {path: fs.info(path)["LastModified"] for path in (f"{BUCKET}/bulk/{image_of(row)}" for row in recorded)}

    again = subprocess.run(
        bulk_command(cluster, rows, out, workers=1),
        cwd=REPO,
        env=bulk_env(),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-3000:]}"
    skipped = int(re.search(r"(\d+) done before \(skipped\)", again.stdout)[1])
    assert before <= skipped < count, again.stdout  # (a part in flight at the loss may have landed since)
    assert f"{count - skipped} rows done, 0 failed, {skipped} done before (skipped)" in again.stdout
    entries = read_entries(output)[0].to_pylist()
    assert sorted(e["row"] for e in entries) == list(range(count)) and {e["status"] for e in entries} == {"done"}
    # Rows done before are not done again: their entries keep the first run's id, the others have the second's.
    runs = Counter(e["run_id"] for e in entries)
    assert sorted(runs.values()) == sorted([skipped, count - skipped]), runs
    fs.invalidate_cache()
    for entry in entries:
        assert entry["file"] == image_of(entry["row"])
        assert decode(fs.cat_file(f"{BUCKET}/bulk/{entry['file']}")).size == (64, 64)
    images = [p for p in fs.find(f"{BUCKET}/bulk/images") if p.endswith(".png")]
    assert len(images) == count  # one image per row: rows that ran twice wrote the same file again
    # The images of rows recorded done before the second run were not written again.
    assert {path: fs.info(path)["LastModified"] for path in written} == written
