"""Tenants at the ingress: who asks, and what they may ask for.

A request's tenant is its API key (by the key's hash: the key is never kept or logged), or, with keys off, the
name in its `X-Tenant` header, or else everyone together (`shared`). Its policy (`config.TenantPolicy`: the
`tenants` config's `default`, with what `keys.<name>` changes) says:

* `weight` and `max_priority`: the fair share its images get in the engines and the job queue (the tasks carry
  both), and the highest `priority` it may ask for (above: 403 naming the field);
* `rate` / `burst`: images per minute, a token bucket per ingress replica (429 `rate_limited`);
* `max_concurrent`: images of its synchronous requests in flight on this ingress replica (429 `too_many_images`);
* `quota`: images per UTC day, counted in the job store so that it survives restarts (429 `quota_exceeded`).

Every 429 carries `Retry-After` and `RateLimit-Limit`/`-Remaining`/`-Reset` (the bucket's, or the quota's when
the tenant has no rate); answers to a tenant with limits carry them too.

How a request goes: the HTTP layer resolves the tenant and opens an `Admission` for it (`begin`: cheap checks
before the body is read, so a refusal costs microseconds), the generation service stamps the request's tasks and
charges their images (`Admission.admit`, through `generation.stamp` once the request is parsed and its images
counted; the admission travels in `generation.REQUEST_ADMISSION`), and the HTTP layer
closes it with the answer's status (`finish`: images in flight released; a request that failed is not charged).

Quotas across ingress replicas: each replica writes its own count of the day to the store
(`quota/<day>/<tenant>/<replica>.json`, every `DailyQuota.FLUSH_S`) and reads the others' back with it, so a
restarted replica starts from what the store holds, and replicas agree within a flush interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace

from ..config import TenantPolicy, TenantsConfig
from ..job_queue.records import owner_of
from ..pipeline.fairness import DEFAULT_PRIORITY, RANK, SHARED_TENANT, Priority, allows
from ..pipeline.tasks import ImageTask
from .errors import ApiError

logger = logging.getLogger("ray.serve")

TENANT_HEADER = "X-Tenant"
MAX_TRACKED_TENANTS = 10_000  # past this, tenants with nothing in flight are forgotten (X-Tenant names are free)


@dataclass(frozen=True)
class Tenant:
    id: str  # a hash: what logs, metrics, /info and the tasks carry
    name: str | None  # the API key's name, or the X-Tenant name; None for everyone together
    policy: TenantPolicy


class TenantDirectory:
    """Which tenant a request is: by its API key (named keys get their `tenants.keys` entry), or with keys off by
    its X-Tenant name (an entry of that name applies), else the shared tenant."""

    def __init__(self, config: TenantsConfig, keys: dict[str, str] | None = None):
        self.config = config
        self.auth = keys is not None
        if keys is not None:
            config.check_names(list(keys))
        self._by_hash = {
            owner_of(key): Tenant(owner_of(key), name, config.policy_for(name)) for name, key in (keys or {}).items()
        }
        self.shared = Tenant(SHARED_TENANT, None, config.default)

    def of_key(self, api_key: str) -> Tenant:
        hashed = owner_of(api_key)
        return self._by_hash.get(hashed) or Tenant(hashed, None, self.config.default)

    def of_name(self, name: str | None) -> Tenant:
        if not name:
            return self.shared
        return Tenant(owner_of(f"{TENANT_HEADER}:{name}"), name, self.config.policy_for(name))


class TokenBucket:
    """`per_minute` images a minute, up to `size` at once after a pause. A request for more than `size` is let
    through when the bucket is full (it then owes the difference)."""

    def __init__(self, per_minute: float, size: float, now: float):
        self.per_s = per_minute / 60
        self.size = size
        self.tokens = size
        self.at = now

    def level(self, now: float) -> float:
        if now > self.at:
            self.tokens = min(self.size, self.tokens + (now - self.at) * self.per_s)
            self.at = now
        return self.tokens

    def wait_s(self, images: int, now: float) -> float:
        """0 when `images` may go now, else the seconds until they may."""
        missing = min(images, self.size) - self.level(now)
        return max(0.0, missing / self.per_s)

    def take(self, images: int, now: float) -> None:
        self.tokens = self.level(now) - images

    def give_back(self, images: int, now: float) -> None:
        self.tokens = min(self.size, self.level(now) + images)

    def full_in_s(self, now: float) -> float:
        return max(0.0, (self.size - self.level(now)) / self.per_s)


def day_of(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight(now: float) -> float:
    return 86400 - now % 86400


class DailyQuota:
    """Images granted per tenant per UTC day, counted here and kept in the job store (see the module's docstring).
    `store` None: counted in memory only. Call `ready()` (async) before the first count of a day is read."""

    FLUSH_S = 1.0

    def __init__(self, store, writer: str, clock=time.time):
        self.store = store
        self.writer = writer
        self.clock = clock
        self.day = day_of(clock())
        self.mine: Counter[str] = Counter()  # granted here today
        self.others: dict[str, int] = {}  # granted today by other writers (this replica's earlier lives too)
        self.stored: Counter[str] = Counter()  # of `mine`, what the store holds
        self._loaded_day: str | None = None
        self._loading: asyncio.Future | None = None
        self._flusher: asyncio.Task | None = None

    def used(self, tenant: str) -> int:
        self._roll()
        return self.mine[tenant] + self.others.get(tenant, 0)

    def charge(self, tenant: str, images: int) -> None:
        self._roll()
        self.mine[tenant] += images

    def refund(self, tenant: str, images: int) -> None:
        self.mine[tenant] = max(0, self.mine[tenant] - images)

    def is_stored(self, tenant: str) -> bool:
        """Everything granted here to `tenant` today is in the store (it would survive a restart now)."""
        return self.store is None or self.stored[tenant] == self.mine[tenant]

    def _roll(self) -> None:
        today = day_of(self.clock())
        if today != self.day:
            self.day, self.mine, self.others, self.stored = today, Counter(), {}, Counter()

    async def ready(self) -> None:
        """Today's counts read from the store (once a day; the first caller reads, the others wait for it), and
        the flusher running."""
        self._roll()
        if self.store is None or self._loaded_day == self.day:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load(self.day))
        await asyncio.shield(self._loading)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _load(self, day: str) -> None:
        counts = await asyncio.to_thread(self.store.quota_counts, day)
        if day == self.day:
            self.others = {t: sum(n for w, n in by.items() if w != self.writer) for t, by in counts.items()}
            self._loaded_day = day

    async def flush(self) -> None:
        """Write this replica's changed counts, and read the other writers' back."""
        self._roll()
        day, changed = self.day, {t: n for t, n in self.mine.items() if n != self.stored[t]}
        counts = await asyncio.to_thread(self._sync, day, changed)
        if day == self.day:
            self.stored.update({t: n - self.stored[t] for t, n in changed.items()})
            self.others = {t: sum(n for w, n in by.items() if w != self.writer) for t, by in counts.items()}

    def _sync(self, day: str, changed: dict[str, int]) -> dict[str, dict[str, int]]:
        for tenant, images in changed.items():
            self.store.put_quota_count(day, tenant, self.writer, images)
        return self.store.quota_counts(day)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_S)
            try:
                await self.flush()
                if self.clock() % 86400 < 2 * self.FLUSH_S:  # just past midnight: yesterday's counts go
                    await asyncio.to_thread(self.store.drop_quota_days_before, day_of(self.clock() - 86400))
            except Exception:  # noqa: BLE001 - the next flush tries again; counts stay in memory meanwhile
                logger.exception("tenants: writing quota counts to the job store failed")


@dataclass
class TenantCounts:
    requests: int = 0
    images: int = 0
    in_flight: int = 0  # images of synchronous requests
    refused: Counter = field(default_factory=Counter)  # by reason


class TenantAdmission:
    """One per ingress replica: each tenant's bucket, images in flight, daily quota and counts."""

    def __init__(
        self,
        directory: TenantDirectory,
        store=None,
        writer: str | None = None,
        retry_after_s: int = 2,
        clock=time.time,
    ):
        self.directory = directory
        self.retry_after_s = retry_after_s  # Retry-After of a refusal for images in flight
        self.clock = clock
        self.quota = DailyQuota(store, writer or f"ingress-{uuid.uuid4().hex[:12]}", clock)
        self.buckets: dict[str, TokenBucket] = {}
        self.counts: dict[str, TenantCounts] = {}
        self.metrics = _TenantMetrics.create()

    # -- who -------------------------------------------------------------------------------------------

    def tenant_for(self, api_key: str | None, tenant_header: str | None) -> Tenant:
        if self.directory.auth:
            return self.directory.of_key(api_key) if api_key else self.directory.shared
        return self.directory.of_name(tenant_header)

    async def begin(self, tenant: Tenant, synchronous: bool, makes_images: bool) -> Admission:
        """An admission for one request. For a request that makes images, refuses at once (ApiError 429, with its
        headers) what could not pass whatever it asks for: quota used up, bucket empty, images in flight at the
        cap. Cheap: no I/O but the store's read of the day's counts, once a day."""
        admission = Admission(self, tenant, synchronous)
        if not makes_images:
            return admission
        policy = tenant.policy
        if policy.quota is not None:
            await self.quota.ready()
        self._count(tenant).requests += 1
        admission.check(1, at_least=True)
        return admission

    # -- what -----------------------------------------------------------------------------------------

    def _count(self, tenant: Tenant) -> TenantCounts:
        counts = self.counts.get(tenant.id)
        if counts is None:
            if len(self.counts) >= MAX_TRACKED_TENANTS:
                self._forget_idle()
            counts = self.counts[tenant.id] = TenantCounts()
        return counts

    def _forget_idle(self) -> None:
        for tenant_id in [t for t, c in self.counts.items() if not c.in_flight]:
            self.counts.pop(tenant_id, None)
            self.buckets.pop(tenant_id, None)

    def bucket(self, tenant: Tenant) -> TokenBucket | None:
        policy = tenant.policy
        if policy.rate is None:
            return None
        bucket = self.buckets.get(tenant.id)
        if bucket is None:
            bucket = self.buckets[tenant.id] = TokenBucket(policy.rate, policy.bucket_size, self.clock())
        return bucket

    def refuse(self, tenant: Tenant, reason: str) -> None:
        self._count(tenant).refused[reason] += 1
        self.metrics.refused(tenant.id, reason)

    def usage(self, tenant: Tenant) -> dict:
        """What `GET /usage` shows a caller: its policy and where it stands now."""
        now = self.clock()
        policy = tenant.policy
        counts = self.counts.get(tenant.id) or TenantCounts()
        bucket = self.bucket(tenant)
        used = self.quota.used(tenant.id)
        return {
            "tenant": tenant.id,
            "name": tenant.name,
            "policy": policy.model_dump(),
            "rate": None
            if bucket is None
            else {
                "images_per_minute": policy.rate,
                "limit": int(bucket.size),
                "remaining": max(0, math.floor(bucket.level(now))),
                "reset_s": math.ceil(bucket.full_in_s(now)),
            },
            "in_flight": counts.in_flight,
            "quota": None
            if policy.quota is None
            else {
                "limit": policy.quota,
                "used": used,
                "remaining": max(0, policy.quota - used),
                "reset_s": math.ceil(seconds_to_midnight(now)),
                "stored": self.quota.is_stored(tenant.id),
            },
            "requests": counts.requests,
            "images": counts.images,
            "images_today": used,
            "refused": dict(counts.refused),
        }

    def snapshot(self) -> dict:
        """Per tenant (hashed ids): requests and images admitted, images in flight, refusals by reason, today."""
        return {
            tenant_id: {
                "requests": counts.requests,
                "images": counts.images,
                "in_flight": counts.in_flight,
                "refused": dict(counts.refused),
                "images_today": self.quota.used(tenant_id),
            }
            for tenant_id, counts in sorted(self.counts.items())
        }


class Admission:
    """One request's dealings with its tenant's limits: stamps and charges its images, then lets them go."""

    def __init__(self, owner: TenantAdmission, tenant: Tenant, synchronous: bool):
        self.owner = owner
        self.tenant = tenant
        self.synchronous = synchronous
        self.images = 0  # charged so far (rate and quota)
        self.in_flight = 0  # counted against max_concurrent

    def admit(self, tasks: list[ImageTask], priority: Priority | None, field_name: str = "priority") -> list[ImageTask]:
        """The tasks stamped with the tenant, its weight and the priority (default: normal), once allowed:
        403 above the tenant's max_priority (naming `field_name`), 429 past a limit; their images charged."""
        policy = self.tenant.policy
        asked = priority or DEFAULT_PRIORITY
        if not allows(policy.max_priority, asked):
            self.owner.refuse(self.tenant, "priority")
            allowed = ", ".join(p for p in RANK if allows(policy.max_priority, p))
            raise ApiError(
                403,
                "priority_not_allowed",
                f"{field_name}: {asked!r} is above what this caller may ask for (max_priority "
                f"{policy.max_priority!r}; allowed: {allowed})",
                field_name,
            )
        self.check(len(tasks))
        self.charge(len(tasks))
        return [replace(t, tenant=self.tenant.id, priority=asked, weight=policy.weight) for t in tasks]

    def check(self, images: int, at_least: bool = False) -> None:
        """429 (with headers) when `images` more would pass a limit; `at_least`: when not even one may go."""
        owner, tenant, policy = self.owner, self.tenant, self.tenant.policy
        now = owner.clock()
        asked = 1 if at_least else images
        if policy.quota is not None:
            used = owner.quota.used(tenant.id)
            if used + asked > policy.quota:
                owner.refuse(tenant, "quota")
                reset = math.ceil(seconds_to_midnight(now))
                raise ApiError(
                    429,
                    "quota_exceeded",
                    f"daily image quota reached: {used} of {policy.quota} images today, {images} more asked for; "
                    f"it resets at 00:00 UTC, in {reset}s",
                    headers={
                        "Retry-After": str(reset),
                        **rate_headers(policy.quota, max(0, policy.quota - used), reset),
                    },
                )
        counts = owner._count(tenant)
        if self.synchronous and policy.max_concurrent is not None:
            busy = counts.in_flight + self.in_flight
            if busy and busy + asked > policy.max_concurrent:
                owner.refuse(tenant, "concurrency")
                raise ApiError(
                    429,
                    "too_many_images",
                    f"{busy} images of this caller are being made, the most it may have at once is "
                    f"{policy.max_concurrent}; retry when some are done",
                    headers={"Retry-After": str(owner.retry_after_s), **self.headers(now)},
                )
        bucket = owner.bucket(tenant)
        if bucket is not None:
            wait = bucket.wait_s(asked, now)
            if wait > 0:
                owner.refuse(tenant, "rate")
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit: {policy.rate:g} images per minute (up to {int(bucket.size)} at once); "
                    f"{images} asked for, {math.floor(bucket.level(now))} available now; retry in {math.ceil(wait)}s",
                    headers={"Retry-After": str(max(1, math.ceil(wait))), **self.headers(now)},
                )

    def charge(self, images: int) -> None:
        owner, tenant = self.owner, self.tenant
        now = owner.clock()
        bucket = owner.bucket(tenant)
        if bucket is not None:
            bucket.take(images, now)
        if tenant.policy.quota is not None:
            owner.quota.charge(tenant.id, images)
        counts = owner._count(tenant)
        counts.images += images
        self.images += images
        if self.synchronous:
            counts.in_flight += images
            self.in_flight += images
            owner.metrics.in_flight(tenant.id, counts.in_flight)
        owner.metrics.images(tenant.id, images)

    def finish(self, status: int) -> None:
        """The answer went out: images in flight released; a request that failed gives its images back."""
        owner, tenant = self.owner, self.tenant
        counts = owner.counts.get(tenant.id)
        if self.in_flight and counts is not None:
            counts.in_flight = max(0, counts.in_flight - self.in_flight)
            owner.metrics.in_flight(tenant.id, counts.in_flight)
        if self.images and status >= 400:
            bucket = owner.buckets.get(tenant.id)
            if bucket is not None:
                bucket.give_back(self.images, owner.clock())
            if tenant.policy.quota is not None:
                owner.quota.refund(tenant.id, self.images)
            if counts is not None:
                counts.images = max(0, counts.images - self.images)
        self.in_flight = self.images = 0

    def headers(self, now: float | None = None) -> dict[str, str]:
        """RateLimit-Limit/-Remaining/-Reset: the bucket's, or the daily quota's for a tenant without a rate."""
        owner, policy = self.owner, self.tenant.policy
        now = owner.clock() if now is None else now
        bucket = owner.bucket(self.tenant)
        if bucket is not None:
            return {
                **rate_headers(int(bucket.size), max(0, math.floor(bucket.level(now))), bucket.full_in_s(now)),
                "RateLimit-Policy": f"{int(bucket.size)};w={math.ceil(bucket.size / bucket.per_s)}",
            }
        if policy.quota is not None:
            used = owner.quota.used(self.tenant.id)
            return rate_headers(policy.quota, max(0, policy.quota - used), seconds_to_midnight(now))
        return {}


