"""The jobs API's models: submit any text-to-image or image-to-image request, read its state,
progress and images, refine a stored image."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...job_queue.records import JobError, JobRecord, JobStatus, Webhook
from ...pipeline.params import ImageParams, Prompt, Seed, Steps, Strength
from ...service.requests import EditFields
from ..native.protocol import ImageRequest


class JobRequest(ImageRequest, EditFields):
    """POST /jobs: the fields of /generate, or of /img2img with `init_image` (and `mask`); plus an optional
    webhook."""

    init_image: str | None = Field(None, description="image-to-image: the starting image, base64 or a data: URL")
    mask: str | None = Field(
        None, description="inpainting: the area to repaint, white on black, the init image's size (base64)"
    )
    webhook: Webhook | None = Field(None, description="POSTed the final job (hosts must be allowed by the server)")
    preview_every: int | None = Field(
        None, ge=1, le=1000, description="a `preview` event (small PNG of the latents) every this many steps"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dawn", "seed": 42, "num_images": 2},
                {"prompt": "the same, at night", "init_image": "<base64 PNG>", "strength": 0.6},
            ]
        }
    )

    @model_validator(mode="after")
    def _strength_needs_an_image(self) -> JobRequest:
        for name in ("strength", "mask", "outpaint"):
            if getattr(self, name) is not None and self.init_image is None:
                raise ValueError(f"{name} applies to image-to-image: send init_image too")
        return self

    def image_params(self) -> ImageParams:
        """The shared record, with `inpaint` from the flat fields when a mask (or outpainting) is sent."""
        inpaint = self.inpaint_params(self.mask is not None, outpaint=self.outpaint is not None)
        return super().image_params().model_copy(update={"inpaint": inpaint})


class RefineRequest(EditFields):
    """POST /jobs/{id}/refine: image-to-image on a stored image (the refiner model when one is configured); with
    `mask`, inpainting of that image."""

    model_config = ConfigDict(extra="forbid")

    image: int = Field(0, ge=0, description="which image of the job")
    prompt: Prompt | None = Field(None, description="default: the job's own prompt")
    strength: Strength = 0.3
    negative_prompt: str | None = None
    num_inference_steps: Steps | None = None
    seed: Seed | None = None
    refiner: bool | None = Field(None, description="run the job's model's refiner (default: when it has one)")
    mask: str | None = Field(
        None, description="repaint only this area of the stored image: white on black, its size (base64)"
    )
    webhook: Webhook | None = None


class RefineByIdRequest(RefineRequest):
    """POST /refine: the same, naming the job in the body."""

    id: str


class JobProgress(BaseModel):
    step: int = Field(..., description="denoising steps done, all the job's images together")
    total_steps: int
    images_done: int
    num_images: int


class JobImageView(BaseModel):
    index: int
    seed: int
    url: str = Field(
        ..., description="this server's /jobs/{id}/images/{n} (send your key), or a presigned object-store URL"
    )
    url_expires_at: float | None = Field(None, description="a presigned URL works until then (seconds since epoch)")
    metadata: dict


class JobView(BaseModel):
    """A job as the API shows it: the stored record with its live state and URLs."""

    id: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    kind: Literal["txt2img", "img2img"]
    model: str
    params: ImageParams
    seeds: list[int]
    position: int | None = Field(None, description="place in the queue while queued (1 = next)")
    progress: JobProgress | None = Field(None, description="while running")
    preview: str | None = Field(
        None, description="while running with preview_every: the latest latent preview, base64 PNG"
    )
    error: JobError | None = None
    images: list[JobImageView] = Field(default_factory=list)
    refined_from: str | None = None
    attempts: int = Field(0, description="runs so far (a job runs again when its Generator replica dies)")
    urls: dict[str, str]

    @classmethod
    def of(
        cls, record: JobRecord, live: dict | None = None, links: list[tuple[str, float | None]] | None = None
    ) -> JobView:
        """`links`: each image's URL and expiry (the jobs service's `links`); default: this server's paths."""
        base = f"/jobs/{record.id}"
        live = live or {}
        links = links or [(f"{base}/images/{i.index}", None) for i in record.images]
        return cls(
            **record.model_dump(
                include={"id", "created_at", "started_at", "finished_at", "kind", "model", "seeds", "attempts"}
            ),
            status=live.get("status", record.status),
            params=record.params,
            position=live.get("position"),
            progress=live.get("progress"),
            preview=live.get("preview"),
            error=record.error,
            images=[
                JobImageView(index=i.index, seed=i.seed, url=url, url_expires_at=expires, metadata=i.metadata)
                for i, (url, expires) in zip(record.images, links)
            ],
            refined_from=record.refined_from,
            urls={"self": base, "events": f"{base}/events", "cancel": base},
        )


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")
