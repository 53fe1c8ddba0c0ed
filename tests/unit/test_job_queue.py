"""The job store and the JobManager's queue, in-process: a scripted Generator, a temporary store,
no Ray. Each scenario runs on its own event loop and synchronises on the manager's state."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from ray.exceptions import RayActorError

from serve_app.config import AppArgs
from serve_app.job_queue.manager import JobFinished, JobManager, JobNotFound, JobRefused
from serve_app.job_queue.records import JobRecord, JobStatus, Webhook, created_at, is_job_id, new_job_id, owner_of
from serve_app.job_queue.store import JobStore
from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult

Manager = JobManager.func_or_class  # the class behind the deployment


def record(owner: str | None = None, images: int = 1, prompt: str = "p", **fields) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        created_at=time.time(),
        owner=owner,
        model="synthetic:tiny",
        params=ImageParams(prompt=prompt, seed=10, num_inference_steps=3),
        seeds=list(range(10, 10 + images)),
        **fields,
    )


# -- records and the store -------------------------------------------------------------------------


def test_ids_are_unguessable_sort_by_time_and_tell_their_age():
    early, late = new_job_id(now=1000.0), new_job_id(now=2000.0)
    assert early < late and is_job_id(early) and created_at(late) == 2000.0
    assert new_job_id(now=1000.0) != early  # 96 random bits follow the time
    assert not is_job_id("../etc/passwd") and not is_job_id(early.upper())
    assert owner_of("key-1") != owner_of("key-2") and owner_of(None) is None and "key-1" not in owner_of("key-1")


def test_store_keeps_records_and_images_and_lists_newest_first_by_page(tmp_path):
    store = JobStore(str(tmp_path / "store"))
    records = [record() for _ in range(5)]
    for r in records:
        store.put(r)
    records[1].status = JobStatus.succeeded
    store.put(records[1])
    assert store.get(records[1].id).status == JobStatus.succeeded and store.get(new_job_id()) is None
    page, cursor = store.list(limit=2)
    assert [r.id for r in page] == [records[4].id, records[3].id]
    page, cursor = store.list(limit=2, cursor=cursor)
    assert [r.id for r in page] == [records[2].id, records[1].id]
    page, cursor = store.list(limit=2, cursor=cursor)
    assert [r.id for r in page] == [records[0].id] and cursor is None
    assert [r.id for r in store.list(status=JobStatus.succeeded)[0]] == [records[1].id]
    assert [r.id for r in store.unfinished()] == [r.id for r in records if r is not records[1]]
    store.put_image(records[0].id, 0, b"png bytes")
    assert store.get_image(records[0].id, 0) == b"png bytes" and store.size_bytes(records[0].id) > 9
    store.delete(records[0].id)
    assert store.get(records[0].id) is None and store.get_image(records[0].id, 0) is None
    assert not list((tmp_path / "store").rglob("*.part"))  # written aside, then moved into place


def test_a_store_lists_only_the_owners_jobs(tmp_path):
    store = JobStore(str(tmp_path))
    mine, theirs = record(owner="a"), record(owner="b")
    store.put(mine)
    store.put(theirs)
    assert [r.id for r in store.list(owner="a")[0]] == [mine.id]


# -- the manager, with a scripted Generator ------------------------------------------------------


class ScriptedGenerator:
    """A Generator handle: each image streams `steps` progress events; a gate can hold them mid-way."""

    def __init__(self, steps: int = 3):
        self.steps = steps
        self.gate = asyncio.Event()
        self.gate.set()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.fail_with: list[Exception] = []  # raised by the next streams, one each

    def options(self, **_):
        return self

    @property
    def generate_stream(self):
        return self

    def remote(self, job):
        self.started.append(job.params.prompt)
        return Stream(self, job)


class Stream:
    def __init__(self, generator: ScriptedGenerator, job):
        self.generator, self.job = generator, job

    def cancel(self):
        self.generator.cancelled.append(self.job.params.prompt)

    def __aiter__(self):
        return self._items()

    async def _items(self):
        if self.generator.fail_with:
            raise self.generator.fail_with.pop(0)
        for step in range(1, self.generator.steps + 1):
            yield {"step": step, "total_steps": self.generator.steps}
            await self.generator.gate.wait()
        params = self.job.params.with_defaults(_DEFAULTS)
        yield ImageResult(np.full((8, 8, 3), self.job.seed % 255, np.uint8), params, 1, 0.01)


_DEFAULTS = AppArgs().defaults.model_copy(update={"width": 8, "height": 8, "guidance_scale": 7.5, "strength": 0.5})


def manager_for(tmp_path, generator: ScriptedGenerator, **jobs) -> Manager:
    settings = AppArgs.model_validate({"jobs": {"store": str(tmp_path / "store"), **jobs}})
    return Manager(generator, settings)


async def until(predicate, what: str, timeout_s: float = 10.0, interval_s: float = 0.005):
    """Wait until `predicate()` holds, looking again every `interval_s` (a real pause: the manager's tasks
    and the store writes it runs in threads go on meanwhile); AssertionError naming `what` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(interval_s)


