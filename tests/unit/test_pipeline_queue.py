"""PipelineQueue (serve_app/generator.py): batches that close while the pipeline is busy run together."""

import asyncio

import pytest

from serve_app.generator import PipelineQueue


class FakePipeline:
    """Records each run; a run lasts until the test releases it."""

    def __init__(self):
        self.runs: list[list[str]] = []
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()

    async def __call__(self, jobs):
        self.runs.append(list(jobs))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await self.release.wait()
        self.running -= 1
        return [f"image of {job}" for job in jobs]


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_batches_that_close_during_a_run_are_merged_into_the_next_one():
    async def scenario():
        pipeline = FakePipeline()
        queue = PipelineQueue(pipeline, max_batch_size=8)
        first = queue.submit(["a1", "a2", "a3"])
        await settle()  # the first run starts at once: the pipeline was idle
        later = queue.submit(["b1", "b2", "b3", "b4", "b5"]) + queue.submit(["c1", "c2", "c3", "c4", "c5"])
        await settle()
        pipeline.release.set()
        results = await asyncio.gather(*first, *later)
        return pipeline, results

    pipeline, results = asyncio.run(scenario())
    assert pipeline.runs == [["a1", "a2", "a3"], ["b1", "b2", "b3", "b4", "b5", "c1", "c2", "c3"], ["c4", "c5"]]
    assert pipeline.most_at_once == 1
    assert results[0] == "image of a1" and results[-1] == "image of c5"


def test_a_job_whose_caller_gave_up_is_never_run():
    async def scenario():
        pipeline = FakePipeline()
        queue = PipelineQueue(pipeline, max_batch_size=8)
        queue.submit(["busy"])
        await settle()
        kept, dropped = queue.submit(["kept", "dropped"])
        dropped.cancel()
        pipeline.release.set()
        return pipeline, await kept

    pipeline, kept = asyncio.run(scenario())
    assert pipeline.runs == [["busy"], ["kept"]] and kept == "image of kept"


def test_a_failed_run_answers_each_of_its_jobs_with_the_error_and_the_queue_goes_on():
    calls = []

    async def flaky(jobs):
        calls.append(jobs)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [f"image of {job}" for job in jobs]

    async def scenario():
        queue = PipelineQueue(flaky, max_batch_size=4)
        failed = await asyncio.gather(*queue.submit(["x", "y"]))
        return failed, await asyncio.gather(*queue.submit(["z"]))

    failed, later = asyncio.run(scenario())
    assert [type(r) for r in failed] == [RuntimeError, RuntimeError] and str(failed[0]) == "device lost"
    assert later == ["image of z"]


@pytest.mark.parametrize("size", [1, 3])
def test_runs_never_exceed_max_batch_size(size):
    async def scenario():
        pipeline = FakePipeline()
        pipeline.release.set()
        queue = PipelineQueue(pipeline, max_batch_size=size)
        await asyncio.gather(*queue.submit([f"j{i}" for i in range(7)]))
        return pipeline

    runs = asyncio.run(scenario()).runs
    assert max(len(run) for run in runs) == size and sum(len(run) for run in runs) == 7
