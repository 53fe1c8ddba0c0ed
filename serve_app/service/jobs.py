"""The jobs service: submit a request as a job, find a caller's jobs, follow and cancel them, refine a
stored image. Records and images are read from the store by any ingress replica; every change goes
through the one JobManager. Used by the jobs API and by every family that can answer with a job
(native `Prefer: respond-async`, AUTOMATIC1111's progress and interrupt).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ..job_queue.records import JobRecord, JobStatus, Webhook, created_at, is_job_id, new_job_id, owner_of
from ..job_queue.store import JobStore, describe_error, store_results
from ..pipeline.errors import GenerationError
from ..pipeline.fairness import Priority
from ..pipeline.params import ImageParams, InpaintParams, RefinerParams
from ..pipeline.tasks import ImageResult
from .encoding import encode_input
from .errors import ApiError
from .generation import GenerationService


class JobService:
    def __init__(self, manager: DeploymentHandle | None, store: JobStore | None, generation: GenerationService):
        self.manager = manager  # the JobManager: every change to a job goes through it
        self.store = store  # job records and images, read directly by every ingress replica
        self.generation = generation
        self.settings = generation.settings
        self._store_status: tuple[float, dict] | None = None  # (when, status): probes are answered from it

    # -- who and which ---------------------------------------------------------------------------

    def owner(self, api_key: str | None) -> str | None:
        """With API keys on, a job belongs to the key that submitted it; others cannot see it."""
        if not self.settings.auth.enabled:
            return None
        return owner_of(api_key or None)

    async def find(self, job_id: str, owner: str | None) -> JobRecord:
        """The caller's job, or 404 (unknown, malformed or someone else's) / 410 (deleted after its retention)."""
        record = await asyncio.to_thread(self.store.get, job_id) if is_job_id(job_id) else None
        if record is None or record.owner != owner:
            if (
                record is None
                and is_job_id(job_id)
                and created_at(job_id) < time.time() - self.settings.jobs.retention_s
            ):
                raise ApiError(410, "job_expired", f"job {job_id} was deleted after the retention period")
            raise ApiError(404, "job_not_found", f"no job {job_id}")
        return record

    async def list(
        self, status: JobStatus | None, owner: str | None, limit: int, cursor: str | None
    ) -> tuple[list[tuple[JobRecord, dict | None]], str | None]:
        """A page of the caller's jobs, newest first, each with its live state; and the next page's cursor."""
        records, next_cursor = await asyncio.to_thread(self.store.list, status, owner, limit, cursor)
        return [(record, await self.live_state(record)) for record in records], next_cursor

    async def image(self, record: JobRecord, index: int) -> bytes:
        """The stored PNG of image `index` of a job: 409 while it runs, 404 past its images, 410 once deleted."""
        if record.status != JobStatus.succeeded:
            raise ApiError(
                409, "job_not_finished", f"job {record.id} is {record.status.value}; its images come when it succeeds"
            )
        if not 0 <= index < len(record.images):
            raise ApiError(404, "image_not_found", f"job {record.id} has images 0 to {len(record.images) - 1}", "index")
        data = await asyncio.to_thread(self.store.get_image, record.id, index)
        if data is None:
            raise ApiError(410, "job_expired", f"the images of job {record.id} were deleted")
        return data

    # -- links to images ---------------------------------------------------------------------------

    async def links(self, record: JobRecord, base: str = "", fmt: str = "png") -> list[tuple[str, float | None]]:
        """`image_links`, off the event loop (signing may have to fetch credentials first)."""
        if not record.images:
            return []
        return await asyncio.to_thread(self.image_links, record, base, fmt)

    def image_links(self, record: JobRecord, base: str = "", fmt: str = "png") -> list[tuple[str, float | None]]:
        """Each image's URL and when it stops working (None: while the job is kept). With `jobs.presign_s`, a
        presigned object-store URL; otherwise this server's `/jobs/{id}/images/{n}` (which checks the caller's
        key) under `jobs.public_url`, else under `base` (a path when empty)."""
        config = self.settings.jobs
        if config.presign_s is not None and self.store is not None and self.store.can_presign:
            expires = time.time() + config.presign_s
            return [
                (self.store.presigned_url(record.id, image.index, config.presign_s, fmt), expires)
                for image in record.images
            ]
        prefix = config.public_url or base.rstrip("/")
        query = "" if fmt == "png" else f"?format={fmt}"
        return [(f"{prefix}/jobs/{record.id}/images/{image.index}{query}", None) for image in record.images]

    async def store_answer(
        self, results: list[ImageResult], request_id: str, owner: str | None, kind: str, output: tuple[str, int]
    ) -> JobRecord:
        """Images of a synchronous request, stored as a job that has succeeded, owned by the caller and kept
        as long as any job (`jobs.retention_s`, `jobs.max_store_bytes`): what an answer that links to its images
        (OpenAI's `response_format: "url"`) points at. Written here, by the ingress: the record is born final,
        so the JobManager (the writer of unfinished records) has nothing to take over."""
        if self.store is None:
            raise ApiError(503, "store_unavailable", "this server has no job store to keep linked images in")
        now = time.time()
        first = results[0].params
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.succeeded,
            created_at=now,
            started_at=now - max(r.generation_time_s for r in results),
            finished_at=now,
            owner=owner,
            request_id=request_id,
            model=first.model or self.generation.models.default,
            kind=kind,
            params=first,
            seeds=[r.seed for r in results],
            attempts=1,
        )
        also_as = output if self.settings.jobs.presign_s is not None else None  # a presigned link names one file

        def write() -> None:
            record.images = store_results(self.store, record, results, also_as)
            self.store.put(record)

        await asyncio.to_thread(write)
        return record

    async def store_status(self, max_age_s: float = 5.0) -> dict | None:
        """Whether the store answers (one cheap listing, at most every `max_age_s`), and how fast; None without one."""
        if self.store is None:
            return None
        now = time.monotonic()
        if self._store_status is not None and now - self._store_status[0] < max_age_s:
            return self._store_status[1]
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.probe), timeout=10)
            status = {"url": self.store.url, "reachable": True}
        except Exception as exc:  # noqa: BLE001 - any failure is "not reachable", said in one line
            status = {"url": self.store.url, "reachable": False, "error": describe_error(exc)}
        status["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        self._store_status = (now, status)
        return status

    # -- changes, through the JobManager ---------------------------------------------------------

    async def submit(
        self,
        params: ImageParams,
        num_images: int,
        request_id: str,
        owner: str | None,
        *,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        control_images: tuple[np.ndarray, ...] = (),
        webhook: Webhook | None = None,
        refined_from: str | None = None,
        preview_every: int | None = None,
        priority: Priority | None = None,
    ) -> JobRecord:
        """Check, seed and hand a job to the JobManager, which stores it (and its init image and control maps)
        before answering; it runs by fair share (its tenant and priority, as the caller's admission stamped them)."""
        if webhook is not None:
            check_webhook(webhook, self.settings.jobs.webhook_hosts)
        tasks = self.generation.tasks_for(
            params, num_images, request_id, mask=mask, control_images=control_images, priority=priority
        )
        record = JobRecord(
            id=new_job_id(),
            created_at=time.time(),
            owner=owner,
            request_id=request_id,
            model=tasks[0].params.model,
            kind="txt2img" if init_image is None else "img2img",
            params=tasks[0].params,
            seeds=[task.seed for task in tasks],
            webhook=webhook,
            refined_from=refined_from,
            preview_every=preview_every,
            tenant=tasks[0].tenant,
            priority=tasks[0].priority,
            weight=tasks[0].weight,
        )
        # A mask travels as the init image's alpha channel (white = repaint): one stored input, one PNG.
        init_png = None if init_image is None else await asyncio.to_thread(encode_input, init_image, mask)
        control_pngs = [await asyncio.to_thread(encode_input, image) for image in control_images]
        return await self.call_manager(self.manager.submit.remote(record, init_png, control_pngs or None))

    async def refine(
        self,
        source: JobRecord,
        image: int,
        request_id: str,
        owner: str | None,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        strength: float,
        num_inference_steps: int | None = None,
        seed: int | None = None,
        refiner: bool | None = None,
        mask: str | None = None,
        inpaint: InpaintParams | None = None,
        webhook: Webhook | None = None,
    ) -> JobRecord:
        """A new job: image-to-image on image `image` of `source`, its parameters unless given; with `mask` (base64,
        white = repaint, the stored image's size) inpainting of it, as `inpaint` says (never with the refiner)."""
        if source.status != JobStatus.succeeded or image >= len(source.images):
            raise ApiError.invalid(
                "image", f"job {source.id} has no stored image {image} (it is {source.status.value})"
            )
        png = await self.image(source, image)
        stored = source.images[image]
        # By default the steps the image was made with, and never so few that the strength leaves none.
        steps = num_inference_steps or max(stored.metadata.get("num_inference_steps") or 1, math.ceil(1 / strength))
        with_refiner = (source.params.model or self.generation.models.default) in self.generation.models.with_refiner
        params = ImageParams(
            prompt=prompt or source.params.prompt,
            negative_prompt=source.params.negative_prompt if negative_prompt is None else negative_prompt,
            num_inference_steps=steps,
            guidance_scale=source.params.guidance_scale,
            scheduler=source.params.scheduler,
            seed=stored.seed if seed is None else seed,
            strength=strength,
            model=source.params.model,
            loras=source.params.loras,
            refiner=RefinerParams() if (with_refiner and mask is None if refiner is None else refiner) else None,
            inpaint=inpaint if mask is not None else None,
        )
        init_image, mask_array = await self.generation.edit(png, mask, params, fields=("image", "mask"))
        return await self.submit(
            params,
            1,
            request_id,
            owner,
            init_image=init_image,
            mask=mask_array,
            webhook=webhook,
            refined_from=f"{source.id}/{image}",
        )

    async def cancel(self, job_id: str, owner: str | None) -> JobRecord:
        await self.find(job_id, owner)
        return await self.call_manager(self.manager.cancel.remote(job_id, owner))

    async def events(self, job_id: str, owner: str | None) -> AsyncIterator[dict]:
        """The job's events from now on: its current state first, then each change, ending with the final one.
        The job is found (404/410) before this returns, so a stream is only opened for a job that exists."""
        await self.find(job_id, owner)
        return self.manager.options(stream=True).events.remote(job_id)

    async def live_state(self, record: JobRecord) -> dict | None:
        """Queue position or progress of an unfinished job (None once it ended)."""
        if record.status.final:
            return None
        return await self.call_manager(self.manager.live.remote(record.id))

    async def running_job_of(self, owner: str | None) -> str | None:
        """The caller's most recently started running job."""
        return await self.call_manager(self.manager.running_job_of.remote(owner))

    async def manager_info(self) -> dict | None:
        return await self.call_manager(self.manager.info.remote()) if self.manager else None

    async def call_manager(self, response):
        """A JobManager call; its refusals (429, 503, 404, 409) as API errors."""
        try:
            return await response
        except GenerationError as exc:
            raise ApiError.of(exc) from None
        except (RayActorError, DeploymentUnavailableError):
            raise self.generation.unavailable("job_queue_unavailable", "the job queue is restarting; retry") from None


def check_webhook(webhook: Webhook, allowed_hosts: list[str]) -> None:
    parts = urlsplit(webhook.url)
    host = parts.hostname or ""
    hostport = f"{host}:{parts.port}" if parts.port else host
    if parts.scheme not in ("http", "https") or not host:
        raise ApiError.invalid("webhook.url", "must be an http(s) URL")
    if not allowed_hosts:
        raise ApiError.invalid("webhook.url", "webhooks are off on this server (jobs.webhook_hosts is empty)")
    if host not in allowed_hosts and hostport not in allowed_hosts:
        raise ApiError.invalid("webhook.url", f"host {hostport} is not allowed; allowed: {', '.join(allowed_hosts)}")
