"""Who goes next when more work waits than there is room for: weighted fair share across tenants.

One policy for everything that queues work: the step engine's admission into its running set, the request
engine's pick for its next call, and the JobManager's dispatch of jobs. Each keeps its waiting items in a
`FairQueue` and asks it for the next ones with `take(room, fits)`:

* **Across tenants: deficit round-robin.** Tenants with waiting work take turns; on its turn a tenant is
  credited `quantum x weight` and admits items while their cost (denoiser rows over the image's steps, for an
  image: `ImageTask.cost`) fits its credit. Over time each busy tenant gets work in proportion to its weight,
  whatever the size of its items, and a tenant that arrives with one image waits at most one turn of each
  other tenant, not behind their backlog. The quantum is the largest cost waiting (over the lightest weight),
  so every turn admits at least one item.
* **Within a tenant:** by priority (`high`, `normal`, `low`: strict), then in arrival order (or by an engine's
  own order, e.g. fewest steps first).
* **Never starved once admitted:** the queue decides only who joins; what was admitted runs to its end.

A turn cut short by lack of room goes on where it stopped at the next `take`, so the shares hold even when
room frees one item at a time. Fairness is per queue: per Generator replica, per JobManager.

`Tally` is a snapshot of the waiting work per tenant and priority, for the expected wait of a new item: the
work *ahead of it* under this policy (its tenant's work of its priority or higher, and each other tenant's up
to that tenant's weighted share of the same), not everything queued.

Plain Python: no torch, no Ray; not thread-safe (each user calls it from one thread).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")  # highest first
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
DEFAULT_PRIORITY: Priority = "normal"
SHARED_TENANT = "shared"  # requests that name no tenant (no API key, no X-Tenant)

T = TypeVar("T")


def allows(max_priority: Priority, asked: Priority) -> bool:
    """Whether a tenant whose highest priority is `max_priority` may ask for `asked`."""
    return RANK[asked] >= RANK[max_priority]


@dataclass(frozen=True)
class Claim:
    """What the policy needs to know of one waiting item."""

    tenant: str = SHARED_TENANT
    priority: Priority = DEFAULT_PRIORITY
    cost: float = 1.0  # compute it takes: denoiser rows x steps for an image
    weight: float = 1.0  # its tenant's weight (the latest item's counts)
    steps: float = 0.0  # denoising steps (image-steps), for the expected wait in the engines' unit


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    seq: int
    claim: Claim


@dataclass(frozen=True)
class Tally:
    """Waiting work per tenant: {tenant: (weight, cost by priority rank, steps by priority rank)}."""

    tenants: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)

    def with_claim(self, claim: Claim) -> Tally:
        """This tally and one more waiting item."""
        rank = RANK[claim.priority]
        costs = tuple(claim.cost if r == rank else 0.0 for r in range(len(PRIORITIES)))
        steps = tuple(claim.steps if r == rank else 0.0 for r in range(len(PRIORITIES)))
        return self.plus(Tally({claim.tenant: (claim.weight, costs, steps)}))

    def plus(self, other: Tally) -> Tally:
        merged = dict(self.tenants)
        for tenant, (weight, costs, steps) in other.tenants.items():
            if tenant in merged:
                _, old_costs, old_steps = merged[tenant]
                costs = tuple(a + b for a, b in zip(old_costs, costs))
                steps = tuple(a + b for a, b in zip(old_steps, steps))
            merged[tenant] = (weight, costs, steps)
        return Tally(merged)

    def steps_ahead(self, claim: Claim) -> float:
        """Image-steps that run before an item with `claim` (itself included) under weighted fair share: its
        tenant's waiting work of its priority or higher, plus each other tenant's in proportion to the weights
        (all of it where that tenant has less)."""
        own = self.tenants.get(claim.tenant)
        rank = RANK[claim.priority]
        own_cost = claim.cost + (sum(own[1][: rank + 1]) if own else 0.0)
        ahead = claim.steps + (sum(own[2][: rank + 1]) if own else 0.0)
        for tenant, (weight, costs, steps) in self.tenants.items():
            total_cost, total_steps = sum(costs), sum(steps)
            if tenant == claim.tenant or total_cost <= 0:
                continue
            share = own_cost * weight / claim.weight
            ahead += total_steps * min(1.0, share / total_cost)
        return ahead

    def counts(self) -> dict[str, float]:
        """Waiting image-steps per tenant."""
        return {tenant: sum(steps) for tenant, (_, _, steps) in self.tenants.items()}


class FairQueue(Generic[T]):
    """Waiting items, per tenant and priority; `take` admits them by weighted deficit round-robin.

    Deque-like where the engines and the JobManager need it (`append`, `appendleft`, `extend`, `len`, iteration
    in arrival order, `remove_if`), so a FIFO queue becomes a fair one in place. `claim(item)` says who asked,
    at what priority and cost; it is read once, when the item is added.
    """

    def __init__(self, claim: Callable[[T], Claim], items: Iterable[T] = ()):
        self._claim = claim
        self._queues: dict[str, tuple[deque[_Entry[T]], ...]] = {}
        self._weights: dict[str, float] = {}
        self._costs: Counter[float] = Counter()  # cost -> entries with it: the largest is the quantum
        self._len = 0
        self._next_seq = itertools.count()
        self._first_seq = itertools.count(-1, -1)  # appendleft: before everything added so far
        self._round: deque[str] = deque()  # tenants with waiting items, in turn order
        self._deficit: dict[str, float] = {}
        self._credited: set[str] = set()  # tenants whose turn has begun (got its quantum) and goes on
        self.extend(items)

    # -- deque-like ---------------------------------------------------------------------------------

    def append(self, item: T) -> None:
        self._add(_Entry(item, next(self._next_seq), self._claim(item)), left=False)

    def appendleft(self, item: T) -> None:
        """Before every waiting item of its tenant and priority (a job that runs again goes first)."""
        self._add(_Entry(item, next(self._first_seq), self._claim(item)), left=True)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        """Every waiting item, in arrival order."""
        lanes = [lane for lanes in self._queues.values() for lane in lanes if lane]
        for entry in heapq.merge(*(sorted(lane, key=_seq) for lane in lanes), key=_seq):
            yield entry.item

    def remove_if(self, doomed: Callable[[T], bool]) -> list[T]:
        """Remove (and return, in arrival order) the items for which `doomed` is true."""
        removed: list[_Entry[T]] = []
        for tenant, lanes in list(self._queues.items()):
            for lane in lanes:
                gone = [entry for entry in lane if doomed(entry.item)]
                for entry in gone:
                    lane.remove(entry)
                    self._removed(entry)
                removed += gone
            self._forget_if_empty(tenant)
        return [entry.item for entry in sorted(removed, key=_seq)]

    # -- the policy ----------------------------------------------------------------------------------

    def take(
        self, room: int, fits: Callable[[T], bool] | None = None, order: Callable[[T], float] | None = None
    ) -> list[T]:
        """Up to `room` items, in the order the policy admits them, removed from the queue.

        `fits(item)`: whether `item` can be taken now (its size still has room, say); it is asked only of the
        item the policy would take next, and each True takes it, so it may count what it has let through. An
        item that does not fit is passed over (it keeps its place) for the tenant's next one; a tenant none of
        whose items fits keeps its place and its credit while the others go. `order(item)`: within a tenant and
        priority, smaller first (default: arrival)."""
        taken: list[T] = []
        if room <= 0 or not self._len:
            return taken
        lightest = min(self._weights[tenant] for tenant in self._round)
        quantum = max(self._costs) / lightest  # the lightest tenant's turn admits the costliest item waiting
        stuck: set[str] = set()  # tenants none of whose items fits now
        while len(taken) < room:
            tenant = next((t for t in self._round if t not in stuck), None)
            if tenant is None:
                break
            credit = 0.0
            if tenant not in self._credited:  # a new turn
                credit = quantum * self._weights[tenant]
                self._deficit[tenant] += credit
                self._credited.add(tenant)
            before = len(taken)
            outcome = self._serve(tenant, room - len(taken), fits, order, taken)
            if outcome == "full":
                break  # its turn goes on at the next take
            if self._forget_if_empty(tenant):
                continue
            if outcome == "stuck":
                stuck.add(tenant)
                if credit and len(taken) == before:  # nothing of it fitted: as if the turn had not begun
                    self._deficit[tenant] -= credit
                    self._credited.discard(tenant)
                continue
            self._credited.discard(tenant)  # 'short': its turn is over; to the back of the round
            self._round.remove(tenant)
            self._round.append(tenant)
        return taken

    def _serve(self, tenant: str, room: int, fits, order, taken: list[T]) -> str:
        """Admit the tenant's items while its credit lasts: 'full' (room ran out), 'short' (credit ran out),
        'stuck' (nothing left that fits, or nothing left)."""
        took = 0
        for lane in self._queues[tenant]:
            candidates = sorted(lane, key=lambda e: (order(e.item), e.seq)) if order else list(lane)
            for entry in candidates:
                if entry.claim.cost > self._deficit[tenant]:
                    return "short"
                if fits is not None and not fits(entry.item):
                    continue
                lane.remove(entry)
                self._removed(entry)
                self._deficit[tenant] -= entry.claim.cost
                taken.append(entry.item)
                took += 1
                if took == room:
                    return "full"
        return "stuck"

    # -- what waits ----------------------------------------------------------------------------------

    def tally(self) -> Tally:
        """The waiting work per tenant and priority (a snapshot, safe to hand to another thread)."""
        return Tally(
            {
                tenant: (
                    self._weights[tenant],
                    tuple(sum(e.claim.cost for e in lane) for lane in lanes),
                    tuple(sum(e.claim.steps for e in lane) for lane in lanes),
                )
                for tenant, lanes in self._queues.items()
            }
        )

    def waiting_by_tenant(self) -> dict[str, int]:
        return {tenant: sum(len(lane) for lane in lanes) for tenant, lanes in self._queues.items()}

    def positions(self) -> dict[T, int]:
        """Each item's place in its own tenant's order (1 = that tenant's next): other tenants take turns with
        it, so their items are not ahead of it in the way its tenant's own are."""
        places: dict[T, int] = {}
        for lanes in self._queues.values():
            for place, entry in enumerate((e for lane in lanes for e in lane), 1):
                places[entry.item] = place
        return places

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _add(self, entry: _Entry[T], left: bool) -> None:
        claim = entry.claim
        if claim.priority not in RANK:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)} (got {claim.priority!r})")
        if claim.tenant not in self._queues:
            self._queues[claim.tenant] = tuple(deque() for _ in PRIORITIES)
            self._round.append(claim.tenant)
            self._deficit[claim.tenant] = 0.0
        self._weights[claim.tenant] = claim.weight if claim.weight > 0 else 1.0
        lane = self._queues[claim.tenant][RANK[claim.priority]]
        if left:
            lane.appendleft(entry)
        else:
            lane.append(entry)
        self._costs[claim.cost] += 1
        self._len += 1

    def _removed(self, entry: _Entry[T]) -> None:
        self._len -= 1
        self._costs[entry.claim.cost] -= 1
        if not self._costs[entry.claim.cost]:
            del self._costs[entry.claim.cost]

    def _forget_if_empty(self, tenant: str) -> bool:
        """A tenant with nothing waiting leaves the round, its credit with it (deficit round-robin's rule)."""
        if any(self._queues[tenant]):
            return False
        self._credited.discard(tenant)
        self._round.remove(tenant)
        del self._queues[tenant], self._deficit[tenant], self._weights[tenant]
        return True


def _seq(entry: _Entry) -> int:
    return entry.seq
