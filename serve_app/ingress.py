"""Ingress: the HTTP deployment (FastAPI). CPU only; never imports torch."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from .api.asgi import create_api
from .config import INGRESS_MAX_ONGOING_REQUESTS, SERVE_BACKPRESSURE, AppArgs
from .job_queue.metrics import StoreMetrics
from .job_queue.store import JobStore, protocol_of
from .service.generation import GenerationService
from .service.jobs import JobService


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    # Serve's default of 5 would cap the whole service (and every batch) at 5 requests.
    max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    backpressure_config=SERVE_BACKPRESSURE,
)
@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, manager: DeploymentHandle, settings: AppArgs):
        # Keys are read here, on the replica, from the environment or file the config names.
        self.api_keys = settings.auth.load_named_keys() if settings.auth.enabled else None
        context = serve.get_replica_context()
        self.service = GenerationService(generator, settings, context.app_name, context.replica_id.unique_id)
        store = JobStore(settings.jobs.store, observe=StoreMetrics(protocol_of(settings.jobs.store)))
        self.jobs = JobService(manager, store, self.service)

    def __serve_build_asgi_app__(self):
        return create_api(self.service, self.api_keys, self.jobs)