def rate_headers(limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(math.ceil(reset_s)),
    }


class _TenantMetrics:
    """Prometheus counters per tenant (hashed ids; past MAX_LABELS distinct tenants, `other`), when in a replica."""

    MAX_LABELS = 200

    def __init__(self, images=None, refusals=None, in_flight_gauge=None):
        self._images, self._refusals, self._in_flight = images, refusals, in_flight_gauge
        self._labels: set[str] = set()

    @classmethod
    def create(cls) -> _TenantMetrics:
        try:
            import ray

            if not ray.is_initialized():
                return cls()
            from ray.serve.metrics import Counter as RayCounter
            from ray.serve.metrics import Gauge

            return cls(
                RayCounter(
                    "sd_tenant_images", description="Images admitted at the ingress, by tenant.", tag_keys=("tenant",)
                ),
                RayCounter(
                    "sd_tenant_refusals",
                    description="Requests refused by a tenant's own limits, by tenant and reason "
                    "(rate, concurrency, quota, priority).",
                    tag_keys=("tenant", "reason"),
                ),
                Gauge(
                    "sd_tenant_images_in_flight",
                    description="Images of synchronous requests in flight, by tenant.",
                    tag_keys=("tenant",),
                ),
            )
        except Exception:  # noqa: BLE001 - metrics must never cost a request
            logger.exception("tenants: no Prometheus metrics")
            return cls()

    def _label(self, tenant: str) -> str:
        if tenant in self._labels or len(self._labels) < self.MAX_LABELS:
            self._labels.add(tenant)
            return tenant
        return "other"

    def images(self, tenant: str, images: int) -> None:
        if self._images is not None:
            self._images.inc(images, tags={"tenant": self._label(tenant)})

    def refused(self, tenant: str, reason: str) -> None:
        if self._refusals is not None:
            self._refusals.inc(tags={"tenant": self._label(tenant), "reason": reason})

    def in_flight(self, tenant: str, images: int) -> None:
        if self._in_flight is not None:
            self._in_flight.set(images, tags={"tenant": self._label(tenant)})