async def ended(manager: Manager, job_id: str, timeout_s: float = 10.0) -> dict:
    """The job's final event, from the manager's own event stream. The manager sends it once the final
    state is stored and the job has left its unfinished records: after this, nothing of the job runs."""

    async def every_event() -> list[dict]:
        return [event async for event in manager.events(job_id)]

    event = (await asyncio.wait_for(every_event(), timeout_s))[-1]
    assert event["event"] in {s.value for s in JobStatus if s.final}, event
    return event


def run(scenario):
    return asyncio.run(scenario())


def test_a_job_is_stored_before_submit_returns_and_ends_with_its_images(tmp_path):
    async def scenario():
        generator = ScriptedGenerator()
        manager = manager_for(tmp_path, generator)
        job = record(images=2)
        await manager.submit(job)
        assert manager.store.get(job.id).status in (JobStatus.queued, JobStatus.running)
        assert (await ended(manager, job.id))["event"] == "succeeded"
        return manager.store.get(job.id), manager.store

    stored, store = run(scenario)
    assert [i.seed for i in stored.images] == [10, 11] and stored.attempts == 1
    assert store.get_image(stored.id, 1)[:4] == b"\x89PNG" and stored.images[0].metadata["prompt"] == "p"
    assert stored.started_at >= stored.created_at and stored.finished_at >= stored.started_at


