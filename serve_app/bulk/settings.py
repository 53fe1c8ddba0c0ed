"""What a bulk run is told: the model and its options, the rules rows are checked by, and how the work is cut.

The model, its pipeline options, its defaults and the request limits are the ones a Serve
config's `args` holds (`serve_app.config.AppArgs`), and the batching knobs its Generator's
`user_config` (`BatchingConfig`): `--config FILE` takes them from a config, so bulk runs
the model the server runs, with the same rules. Torch- and Ray-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import AppArgs, BatchingConfig, RequestLimits, format_validation_error
from ..pipeline.loading import PipelineOptions
from ..pipeline.params import SEED_MAX, GenerationDefaults
from ..service.requests import OutputFormat

InputFormat = Literal["jsonl", "csv", "parquet"]
ManifestFormat = Literal["parquet", "jsonl"]


class SettingsError(ValueError):
    """A setting or a config file that cannot work; the message says which and why."""


class WorkerPool(BaseModel):
    """How many engine actors Ray Data may run, and what each one reserves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_workers: int = Field(1, ge=1)
    max_workers: int | None = Field(None, ge=1, description="None: from the cluster's GPUs, else its CPUs")
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 where the cluster has GPUs, else 0")
    cpus_per_worker: float = Field(1, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerPool:
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")
        return self


class BulkSettings(BaseModel):
    """Everything about a run but its input and output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    pipeline: PipelineOptions = Field(default_factory=PipelineOptions)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    # Values for rows that leave a field out (the row's own value wins): output_format, width, ...
    row_defaults: dict = Field(default_factory=dict)
    base_seed: int = Field(0, ge=0, le=SEED_MAX, description="a row without a seed gets base_seed + its row index")
    max_batch_size: int = Field(8, ge=1, le=256, description="images in one model call")
    max_active_requests: int = Field(32, ge=1, description="images in flight in one worker (step engine)")
    batch_size: int | None = Field(None, ge=1, description="rows per call of a worker; None: 2 x max_batch_size")
    rows_per_task: int | None = Field(None, ge=1, description="rows per Ray Data task; None: from the row count")
    workers: WorkerPool = Field(default_factory=WorkerPool)
    sort: bool = Field(True, description="order rows by compatibility key before they reach the workers")
    manifest_format: ManifestFormat = "parquet"

    @property
    def rows_per_call(self) -> int:
        return self.batch_size or 2 * self.max_batch_size

    @property
    def output_format(self) -> OutputFormat:
        return self.row_defaults.get("output_format", "png")


def serve_config_args(path: str | Path) -> tuple[AppArgs, BatchingConfig]:
    """The first application's `args` and its ImageGenerator's `user_config` in a Serve config file."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config {path} is not YAML: {exc}") from None
    applications = (config or {}).get("applications") or []
    if not applications:
        raise SettingsError(f"config {path} has no applications")
    app = applications[0]
    generator = next((d for d in app.get("deployments", []) if d.get("name") == "ImageGenerator"), {})
    try:
        args = AppArgs.model_validate(app.get("args") or {})
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, f"{path}: applications[0].args")) from None
    try:
        batching = BatchingConfig.model_validate(generator.get("user_config") or {})
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, f"{path}: ImageGenerator.user_config")) from None
    return args, batching
