"""How tasks share model calls: one loop on one worker thread, and the two engines it can drive.

The serving layer submits tasks from its event loop (`EngineLoop.submit`, thread-safe) and gets
each image back through a callback the moment it is ready; progress comes the same way. One
worker thread runs the engine, so a pipeline object is never called from two threads at once,
and one place decides what runs next.

* `StepEngine` (continuous batching): every tick admits waiting tasks (their prompts encoded
  together), runs ONE UNet call over the active images of one latent shape, steps each image's own
  scheduler, and decodes the images that finished. Requests with different step counts,
  samplers, guidance and strengths share the call; a task joins at the next tick, not after the
  current request ends. Shapes take turns round-robin: every active image advances at least once
  every (number of shapes) ticks, so a lone odd size can neither starve nor be starved, and the
  turn order needs no tuning. A cancelled task leaves at the next tick.
* `RequestEngine` (whole pipeline calls): each tick takes the waiting tasks, up to
  `max_batch_size`, and runs one diffusers call per group that can share one (same size, steps,
  guidance, sampler, strength). For pipelines the step engine does not know. Progress comes from
  the pipeline's step callback; a call whose tasks were all cancelled stops at the next step.

Both engines pick what joins next with one policy (`fairness.FairQueue`): weighted fair share across tenants
(deficit round-robin on denoiser rows x steps), then priority, then arrival (or fewest steps first). An
admission that refuses by expected wait counts only the work ahead of the task under that policy.

No Ray and no asyncio here: the Generator adapts the callbacks to its event loop.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .errors import GenerationError, OverloadedError
from .fairness import FairQueue, Tally
from .tasks import ImageResult, ImageTask

logger = logging.getLogger(__name__)

AdmissionPolicy = Literal["fifo", "fewest_steps"]


@dataclass(frozen=True)
class Progress:
    """How far one image is: `step` of `total_steps` model evaluations done; every `task.preview_every`
    steps (step engine) a small PNG of its current latents."""

    step: int
    total_steps: int
    preview: bytes | None = None


@dataclass(eq=False)
class Ticket:
    """One submitted task on its way through the loop. `cancel()` may be called from any thread."""

    task: ImageTask  # defaults filled in, checked by the engine
    warnings: list[str]
    on_done: Callable[[ImageResult | Exception], None]
    on_progress: Callable[[Progress], None] | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    batch_size: int = 0  # images in the largest model call it took part in
    # Hires fix in the step engine: denoiser evaluations of the phases before the current one and of those
    # still to come, so that progress runs once over the whole image.
    steps_before: int = 0
    steps_after: int = 0
    cancelled: bool = False
    delivered: bool = False  # its outcome went to on_done (once)

    def cancel(self) -> None:
        self.cancelled = True

    def progress(self, step: int, total_steps: int, preview: bytes | None = None) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(Progress(step, total_steps, preview))
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the loop
                logger.exception("progress listener failed")

    def finish(self, result: ImageResult | Exception) -> None:
        if self.delivered:
            return
        self.delivered = True
        try:
            self.on_done(result)
        except Exception:  # noqa: BLE001 - a listener's failure must not stop the loop
            logger.exception("result listener failed")

    def result(self, pixels, seconds: float | None = None) -> ImageResult:
        elapsed = time.monotonic() - (self.started_at or self.submitted_at)
        return ImageResult(
            pixels,
            self.task.params,
            batch_size=self.batch_size,
            generation_time_s=elapsed if seconds is None else seconds,
            warnings=self.warnings,
        )


@dataclass
class EngineLimits:
    """The knobs of the loop (the Generator's `user_config` sets them at run time)."""

    max_batch_size: int = 8  # images in one model call (per latent shape, for the step engine)
    max_active_requests: int = 32  # images in flight at once (step engine), across shapes
    admission: AdmissionPolicy = "fifo"


class LoopCounters:
    """What the loop has done since start; read from any thread (plain ints, updated by the worker)."""

    def __init__(self) -> None:
        self.model_calls_by_batch_size: Counter[int] = Counter()
        self.admitted = 0
        self.admitted_mid_flight = 0  # joined while other images were being denoised
        self.cancelled_before_start = 0
        self.cancelled_in_flight = 0
        self.succeeded = 0
        self.failed = 0
        self.admitted_by_tenant: Counter[str] = Counter()  # hashed tenant ids: fair admission at work
        self.busy_s = 0.0  # wall time in model calls (UNet steps, decodes, whole pipeline calls)
        self.refused = 0  # tasks refused at admission: they could not finish before their deadline
        # Image-steps per second the model delivers (an image advanced by one denoising step), smoothed:
        # with the backlog in the same unit it says how long a new task would wait. None until measured.
        self.step_rate: float | None = None

    def record_rate(self, image_steps: float, seconds: float) -> None:
        if seconds <= 0 or image_steps <= 0:
            return
        sample = image_steps / seconds
        self.step_rate = sample if self.step_rate is None else 0.8 * self.step_rate + 0.2 * sample

    def snapshot(self) -> dict:
        return {
            "model_calls_by_batch_size": {str(k): v for k, v in sorted(self.model_calls_by_batch_size.items())},
            "admitted": self.admitted,
            "admitted_mid_flight": self.admitted_mid_flight,
            "cancelled_before_start": self.cancelled_before_start,
            "cancelled_in_flight": self.cancelled_in_flight,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "busy_s": round(self.busy_s, 3),
            "refused": self.refused,
            "image_steps_per_s": None if self.step_rate is None else round(self.step_rate, 2),
        }


class Engine:
    """What an engine does each tick. Only the loop's worker thread calls these."""

    kind: str

    def __init__(self, limits: EngineLimits, counters: LoopCounters):
        self.limits = limits
        self.counters = counters
        self.waiting: FairQueue[Ticket] = FairQueue(_claim_of)
        # Refreshed by the worker after each tick (`publish`), read by submitters on other threads (each a
        # whole value, replaced, never changed in place: no lock needed to read it).
        self.backlog_steps = 0.0  # denoising steps still to run, over every image it holds
        self.active_steps = 0.0  # ... over the images already admitted
        self.waiting_tally = Tally()  # the waiting work per tenant and priority
        self.by_tenant: dict[str, dict[str, int]] = {}  # images waiting and running per tenant

    def measure_backlog(self) -> float:
        return sum(t.task.denoising_steps for t in self.waiting) + self.measure_active()

    def measure_active(self) -> float:
        return 0.0

    def running_tickets(self) -> list[Ticket]:
        return []

    def publish(self) -> None:
        """What submitters on other threads read: the backlog, and what waits and runs per tenant."""
        self.active_steps = self.measure_active()
        self.waiting_tally = self.waiting.tally()
        self.backlog_steps = self.active_steps + sum(self.waiting_tally.counts().values())
        counts: dict[str, dict[str, int]] = {}
        for tenant, waiting in self.waiting.waiting_by_tenant().items():
            counts.setdefault(tenant, {"waiting": 0, "running": 0})["waiting"] = waiting
        for ticket in self.running_tickets():
            counts.setdefault(ticket.task.tenant, {"waiting": 0, "running": 0})["running"] += 1
        self.by_tenant = counts

    def has_work(self) -> bool:
        return bool(self.waiting)

    @property
    def active(self) -> int:
        return 0

    def tick(self) -> None:
        raise NotImplementedError

    def abandon(self, error: Exception) -> None:
        """Finish every ticket in flight with `error` (after a tick failed unexpectedly)."""
        raise NotImplementedError

    def _drop_cancelled_waiting(self) -> None:
        for ticket in self.waiting.remove_if(lambda t: t.cancelled):
            self.counters.cancelled_before_start += 1
            ticket.finish(TaskCancelled())

    def _count_admitted(self, tickets: list[Ticket]) -> None:
        self.counters.admitted += len(tickets)
        self.counters.admitted_by_tenant.update(t.task.tenant for t in tickets)

    def _finish(self, ticket: Ticket, result: ImageResult | Exception) -> None:
        if isinstance(result, Exception):
            self.counters.failed += 1
        else:
            self.counters.succeeded += 1
        ticket.finish(result)

    def _run_whole_call(self, tickets: list[Ticket]) -> None:
        """One diffusers call for tickets that can share one (`engine.groups`); progress from its step callback."""

        def on_step(step: int, total: int) -> bool:
            for ticket in tickets:
                ticket.progress(step, total)
            return all(t.cancelled for t in tickets)  # True: stop the call, nobody waits for it

        started = time.perf_counter()
        results = self.model.run_prepared([(t.task, t.warnings) for t in tickets], on_step=on_step)
        seconds = time.perf_counter() - started
        self.counters.busy_s += seconds
        self.counters.record_rate(sum(t.task.denoising_steps for t in tickets), seconds)
        # Every call of k images returns k images of batch_size k (halves after running out of memory).
        sizes = Counter(r.batch_size for r in results if isinstance(r, ImageResult))
        for size, images in sizes.items():
            self.counters.model_calls_by_batch_size[size] += images // size
        for ticket, result in zip(tickets, results):
            ticket.batch_size = getattr(result, "batch_size", 0)
            if ticket.cancelled:
                self.counters.cancelled_in_flight += 1
                ticket.finish(TaskCancelled())
            else:
                self._finish(ticket, result)


class TaskCancelled(Exception):
    """The outcome of a task whose caller gave up: delivered so that every ticket ends, read by nobody."""


class EngineLoop:
    """Runs a batcher on its own worker thread; `submit` from any thread."""

    def __init__(self, engine: Engine, prepare: Callable[[ImageTask], tuple[ImageTask, list[str]]]):
        self.engine = engine
        self.counters = engine.counters
        self._prepare = prepare
        self._incoming: deque[Ticket] = deque()
        self._incoming_steps = 0.0
        self._incoming_tally = Tally()  # what _incoming holds, per tenant and priority
        self._wake = threading.Condition()
        self._stopped = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._incoming) + len(self.engine.waiting)

    @property
    def active(self) -> int:
        return self.engine.active

    def tenants(self) -> dict[str, dict[str, int]]:
        """Per tenant (hashed ids): images waiting and running now (as of the last tick), admitted since start."""
        counts = {tenant: dict(now) for tenant, now in self.engine.by_tenant.items()}
        with self._wake:
            incoming = list(self._incoming)
        for ticket in incoming:
            counts.setdefault(ticket.task.tenant, {"waiting": 0, "running": 0})["waiting"] += 1
        for tenant, admitted in dict(self.counters.admitted_by_tenant).items():
            counts.setdefault(tenant, {"waiting": 0, "running": 0})["admitted"] = admitted
        return counts

    def submit(
        self,
        task: ImageTask,
        on_done: Callable[[ImageResult | Exception], None],
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Ticket:
        """Queue a task; `on_done` gets its image or error on the worker thread (or at once, for a bad task)."""
        try:
            prepared, warnings = self._prepare(task)
        except GenerationError as exc:
            ticket = Ticket(task, [], on_done, on_progress)
            self.counters.failed += 1
            ticket.finish(exc)
            return ticket
        ticket = Ticket(prepared, warnings, on_done, on_progress)
        with self._wake:
            refusal = self._admission(prepared)
            if refusal is not None:
                self.counters.refused += 1
                ticket.finish(refusal)
                return ticket
            self._incoming.append(ticket)
            self._incoming_steps += prepared.denoising_steps
            self._incoming_tally = self._incoming_tally.with_claim(prepared.claim())
            self._wake.notify()
        return ticket

    def expected_wait_s(self, task: ImageTask | None = None) -> float | None:
        """Seconds until `task` would be done, at the measured rate: the images admitted, then the waiting work
        ahead of it under fair admission (its tenant's, at its priority or higher, and each other tenant's up
        to that tenant's weighted share). Without a task: until everything held now is done. None before the
        first measurement."""
        rate = self.counters.step_rate
        if rate is None:
            return None
        if task is None:
            return (self.engine.backlog_steps + self._incoming_steps) / rate
        waiting = self.engine.waiting_tally.plus(self._incoming_tally)
        return (self.engine.active_steps + waiting.steps_ahead(task.claim())) / rate

    DEADLINE_SHARE = 0.8  # admit a task expected to be done within this share of the time left to its deadline

    def _admission(self, task: ImageTask) -> OverloadedError | None:
        """Refuse at once a task that could not be done before its deadline: better than a late 504."""
        if task.deadline is None:
            return None
        expected = self.expected_wait_s(task)
        # The estimate is a mean at the rate measured so far: the slow end of the spread must fit too.
        if expected is None or expected <= self.DEADLINE_SHARE * (task.deadline - time.time()):
            return None
        drain_s = self.expected_wait_s() or 1.0
        retry_after = max(1, min(60, math.ceil(drain_s)))
        return OverloadedError(
            f"server busy: this image would be ready in about {expected:.1f}s, after its deadline; "
            f"retry in {retry_after}s",
            retry_after,
        )

    def submit_all(
        self,
        tasks: list[ImageTask],
        on_done: Callable[[int, ImageResult | Exception], None],
        on_progress: Callable[[int, Progress], None] | None = None,
    ) -> list[Ticket]:
        """Several tasks that arrived together, admitted together (at the same tick); callbacks get the task's index."""
        tickets = []
        with self._wake:  # held across the batch, so the worker takes all of them in one tick
            for index, task in enumerate(tasks):
                progress = None if on_progress is None else (lambda p, index=index: on_progress(index, p))
                tickets.append(self.submit(task, lambda result, index=index: on_done(index, result), progress))
        return tickets

    def stop(self, drain: bool = False, timeout_s: float = 10) -> None:
        """Stop the worker: at once, or (`drain`) once every task it holds has finished."""
        with self._wake:
            self._draining = drain
            self._stopped = not drain
            self._wake.notify()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._incoming and not self.engine.has_work():
                    if self._draining:
                        return
                    self._wake.wait()
                if self._stopped:
                    return
                self.engine.waiting.extend(self._incoming)
                self._incoming.clear()
                self.engine.publish()
                self._incoming_steps = 0.0
                self._incoming_tally = Tally()
            try:
                self.engine.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one tick
                logger.exception("engine tick failed")
                # Whatever that tick held ends with an error rather than never.
                self.engine.abandon(GenerationError(f"image generation failed: {type(exc).__name__}"))
            self.engine.publish()


# -- whole pipeline calls -----------------------------------------------------------------------


class RequestEngine(Engine):
    """Each tick: the waiting tasks (up to max_batch_size), one whole pipeline call per compatible group."""

    kind = "request"

    def __init__(self, model, limits: EngineLimits, counters: LoopCounters):
        super().__init__(limits, counters)
        self.model = model  # a LoadedModel
        self._running: list[Ticket] = []

    @property
    def active(self) -> int:
        return len(self._running)

    def measure_active(self) -> float:
        return sum(t.task.denoising_steps for t in self._running)

    def running_tickets(self) -> list[Ticket]:
        return list(self._running)

    def tick(self) -> None:
        self._drop_cancelled_waiting()
        taken = self.waiting.take(self.limits.max_batch_size)  # fair share across tenants, then priority
        if not taken:
            return
        self._running = taken
        self._count_admitted(taken)
        self.publish()  # what runs, for those who ask while the call computes
        now = time.monotonic()
        for ticket in taken:
            ticket.started_at = now
        try:
            for group in self.model.groups([t.task for t in taken]):
                self._run_whole_call([taken[i] for i in group])
        finally:
            self._running = []

    def abandon(self, error: Exception) -> None:
        for ticket in self._running:
            self._finish(ticket, error)
        self._running = []


# -- one UNet step at a time ------------------------------------------------------------------


class StepEngine(Engine):
    """Each tick: admit, one denoiser call over the active images of one group (groups take turns), decode
    those that finished. `stepper` is its family's stepper (`steppers/`); `model` the `LoadedModel` it serves."""

    kind = "step"

    def __init__(self, model, stepper, limits: EngineLimits, counters: LoopCounters):
        super().__init__(limits, counters)
        import torch

        self.model = model
        self.stepper = stepper
        self._out_of_memory = torch.OutOfMemoryError
        # Active images by output size (one latent shape per size for a given model), in admission order;
        # by size and LoRA adapter set when the stepper keeps adapter sets apart.
        self._active: dict[tuple, list[tuple[Ticket, object]]] = {}
        self._last_size: tuple | None = None

    def _group_of(self, task: ImageTask) -> tuple:
        """Tasks of different groups never share a denoiser call: the stepper's key (size, and whatever else its
        family's calls must share), else the size (and adapter set when the stepper keeps them apart)."""
        group_key = getattr(self.stepper, "group_key", None)
        if group_key is not None:
            return group_key(task)
        if getattr(self.stepper, "group_by_adapters", False):
            return (*_size(task), task.params.adapter_key)
        return _size(task)

    @property
    def active(self) -> int:
        return sum(len(group) for group in self._active.values())

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    def measure_active(self) -> float:
        return sum(t.steps_after + s.total_steps - s.step_index for group in self._active.values() for t, s in group)

    def running_tickets(self) -> list[Ticket]:
        return [ticket for group in self._active.values() for ticket, _ in group]

    def tick(self) -> None:
        started = time.perf_counter()
        self._drop_cancelled_waiting()
        self._drop_cancelled_active()
        self._run_refiner_tasks()
        self._admit()
        size = self._next_size()
        if size is not None:
            images = len(self._active[size])
            self._step(size)
            # The whole tick (admission and decoding included): what the next image will really wait.
            self.counters.record_rate(images, time.perf_counter() - started)

    def abandon(self, error: Exception) -> None:
        for group in self._active.values():
            for ticket, _ in group:
                self._finish(ticket, error)
        self._active.clear()

    # -- admission -------------------------------------------------------------------

    def _admit(self) -> None:
        room = self.limits.max_active_requests - self.active
        if room <= 0 or not self.waiting:
            return
        in_flight = self.active > 0
        per_size = {size: len(group) for size, group in self._active.items()}

        def fits(ticket: Ticket) -> bool:  # its size has room: taken
            size = self._group_of(ticket.task)
            if per_size.get(size, 0) >= self.limits.max_batch_size:
                return False
            per_size[size] = per_size.get(size, 0) + 1
            return True

        # Fair share across tenants (deficit round-robin on denoiser rows x steps), then priority, then
        # `admission` within a tenant; an image whose size is full waits while others pass.
        order = (lambda t: t.task.denoising_steps) if self.limits.admission == "fewest_steps" else None
        taken = self.waiting.take(room, fits, order)
        if not taken:
            return
        now = time.monotonic()
        started = time.perf_counter()
        states = self.stepper.start([t.task for t in taken])  # prompts encoded together
        self.counters.busy_s += time.perf_counter() - started
        for ticket, state in zip(taken, states):
            ticket.started_at = now
            if isinstance(state, Exception):
                self._finish(ticket, state)
                continue
            self._count_admitted([ticket])
            self.counters.admitted_mid_flight += in_flight
            if ticket.task.params.hires is not None:
                ticket.steps_after = self.stepper.second_phase_steps(ticket.task)
            self._active.setdefault(self._group_of(ticket.task), []).append((ticket, state))
            ticket.progress(0, state.total_steps + ticket.steps_after)
        self.publish()  # what runs, for those who ask while the step computes

    def _run_refiner_tasks(self) -> None:
        """Tasks for a refiner (two pipelines, one after the other) are not stepped: they run as whole calls,
        while the stepped images wait one call's time."""
        refined = [t for t in self.waiting if t.task.params.refiner is not None][: self.limits.max_batch_size]
        if not refined:
            return
        chosen = set(map(id, refined))
        self.waiting.remove_if(lambda t: id(t) in chosen)
        self._count_admitted(refined)
        now = time.monotonic()
        for ticket in refined:
            ticket.started_at = now
        for group in self.model.groups([t.task for t in refined]):
            self._run_whole_call([refined[i] for i in group])

    def _drop_cancelled_active(self) -> None:
        for size, group in list(self._active.items()):
            kept = []
            for ticket, state in group:
                if ticket.cancelled:
                    self.counters.cancelled_in_flight += 1
                    ticket.finish(TaskCancelled())
                else:
                    kept.append((ticket, state))
            self._set_group(size, kept)

    def _set_group(self, size: tuple[int, int], group: list) -> None:
        if group:
            self._active[size] = group
        else:
            self._active.pop(size, None)

    def _next_size(self) -> tuple[int, int] | None:
        """Round-robin over the sizes with active images, in the order they became active."""
        sizes = list(self._active)
        if not sizes:
            return None
        if self._last_size in sizes:
            self._last_size = sizes[(sizes.index(self._last_size) + 1) % len(sizes)]
        else:
            self._last_size = sizes[0]
        return self._last_size

    # -- one step ----------------------------------------------------------------------

    def _step(self, size: tuple[int, int]) -> None:
        group = self._active[size]
        failed = self._step_splitting_on_oom(group)
        done, running = [], []
        for ticket, state in group:
            if id(ticket) in failed:
                self._finish(ticket, failed[id(ticket)])
            elif state.error is not None:
                self._finish(ticket, state.error)
            elif state.done:
                done.append((ticket, state))
            else:
                running.append((ticket, state))
            if not ticket.delivered:
                every = ticket.task.preview_every
                preview = None
                if every and state.step_index % every == 0 and not state.done and ticket.on_progress is not None:
                    preview = self.stepper.preview(state)
                before = ticket.steps_before
                ticket.progress(before + state.step_index, before + state.total_steps + ticket.steps_after, preview)
        self._set_group(size, running)
        first_phases = [(t, s) for t, s in done if t.task.params.hires is not None and not t.steps_before]
        if first_phases:
            done = [member for member in done if member not in first_phases]
            self._next_phase(first_phases)
        if done:
            self._decode(done)

    def _next_phase(self, finished: list[tuple[Ticket, object]]) -> None:
        """Hires fix: first passes that finished start their second pass (upscaled, image to image at the new size)
        as new states of the same tickets, in the groups of their new size: progress and cancel span both."""
        started = time.perf_counter()
        try:
            states = self.stepper.second_phase([state for _, state in finished])
        except Exception as exc:  # noqa: BLE001 - fail these images, keep the loop
            logger.exception("hires fix's second pass failed to start (requests %s)", _request_ids(finished))
            self.model.note_failure(exc)
            states = [GenerationError(f"hires fix failed: {type(exc).__name__}")] * len(finished)
        self.counters.busy_s += time.perf_counter() - started
        for (ticket, first), state in zip(finished, states):
            if isinstance(state, Exception):
                self._finish(ticket, state)
                continue
            ticket.steps_before += first.total_steps
            ticket.steps_after = 0
            self._active.setdefault(self._group_of(state.task), []).append((ticket, state))

    def _step_splitting_on_oom(self, group: list[tuple[Ticket, object]]) -> dict[int, Exception]:
        """One denoiser call over `group`, in halves while the device runs out of memory; failures by ticket id."""
        from .memory import image_does_not_fit, in_halves_while_out_of_memory

        return in_halves_while_out_of_memory(
            group,
            self._step_group,
            alone_too_big=lambda member: {id(member[0]): image_does_not_fit(member[0].task.params)},
            combine=operator.or_,
            device=self.model.device,
        )

    def _step_group(self, group: list[tuple[Ticket, object]]) -> dict[int, Exception]:
        started = time.perf_counter()
        try:
            self.stepper.step([state for _, state in group])
        except self._out_of_memory:
            raise  # split in halves by _step_splitting_on_oom
        except Exception as exc:  # noqa: BLE001 - an unexpected failure fails this call's images, not the loop
            logger.exception("denoiser step failed for %d images (requests %s)", len(group), _request_ids(group))
            self.model.note_failure(exc)
            error = GenerationError(f"image generation failed: {type(exc).__name__}")
            return {id(ticket): error for ticket, _ in group}
        self.counters.busy_s += time.perf_counter() - started
        self.counters.model_calls_by_batch_size[len(group)] += 1
        for ticket, _ in group:
            ticket.batch_size = max(ticket.batch_size, len(group))
        return {}

    def _decode(self, done: list[tuple[Ticket, object]]) -> None:
        started = time.perf_counter()
        try:
            images = self.stepper.decode([state for _, state in done])
        except Exception as exc:  # noqa: BLE001 - fail these images, keep the loop
            logger.exception("VAE decode failed for %d images (requests %s)", len(done), _request_ids(done))
            self.model.note_failure(exc)
            error = GenerationError(f"image decoding failed: {type(exc).__name__}")
            for ticket, _ in done:
                self._finish(ticket, error)
            return
        self.counters.busy_s += time.perf_counter() - started
        for (ticket, _), pixels in zip(done, images):
            self._finish(ticket, ticket.result(pixels))


def _claim_of(ticket: Ticket):
    return ticket.task.claim()


def _size(task: ImageTask) -> tuple[int, int]:
    return task.params.width, task.params.height


def _request_ids(group) -> list[str]:
    return sorted({ticket.task.request_id for ticket, _ in group})


def make_engine(model, kind: Literal["step", "request"], limits: EngineLimits, counters: LoopCounters) -> Engine:
    """The step engine where a stepper of the model's family can step its pipeline (`steppers.make_stepper`),
    whole pipeline calls otherwise (logged, with the reason)."""
    if kind == "step":
        from .steppers import make_stepper

        stepper, reason = make_stepper(model)
        if stepper is not None:
            return StepEngine(model, stepper, limits, counters)
        logger.warning("%s runs whole pipeline calls (engine: request): %s", model.source, reason)
    return RequestEngine(model, limits, counters)
