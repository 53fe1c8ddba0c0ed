"""JobManager: the one queue holder. It takes jobs in (written to the store before anyone is told
"accepted"), drives them through the Generator with streaming handle calls, keeps their live
progress, stores their images, tells watchers and webhooks, and sweeps expired jobs.

What survives what:
* the ingress replica that accepted a job dies: nothing is lost; the job is in the store and here;
* the Generator replica running a job dies: the streaming call fails, the job runs again (up to
  `jobs.max_attempts`); the same seeds make the same images, written to the same files;
* this replica dies: Serve starts a new one, which reads every unfinished job from the store and
  runs it again from the start (queued first, oldest first). Progress of the lost attempt is lost.
Only one replica of this deployment may run (num_replicas 1): it is the single writer of records.

Which queued job runs next is the engines' rule (`pipeline/fairness.py`): weighted fair share across tenants
(deficit round-robin on each job's denoiser rows x steps x images), then priority, then arrival. A tenant's
burst of jobs waits its turn beside everyone else's instead of in front of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from ..config import SERVE_BACKPRESSURE, AppArgs
from ..pipeline.errors import GenerationError
from ..pipeline.fairness import Claim, FairQueue
from ..pipeline.tasks import ImageResult, ImageTask
from ..service.encoding import decode_input
from ..service.generation import stream_images
from .metrics import StoreMetrics
from .records import JobError, JobRecord, JobStatus
from .store import open_store, protocol_of, store_results

logger = logging.getLogger("ray.serve")
DEFAULT_STEPS = 25  # a job's steps for fair dispatch when neither it nor its model's configured defaults say


class JobRefused(GenerationError):
    """A job that cannot be taken now: the caller's share of the queue is full (429) or the queue is (503)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s

    def __reduce__(self):  # crosses to the ingress pickled: rebuild it from its own arguments
        return type(self), (self.status, self.code, self.message, self.retry_after_s)


class JobNotFound(GenerationError):
    status, code = 404, "job_not_found"


class JobFinished(GenerationError):
    status, code = 409, "job_finished"


