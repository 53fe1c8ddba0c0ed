"""The callable class Ray Data runs in its actor pool: one engine per actor, rows in, manifest entries out.

Each actor loads the model once (the project's pipeline layer: `LoadedModel`, the same
model sources and options as the server) and drives it through the engine loop the
server's Generator uses (`EngineLoop`). Ray Data calls it with up to two batches at a
time (`max_concurrent_calls_per_actor=2`), and both go into the one loop: while one
call encodes and writes its images, the other's are being denoised, and the last images
of one batch share model calls with the first of the next. Images are written here, by
the actor that made them, straight to the output; what goes back to Ray Data is one
small manifest entry per row.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

import pyarrow as pa

from ..pipeline.tasks import ImageResult, ImageTask
from ..service.encoding import encode_image, parameters_text
from ..service.generation import image_tasks, stamp
from .manifest import DONE, FAILED, Output, entries_table
from .rows import BulkRequest, image_path
from .settings import BulkSettings

logger = logging.getLogger(__name__)


class ImageMaker:
    """One engine on this actor's device; `__call__` makes and writes the images of a batch of checked rows."""

    def __init__(self, settings: BulkSettings, output: Output, run_id: str):
        import ray

        from ..pipeline.engines import EngineLimits, EngineLoop, LoopCounters, make_engine
        from ..pipeline.model import LoadedModel

        self.settings = settings
        self.output = output
        self.run_id = run_id
        self.model = LoadedModel.load(settings.model, settings.pipeline, settings.defaults)
        self.model.warmup()
        self.counters = LoopCounters()
        limits = EngineLimits(settings.max_batch_size, settings.max_active_requests)
        self.engine = make_engine(self.model, settings.pipeline.engine, limits, self.counters)
        self.loop = EngineLoop(self.engine, self.model.prepare)
        # Outside Ray (a test calling it in-process), asking for the runtime context would start Ray.
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self._folders: set[str] = set()
        logger.info("bulk worker ready on node %s: %s, engine %s", self.node_id, self.model_name, self.engine.kind)

    @property
    def model_name(self) -> str:
        return self.settings.model  # as the server names it in the PNG parameters

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["row", "fields", "request"]).to_pylist()
        requests = [BulkRequest.model_validate_json(row["request"]) for row in rows]
        tasks: list[ImageTask] = []
        owners: list[int] = []
        for index, (row, request) in enumerate(zip(rows, requests)):
            made = image_tasks(request.image_params(), request.num_images, self.settings.limits, f"row-{row['row']}")
            made = stamp(made, request.priority, default="low")  # a row's priority orders it among the run's rows
            tasks.extend(made)
            owners.extend([index] * len(made))
        results = self._generate(tasks)
        images_of: list[list[ImageResult | Exception]] = [[] for _ in rows]
        for owner, result in zip(owners, results):
            images_of[owner].append(result)
        return entries_table([self._entry(*made) for made in zip(rows, requests, images_of)])

    def _generate(self, tasks: list[ImageTask]) -> list[ImageResult | Exception]:
        """Every task through the engine loop; returns when the last one is back."""
        results: list[ImageResult | Exception | None] = [None] * len(tasks)
        if not tasks:
            return []
        remaining = [len(tasks)]
        lock, finished = threading.Lock(), threading.Event()

        def on_done(index: int, result: ImageResult | Exception) -> None:  # on the loop's thread
            results[index] = result
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        self.loop.submit_all(tasks, on_done)
        finished.wait()
        return results

    def _entry(self, row: dict, request: BulkRequest, images: list[ImageResult | Exception]) -> dict:
        failure = next((image for image in images if isinstance(image, Exception)), None)
        # As run (the model's defaults filled in), or as asked where no image came back.
        params = request.image_params() if failure is not None else images[0].params
        entry = {
            "row": row["row"],
            "request": row["fields"],
            **params.model_dump(exclude={"strength"}),
            "num_images": request.num_images,
            "output_format": request.output_format,
            "quality": request.quality,
            "model": self.model_name,
            "node_id": self.node_id,
            "run_id": self.run_id,
        }
        if failure is not None:
            entry.update(
                status=FAILED,
                error=getattr(failure, "message", None) or f"{type(failure).__name__}: {failure}",
                error_code=getattr(failure, "code", "generation_failed"),
                error_field=getattr(failure, "field", None),
            )
        else:
            files = [self._write(row["row"], image, request) for image in images]
            entry.update(
                status=DONE,
                file=files[0],
                files=files,
                batch_size=max(image.batch_size for image in images),
                generation_time_s=max(image.generation_time_s for image in images),
                warnings=sorted({w for image in images for w in image.warnings}),
            )
        entry["finished_at"] = datetime.now(timezone.utc)
        return entry

    def _write(self, row: int, image: ImageResult, request: BulkRequest) -> str:
        data = encode_image(
            image.pixels, request.output_format, request.quality, parameters_text(image.params, self.model_name)
        )
        path = image_path(row, image.seed, request.output_format)
        folder = path.rsplit("/", 1)[0]
        if folder not in self._folders:
            self.output.makedirs(folder)
            self._folders.add(folder)
        self.output.write_bytes(path, data)
        return path
