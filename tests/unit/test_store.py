"""The job store on a local directory and on a real S3-protocol server (moto, started for the session on
127.0.0.1): records and images, listing a page without reading the store, atomic writes, retention and the
byte cap, presigned links, and the one-line errors of a store that cannot be used."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest
from s3fs import S3FileSystem

from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.job_queue.manager import JobManager
from serve_app.job_queue.records import JobRecord, JobStatus, new_job_id
from serve_app.job_queue.store import JobStore, StoreUnavailable, inverted, missing_backend, open_store
from serve_app.pipeline.params import ImageParams


def record(owner: str | None = None, status: JobStatus = JobStatus.queued, at: float | None = None) -> JobRecord:
    now = time.time() if at is None else at
    return JobRecord(
        id=new_job_id(now=at),
        status=status,
        created_at=now,
        owner=owner,
        model="synthetic:tiny",
        params=ImageParams(prompt="p", seed=1),
        seeds=[1],
    )


# The S3 cases start a server (moto, once for the session): slow, as everything that starts a server is.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/jobs"


class Counting:
    """Counts the store's record reads and listing calls (what a page costs)."""

    def __init__(self, store: JobStore, monkeypatch):
        self.records_read, self.listings = 0, 0
        read_many, names_after = store._read_many, store._names_after

        def counted_read(paths):
            self.records_read += sum("/records/" in p for p in paths)
            return read_many(paths)

        def counted_names(*args):
            self.listings += 1
            return names_after(*args)

        monkeypatch.setattr(store, "_read_many", counted_read)
        monkeypatch.setattr(store, "_names_after", counted_names)


def test_a_page_is_one_listing_and_its_own_records_newest_first(store_url, monkeypatch):
    store = JobStore(store_url)
    mine = [record(owner="a") for _ in range(12)]
    for r in [*mine, *(record(owner="b") for _ in range(5))]:
        store.put(r)
    count = Counting(store, monkeypatch)
    pages, cursor = [], None
    while True:
        page, cursor = store.list(owner="a", limit=5, cursor=cursor)
        pages.append([r.id for r in page])
        if cursor is None:
            break
    assert pages == [[r.id for r in reversed(mine)][i : i + 5] for i in (0, 5, 10)]
    assert count.listings == 3 and count.records_read == 12  # no record of b's, none twice
    assert store.list(owner="c") == ([], None)


def test_listing_by_status_uses_the_final_index_and_the_unfinished_jobs(store_url):
    store = JobStore(store_url)
    done, failed, running, queued = (record(owner="a") for _ in range(4))
    for r in (done, failed, running, queued):
        store.put(r)
    for r, status in ((done, JobStatus.succeeded), (failed, JobStatus.failed), (running, JobStatus.running)):
        r.status = status
        r.attempts = 1
        store.put(r)
    by_status = {s: [r.id for r in store.list(status=s, owner="a")[0]] for s in JobStatus}
    assert by_status == {
        JobStatus.succeeded: [done.id],
        JobStatus.failed: [failed.id],
        JobStatus.running: [running.id],
        JobStatus.queued: [queued.id],
        JobStatus.canceled: [],
    }
    assert [r.id for r in store.unfinished()] == [running.id, queued.id]  # oldest first
    assert store.list(status=JobStatus.succeeded, owner="b") == ([], None)


def test_a_new_queue_holder_drops_markers_of_jobs_that_ended_or_were_never_stored(store_url):
    store = JobStore(store_url)
    ended, waiting = record(), record()
    store.put(ended)
    store.put(waiting)
    ended.status = JobStatus.succeeded
    store._write(store._record_path(ended.id), ended.model_dump_json().encode())  # ended; its marker left behind
    store._write(store._path("unfinished", inverted(new_job_id())), b"")  # a submit cut short
    assert [r.id for r in store.unfinished()] == [waiting.id]
    assert store._names_after("unfinished", None, 10) == ([inverted(waiting.id)], False)


def test_images_are_written_whole_while_readers_read_them(store_url, monkeypatch):
    store = JobStore(store_url)
    if not store.is_local:  # one PUT each: nothing is moved into place on an object store
        monkeypatch.setattr(store.fs, "mv", lambda *a, **k: pytest.fail("no mv on an object store"))
    job_id = new_job_id()
    versions = [bytes([v]) * 300_000 for v in range(4)]
    store.put_image(job_id, 0, versions[0])
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(store.get_image(job_id, 0))

    reader = threading.Thread(target=read)
    reader.start()
    for v in versions[1:] * 3:
        store.put_image(job_id, 0, v)
    stop.set()
    reader.join()
    assert seen and all(data in versions for data in seen)
    assert store.get_image(job_id, 0) == versions[-1]
    assert not [p for p in store.fs.find(store.root) if p.endswith(".part")]


def test_deleting_a_job_removes_its_files_and_markers(store_url):
    store = JobStore(store_url)
    job = record(owner="a")
    store.put(job)
    store.put_input(job.id, b"init")
    store.put_image(job.id, 0, b"png")
    store.put_image(job.id, 0, b"jpeg", "jpeg")
    assert store.delete(job.id, only_final=True) is False  # still queued
    job.status = JobStatus.succeeded
    store.put(job)
    assert store.size_bytes(job.id) == len(job.model_dump_json()) + 4 + 3 + 4
    assert store.delete(job.id, only_final=True) is True
    assert store.get(job.id) is None and store.get_image(job.id, 0) is None and store.get_input(job.id) is None
    assert store.list(owner="a") == ([], None) and store.list(JobStatus.succeeded, owner="a") == ([], None)
    assert store.usage() == {}


