"""Fair admission, tick by tick: the policy (`FairQueue`: deficit round-robin across tenants, then priority, then
arrival) on its own, then driving the step engine through a scripted stepper, the request engine, and the
loop's expected-wait refusal. No model, no sleeps."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest
from helpers import Collector
from scripted import FakeModel, GatedStepper, Harness, job

from serve_app.pipeline.engines import EngineLimits, EngineLoop, LoopCounters, RequestEngine, StepEngine, Ticket
from serve_app.pipeline.errors import OverloadedError
from serve_app.pipeline.fairness import Claim, FairQueue, Tally, allows
from serve_app.pipeline.tasks import ImageResult

Item = tuple  # (name, tenant, priority, cost, weight)


def claim_of(item: Item) -> Claim:
    name, tenant, priority, cost, weight = item
    return Claim(tenant, priority, cost, weight, cost)


def queue_of(*items: Item) -> FairQueue:
    return FairQueue(claim_of, items)


def item(name: str, tenant: str, priority: str = "normal", cost: float = 1.0, weight: float = 1.0) -> Item:
    return (name, tenant, priority, cost, weight)


def heavy(tenant: str, count: int, cost: float = 1.0, weight: float = 1.0, priority: str = "normal") -> list[Item]:
    return [item(f"{tenant}{i}", tenant, priority, cost, weight) for i in range(count)]


def names(items: list[Item]) -> list[str]:
    return [entry[0] for entry in items]


def take_all(queue: FairQueue, room: int = 1) -> list[str]:
    order = []
    while queue:
        order += names(queue.take(room))
    return order


# -- the policy ---------------------------------------------------------------------------------------


def test_tenants_take_turns_whatever_their_backlog():
    queue = queue_of(*heavy("a", 6), item("b0", "b"), item("b1", "b"))
    assert take_all(queue) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


@pytest.mark.parametrize("room", [1, 3, 8])
def test_busy_tenants_share_in_proportion_to_their_weights(room):
    queue = queue_of(*heavy("a", 400, weight=1), *heavy("b", 400, weight=3))
    first = [name[0] for name in take_all(queue, room)[:400]]
    assert Counter(first) == {"a": 100, "b": 300}


def test_shares_are_of_compute_not_of_items():
    """An item costing twice as much (more steps, or guidance rows) uses two turns' worth of credit."""
    queue = queue_of(*heavy("a", 100, cost=8), *heavy("b", 100, cost=4))
    first = [name[0] for name in take_all(queue)[:60]]
    assert Counter(first) == {"a": 20, "b": 40}


def test_within_a_tenant_priority_then_arrival():
    queue = queue_of(item("low", "a", "low"), item("n1", "a"), item("high", "a", "high"), item("n2", "a"))
    assert take_all(queue) == ["high", "n1", "n2", "low"]


def test_a_tenants_priority_does_not_jump_other_tenants():
    queue = queue_of(*heavy("a", 3, priority="high"), *heavy("b", 3, priority="low"))
    assert take_all(queue) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_newcomer_waits_one_turn_not_behind_the_backlog():
    queue = queue_of(*heavy("a", 200))
    assert names(queue.take(5)) == ["a0", "a1", "a2", "a3", "a4"]
    queue.append(item("late", "b"))
    assert "late" in names(queue.take(2))


def test_a_turn_cut_short_by_room_goes_on_at_the_next_take():
    queue = queue_of(*heavy("a", 10, weight=3), *heavy("b", 10, weight=1))
    assert [queue.take(1)[0][1] for _ in range(8)] == list("aaabaaab")


def test_an_item_that_does_not_fit_keeps_its_place_while_others_pass():
    queue = queue_of(item("big", "a"), item("small", "a"), item("other", "b"))
    assert names(queue.take(3, fits=lambda entry: entry[0] != "big")) == ["small", "other"]
    assert names(queue) == ["big"] and names(queue.take(1)) == ["big"]


def test_the_engines_own_order_applies_within_a_tenant_and_priority():
    queue = queue_of(item("long", "a", cost=9), item("short", "a", cost=1))
    assert names(queue.take(1, order=lambda entry: entry[3])) == ["short"]


def test_removed_items_leave_and_a_job_run_again_goes_first():
    queue = queue_of(*heavy("a", 3))
    assert names(queue.remove_if(lambda entry: entry[0] == "a1")) == ["a1"]
    queue.appendleft(item("a9", "a"))
    assert names(queue)[0] == "a9" and take_all(queue) == ["a9", "a0", "a2"] and len(queue) == 0


def test_positions_count_the_tenants_own_items_ahead():
    queue = queue_of(*heavy("a", 3), item("b0", "b"), item("a-high", "a", "high"))
    assert {entry[0]: place for entry, place in queue.positions().items()} == {
        "a-high": 1,
        "a0": 2,
        "a1": 3,
        "a2": 4,
        "b0": 1,
    }


