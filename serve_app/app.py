"""The application builder that a Serve config's `import_path` names: serve_app.app:build_app."""

from __future__ import annotations

from pydantic import ValidationError
from ray.serve import Application

from .config import AppArgs, format_validation_error
from .generator import ImageGenerator
from .ingress import Ingress
from .job_queue.manager import JobManager
from .job_queue.store import StoreUnavailable, open_store


def build_app(args: dict | None = None) -> Application:
    try:
        settings = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, "args")) from None
    if "://" in settings.jobs.store:  # an object store or remote filesystem: it must answer now, not in a crash loop
        try:
            open_store(settings.jobs.store)
        except StoreUnavailable as exc:
            raise ValueError(f"args.jobs.store: {exc}") from None
    # Serve's own 503s (a deployment's max_queued_requests reached) say when to come back, as the ingress's do.
    backpressure = {"status_code": 503, "retry_after_s": settings.limits.retry_after_s}
    generator = ImageGenerator.options(backpressure_config=backpressure).bind(
        settings.served_models(), settings.max_models_per_replica, settings.loras
    )
    manager = JobManager.options(backpressure_config=backpressure).bind(generator, settings)
    return Ingress.options(backpressure_config=backpressure).bind(generator, manager, settings)