def test_expired_jobs_are_listed_oldest_first_up_to_the_horizon(store_url):
    store = JobStore(store_url)
    now = time.time()
    old = [record(status=JobStatus.succeeded, at=now - age) for age in (9000, 8000, 7000)]
    young = record(status=JobStatus.succeeded)
    for r in (*old, young):
        store.put(r)
    assert store.ids_before(now - 3600) == [r.id for r in old]


class IdleGenerator:
    def options(self, **_):
        return self


def manager_over(url: str, **jobs):
    async def make():
        return JobManager.func_or_class(IdleGenerator(), AppArgs.model_validate({"jobs": {"store": url, **jobs}}))

    return asyncio.run(make())


def test_retention_and_the_byte_cap_sweep_the_store(store_url):
    store = JobStore(store_url)
    now = time.time()
    expired = record(status=JobStatus.succeeded, at=now - 7200)
    kept = [record(status=JobStatus.succeeded, at=now - 60 + i) for i in range(3)]
    for r in (expired, *kept):
        store.put(r)
        store.put_image(r.id, 0, b"x" * 1000)
    unfinished = record(at=now - 30)  # over the cap too, but it may still run: never swept
    store.put(unfinished)
    store.put_image(unfinished.id, 0, b"x" * 1000)
    sizes = store.usage()
    cap = sizes[kept[1].id] + sizes[kept[2].id] + sizes[unfinished.id]
    manager = manager_over(store_url, retention_s=3600, max_store_bytes=cap)
    assert manager.sweep() == 2  # the expired one, then the oldest while over the cap
    assert [r.id for r in store.list(limit=10)[0]] == [unfinished.id, kept[2].id, kept[1].id]
    assert store.get(expired.id) is None and store.get_image(kept[0].id, 0) is None
    assert sum(store.usage().values()) <= cap


def test_a_store_of_the_older_layout_is_indexed_once_by_the_queue_holder(tmp_path):
    store = JobStore(str(tmp_path))
    done, waiting = record(status=JobStatus.succeeded, owner="a"), record(owner="a")
    for r in (done, waiting):
        store._write(store._record_path(r.id), r.model_dump_json().encode())  # records only, no markers
    assert store.list(owner="a") == ([], None)
    manager = manager_over(str(tmp_path))
    assert [r.id for r in manager.store.list(owner="a")[0]] == [waiting.id, done.id]
    assert list(manager._records) == [waiting.id]  # taken over
    assert manager.store.ensure_layout() == 0


@pytest.mark.slow
def test_presigned_links_fetch_the_image_until_they_expire(s3_bucket):
    store = JobStore(f"{s3_bucket}/signed")
    job_id = new_job_id()
    store.put_image(job_id, 0, b"\x89PNG image")
    url = store.presigned_url(job_id, 0, 90)
    assert url.startswith("http://127.0.0.1:") and "X-Amz-Expires=90" in url and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG image"


def test_a_store_without_its_package_is_one_line_naming_the_url_and_the_package():
    assert missing_backend("s3://bucket/x") is None and missing_backend("/some/dir") is None
    problem = missing_backend("gs://bucket/jobs")
    assert problem.startswith("gs://bucket/jobs:") and "'gcsfs'" in problem and "\n" not in problem
    with pytest.raises(ValueError) as info:
        build_app({"jobs": {"store": "gs://bucket/jobs"}})
    [line] = [line for line in str(info.value).splitlines() if "gs://bucket/jobs" in line]
    assert "pip install gcsfs" in line
    with pytest.raises(StoreUnavailable, match="needs the package 'adlfs'"):
        JobStore("abfs://container/jobs")


@pytest.mark.slow
def test_a_store_that_cannot_be_reached_at_start_is_one_line_naming_the_url_and_the_error(s3_server, monkeypatch):
    with pytest.raises(ValueError) as info:
        build_app({"jobs": {"store": "s3://no-such-bucket/jobs"}})
    message = str(info.value)
    assert message.count("\n") == 0 and message.startswith("args.jobs.store: job store s3://no-such-bucket/jobs")
    assert "cannot be reached" in message and "bucket does not exist" in message
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    S3FileSystem.clear_instance_cache()  # a new client, which reads the environment again
    with pytest.raises(StoreUnavailable) as info:
        open_store("s3://elsewhere/jobs", timeout_s=0.5)
    S3FileSystem.clear_instance_cache()
    assert str(info.value) == "job store s3://elsewhere/jobs cannot be reached: no answer within 0.5 s"


def test_every_store_operation_is_timed_and_its_errors_counted(store_url):
    seen = []
    store = JobStore(store_url, observe=lambda op, seconds, error: seen.append((op, error)))
    job = record()
    store.put(job)
    store.get(job.id)
    store.get_image(job.id, 0)  # missing: no error
    store.list()
    store.probe()
    assert [op for op, _ in seen] == ["put_record", "get_record", "get_image", "list", "probe"]
    assert all(error is None for _, error in seen)
    store.fs = None  # every call now fails
    with pytest.raises(AttributeError):
        store.get(job.id)
    assert seen[-1][0] == "get_record" and isinstance(seen[-1][1], AttributeError)