def test_events_start_with_the_current_state_and_end_with_the_final_one(tmp_path):
    async def scenario():
        generator = ScriptedGenerator(steps=3)
        generator.gate.clear()
        manager = manager_for(tmp_path, generator, max_running=1)
        first, second = record(prompt="first"), record(prompt="second")
        await manager.submit(first)
        await manager.submit(second)
        await until(lambda: manager._progress.get(first.id), "the first job reports progress")
        events = manager.events(second.id)
        seen = [await anext(events)]
        assert seen[0] == {"event": "queued", "data": {"id": second.id, "position": 1}}
        generator.gate.set()
        async for event in events:
            seen.append(event)
        return seen

    seen = run(scenario)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "queued" and kinds[1] == "running" and kinds[-1] == "succeeded"
    progress = [e["data"]["step"] for e in seen if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 3
    assert seen[-1]["data"]["status"] == "succeeded" and len(seen[-1]["data"]["images"]) == 1


def test_a_watcher_arriving_while_the_final_state_is_stored_still_gets_the_final_event(tmp_path):
    async def scenario():
        manager = manager_for(tmp_path, ScriptedGenerator(steps=1))
        storing_final, release = threading.Event(), threading.Event()
        put = manager.store.put

        def slow_final_put(record):
            if record.status.final:
                storing_final.set()
                release.wait(5)
            put(record)

        manager.store.put = slow_final_put
        job = record()
        await manager.submit(job)
        await until(storing_final.is_set, "the final state is being stored")
        assert (await manager.live(job.id)) is None  # no longer reported as running
        with pytest.raises(JobFinished):
            await manager.cancel(job.id, None)
        events = manager.events(job.id)
        seen = [await anext(events)]
        release.set()
        async for event in events:
            seen.append(event)
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert seen[-1]["event"] == "succeeded" and seen[-1]["data"]["images"]


def test_cancelling_a_queued_job_means_it_never_runs_and_a_running_one_stops_its_generator_calls(tmp_path):
    async def scenario():
        generator = ScriptedGenerator()
        generator.gate.clear()
        manager = manager_for(tmp_path, generator, max_running=1)
        running, queued = record(prompt="running"), record(prompt="queued")
        await manager.submit(running)
        await manager.submit(queued)
        await until(lambda: manager._progress.get(running.id), "the first job reports progress")
        assert (await manager.live(queued.id)) == {"status": "queued", "position": 1}
        await manager.cancel(queued.id, None)
        await manager.cancel(running.id, None)
        await until(lambda: not manager._runs, "the cancelled job's task has ended")
        with pytest.raises(JobFinished):
            await manager.cancel(running.id, None)
        with pytest.raises(JobNotFound):
            await manager.cancel(new_job_id(), None)
        return generator, manager.store.get(running.id), manager.store.get(queued.id)

    generator, running, queued = run(scenario)
    assert generator.started == ["running"] and generator.cancelled == ["running"]
    assert running.status == queued.status == JobStatus.canceled and running.images == []


def test_a_cancel_that_arrives_while_the_images_are_stored_is_refused_and_the_job_succeeds(tmp_path, monkeypatch):
    from serve_app.job_queue import manager as manager_module

    storing, release = threading.Event(), threading.Event()
    store_results = manager_module.store_results

    def held_store(*args):
        storing.set()
        release.wait(10)
        return store_results(*args)

    monkeypatch.setattr(manager_module, "store_results", held_store)

    async def scenario():
        manager = manager_for(tmp_path, ScriptedGenerator())
        job = record(images=2)
        await manager.submit(job)
        await until(storing.is_set, "its images are being stored")
        with pytest.raises(JobFinished, match="storing"):
            await manager.cancel(job.id, None)
        release.set()
        await until(lambda: not manager._runs, "the job's task has ended")
        return manager.store.get(job.id)

    stored = run(scenario)
    assert stored.status == JobStatus.succeeded and len(stored.images) == 2


def test_another_keys_job_is_not_found(tmp_path):
    async def scenario():
        manager = manager_for(tmp_path, ScriptedGenerator())
        job = record(owner="alice")
        await manager.submit(job)
        with pytest.raises(JobNotFound):
            await manager.cancel(job.id, "mallory")

    run(scenario)


def test_queue_caps_refuse_per_key_with_429_and_in_all_with_503(tmp_path):
    async def scenario():
        generator = ScriptedGenerator()
        generator.gate.clear()
        manager = manager_for(tmp_path, generator, max_queued=3, max_queued_per_key=2)
        await manager.submit(record(owner="a"))
        await manager.submit(record(owner="a"))
        with pytest.raises(JobRefused) as per_key:
            await manager.submit(record(owner="a"))
        await manager.submit(record(owner="b"))
        with pytest.raises(JobRefused) as full:
            await manager.submit(record(owner="c"))
        return per_key.value, full.value

    per_key, full = run(scenario)
    assert (per_key.status, per_key.code) == (429, "too_many_jobs") and per_key.retry_after_s >= 1
    assert (full.status, full.code) == (503, "overloaded")
    import pickle

    again = pickle.loads(pickle.dumps(per_key))  # crosses to the ingress intact
    assert (again.status, again.code, again.retry_after_s) == (429, "too_many_jobs", per_key.retry_after_s)


def test_a_job_whose_generator_died_runs_again_and_a_job_error_fails_it(tmp_path):
    async def scenario():
        generator = ScriptedGenerator()
        generator.fail_with = [RayActorError()]
        manager = manager_for(tmp_path, generator)
        retried = record(prompt="retried")
        await manager.submit(retried)
        await ended(manager, retried.id)
        generator.fail_with = [InvalidTaskError("strength leaves no step", "strength")]
        failed = record(prompt="failed")
        await manager.submit(failed)
        await ended(manager, failed.id)
        return manager.store.get(retried.id), manager.store.get(failed.id)

    retried, failed = run(scenario)
    assert retried.status == JobStatus.succeeded and retried.attempts == 2
    assert failed.status == JobStatus.failed and failed.error.code == "invalid_request"
    assert failed.error.field == "strength"


def test_a_new_queue_holder_takes_over_every_unfinished_job_from_the_store(tmp_path):
    async def scenario():
        generator = ScriptedGenerator()
        generator.gate.clear()
        first = manager_for(tmp_path, generator, max_running=1)
        jobs = [record(prompt=f"j{i}") for i in range(3)]
        for job in jobs:
            await first.submit(job)
        await until(lambda: first._progress, "the first job runs")
        first._dispatcher.cancel()  # the replica dies: its tasks and memory are gone
        for task in list(first._runs.values()):
            task.cancel()
        generator.gate.set()
        second = manager_for(tmp_path, generator)
        for job in jobs:
            assert (await ended(second, job.id))["event"] == "succeeded"
        return [second.store.get(j.id) for j in jobs]

    records = run(scenario)
    assert [r.attempts for r in records] == [2, 1, 1]  # the one that was running ran again


def test_webhooks_are_retried_until_the_receiver_accepts(tmp_path):
    calls = []

    async def scenario():
        import httpx

        def receiver(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return httpx.Response(500 if len(calls) == 1 else 204)

        manager = manager_for(tmp_path, ScriptedGenerator(), webhook_backoff_s=0)
        manager._http = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
        job = record(webhook=Webhook(url="http://hooks.example/done"))
        await manager.submit(job)
        await until(lambda: len(calls) == 2, "the webhook is delivered a second time")
        return job

    job = run(scenario)
    import json

    assert [json.loads(c.content)["id"] for c in calls] == [job.id, job.id]
    assert json.loads(calls[-1].content)["status"] == "succeeded"


def test_sweeping_deletes_jobs_past_retention_and_the_oldest_over_the_byte_cap(tmp_path):
    async def scenario():
        manager = manager_for(tmp_path, ScriptedGenerator(), retention_s=3600, max_store_bytes=1)
        old = record().model_copy(update={"id": new_job_id(now=time.time() - 7200)})
        manager.store.put(old.model_copy(update={"status": JobStatus.succeeded}))
        kept = record()
        await manager.submit(kept)
        # Its final event, not its stored state: the manager stores the final state first and lets the job
        # leave its unfinished records after, and a sweep rightly skips every job still among those.
        await ended(manager, kept.id)
        unfinished = record()
        manager.generator.gate.clear()
        await manager.submit(unfinished)
        deleted = manager.sweep()
        return deleted, manager.store, old, kept, unfinished

    deleted, store, old, kept, unfinished = run(scenario)
    assert deleted == 2 and store.get(old.id) is None and store.get(kept.id) is None
    assert store.get(unfinished.id) is not None  # never swept while it can still run