@serve.deployment(
    name="JobManager",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=4096,  # watchers hold a call open for a job's whole life
    backpressure_config=SERVE_BACKPRESSURE,
    health_check_period_s=5,
)
class JobManager:
    def __init__(self, generator: DeploymentHandle, settings: AppArgs):
        self.generator = generator.options(stream=True)
        self._by_model = len(settings.served_models()) > 1  # route each image to a replica holding its model
        self.config = settings.jobs
        self.model = settings.model
        # One line naming the URL and the error when the store cannot be reached (the builder checked it too).
        self.store = open_store(self.config.store, observe=StoreMetrics(protocol_of(self.config.store)))
        indexed = self.store.ensure_layout()
        if indexed:
            logger.info("JobManager: indexed %d records of a store written by an older version", indexed)
        # Ids waiting to run; the next by fair share (tenant, then priority, then arrival).
        self._queue: FairQueue[str] = FairQueue(self._claim)
        self._default_steps = {m.id: m.defaults.num_inference_steps for m in settings.served_models()}
        self._records: dict[str, JobRecord] = {}  # every unfinished job (queued or running)
        self._progress: dict[str, dict] = {}  # running jobs: step, total_steps, images_done
        self._previews: dict[str, str] = {}  # running jobs that asked for previews: the latest (base64 PNG)
        self._runs: dict[str, asyncio.Task] = {}  # running jobs: the asyncio task of each
        self._storing: set[str] = set()  # running jobs whose images are made and being stored
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._wake = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=self.config.webhook_timeout_s)
        for record in self.store.unfinished():  # taken over from a previous queue holder
            record.status = JobStatus.queued
            self._records[record.id] = record
            self._queue.append(record.id)
        if self._queue:
            logger.info("JobManager: %d unfinished jobs taken over from the store", len(self._queue))
        loop = asyncio.get_running_loop()
        self._dispatcher = loop.create_task(self._dispatch())
        self._sweeper = loop.create_task(self._sweep_forever())

    # -- calls from the ingress -----------------------------------------------------------------

    async def submit(
        self, record: JobRecord, init_png: bytes | None = None, control_pngs: list[bytes] | None = None
    ) -> JobRecord:
        """Take a job: stored before this returns, so an accepted job is never lost. `control_pngs`: the control
        maps of its ControlNet units, in order."""
        unfinished = len(self._records)
        if unfinished >= self.config.max_queued:
            raise JobRefused(503, "overloaded", f"the job queue is full ({unfinished} jobs)", self._retry_after())
        mine = sum(1 for r in self._records.values() if r.owner == record.owner)
        if record.owner is not None and mine >= self.config.max_queued_per_key:
            raise JobRefused(
                429,
                "too_many_jobs",
                f"this API key has {mine} unfinished jobs, the most it may have at once; wait for some to finish",
                self._retry_after(),
            )
        if init_png is not None:
            await run_in_threadpool(self.store.put_input, record.id, init_png)
        if control_pngs:
            await run_in_threadpool(self.store.put_controls, record.id, control_pngs)
        await run_in_threadpool(self.store.put, record)
        self._records[record.id] = record
        self._queue.append(record.id)
        self._wake.set()
        return record

    async def live(self, job_id: str) -> dict | None:
        """Queue position (1 = next) while queued, progress while running; None for jobs not unfinished here."""
        record = self._records.get(job_id)
        if record is None or record.status.final:  # final: being stored, about to leave
            return None
        if record.status == JobStatus.queued:
            return {"status": "queued", "position": self._position(job_id)}
        return {"status": "running", "progress": self._progress.get(job_id), "preview": self._previews.get(job_id)}

    async def running_job_of(self, owner: str | None) -> str | None:
        """The caller's most recently started running job (AUTOMATIC1111's progress and interrupt)."""
        running = [r for r in self._records.values() if r.status == JobStatus.running and r.owner == owner]
        return max(running, key=lambda r: r.started_at or 0).id if running else None

    async def cancel(self, job_id: str, owner: str | None) -> JobRecord:
        record = self._records.get(job_id)
        if record is None or record.owner != owner:
            stored = await run_in_threadpool(self.store.get, job_id)
            if stored is None or stored.owner != owner:
                raise JobNotFound(f"no job {job_id}")
            raise JobFinished(f"job {job_id} already ended: {stored.status.value}")
        if record.status.final:  # ended a moment ago; its final state is being stored
            raise JobFinished(f"job {job_id} already ended: {record.status.value}")
        if job_id in self._storing:
            raise JobFinished(f"job {job_id} has made its images and is storing them; it ends succeeded")
        if record.status == JobStatus.queued:
            self._queue.remove_if(lambda queued: queued == job_id)
            self._queue_moved()
        else:
            self._runs[job_id].cancel()  # its Generator calls are cancelled: rows leave at the next step
        await self._finish(record, JobStatus.canceled)
        return record

    async def events(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events from now on: its current state first, then each change, ending with the final one."""
        record = self._records.get(job_id)
        if record is None:  # finished (or unknown: the ingress checked it exists)
            stored = await run_in_threadpool(self.store.get, job_id)
            if stored is not None:
                yield {"event": stored.status.value, "data": stored.model_dump(mode="json")}
            return
        watcher: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(watcher)
        try:
            if record.status == JobStatus.queued:
                yield {"event": "queued", "data": {"id": job_id, "position": self._position(job_id)}}
            elif job_id in self._progress:
                yield {"event": "progress", "data": {"id": job_id, **self._progress[job_id]}}
            else:
                yield {"event": "running", "data": {"id": job_id, "attempt": record.attempts}}
            while True:
                event = await watcher.get()
                yield event
                if event["event"] in {s.value for s in JobStatus if s.final}:
                    return
        finally:
            watchers = self._watchers.get(job_id, set())
            watchers.discard(watcher)
            if not watchers:
                self._watchers.pop(job_id, None)

    async def info(self) -> dict:
        queued = sum(1 for r in self._records.values() if r.status == JobStatus.queued)
        tenants: dict[str, dict[str, int]] = {}
        for record in self._records.values():
            counts = tenants.setdefault(record.tenant, {"queued": 0, "running": 0})
            counts["queued" if record.status == JobStatus.queued else "running"] += 1
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "store": self.store.url,
            "queued": queued,
            "running": len(self._records) - queued,
            "watchers": sum(len(w) for w in self._watchers.values()),
            "tenants": dict(sorted(tenants.items())),  # unfinished jobs per tenant (hashed ids)
        }

    # -- running jobs ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            taken = self._queue.take(self.config.max_running - len(self._runs))  # fair share, then priority
            for job_id in taken:
                task = asyncio.get_running_loop().create_task(self._run(job_id))
                self._runs[job_id] = task
                task.add_done_callback(lambda _, job_id=job_id: self._run_done(job_id))
            if taken:
                self._queue_moved()
            self._wake.clear()
            await self._wake.wait()

    def _claim(self, job_id: str) -> Claim:
        """What fair dispatch weighs of a job: its tenant, priority and weight, and its images' cost (denoiser rows
        x steps, the model's default steps where it names none)."""
        record = self._records[job_id]
        steps = record.params.num_inference_steps or self._default_steps.get(record.model) or DEFAULT_STEPS
        params = record.params.model_copy(update={"num_inference_steps": steps})
        one = ImageTask(params, tenant=record.tenant, priority=record.priority, weight=record.weight).claim()
        images = len(record.seeds)
        return dataclasses.replace(one, cost=one.cost * images, steps=one.steps * images)

    def _run_done(self, job_id: str) -> None:
        self._runs.pop(job_id, None)
        self._wake.set()

    async def _run(self, job_id: str) -> None:
        record = self._records[job_id]
        record.status, record.started_at = JobStatus.running, time.time()
        record.attempts += 1
        await run_in_threadpool(self.store.put, record)
        self._notify(job_id, "running", {"id": job_id, "attempt": record.attempts})
        try:
            results = await self._generate(record)
        except asyncio.CancelledError:
            return  # cancelled: cancel() records it
        except GenerationError as exc:
            await self._finish(record, JobStatus.failed, JobError(code=exc.code, message=exc.message, field=exc.field))
            return
        except (RayActorError, DeploymentUnavailableError) as exc:
            if record.attempts < self.config.max_attempts:
                logger.warning("job %s: the Generator replica failed (%s); running it again", job_id, exc)
                record.status = JobStatus.queued
                self._progress.pop(job_id, None)
                await run_in_threadpool(self.store.put, record)
                self._queue.appendleft(job_id)
                self._queue_moved()
                self._wake.set()
                return
            error = JobError(code="generator_unavailable", message=f"the Generator failed {record.attempts} times")
            await self._finish(record, JobStatus.failed, error)
            return
        except Exception as exc:  # noqa: BLE001 - any other failure ends the job, never the queue
            logger.exception("job %s failed", job_id)
            await self._finish(record, JobStatus.failed, JobError(code="internal_error", message=type(exc).__name__))
            return
        # Its images are made: from here it ends succeeded, and a cancel arriving now is told so (its
        # images would be written anyway, by the thread below, while the job said "canceled").
        self._storing.add(job_id)
        try:
            record.images = await run_in_threadpool(store_results, self.store, record, results)
            await self._finish(record, JobStatus.succeeded)
        finally:
            self._storing.discard(job_id)

    async def _generate(self, record: JobRecord) -> list[ImageResult]:
        init_image = mask = None
        if record.kind == "img2img":
            init_image, mask = await run_in_threadpool(self._load_input, record.id)
        controls = ()
        if record.params.controlnet:
            controls = await run_in_threadpool(self._load_controls, record)
        tasks = [
            ImageTask(
                record.params.model_copy(update={"seed": seed}),
                init_image,
                request_id=record.request_id,
                mask=mask,
                control_images=controls,
                preview_every=record.preview_every or 0,
                tenant=record.tenant,
                priority=record.priority,
                weight=record.weight,
            )
            for seed in record.seeds
        ]
        return await stream_images(
            self.generator, tasks, lambda progress: self._report(record.id, progress), self._by_model
        )

    def _report(self, job_id: str, progress: dict) -> None:
        preview = progress.pop("preview", None)
        self._progress[job_id] = progress
        self._notify(job_id, "progress", {"id": job_id, **progress})
        if preview is not None:
            self._previews[job_id] = preview
            self._notify(job_id, "preview", {"id": job_id, "step": progress["step"], "image": preview})

    def _load_input(self, job_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The job's init image and its mask (stored as the image's alpha channel), or None."""
        data = self.store.get_input(job_id)
        if data is None:
            raise GenerationError(f"the init image of job {job_id} is missing from the store")
        return decode_input(data)

    def _load_controls(self, record: JobRecord) -> tuple[np.ndarray, ...]:
        """The control maps of the job's ControlNet units, in order."""
        pngs = self.store.get_controls(record.id, len(record.params.controlnet))
        if pngs is None:
            raise GenerationError(f"the control images of job {record.id} are missing from the store")
        return tuple(decode_input(png)[0] for png in pngs)

    async def _finish(self, record: JobRecord, status: JobStatus, error: JobError | None = None) -> None:
        record.status, record.error, record.finished_at = status, error, time.time()
        # Stored before it leaves the unfinished records: a watcher arriving while the store writes
        # still finds it here and gets the final event below (from the store it would read the old state).
        await run_in_threadpool(self.store.put, record)
        self._records.pop(record.id, None)
        self._progress.pop(record.id, None)
        self._previews.pop(record.id, None)
        self._notify(record.id, status.value, record.model_dump(mode="json"))
        if record.webhook is not None and status in record.webhook.events:
            asyncio.get_running_loop().create_task(self._deliver_webhook(record))

    def _notify(self, job_id: str, event: str, data: dict) -> None:
        for watcher in self._watchers.get(job_id, ()):
            watcher.put_nowait({"event": event, "data": data})

    def _queue_moved(self) -> None:
        """A job left or re-entered the queue: tell the watchers of queued jobs their new position."""
        if not self._watchers:
            return
        for job_id, position in self._queue.positions().items():
            self._notify(job_id, "queued", {"id": job_id, "position": position})

    def _position(self, job_id: str) -> int | None:
        """Its place among its own tenant's queued jobs (1 = that tenant's next): other tenants' jobs take turns
        with it rather than go before it."""
        return self._queue.positions().get(job_id)

    def _retry_after(self) -> int:
        return max(1, min(60, len(self._records) // max(1, self.config.max_running)))

    async def _deliver_webhook(self, record: JobRecord) -> None:
        """POST the final record, retried with doubling waits; a receiver that keeps failing is logged, not fatal."""
        body = record.model_dump(mode="json")
        for attempt in range(self.config.webhook_retries + 1):
            try:
                response = await self._http.post(record.webhook.url, json=body)
                if response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if attempt < self.config.webhook_retries:
                await asyncio.sleep(self.config.webhook_backoff_s * 2**attempt)
        logger.warning(
            "job %s: webhook %s failed after %d attempts (%s)", record.id, record.webhook.url, attempt + 1, problem
        )

    # -- retention ------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = max(0.5, min(60.0, self.config.retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await run_in_threadpool(self.sweep)
            except Exception:  # noqa: BLE001 - the next sweep tries again
                logger.exception("JobManager: sweeping the store failed")

    def sweep(self) -> int:
        """Delete finished jobs past the retention, then the oldest finished ones while the store is over the byte
        cap. The retention's listing stops at the first job younger than it; the byte cap lists the store once."""
        deleted = 0
        for job_id in self.store.ids_before(time.time() - self.config.retention_s):  # oldest first
            if job_id not in self._records and self.store.delete(job_id, only_final=True):
                deleted += 1
        if self.config.max_store_bytes is not None:
            sizes = self.store.usage()
            total = sum(sizes.values())
            for job_id in sorted(sizes):  # oldest first
                if total <= self.config.max_store_bytes:
                    break
                if job_id not in self._records and self.store.delete(job_id, only_final=True):
                    total -= sizes[job_id]
                    deleted += 1
        return deleted
