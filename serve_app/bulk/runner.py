"""A bulk run as one Ray Data pipeline:

    read_datasource(RequestFiles)         rows of the input, each with its index          (read tasks)
    .map_batches(check_rows)              the API's rules, seeds, sort keys; finished rows dropped (tasks)
    .sort(["key", "row"])                 rows that can share model calls next to each other (if they differ)
    .repartition(rows_per_task)           small tasks: spread over the workers, recorded as they finish
    .map_batches(ImageMaker, ActorPool)   one engine per GPU (or CPU slot): images written, entries out
    .write_parquet(OUTPUT/_manifest_parts/RUN)   entries land as rows finish (what a resumed run reads)

then the entries are merged into OUTPUT/manifest.parquet. Ray runs embedded on this machine,
or on the cluster at `address` (or $RAY_ADDRESS); the actor pool grows up to one worker per
GPU there, or per `cpus_per_worker` CPUs (one CPU left for reading and writing) where there
are none.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .manifest import (
    DONE,
    FAILED,
    PARTS_DIR,
    Output,
    check_run_record,
    done_rows,
    entries_table,
    merge,
    new_run_id,
    read_entries,
    write_manifest,
)
from .settings import BulkSettings, InputFormat, SettingsError

logger = logging.getLogger(__name__)

CHECKED_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("fields", pa.string()),
        ("request", pa.string()),
        ("key", pa.string()),
        ("error", pa.string()),
        ("error_code", pa.string()),
        ("error_field", pa.string()),
    ]
)
MAX_ROWS_PER_TASK = 128
LOCAL_RAY_ATTEMPTS = 3
TASKS_PER_WORKER = 4  # at least, when rows are few: every worker gets work, and progress is recorded often


@dataclass
class BulkSummary:
    """What a run did, and where the output stands after it."""

    output: str
    manifest: str
    rows_to_do: int  # rows this run found not done yet
    skipped: int  # rows done by earlier runs
    done: int = 0
    failed: int = 0
    images: int = 0
    seconds: float = 0.0  # the generation stage: workers starting, images made and written, entries recorded
    first_to_last_s: float = 0.0  # from the first row finished to the last
    workers: str = ""
    nodes: list[str] = field(default_factory=list)
    manifest_rows: int = 0
    manifest_failed: int = 0
    failures: list[dict] = field(default_factory=list)  # a few of this run's failed rows

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images per second between the first and the last row finished (no start-up in it)."""
        return (self.images - 1) / self.first_to_last_s if self.first_to_last_s > 0 and self.images > 1 else 0.0

    @property
    def complete(self) -> bool:
        return self.manifest_failed == 0 and self.manifest_rows == self.rows_to_do + self.skipped

    def text(self) -> str:
        rate = f"{self.images} images in {self.seconds:.1f} s"
        if self.images:
            rate += f" ({self.images_per_s:.2f} images/s; {self.steady_images_per_s:.2f} from the first row done to the last)"
        lines = [
            f"bulk: {self.done} rows done, {self.failed} failed, {self.skipped} done before (skipped); {rate}",
            f"workers: {self.workers}; rows ran on {len(self.nodes)} node(s)",
            f"manifest: {self.manifest} ({self.manifest_rows} rows, {self.manifest_failed} failed)",
        ]
        for failure in self.failures:
            lines.append(f"  row {failure['row']}: {failure['error']}")
        if self.failed > len(self.failures):
            lines.append(f"  ... and {self.failed - len(self.failures)} more (status 'failed' in the manifest)")
        return "\n".join(lines)


def run_bulk(
    input_url: str,
    output_url: str,
    settings: BulkSettings,
    *,
    input_format: InputFormat | None = None,
    address: str | None = None,
    progress: bool = True,
) -> BulkSummary:
    """Make every row of `input_url` not yet done in `output_url`; merge the manifest; say what happened."""
    output = Output(output_url)
    input_url = _absolute(input_url)
    check_run_record(output, {"input": input_url, "model": settings.model, "base_seed": settings.base_seed})
    done = done_rows(read_entries(output)[0])
    run_id = new_run_id()
    _connect(address)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    settings, pool = _fit_to_cluster(settings, ray.cluster_resources())
    checked = read_and_check(input_url, input_format, settings, done)
    survey = _survey(checked)
    summary = BulkSummary(output.describe(), "", rows_to_do=survey.rows, skipped=len(done), workers=pool.describe())
    entries = make_entries(checked, survey, settings, pool, output, run_id)
    started = time.perf_counter()
    try:
        if entries is not None:
            entries.write_parquet(f"{_arrow_root(output)}/{PARTS_DIR}/{run_id}", filesystem=output.arrow_fs)
    finally:
        summary.seconds = time.perf_counter() - started
        _finish(output, settings, summary, run_id)
    return summary


