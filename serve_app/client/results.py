"""What the client returns: images with their seeds and metadata, and a server's health."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# The server's own response model (pydantic only), so the client reads exactly what the server writes.
from ..api.native.protocol import GenerationMetadata


@dataclass(frozen=True)
class GeneratedImage:
    """One image as the server encoded it, with the seed that reproduces it."""

    data: bytes = field(repr=False)
    seed: int
    media_type: str
    batch_size: int  # images in the model call that made this one: batching seen from outside

    @property
    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data))

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/webp": "webp"}.get(self.media_type, "png")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bytes exactly as the server sent them (PNGs keep their embedded parameters)."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Generation:
    """The answer to one generate / img2img request (or to one entry of generate_prompts)."""

    images: list[GeneratedImage]
    metadata: GenerationMetadata

    @property
    def image(self) -> Image.Image:
        """The first image, decoded: the common case of one image per request."""
        return self.images[0].image

    @property
    def seeds(self) -> list[int]:
        return [i.seed for i in self.images]

    @property
    def request_id(self) -> str:
        return self.metadata.request_id

    @property
    def warnings(self) -> list[str]:
        return self.metadata.warnings

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        images = [
            GeneratedImage(
                data=base64.b64decode(i["b64"]),
                seed=i["seed"],
                media_type=i["media_type"],
                batch_size=i["batch_size"],
            )
            for i in data["images"]
        ]
        return cls(images=images, metadata=GenerationMetadata.model_validate(data["metadata"]))


@dataclass(frozen=True)
class HealthReport:
    live: bool  # /healthz answered 200
    ready: bool | None  # /readyz: True/False, None when the server has no /readyz
    info: dict[str, Any] | None  # /info, None when it could not be read