def test_the_work_ahead_of_a_new_item_is_its_tenants_and_a_weighted_share_of_the_others():
    queue = queue_of(*heavy("a", 100, cost=4, weight=1))
    tally = queue.tally()
    light = Claim("b", "normal", 4, 1, 4)
    assert tally.steps_ahead(light) == 8  # itself, and as much of a's as it takes
    assert tally.steps_ahead(dataclasses.replace(light, weight=0.5)) == 12  # half the weight: twice a's share
    assert tally.steps_ahead(Claim("a", "normal", 4, 1, 4)) == 404  # behind all of its own
    assert tally.steps_ahead(Claim("a", "high", 4, 1, 4)) == 4  # ahead of all of its own
    both = tally.with_claim(Claim("c", "low", 2, 1, 2))
    assert both.steps_ahead(light) == 4 + 4 + 2  # c has less than its share waiting: all of it
    assert Tally().steps_ahead(light) == 4


def test_max_priority_allows_what_is_at_or_below_it():
    assert allows("high", "low") and allows("normal", "normal") and not allows("normal", "high")
    assert not allows("low", "normal")


# -- the step engine ----------------------------------------------------------------------------------


def test_a_light_tenant_joins_at_the_next_free_slot_while_the_heavy_backlog_waits():
    h = Harness(max_batch_size=2)
    h.submit(*(job(f"heavy{i}", steps=2, tenant="heavy") for i in range(20)))
    h.tick()
    h.submit(job("light", steps=2, tenant="light"))
    h.tick(3)
    assert isinstance(h.results["light"], ImageResult)
    assert len(h.engine.waiting) >= 14  # most of the backlog that was there first still waits
    fifo = Harness(max_batch_size=2)
    fifo.submit(*(job(f"heavy{i}", steps=2) for i in range(20)), job("light", steps=2))  # one tenant: arrival
    fifo.tick(4)
    assert "light" not in fifo.results


def test_heavy_tenants_share_the_running_set_by_weight():
    h = Harness(max_batch_size=4, max_active_requests=4)
    h.submit(*(job(f"a{i}", steps=1, tenant="a", weight=1) for i in range(60)))
    h.submit(*(job(f"b{i}", steps=1, tenant="b", weight=3) for i in range(60)))
    h.tick(10)
    admitted = Counter(prompt[0] for started in h.stepper.started for prompt in started)
    assert admitted == {"a": 10, "b": 30}
    assert h.counters.admitted_by_tenant == {"a": 10, "b": 30}


def test_weights_hold_when_room_frees_one_image_at_a_time():
    """Images of several steps finish at different ticks: most ticks the size is full and one slot frees now and
    then; a turn interrupted by a full size goes on when room frees."""
    h = Harness(max_batch_size=4, max_active_requests=4)
    h.submit(job("first", steps=1, tenant="a"), job("second", steps=2, tenant="a"), job("third", steps=3, tenant="a"))
    h.submit(*(job(f"a{i}", steps=4, tenant="a", weight=1) for i in range(100)))
    h.submit(*(job(f"b{i}", steps=4, tenant="b", weight=3) for i in range(100)))
    h.tick(80)
    admitted = Counter(prompt[0] for started in h.stepper.started for prompt in started if prompt[-1].isdigit())
    assert admitted["a"] + admitted["b"] >= 60
    assert abs(admitted["b"] / (admitted["a"] + admitted["b"]) - 0.75) <= 0.05


def test_an_admitted_image_steps_every_tick_however_much_arrives():
    h = Harness(max_batch_size=4)
    h.submit(job("first", steps=5, tenant="a", priority="low"))
    for tick in range(5):
        h.tick()
        h.submit(*(job(f"new{tick}-{i}", steps=5, tenant=f"t{i}", priority="high") for i in range(3)))
    assert sum("first" in call for call in h.stepper.calls) == 5 and isinstance(h.results["first"], ImageResult)


def test_a_tenant_with_a_tiny_weight_still_gets_its_turn():
    h = Harness(max_batch_size=1, max_active_requests=1)
    h.submit(*(job(f"big{i}", steps=1, tenant="big", weight=100) for i in range(300)))
    h.submit(job("tiny", steps=1, tenant="tiny", weight=1))
    h.tick(102)
    assert isinstance(h.results["tiny"], ImageResult)


def test_priorities_order_a_tenants_own_images():
    h = Harness(max_batch_size=1, max_active_requests=1)
    h.submit(job("low", steps=1, priority="low"), job("normal", steps=1), job("high", steps=1, priority="high"))
    h.run()
    assert h.stepper.started == [["high"], ["normal"], ["low"]]