def read_and_check(input_url: str, input_format: InputFormat | None, settings: BulkSettings, done: np.ndarray):
    """The rows not done yet, checked, materialized (their count and keys decide what runs next)."""
    import ray.data

    from .source import RequestFiles

    return (
        ray.data.read_datasource(RequestFiles(input_url, input_format))
        .map_batches(
            check_rows, fn_kwargs={"settings": settings, "done": done}, batch_format="pyarrow", batch_size=None
        )
        .materialize()
    )


def make_entries(checked, survey: Survey, settings: BulkSettings, pool: Pool, output: Output, run_id: str):
    """The dataset of manifest entries: refused rows recorded as they are, the others through the workers.
    None when there is nothing to do."""
    import ray.data
    from ray.data.expressions import col

    stages = []
    if survey.refused:  # rows the API would refuse: recorded as failed, no model needed
        refused = checked.filter(expr=col("error").is_not_null())
        stages.append(
            refused.map_batches(
                refused_entries,
                fn_kwargs={"model": settings.model, "run_id": run_id},
                batch_format="pyarrow",
                batch_size=None,
            )
        )
    if survey.accepted:
        rows = checked.filter(expr=col("error").is_null())
        if settings.sort and survey.several_keys:
            rows = rows.sort(["key", "row"])
        rows = rows.repartition(target_num_rows_per_block=_rows_per_task(settings, survey.accepted, pool.max_workers))
        stages.append(
            rows.map_batches(
                _worker_class(),
                fn_constructor_kwargs={"settings": settings, "output": output, "run_id": run_id},
                batch_size=settings.rows_per_call,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    min_size=pool.min_workers,
                    max_size=pool.max_workers,
                    initial_size=pool.max_workers,
                    # One call's images are encoded and written while the next call's are made.
                    max_concurrent_calls_per_actor=2,
                    enable_true_multi_threading=True,
                ),
                num_cpus=pool.cpus,
                num_gpus=pool.gpus or None,
            )
        )
    if not stages:
        return None
    return stages[0].union(*stages[1:]) if len(stages) > 1 else stages[0]


def _finish(output: Output, settings: BulkSettings, summary: BulkSummary, run_id: str) -> None:
    """Merge every entry into the manifest and fill in the summary (also after an interrupted run)."""
    entries, parts = read_entries(output)
    merged = merge(entries)
    summary.manifest = output.describe(write_manifest(output, merged, settings.manifest_format, parts))
    status = np.asarray(merged.column("status").to_pylist(), dtype=object)
    summary.manifest_rows = merged.num_rows
    summary.manifest_failed = int((status == FAILED).sum())
    ours = merged.filter(pc.equal(merged.column("run_id"), run_id))
    if ours.num_rows == 0:
        return
    mine = ours.select(["row", "status", "error", "num_images", "node_id", "finished_at"]).to_pylist()
    summary.done = sum(entry["status"] == DONE for entry in mine)
    summary.failed = sum(entry["status"] == FAILED for entry in mine)
    summary.images = sum(entry["num_images"] or 0 for entry in mine if entry["status"] == DONE)
    summary.nodes = sorted({entry["node_id"] for entry in mine if entry["node_id"]})
    times = [entry["finished_at"] for entry in mine if entry["status"] == DONE]
    if len(times) > 1:
        summary.first_to_last_s = (max(times) - min(times)).total_seconds()
    summary.failures = [entry for entry in mine if entry["status"] == FAILED][:10]


# -- the check stage -------------------------------------------------------------------------


def check_rows(batch: pa.Table, *, settings: BulkSettings, done: np.ndarray) -> pa.Table:
    """Ray Data task: the rows of `batch` not in `done`, checked (`rows.check_row`), with their sort keys."""
    from .rows import check_row

    rows = batch.column("row").to_numpy()
    keep = ~np.isin(rows, done)
    columns = {name: [] for name in CHECKED_SCHEMA.names}
    fields, read_errors = batch.column("fields").to_pylist(), batch.column("read_error").to_pylist()
    for index in np.flatnonzero(keep):
        row, text, read_error = int(rows[index]), fields[index], read_errors[index]
        checked = check_row(
            row,
            text if read_error is not None else json.loads(text),
            settings.limits,
            settings.base_seed,
            settings.row_defaults,
            read_error,
        )
        columns["row"].append(row)
        columns["fields"].append(checked.fields)
        columns["request"].append(checked.request.model_dump_json() if checked.request is not None else None)
        columns["key"].append(checked.key)
        columns["error"].append(checked.error)
        columns["error_code"].append(checked.error_code)
        columns["error_field"].append(checked.error_field)
    return pa.Table.from_pydict(columns, schema=CHECKED_SCHEMA)


