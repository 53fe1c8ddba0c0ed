"""GenerationService: what the routes call. Fans jobs out to the Generator and maps its failures."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from ..config import AppArgs
from ..pipeline.errors import GenerationError
from ..pipeline.jobs import GeneratedImage, GenerationJob
from .errors import ApiError

GENERATOR = "ImageGenerator"
_STATUS_CACHE_S = 1.0


class GenerationService:
    def __init__(self, generator: DeploymentHandle, settings: AppArgs, app_name: str | None = None):
        self.generator = generator
        self.settings = settings
        self.model = settings.model
        self.limits = settings.limits
        self.app_name = app_name
        self.started_at = int(time.time())
        self.responses_by_status: Counter[str] = Counter()
        self._status: tuple[float, dict] | None = None

    async def generate(self, jobs: list[GenerationJob]) -> list[GeneratedImage]:
        """One Generator call per image, so the images of one request batch with everyone else's."""
        responses = []
        finished = False
        try:
            submitted_at = time.time()  # for the Generator's queue-wait metric
            responses.extend(
                self.generator.generate.remote(dataclasses.replace(job, submitted_at=submitted_at)) for job in jobs
            )
            images = list(await asyncio.gather(*responses))
            finished = True
            return images
        except GenerationError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.field) from None
        except BackPressureError as exc:
            raise self._unavailable("overloaded", f"server busy: {exc.message}", exc.retry_after_s) from None
        except (RayActorError, DeploymentUnavailableError):
            message = "the generator replica working on this request stopped; retry (a new one is starting)"
            raise self._unavailable("generator_unavailable", message) from None
        finally:
            if not finished:
                # Failure, time-out or client gone: drop this request's work that has not started.
                for response in responses:
                    _cancel_quietly(response)

    async def generate_each(self, job_lists: list[list[GenerationJob]]) -> list[list[GeneratedImage]]:
        """Several requests' jobs submitted together (so they share batches), answered per request."""
        images = iter(await self.generate([job for jobs in job_lists for job in jobs]))
        return [[next(images) for _ in jobs] for jobs in job_lists]

    async def generator_info(self) -> dict:
        return await asyncio.wait_for(self.generator.info.remote(), timeout=10)

    async def generator_status(self) -> dict:
        """Replica counts and state of the Generator deployment, from Serve's controller (cached briefly)."""
        now = time.monotonic()
        if self._status is None or now - self._status[0] > _STATUS_CACHE_S:
            self._status = (now, await run_in_threadpool(self._read_status))
        return self._status[1]

    def _read_status(self) -> dict:
        from ray import serve

        apps = serve.status().applications
        app = apps.get(self.app_name) if self.app_name else next(iter(apps.values()), None)
        deployment = app.deployments.get(GENERATOR) if app else None
        if deployment is None:
            return {"status": "MISSING", "running_replicas": 0, "replica_states": {}}
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        return {
            "status": str(getattr(deployment.status, "value", deployment.status)),
            "running_replicas": states.get("RUNNING", 0),
            "replica_states": states,
        }

    def _unavailable(self, code: str, message: str, retry_after_s: float | None = None) -> ApiError:
        retry_after = max(1, round(retry_after_s)) if retry_after_s else self.limits.retry_after_s
        return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})


def _cancel_quietly(response) -> None:
    # cancel() re-raises the call's own error (e.g. BackPressureError) when it already failed.
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - nothing left to cancel
        pass


def is_ready(status: dict) -> bool:
    """Ready when a Generator replica runs, or when none is needed yet (scaled to zero, healthy)."""
    return status["running_replicas"] > 0 or status["status"] == "HEALTHY"
