"""GenerationService: what the routes call. Fans jobs out to the Generator and maps its failures."""

from __future__ import annotations

import asyncio
import time

from ray.serve.handle import DeploymentHandle

from ..config import AppArgs
from ..pipeline.errors import GenerationError
from ..pipeline.jobs import GeneratedImage, GenerationJob
from .errors import ApiError


class GenerationService:
    def __init__(self, generator: DeploymentHandle, settings: AppArgs):
        self.generator = generator
        self.settings = settings
        self.model = settings.model
        self.limits = settings.limits
        self.started_at = int(time.time())

    async def generate(self, jobs: list[GenerationJob]) -> list[GeneratedImage]:
        """One Generator call per image, so the images of one request batch with everyone else's."""
        responses = [self.generator.generate.remote(job) for job in jobs]
        try:
            return list(await asyncio.gather(*responses))
        except GenerationError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.field) from None
        finally:
            for response in responses:
                response.cancel()  # a no-op for finished calls; frees queued work when one failed

    async def generate_each(self, job_lists: list[list[GenerationJob]]) -> list[list[GeneratedImage]]:
        """Several requests' jobs submitted together (so they share batches), answered per request."""
        images = iter(await self.generate([job for jobs in job_lists for job in jobs]))
        return [[next(images) for _ in jobs] for jobs in job_lists]

    async def generator_info(self) -> dict:
        return await self.generator.info.remote()