@dataclass(frozen=True)
class Survey:
    rows: int
    accepted: int
    refused: int
    several_keys: bool  # accepted rows hold more than one compatibility key: sorting them helps


def _survey(checked) -> Survey:
    """Counts and keys of the checked rows, read from the materialized blocks (no shuffle, unlike
    `Dataset.unique`)."""
    rows = accepted = 0
    keys: set[str] = set()
    for batch in checked.select_columns(["key", "error"]).iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
        ok = pc.is_null(batch.column("error"))
        accepted += pc.sum(ok).as_py() or 0
        if len(keys) < 2:
            keys.update(pc.unique(batch.column("key").filter(ok)).to_pylist())
    return Survey(rows, accepted, rows - accepted, len(keys) > 1)


def refused_entries(batch: pa.Table, *, model: str, run_id: str) -> pa.Table:
    """Ray Data task: manifest entries of rows refused when checked (they never reach a worker)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    now = datetime.now(timezone.utc)
    names = ("row", "error", "error_code", "error_field")
    return entries_table(
        [
            {
                **{name: value for name, value in zip(names, values)},
                "request": fields,
                "status": FAILED,
                "model": model,
                "node_id": node_id,
                "run_id": run_id,
                "finished_at": now,
            }
            for *values, fields in zip(*(batch.column(n).to_pylist() for n in (*names, "fields")))
        ]
    )


# -- the cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    min_workers: int
    max_workers: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        size = (
            f"{self.max_workers}" if self.min_workers == self.max_workers else f"{self.min_workers}-{self.max_workers}"
        )
        each = f"{self.gpus:g} GPU" if self.gpus else f"{self.cpus:g} CPU"
        return f"{size} x ({each})"


def _fit_to_cluster(settings: BulkSettings, resources: dict) -> tuple[BulkSettings, Pool]:
    """The actor pool the cluster's resources allow, and the settings its workers run with."""
    wanted = settings.workers
    total_gpus, total_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    device = settings.pipeline.device
    gpus = wanted.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 and device != "cpu" else 0.0
    if device.startswith("cuda") and (gpus == 0 or total_gpus == 0):
        raise SettingsError(f"device {device!r} needs GPUs, and the Ray cluster has {total_gpus:g}")
    if gpus:
        fits = int(total_gpus // gpus)
    else:
        # One CPU stays free for the read, check and write tasks.
        fits = int((total_cpus - 1) // wanted.cpus_per_worker) if total_cpus > wanted.cpus_per_worker else 1
    max_workers = wanted.max_workers or max(1, fits)
    pool = Pool(min(wanted.min_workers, max_workers), max_workers, wanted.cpus_per_worker, gpus)
    if not gpus and settings.pipeline.torch_threads is None:
        # Ray sets OMP_NUM_THREADS to an actor's CPUs; torch's own default would take every core.
        pipeline = settings.pipeline.model_copy(update={"torch_threads": max(1, int(wanted.cpus_per_worker))})
        settings = settings.model_copy(update={"pipeline": pipeline})
    return settings, pool


def _rows_per_task(settings: BulkSettings, rows: int, workers: int) -> int:
    """Whole worker calls, at most MAX_ROWS_PER_TASK rows (a task's entries are written when it ends:
    what a kill can lose), and few enough that every worker gets TASKS_PER_WORKER of them."""
    if settings.rows_per_task:
        return settings.rows_per_task
    per_call = settings.rows_per_call
    spread = math.ceil(rows / (workers * TASKS_PER_WORKER))
    calls = math.ceil(min(MAX_ROWS_PER_TASK, max(per_call, spread)) / per_call)
    return calls * per_call


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
        try:
            ray.init(address="local", include_dashboard=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node does not start
            # On a loaded machine the raylet gives up waiting for its agent (and dies) now and then.
            if "during startup" not in str(exc) or attempt == LOCAL_RAY_ATTEMPTS:
                raise
            logger.warning("Ray did not start (%s); starting it again (attempt %d)", exc, attempt + 1)
            ray.shutdown()


def _worker_class():
    from .worker import ImageMaker

    return ImageMaker


def _absolute(url: str) -> str:
    """Local paths absolute: read tasks and workers may run in other directories (or on other nodes)."""
    return url if "://" in url else os.path.abspath(url)


def _arrow_root(output: Output) -> str:
    return output.root if output.is_local else output.fs._strip_protocol(output.url).rstrip("/")