def test_guidance_rows_count_in_the_share():
    """Equal weights, equal steps: an image with guidance (two rows per step) costs two of one without."""
    h = Harness(max_batch_size=1, max_active_requests=1)
    h.submit(*(job(f"g{i}", steps=1, tenant="g", guidance_scale=7.5) for i in range(30)))
    h.submit(*(job(f"n{i}", steps=1, tenant="n", guidance_scale=1.0) for i in range(30)))
    h.tick(30)
    assert Counter(prompt[0] for started in h.stepper.started for prompt in started) == {"g": 10, "n": 20}


# -- the request engine -------------------------------------------------------------------------------


class WholeCalls(FakeModel):
    def __init__(self):
        self.calls: list[list[str]] = []

    def groups(self, tasks):
        return [list(range(len(tasks)))]

    def run_prepared(self, members, on_step=None):
        self.calls.append([task.params.prompt for task, _ in members])
        return [ImageResult(np.zeros((8, 8, 3), np.uint8), task.params, len(members), 0.0, w) for task, w in members]


def test_the_request_engine_fills_each_call_by_the_same_rule():
    model = WholeCalls()
    engine = RequestEngine(model, EngineLimits(max_batch_size=4), LoopCounters())
    for task in [job(f"a{i}", tenant="a") for i in range(8)] + [job("b0", tenant="b"), job("b1", tenant="b")]:
        engine.waiting.append(Ticket(task, [], on_done=lambda result: None))
    engine.tick()
    engine.tick()
    assert model.calls == [["a0", "b0", "a1", "b1"], ["a2", "a3", "a4", "a5"]]


# -- refusing by expected wait ------------------------------------------------------------------------


@pytest.fixture
def gated():
    """A loop (one image per call) whose stepper holds each denoiser call until released; stopped after the test."""
    stepper = GatedStepper()
    loop = EngineLoop(
        StepEngine(FakeModel(), stepper, EngineLimits(max_batch_size=1), LoopCounters()), lambda t: (t, [])
    )
    yield loop, stepper
    stepper.release.set()
    loop.stop()


def test_the_expected_wait_counts_only_the_work_ahead_of_this_task(gated):
    loop, stepper = gated
    done = Collector(11)
    loop.submit_all([job(f"heavy{i}", steps=10, tenant="heavy") for i in range(11)], done)
    assert stepper.entered.wait(10)  # one heavy image runs; ten wait: 100 steps
    loop.counters.step_rate = 10.0  # image-steps per second, as if measured
    deadline = time.time() + 5  # 5 s: the whole backlog (11 s) would not fit; its fair share (3 s) does
    light: list = []
    loop.submit(dataclasses.replace(job("light", steps=10, tenant="light"), deadline=deadline), light.append)
    late: list = []
    loop.submit(dataclasses.replace(job("more", steps=10, tenant="heavy"), deadline=deadline), late.append)
    assert not light and loop.counters.refused == 1  # the light one queued
    assert isinstance(late[0], OverloadedError) and "deadline" in late[0].message  # behind its own backlog
    stepper.release.set()
    assert done.all_done.wait(10)


def test_the_loop_reports_images_per_tenant(gated):
    loop, stepper = gated
    done = Collector(3)
    loop.submit_all([job("a0", tenant="a"), job("a1", tenant="a"), job("b0", tenant="b")], done)
    assert stepper.entered.wait(10)
    tenants = loop.tenants()
    assert tenants["a"]["running"] + tenants["b"]["running"] == 1
    assert tenants["a"]["waiting"] + tenants["b"]["waiting"] == 2
    stepper.release.set()
    assert done.all_done.wait(10)
    assert {tenant: counts["admitted"] for tenant, counts in loop.tenants().items()} == {"a": 2, "b": 1}


def test_a_task_expected_just_before_its_deadline_is_refused_the_estimate_is_a_mean(gated):
    loop, stepper = gated
    done = Collector(1)
    loop.submit(job("running", steps=10, tenant="a"), lambda result: done(0, result))
    assert stepper.entered.wait(10)
    loop.counters.step_rate = 10.0  # image-steps per second, as if measured
    # About 2 s of work (10 steps ahead, 10 of its own): inside 2.2 s but past 0.8 of it; inside 3 s with room.
    tight: list = []
    loop.submit(dataclasses.replace(job("tight", steps=10, tenant="b"), deadline=time.time() + 2.2), tight.append)
    assert isinstance(tight[0], OverloadedError) and "deadline" in tight[0].message
    roomy: list = []
    loop.submit(dataclasses.replace(job("roomy", steps=10, tenant="b"), deadline=time.time() + 3.0), roomy.append)
    assert not roomy  # queued
    stepper.release.set()
    assert done.all_done.wait(10)
