"""One input row: checked as POST /generate checks a body, given its seed, its file names, its sort key.

The rules are the HTTP API's own, not a copy: a row is validated by a subclass of the native
API's request models (`TextToImageRequest` and `OutputOptions`, so every bound and every
refusal, such as `strength` on text-to-image, is the same), then by the deployment limits
(`service.generation.check_limits`). A row that fails gets the message a 422 would carry.

Seeds: a row's own `seed`, else `base_seed + row` (modulo 2^32); image i of a row with
`num_images` > 1 gets seed + i, as on the server. So a re-run, or a resumed run, makes the
same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError, field_validator

from ..config import RequestLimits
from ..pipeline.params import seed_at
from ..service.errors import ApiError
from ..service.generation import check_limits
from ..service.requests import OutputOptions, TextToImageRequest
from ..service.validation import validation_problems

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
IMAGES_DIR = "images"
ROWS_PER_IMAGE_DIR = 1000  # a million rows make a thousand folders of a thousand images, not one of a million


class BulkRequest(TextToImageRequest, OutputOptions):
    """A row of a bulk input: the fields of POST /generate (response_format aside), with their rules."""

    @field_validator("controlnet")
    @classmethod
    def _no_controlnet(cls, units: tuple) -> tuple:
        if units:
            raise ValueError("ControlNet units are not offered in bulk runs: send them to POST /generate or /jobs")
        return units


COLUMNS = frozenset(BulkRequest.model_fields)  # what a row may hold; an unknown one gets "did you mean ...?"


@dataclass(frozen=True)
class CheckedRow:
    """A row ready for a worker (`request` set) or refused (`error` set)."""

    row: int
    fields: str  # the row as given, JSON
    request: BulkRequest | None = None
    error: str | None = None
    error_code: str | None = None
    error_field: str | None = None

    @property
    def key(self) -> str:
        """Rows with equal keys can share model calls: what `pipeline.tasks.call_key` compares, as given.

        Unset values (the model's defaults) sort together; refused rows sort first."""
        r = self.request
        if r is None:
            return ""
        guidance = "" if r.guidance_scale is None else f"{r.guidance_scale:012.6f}"
        return (
            f"{r.width or 0:05d}x{r.height or 0:05d}|{r.num_inference_steps or 0:04d}|{guidance}|{r.scheduler}"
            f"|{bool(r.negative_prompt):d}"
        )


def check_row(
    row: int,
    fields: dict | str,
    limits: RequestLimits,
    base_seed: int,
    row_defaults: dict | None = None,
    read_error: str | None = None,
) -> CheckedRow:
    """Validate one row as /generate validates a body; fill its seed. `fields` is the row as read
    (a dict, or the raw text when it could not be read as one: `read_error` says why)."""
    text = fields if isinstance(fields, str) else json.dumps(fields, ensure_ascii=False, default=str)
    if read_error is not None:
        return CheckedRow(row, text, error=read_error, error_code="malformed_request")
    given = {k: v for k, v in fields.items() if v is not None}
    try:
        request = BulkRequest.model_validate({**(row_defaults or {}), **given})
        check_limits(request.image_params(), request.num_images, limits)
    except ValidationError as exc:
        problems = validation_problems(exc.errors(), limits=limits, known=COLUMNS)
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return CheckedRow(row, text, error=message, error_code="invalid_request", error_field=problems[0]["field"])
    except ApiError as exc:
        return CheckedRow(row, text, error=exc.message, error_code=exc.code, error_field=exc.field)
    if request.seed is None:
        request = request.model_copy(update={"seed": seed_at(base_seed, row)})
    return CheckedRow(row, text, request=request)


def image_path(row: int, seed: int, output_format: str) -> str:
    """Where image `seed` of row `row` goes, relative to the output: images/0000/00000012-12.png."""
    return f"{IMAGES_DIR}/{row // ROWS_PER_IMAGE_DIR:04d}/{row:08d}-{seed}.{EXTENSIONS[output_format]}"
