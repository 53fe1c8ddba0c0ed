"""GenerationService: what the routes call. Fans jobs out to the Generator and maps its failures."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from ray.serve.handle import DeploymentHandle

from ..config import AppArgs
from ..pipeline.errors import GenerationError
from ..pipeline.jobs import SEED_MAX, GeneratedImage, GenerationJob
from .errors import ApiError


def new_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


class GenerationService:
    def __init__(self, generator: DeploymentHandle, settings: AppArgs):
        self.generator = generator
        self.settings = settings
        self.model = settings.model
        self.limits = settings.limits

    async def run(self, jobs: list[GenerationJob]) -> list[GeneratedImage]:
        """One Generator call per image, so the images of one request batch with everyone else's."""
        responses = [self.generator.generate.remote(dataclasses.replace(job, submitted_at=time.time())) for job in jobs]
        try:
            return list(await asyncio.gather(*responses))
        except GenerationError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.field) from None
        finally:
            for response in responses:
                response.cancel()  # a no-op for finished calls; frees queued work when one failed

    async def generator_info(self) -> dict:
        return await self.generator.info.remote()
