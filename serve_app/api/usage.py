"""GET /usage: the caller's own figures (its tenant, limits, where it stands now, its images in the engine
and its jobs in the queue)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ..service.tenants import Tenant, TenantAdmission
from .dependencies import Jobs, Service

router = APIRouter(tags=["Health"])


@router.get(
    "/usage",
    summary="The caller's tenant, limits and usage: rate, images in flight, today's quota, its images and jobs now",
)
async def usage(request: Request, service: Service, jobs: Jobs):
    admission: TenantAdmission = request.app.state.tenants
    tenant: Tenant = request.scope.get("state", {}).get("tenant") or admission.directory.shared
    if tenant.policy.quota is not None:
        await admission.quota.ready()
    body = admission.usage(tenant)
    generator, manager = await asyncio.gather(service.generator_info(), jobs.manager_info(), return_exceptions=True)
    body["generator"] = _of(generator, "tenants", tenant.id, {"waiting": 0, "running": 0, "admitted": 0})
    body["jobs"] = _of(manager, "tenants", tenant.id, {"queued": 0, "running": 0})
    return body


def _of(info, key: str, tenant: str, empty: dict) -> dict | None:
    """This tenant's entry of a deployment's per-tenant counts; None when the deployment did not answer."""
    if not isinstance(info, dict):
        return None
    return {**empty, **(info.get(key) or {}).get(tenant, {})}
