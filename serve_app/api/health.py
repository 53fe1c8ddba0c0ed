"""Probes and the server's own description: /healthz, /readyz, /info."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..config import ModelLimits
from ..pipeline.params import PREPROCESSOR_NAMES
from ..service.generation import is_ready
from .dependencies import Jobs, Service

router = APIRouter(tags=["Health"])


@router.get("/healthz", summary="Liveness: the HTTP side is up")
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: a Generator replica can take work; whether the job store answers",
    responses={503: {"description": "no Generator replica is running yet (Retry-After says when to ask again)"}},
)
async def readyz(service: Service, jobs: Jobs):
    status = await service.generator_status()
    body = {"status": "ready" if is_ready(status) else "not_ready", "generator": status}
    store = await jobs.store_status()
    if store is not None:  # reported, not required: generation answers without the store, jobs do not
        body["store"] = store
    if not is_ready(status):
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(service.published_limits.retry_after_s)})
    return body


@router.get("/info", summary="Model, device, replicas, batching, model calls by batch size, responses by status")
async def info(request: Request, service: Service, jobs: Jobs):
    return {
        "model": service.model,
        "uptime_s": int(time.time()) - service.started_at,
        "limits": service.published_limits.model_dump(),
        "auth": service.settings.auth.enabled,
        "responses_by_status": dict(sorted(service.responses_by_status.items())),
        "ingress": {"replica": service.replica, "pid": os.getpid()},
        "generator_deployment": await service.generator_status(),
        "generator": await service.generator_info(),
        "job_manager": await jobs.manager_info(),
        # Per tenant (hashed ids) on this ingress replica: requests and images admitted, in flight, refused by
        # reason, today's images. The Generator's and the JobManager's own per-tenant counts are in theirs.
        "tenants": request.app.state.tenants.snapshot(),
    }


@router.get("/models", summary="The models requests may name (`model`), the default first")
async def models(service: Service):
    settings = service.settings
    return {
        "default": service.models.default,
        "max_models_per_replica": settings.max_models_per_replica,
        "models": [
            {
                "id": model.id,
                "source": model.source,
                "family": service.models.family(model.id),
                "refiner": model.refiner,
                "defaults": model.defaults.model_dump(exclude_none=True),
                "limits": model.limits.model_dump(include=set(ModelLimits.model_fields)),
            }
            for model in settings.served_models()
        ],
    }


@router.get("/loras", summary="The LoRA adapters requests may apply (`loras`, or <lora:name:scale> in the prompt)")
async def loras(service: Service):
    return {"batching": service.settings.loras.batching, "loras": service.models.adapters.describe()}


@router.get(
    "/controlnets", summary="The ControlNets requests may name (`controlnet`), per model, and the preprocessors"
)
async def controlnets(service: Service):
    served = service.settings.served_models()
    return {
        "models": {
            model.id: {
                "controlnets": service.models.controlnets[model.id],
                "batching": model.pipeline.controlnet_batching,
            }
            for model in served
        },
        "preprocessors": list(PREPROCESSOR_NAMES),
    }
