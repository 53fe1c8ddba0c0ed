"""The `args` of a Serve config and the Generator's `user_config`, as pydantic schemas.

A Serve config file is the one place a deployment is described: Ray's own
schema (replicas, autoscaling, resources, `max_ongoing_requests`) plus the
`args` validated here. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .pipeline.adapters import AdapterSettings
from .pipeline.controlnets import ControlNetEntry
from .pipeline.engines import EngineLimits
from .pipeline.fairness import Priority
from .pipeline.loading import ModelSource, ModelSourceError, PipelineOptions
from .pipeline.params import GenerationDefaults


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestLimits(_Strict):
    """What one request may ask for. Requests outside these get 422 naming the field."""

    min_size: int = Field(64, ge=8, multiple_of=8, description="smallest width or height")
    max_width: int = Field(1024, ge=8, multiple_of=8)
    max_height: int = Field(1024, ge=8, multiple_of=8)
    max_pixels: int = Field(1024 * 1024, ge=64, description="largest width x height")
    max_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(30.0, ge=0)
    max_prompt_chars: int = Field(
        2000, ge=1, description="longer prompts are rejected (tokens past the model's window are truncated)"
    )
    max_num_images: int = Field(4, ge=1, description="images per request (or per batch entry)")
    max_prompts_per_request: int = Field(16, ge=1, description="entries in one /generate/prompts request")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="request body size; larger bodies get 413")
    max_upload_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="pixels of an uploaded init image (stops decompression bombs)"
    )
    request_timeout_s: float = Field(
        60, gt=0, description="deadline per request (504 past it); keep it below http_options.request_timeout_s"
    )
    max_concurrent_requests: int = Field(
        192,
        ge=1,
        description="generation requests one ingress replica holds at once; more get 503 at once "
        "(below the Ingress's max_ongoing_requests, which also counts reads and probes)",
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503 answers")

    def bounds(self) -> dict[str, tuple[float, float]]:
        """The range each bounded request field has on this deployment: what validation enforces, what
        its error messages state and what the OpenAPI document publishes (one source for all three)."""
        return {
            "width": (self.min_size, self.max_width),
            "height": (self.min_size, self.max_height),
            "num_inference_steps": (1, self.max_steps),
            "guidance_scale": (0, self.max_guidance_scale),
            "num_images": (1, self.max_num_images),
        }

    @model_validator(mode="after")
    def _sizes_consistent(self) -> RequestLimits:
        if self.min_size > min(self.max_width, self.max_height):
            raise ValueError(f"min_size {self.min_size} is larger than max_width/max_height")
        return self


class ModelLimits(_Strict):
    """Keys of `args.limits` that one model changes (an SDXL model allows 1024x1024 where an SD 1.5 one
    stops at 512x512); the ingress-wide ones (body size, deadline, concurrency) stay shared."""

    # Bounds are RequestLimits' own: `over` checks the result against them.
    min_size: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_pixels: int | None = None
    max_steps: int | None = None
    max_guidance_scale: float | None = None
    max_num_images: int | None = None
    max_prompt_chars: int | None = None

    def over(self, base: RequestLimits) -> RequestLimits:
        """`base` with these keys changed (validated together: min_size still fits the maxima)."""
        return RequestLimits.model_validate({**base.model_dump(), **self.model_dump(exclude_none=True)})


def widest(limits: list[RequestLimits]) -> RequestLimits:
    """Limits that let through what any of `limits` does: what the API publishes when models differ."""
    per_model = {
        name: (min if name == "min_size" else max)(getattr(each, name) for each in limits)
        for name in ModelLimits.model_fields
    }
    return limits[0].model_copy(update=per_model)


class AuthConfig(_Strict):
    """Optional API keys. The keys never sit in the Serve config: it names where to read them.

    Each entry is a key, or a name and a key separated by white space (`alice sk-...`): the name is what
    `tenants.keys` configures. A key without a name is named `key-` and the first 8 hex digits of its hash
    (`GET /usage` shows a caller its name)."""

    api_keys_env: str | None = Field(
        None, description="environment variable holding keys, comma-separated (each `key` or `name key`)"
    )
    api_keys_file: str | None = Field(
        None, description="file holding keys, one per line (`key` or `name key`; # comments allowed)"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)

    def load_keys(self) -> list[str]:
        """Read the keys; a source that is named but empty is an error, never an open door."""
        return list(self.load_named_keys().values())

    def load_named_keys(self) -> dict[str, str]:
        """The keys by name (unnamed ones named from their hash); the same name twice is an error."""
        entries: list[str] = []
        if self.api_keys_env:
            value = os.environ.get(self.api_keys_env, "")
            found = [k.strip() for k in value.split(",") if k.strip()]
            if not found:
                raise ValueError(f"auth.api_keys_env names {self.api_keys_env!r}, but that variable is unset or empty")
            entries += found
        if self.api_keys_file:
            path = Path(self.api_keys_file).expanduser()
            if not path.is_file():
                raise ValueError(f"auth.api_keys_file {self.api_keys_file!r} does not exist")
            lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
            found = [line for line in lines if line]
            if not found:
                raise ValueError(f"auth.api_keys_file {self.api_keys_file!r} holds no keys")
            entries += found
        return named_keys(entries)


KEY_NAME = re.compile(r"^[\w.@+-]{1,64}$")


def named_keys(entries: list[str]) -> dict[str, str]:
    """Keys by name from entries `key` or `name key`; the same name for two keys is an error."""
    keys: dict[str, str] = {}
    for entry in entries:
        name, key = _named_key(entry)
        if name in keys and keys[name] != key:
            raise ValueError(f"auth: two different keys are named {name!r}; give each key its own name")
        keys[name] = key
    return keys


def _named_key(entry: str) -> tuple[str, str]:
    """`name key` -> (name, key); a lone `key` -> (key-<8 hex of its hash>, key)."""
    parts = entry.split()
    if len(parts) == 2 and KEY_NAME.match(parts[0]):
        return parts[0], parts[1]
    return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry


class TenantPolicy(_Strict):
    """What one tenant (an API key; with keys off an `X-Tenant` name, else everyone together) may do."""

    weight: float = Field(
        1.0, gt=0, le=1000, description="share of a busy replica against other busy tenants (fair admission)"
    )
    max_priority: Priority = Field(
        "normal", description="the highest `priority` its requests may ask for (above it: 403 naming the field)"
    )
    rate: float | None = Field(None, gt=0, description="images per minute (token bucket; 429 past it); none: no limit")
    burst: int | None = Field(
        None, ge=1, description="images it may ask for at once after a pause (the bucket's size); default: `rate`"
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="images of its synchronous requests in flight at once (429 past it); none: no limit"
    )
    quota: int | None = Field(
        None, ge=1, description="images per day (UTC), counted in the job store (429 quota_exceeded past it)"
    )

    @property
    def bucket_size(self) -> float | None:
        return None if self.rate is None else float(self.burst or max(1.0, self.rate))


class TenantsConfig(_Strict):
    """Who gets what: `default` for every tenant, `keys` (by API key name; with keys off, by `X-Tenant` name)
    changing some of its values for one tenant."""

    default: TenantPolicy = Field(default_factory=TenantPolicy)
    keys: dict[str, TenantPolicy] = Field(
        default_factory=dict, description="per key name: the keys of `default` to change for that tenant"
    )

    @field_validator("keys")
    @classmethod
    def _names(cls, keys: dict[str, TenantPolicy]) -> dict[str, TenantPolicy]:
        for name in keys:
            if not KEY_NAME.match(name):
                raise ValueError(f"{name!r} is not a key name (letters, digits, . _ @ + -; at most 64)")
        return keys

    def policy_for(self, name: str | None) -> TenantPolicy:
        """`default`, with what `keys[name]` sets over it."""
        entry = self.keys.get(name) if name is not None else None
        if entry is None:
            return self.default
        return TenantPolicy.model_validate({**self.default.model_dump(), **entry.model_dump(exclude_unset=True)})

    def check_names(self, key_names: list[str]) -> None:
        """Every name under `keys` must name a key (read at start): a typo would silently give the default."""
        unknown = sorted(set(self.keys) - set(key_names))
        if unknown:
            raise ValueError(
                f"tenants.keys: no API key is named {', '.join(unknown)}; the keys are named "
                f"{', '.join(sorted(key_names)) or '(none)'} (a key file line is `name key`)"
            )


class CorsConfig(_Strict):
    allow_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call from a browser; empty = CORS off"
    )


class JobsConfig(_Strict):
    """The jobs API: where records and images live, how long, and how many may wait."""

    store: str = Field(
        "./outputs",
        validate_default=True,
        description="a directory (relative to where Serve starts) or an fsspec URL (s3://bucket/prefix)",
    )
    retention_s: float = Field(7 * 86400, gt=0, description="finished jobs are deleted this long after submission")
    max_store_bytes: int | None = Field(None, ge=1, description="past this, the oldest finished jobs are deleted")
    max_queued: int = Field(10000, ge=1, description="unfinished jobs in all; more get 503")
    max_queued_per_key: int = Field(1000, ge=1, description="unfinished jobs per API key; more get 429")
    max_running: int = Field(64, ge=1, description="jobs whose images are sent to the Generator at once")
    max_attempts: int = Field(3, ge=1, description="runs of a job whose Generator replica died, before it fails")
    webhook_hosts: list[str] = Field(
        default_factory=list, description="hosts webhooks may be sent to (host or host:port); empty = webhooks off"
    )
    webhook_timeout_s: float = Field(10, gt=0)
    webhook_retries: int = Field(3, ge=0)
    webhook_backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles each time")
    presign_s: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="image URLs in answers are presigned object-store URLs valid this long (an object store only); "
        "unset: URLs of this server (/jobs/{id}/images/{n}), which check the caller's key",
    )
    public_url: str | None = Field(
        None,
        description="this server's base URL as clients reach it (https://images.example.com behind a proxy): "
        "image URLs in answers start with it; unset: jobs' URLs are paths, OpenAI's the request's own base URL",
    )

    @field_validator("store")
    @classmethod
    def _absolute(cls, value: str) -> str:
        from .job_queue.store import missing_backend

        problem = missing_backend(value)  # no network: only whether its filesystem's package is here
        if problem is not None:
            raise ValueError(problem)
        # Replicas may start in another directory than the builder: pin a local path now.
        return value if "://" in value else str(Path(value).expanduser().resolve())

    @field_validator("public_url")
    @classmethod
    def _http_base(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL (got {value!r})")
        return value if value is None else value.rstrip("/")

    @model_validator(mode="after")
    def _presign_needs_an_object_store(self) -> JobsConfig:
        local = "://" not in self.store or self.store.startswith(("file://", "local://"))
        if self.presign_s is not None and local:
            raise ValueError(
                f"presign_s needs an object store that signs URLs (s3://...); {self.store} is a directory: "
                "leave presign_s unset and images are served by /jobs/{id}/images/{n}"
            )
        return self


def _named_once(entries: list[ControlNetEntry]) -> list[ControlNetEntry]:
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"ControlNet {', '.join(repeated)} named more than once")
    return entries


# A model's ControlNets: each name once.
ControlNetList = Annotated[list[ControlNetEntry], AfterValidator(_named_once)]


class ModelConfig(_Strict):
    """One entry of `args.models`: a model the deployment serves, under the id requests name it by."""

    id: str = Field(
        ..., min_length=1, max_length=200, pattern=r"^[\w.:/+-]+$", description="what requests name (`model`)"
    )
    model: str = Field(..., description="model source: synthetic:<preset>, a Hub repo id, or a directory")
    pipeline: dict = Field(default_factory=dict, description="keys of args.pipeline to change for this model")
    defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="keys of args.defaults to change for this model"
    )
    refiner: str | None = Field(
        None, description="a refiner's model source (SDXL's), loaded on first use; requests ask with `refiner`"
    )
    limits: ModelLimits = Field(
        default_factory=ModelLimits, description="keys of args.limits to change for this model (sizes, steps, ...)"
    )
    controlnets: ControlNetList = Field(
        default_factory=list,
        description="ControlNets requests may name (`controlnet`), loaded with the model (UNet models: SD 1.x/2.x, "
        "SDXL)",
    )

    @field_validator("model", "refiner")
    @classmethod
    def _model_source_readable(cls, value: str | None) -> str | None:
        return value if value is None else _readable_source(value)

    @model_validator(mode="after")
    def _controlnets_fit(self) -> ModelConfig:
        _check_controlnet_family(self.model, self.controlnets)
        return self


class ServedModel(_Strict):
    """A model as the Generator loads it: every option resolved."""

    id: str
    source: str
    pipeline: PipelineOptions
    defaults: GenerationDefaults
    limits: RequestLimits
    refiner: str | None = None
    controlnets: ControlNetList = Field(default_factory=list)


class AppArgs(_Strict):
    """`args:` of the application in a Serve config (import_path: serve_app.app:build_app)."""

    model: str = Field(
        "synthetic:tiny",
        description="model source (synthetic:<preset>, a Hub repo id, or a directory) when the deployment serves "
        "one model, which requests then name by this same string; several: use `models`",
    )
    refiner: str | None = Field(None, description="the refiner of `model` (one model); with `models`, per model")
    controlnets: ControlNetList = Field(
        default_factory=list, description="the ControlNets of `model` (one model); with `models`, per model"
    )
    models: list[ModelConfig] = Field(
        default_factory=list, description="several models, loaded on demand per Generator replica"
    )
    default_model: str | None = Field(None, description="the id of `models` a request gets when it names none (first)")
    max_models_per_replica: int = Field(
        2, ge=1, description="models one Generator replica holds at once; past it the least recently used is unloaded"
    )
    loras: AdapterSettings = Field(default_factory=AdapterSettings, description="LoRA adapters requests may apply")
    pipeline: PipelineOptions = Field(default_factory=PipelineOptions)
    defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="what requests get for parameters they leave out"
    )
    limits: RequestLimits = Field(default_factory=RequestLimits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tenants: TenantsConfig = Field(
        default_factory=TenantsConfig, description="fair share, priorities, rate limits and quotas per tenant"
    )
    cors: CorsConfig = Field(default_factory=CorsConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)

    @field_validator("model", "refiner")
    @classmethod
    def _model_source_readable(cls, value: str | None) -> str | None:
        return value if value is None else _readable_source(value)

    @model_validator(mode="after")
    def _models_coherent(self) -> AppArgs:
        if not self.models:
            if self.default_model not in (None, self.model):
                raise ValueError(f"default_model {self.default_model!r} is not the served model {self.model!r}")
            _check_controlnet_family(self.model, self.controlnets)
            return self
        if {"model", "refiner", "controlnets"} & self.model_fields_set:
            raise ValueError(
                "give either `model` (and `refiner`, `controlnets`) for one model or `models` for several, not both"
            )
        ids = [entry.id for entry in self.models]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"models: id {', '.join(repeated)} appears more than once")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not among the models' ids: {', '.join(ids)}")
        for entry in self.models:
            try:
                PipelineOptions.model_validate({**self.pipeline.model_dump(exclude_unset=True), **entry.pipeline})
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, f"models[{entry.id}].pipeline")) from None
            try:
                entry.limits.over(self.limits)
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, f"models[{entry.id}].limits")) from None
        return self

    @property
    def default_model_id(self) -> str:
        if not self.models:
            return self.model
        return self.default_model or self.models[0].id

    def served_models(self) -> list[ServedModel]:
        """Every model with its options resolved (per-model keys over the shared ones); the default first."""
        entries = self.models or [
            ModelConfig(id=self.model, model=self.model, refiner=self.refiner, controlnets=self.controlnets)
        ]
        served = [
            ServedModel(
                id=entry.id,
                source=entry.model,
                pipeline=PipelineOptions.model_validate(
                    {**self.pipeline.model_dump(exclude_unset=True), **entry.pipeline}
                ),
                defaults=entry.defaults.over(self.defaults),
                limits=entry.limits.over(self.limits),
                refiner=entry.refiner,
                controlnets=entry.controlnets,
            )
            for entry in entries
        ]
        return sorted(served, key=lambda m: m.id != self.default_model_id)

    def published_limits(self) -> RequestLimits:
        """`limits`, widened to what any served model allows: the bounds /openapi.json and schema errors state
        (each model's own are checked per request, and listed by GET /models)."""
        return widest([model.limits for model in self.served_models()])


def _check_controlnet_family(model: str, entries: list[ControlNetEntry]) -> None:
    """ControlNets steer UNet models; a flow model's family is known from its source without loading it."""
    if not entries:
        return
    from .pipeline.families import family_of_source

    family = family_of_source(model)
    if family not in (None, "unet"):
        raise ValueError(
            f"controlnets: model {model!r} is of the {family} family; ControlNets are offered for UNet models "
            "(SD 1.x/2.x, SDXL), not for SD3 or FLUX.1"
        )


def _readable_source(value: str) -> str:
    try:
        ModelSource.parse(value)
    except ModelSourceError as exc:
        raise ValueError(str(exc)) from None
    return value


class BatchingConfig(_Strict):
    """The Generator's `user_config`: changeable at run time without restarting replicas."""

    max_batch_size: int = Field(
        8, ge=1, le=256, description="most images in one model call: a UNet step (step engine) or a pipeline call"
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, le=10, description="how long the first request of a batch waits for others to join"
    )
    max_active_requests: int = Field(
        32, ge=1, le=4096, description="images being denoised at once, all sizes together (step engine)"
    )
    admission: Literal["fifo", "fewest_steps"] = Field(
        "fifo", description="which waiting images join first (step engine): arrival order, or the shortest first"
    )

    def loop_limits(self) -> EngineLimits:
        return EngineLimits(self.max_batch_size, self.max_active_requests, self.admission)


def check_serve_config(config: dict) -> list[str]:
    """Problems in a whole Serve config (Ray's part and our `args` together), one line each, saying how
    to fix them. Empty when the config is coherent.

    The app builder only sees `args`; the `deployments` overrides reach the replicas later. So the
    settings that must agree across both are checked here, from the file: by `make serve` before it
    starts Serve (`python -m serve_app.config CONFIG`), and by the tests for every shipped config.

    Batching: a replica holds at most `max_ongoing_requests` requests and a batch is taken from
    those, so `max_batch_size` above it caps every batch. The autoscaler adds replicas once replicas
    average more than `target_ongoing_requests`, so keep
    max_batch_size <= target_ongoing_requests <= max_ongoing_requests: a lower target spreads the
    load before any batch fills; a target above max_ongoing_requests only scales once callers queue.
    """
    problems = []
    serve_timeout = (config.get("http_options") or {}).get("request_timeout_s")
    for app in config.get("applications", []):
        where = f"applications[{app.get('name', '?')}]"
        try:
            args = AppArgs.model_validate(app.get("args") or {})
        except ValidationError as exc:
            problems.append(format_validation_error(exc, f"{where}.args"))
            continue
        deployments = {d.get("name"): d for d in app.get("deployments", [])}
        problems += _overload_problems(where, args.limits, deployments, serve_timeout)
        problems += _admission_order_problems(where, args, deployments)
        generator = deployments.get("ImageGenerator", {})
        max_ongoing = generator.get("max_ongoing_requests", GENERATOR_MAX_ONGOING_REQUESTS)
        try:
            batching = BatchingConfig.model_validate(generator.get("user_config") or {})
        except ValidationError as exc:
            problems.append(format_validation_error(exc, f"{where}.ImageGenerator.user_config"))
            continue
        batch = batching.max_batch_size
        prefix = f"{where}.ImageGenerator"
        if batch > max_ongoing:
            problems.append(
                f"{prefix}: user_config.max_batch_size ({batch}) is larger than max_ongoing_requests ({max_ongoing}), "
                f"which caps every batch at {max_ongoing}; set max_ongoing_requests to at least {batch} "
                "(several times more is better)"
            )
        target = (generator.get("autoscaling_config") or {}).get("target_ongoing_requests")
        if target is not None and target < batch:
            problems.append(
                f"{prefix}: autoscaling_config.target_ongoing_requests ({target:g}) is below user_config.max_batch_size "
                f"({batch}): replicas are added before a batch can fill, so batches stay near {target:g} images; "
                f"set it to at least {batch}"
            )
        if target is not None and target > max_ongoing:
            problems.append(
                f"{prefix}: autoscaling_config.target_ongoing_requests ({target:g}) is above max_ongoing_requests "
                f"({max_ongoing}), which a replica never exceeds: scaling up waits until requests queue in front of "
                "the replicas; keep it between max_batch_size and max_ongoing_requests"
            )
    return problems


def _overload_problems(where: str, limits: RequestLimits, deployments: dict, serve_timeout: float | None) -> list[str]:
    """Limits that could never fire, or that fire in the wrong order (Serve's plain 408 before our 504)."""
    problems = []
    if serve_timeout is not None and limits.request_timeout_s >= serve_timeout:
        problems.append(
            f"{where}.args.limits.request_timeout_s ({limits.request_timeout_s:g}) must be below "
            f"http_options.request_timeout_s ({serve_timeout:g}), or Serve answers a plain 408 before the ingress "
            f"can answer 504; e.g. set it to {max(1.0, serve_timeout * 0.8):g}"
        )
    ingress_ongoing = deployments.get("Ingress", {}).get("max_ongoing_requests", INGRESS_MAX_ONGOING_REQUESTS)
    if limits.max_concurrent_requests >= ingress_ongoing:
        problems.append(
            f"{where}.args.limits.max_concurrent_requests ({limits.max_concurrent_requests}) must be below the "
            f"Ingress's max_ongoing_requests ({ingress_ongoing}), or it can never fire (and probes and job reads "
            f"find no room); e.g. set it to {ingress_ongoing * 3 // 4}"
        )
    elif ingress_ongoing < 2 * limits.max_concurrent_requests:
        problems.append(
            f"{where}.Ingress: max_ongoing_requests ({ingress_ongoing}) must be at least twice "
            f"args.limits.max_concurrent_requests ({limits.max_concurrent_requests}): as many again for job "
            "submissions, reads, probes and requests on their way to be refused, so that they reach the ingress's "
            "own admission (a 503 or 429 with Retry-After in well under a millisecond) instead of waiting in "
            f"Serve's proxy; e.g. set it to {4 * limits.max_concurrent_requests}"
        )
    for name in ("Ingress", "ImageGenerator"):
        if deployments.get(name, {}).get("max_queued_requests") is None:
            problems.append(
                f"{where}.{name}: set max_queued_requests; without it requests queue in front of the "
                "replicas without bound and time out instead of being refused at once (503)"
            )
    return problems


def _admission_order_problems(where: str, args: AppArgs, deployments: dict) -> list[str]:
    """Serve's own bounds must sit above the project's admission, so that ours (a 503 or 429 with Retry-After,
    by expected wait, per tenant) fires first; and Serve's own refusals, when they fire, say when to retry."""
    problems = []
    for name, deployment in deployments.items():
        backpressure = deployment.get("backpressure_config")
        if backpressure is not None and backpressure.get("retry_after_s") is None:
            problems.append(
                f"{where}.{name}.backpressure_config: set retry_after_s (e.g. {args.limits.retry_after_s}); "
                "without it Serve's own 503 carries no Retry-After"
            )
    generator = deployments.get("ImageGenerator", {})
    queued = generator.get("max_queued_requests")
    images = args.published_limits().max_num_images
    # Each image is one Generator call: what one caller (an ingress replica, the JobManager) may have in flight.
    in_flight = max(args.limits.max_concurrent_requests, args.jobs.max_running) * images
    if queued is not None and queued != -1 and queued < in_flight:
        problems.append(
            f"{where}.ImageGenerator: max_queued_requests ({queued}) is below the images one caller may have in "
            f"flight (max_concurrent_requests {args.limits.max_concurrent_requests} or jobs.max_running "
            f"{args.jobs.max_running}, x max_num_images {images} = {in_flight}): Serve's plain backpressure would "
            "refuse before the ingress's own admission (by expected wait, per tenant) can; set it to at least "
            f"{in_flight}"
        )
    return problems


# What the deployments declare when a config does not override them (ingress.py, generator.py).
INGRESS_MAX_ONGOING_REQUESTS = 256
# Serve's own 503 (a deployment's max_queued_requests reached) says when to come back, as ours do.
SERVE_BACKPRESSURE = {"status_code": 503, "retry_after_s": RequestLimits().retry_after_s}
GENERATOR_MAX_ONGOING_REQUESTS = 8 * BatchingConfig().max_batch_size


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem, each naming the key path, for errors people read in a terminal."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = "unknown key (check its spelling)" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {where}.{path}: {message}")
    return f"invalid {where}:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m serve_app.config CONFIG...`: check Serve config files; exit 1 with the problems found."""
    import sys

    import yaml

    paths = sys.argv[1:] if argv is None else argv
    failed = False
    for path in paths:
        problems = check_serve_config(yaml.safe_load(Path(path).read_text()))
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
