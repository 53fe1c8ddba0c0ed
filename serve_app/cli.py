"""`sd-serve`: generate images, run prompt files, follow jobs, check a server, write synthetic models.

Speaks HTTP through `serve_app.client`; never imports torch, Ray or diffusers
(`synth` alone loads them, when it runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .api.jobs.protocol import JobView
from .client import (
    API_KEY_ENV,
    DEFAULT_URL,
    FINAL_STATES,
    URL_ENV,
    AsyncSDClient,
    GeneratedImage,
    Generation,
    RetryPolicy,
    SDClient,
    SDServeConnectionError,
    SDServeError,
    SDServeTimeout,
)

SEED_MODULUS = 2**32
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
JOB_STATES = ("queued", "running", *FINAL_STATES)
MAX_JOBS_PAGE = 200  # the most GET /jobs returns at once

EXAMPLES = f"""examples:
  sd-serve generate "a lighthouse at dawn" -o lighthouse.png --seed 42
  sd-serve generate "a red fox in snow" --num-images 4 --size 256x256 --steps 20 -o fox.png
  sd-serve img2img lighthouse.png "the same, at night" --strength 0.6 -o night.png
  sd-serve generate "a house" --control edges=photo.png:0.8 --control-preprocess canny -o house.png   (ControlNet)
  sd-serve generate "a castle" --steps 30 --progress           (steps on stderr; the default in a terminal)
  ID=$(sd-serve generate "a castle at night" --async --num-images 2)   (a job: prints its id at once)
  sd-serve job $ID --wait -o castle.png                         (follow it, then write castle-SEED.png)
  sd-serve jobs --status running                                (newest first; --json for all of it)
  sd-serve cancel $ID
  sd-serve prompts prompts.txt --out-dir out/ --concurrency 8   (run it again to resume)
  sd-serve bulk prompts.jsonl out/ --model synthetic:tiny       (no server: Ray Data; run it again to resume)
  sd-serve health
  sd-serve synth tiny ./tiny-sd

The server is --url, else ${URL_ENV}, else {DEFAULT_URL}.
An API key is --api-key, else ${API_KEY_ENV}; it is sent as 'Authorization: Bearer KEY'.
"""


class UsageError(Exception):
    """A mistake in the command line that argparse cannot see (exit status 2)."""


# -- commands ----------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    if args.async_:
        return _submit(args)
    output_format = args.format or _format_from_suffix(args.output)
    with _client(args) as sd:
        if _progress_wanted(args):
            result = _streamed(sd, args, output_format)
        else:
            result = sd.generate(args.prompt, num_images=args.num_images, output_format=output_format, **_params(args))
    _save_and_report(result.images, args.output, output_format, result.metadata.warnings)
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    if not Path(args.init_image).is_file():
        raise UsageError(f"init image {args.init_image} is not a file")
    if args.async_:
        return _submit(args, init_image=Path(args.init_image), strength=args.strength)
    output_format = args.format or _format_from_suffix(args.output)
    with _client(args) as sd:
        if _progress_wanted(args):  # /img2img streams no progress through the client: run it as a job
            images, warnings = _img2img_as_job(sd, args, output_format)
        else:
            result = sd.img2img(
                args.prompt,
                Path(args.init_image),
                strength=args.strength,
                num_images=args.num_images,
                output_format=output_format,
                **_params(args),
            )
            images, warnings = result.images, result.metadata.warnings
    _save_and_report(images, args.output, output_format, warnings)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    jobs: list[JobView] = []
    with _client(args) as sd:
        cursor = None
        while len(jobs) < args.limit:
            page, cursor = sd.jobs(status=args.status, limit=min(args.limit - len(jobs), MAX_JOBS_PAGE), cursor=cursor)
            jobs += page
            if not page or cursor is None:
                break
    if args.json:
        print(json.dumps([job.model_dump(mode="json") for job in jobs], indent=2))
    elif jobs:
        print("\n".join(describe_job_line(job) for job in jobs))
    else:
        print("no jobs" + (f" {args.status}" if args.status else ""), file=sys.stderr)
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    save = args.save or args.output is not None
    if save and args.json:
        raise UsageError("--json shows the job; -o/--save write its images: one or the other")
    output_format = args.format or _format_from_suffix(args.output)
    images: list[GeneratedImage] = []
    warnings: list[str] = []
    with _client(args) as sd:
        job = sd.job(args.id)
        if args.wait and not job.status.final:
            with StepProgress("generating", enabled=args.progress is not False) as progress:
                job = _follow(sd, job, progress)
        if save and job.status == "succeeded":
            images, warnings = _download(sd, job, output_format, args.quality)
    if save and job.status == "succeeded":
        _save_and_report(images, args.output, output_format, warnings)
    elif save and not job.status.final:
        raise SDServeError(f"job {job.id} is {job.status.value}: its images come when it succeeds (add --wait)")
    elif not save:
        print(json.dumps(job.model_dump(mode="json"), indent=2) if args.json else describe_job(job))
    if job.status.final and job.status != "succeeded":
        raise _ended(job)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as sd:
        job = sd.cancel(args.id)
    print(describe_job_line(job))
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    prompts = read_prompts(Path(args.prompts))
    if not prompts:
        raise UsageError(f"{args.prompts} holds no prompts (one per line; blank lines and # comments are skipped)")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = plan_prompts(prompts, out_dir, args.seed, args.num_images, EXTENSIONS[args.format])
    pending = [e for e in entries if not e.done()]
    skipped = sum(len(e.paths) for e in entries) - sum(len(e.paths) for e in pending)
    outcome = asyncio.run(_run_prompts(args, pending))
    print(outcome.summary(out_dir, skipped))
    for entry, error in outcome.failures:
        print(f"  line {entry.line} ({entry.prompt[:40]!r}): {error}", file=sys.stderr)
    if outcome.aborted:
        raise outcome.aborted
    return 1 if outcome.failures else 0


def cmd_batch(args: argparse.Namespace) -> int:
    """`sd-serve batch`, the old name of `prompts` ("batch" now means only the images of one model call)."""
    print("sd-serve batch is now sd-serve prompts; the old name will go", file=sys.stderr)
    return cmd_prompts(args)


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as sd:
        report = sd.health()
    if args.json:
        print(json.dumps({"url": sd.base_url, **asdict(report)}, indent=2))
    else:
        print(describe_health(sd.base_url, report.live, report.ready, report.info))
    return 0 if report.live and report.ready is not False else 1


def cmd_synth(args: argparse.Namespace) -> int:
    from . import synthetic

    return synthetic.run(args)


# -- jobs and progress --------------------------------------------------------------------------


class StepProgress:
    """Denoising steps of a request or job (all its images together) as a bar on stderr.

    The bar appears with the first update; disabled, every call does nothing.
    """

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.num_images = 0

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()

    def _shown(self, total: int | None = None) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="step", desc=self.desc, file=sys.stderr, dynamic_ncols=True)
        return self.bar

    def state(self, text: str) -> None:
        """Where a job is before its steps run: queued (position N), running."""
        if self.enabled:
            self._shown().set_description_str(f"{self.desc} ({text})")

    def event(self, kind: str, data: dict) -> None:
        """One of a job's events: where it is (queued, running), then its steps."""
        if kind == "queued":
            self.state(f"queued, position {data.get('position')}")
        elif kind == "running":
            self.state("running")
        elif kind == "progress":
            self.update(data)

    def update(self, progress: dict) -> None:
        """A progress event: step, total_steps (model evaluations), images_done, num_images."""
        if not self.enabled:
            return
        total = progress.get("total_steps") or 0
        bar = self._shown(total or None)
        bar.set_description_str(self.desc, refresh=False)
        if total > (bar.total or 0):  # grows as each image of the request starts
            bar.total = total
        bar.n = progress.get("step", 0)
        self.num_images = progress.get("num_images") or self.num_images
        if self.num_images:
            bar.set_postfix_str(f"{progress.get('images_done', 0)}/{self.num_images} images", refresh=False)
        bar.refresh()

    def finish(self) -> None:
        """Succeeded: every step ran, even when the last progress events were folded into the result."""
        if self.enabled and self.bar is not None and self.bar.total:
            self.bar.n = self.bar.total
            if self.num_images:
                self.bar.set_postfix_str(f"{self.num_images}/{self.num_images} images", refresh=False)
            self.bar.refresh()


def describe_job_line(job: JobView) -> str:
    """One line: id, status, created (local time), progress or images, the prompt's head."""
    if job.status == "queued":
        state = f"position {job.position}" if job.position else ""
    elif job.status == "running":
        progress = job.progress
        state = f"{progress.step}/{progress.total_steps} steps" if progress else ""
    elif job.status == "succeeded":
        state = _count(len(job.images), "image")
    elif job.status == "failed":
        state = job.error.code if job.error else ""
    else:
        state = ""
    prompt = " ".join(job.params.prompt.split())
    head = prompt if len(prompt) <= 48 else prompt[:45] + "..."
    return f"{job.id}  {job.status.value:<9}  {_local_time(job.created_at)}  {state or '-':<16}  {head}"


def describe_job(job: JobView) -> str:
    """The job in two columns, as `sd-serve health` shows a server."""
    status = job.status.value
    if job.status == "queued" and job.position:
        status += f" (position {job.position} in the queue)"
    elif job.status == "running" and job.progress:
        p = job.progress
        status += f": {p.step}/{p.total_steps} steps, {p.images_done}/{p.num_images} images done"
    params = job.params
    size = f"{params.width}x{params.height}, " if params.width and params.height else ""
    steps = f"{params.num_inference_steps} steps, " if params.num_inference_steps else ""
    guidance = f"guidance {params.guidance_scale}, " if params.guidance_scale is not None else ""
    strength = f", strength {params.strength}" if params.strength is not None else ""
    rows = [
        ("id", job.id),
        ("status", status),
        ("kind", f"{job.kind} ({job.model})" + (f", refined from {job.refined_from}" if job.refined_from else "")),
        ("prompt", params.prompt),
    ]
    if params.negative_prompt:
        rows.append(("negative", params.negative_prompt))
    rows.append(("params", f"{size}{steps}{guidance}sampler {params.scheduler}{strength}"))
    rows.append(("seeds", ", ".join(str(seed) for seed in job.seeds)))
    rows.append(("created", _local_time(job.created_at)))
    if job.started_at:
        rows.append(("started", f"{_local_time(job.started_at)} ({job.started_at - job.created_at:.1f} s queued)"))
    if job.finished_at:
        ran = f", {job.finished_at - job.started_at:.1f} s running" if job.started_at else ""
        rows.append(("finished", f"{_local_time(job.finished_at)}{ran}"))
    if job.attempts > 1:
        rows.append(("attempts", str(job.attempts)))
    if job.error:
        field = f" ({job.error.field})" if job.error.field else ""
        rows.append(("error", f"{job.error.code}: {job.error.message}{field}"))
    for image in job.images:
        batch = image.metadata.get("batch_size")
        rows.append(
            (f"image {image.index}", f"seed {image.seed}, {image.url}" + (f", batch of {batch}" if batch else ""))
        )
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def _submit(args: argparse.Namespace, init_image: Path | None = None, strength: float | None = None) -> int:
    """--async: queue a job, print its id alone on stdout (for ID=$(sd-serve ...)), how to follow it on stderr."""
    ignored = [
        name
        for name, value in (("-o", args.output), ("--format", args.format), ("--quality", args.quality))
        if value is not None
    ]
    if args.progress:
        ignored.append("--progress")
    if ignored:
        raise UsageError(
            f"{', '.join(ignored)}: --async writes no files; fetch the images with `sd-serve job ID --wait -o FILE`"
        )
    with _client(args) as sd:
        job = sd.submit(args.prompt, init_image=init_image, strength=strength, **_job_params(args))
    print(job.id)
    print(
        f"submitted job {job.id} ({job.status.value}); follow it: sd-serve job {job.id} --wait -o FILE", file=sys.stderr
    )
    return 0


def _streamed(sd: SDClient, args: argparse.Namespace, output_format: str) -> Generation:
    """/generate as server-sent events: progress on the bar, then the images (the client retries 503s)."""
    with StepProgress("generating") as progress:
        for kind, data in sd.stream(
            args.prompt, num_images=args.num_images, output_format=output_format, **_params(args)
        ):
            if kind == "progress":
                progress.update(data)
        progress.finish()
    return data  # the last event is ("succeeded", Generation): the client raises on a failure or an early end


def _img2img_as_job(
    sd: SDClient, args: argparse.Namespace, output_format: str
) -> tuple[list[GeneratedImage], list[str]]:
    job = sd.submit(args.prompt, init_image=Path(args.init_image), strength=args.strength, **_job_params(args))
    try:
        with StepProgress("generating") as progress:
            job = _follow(sd, job, progress)
    except KeyboardInterrupt:  # the job would run on without us: stop it (unless it has just ended)
        with contextlib.suppress(SDServeError):
            sd.cancel(job.id)
        raise
    if job.status != "succeeded":
        raise _ended(job)
    return _download(sd, job, output_format, args.quality)


def _follow(sd: SDClient, job: JobView, progress: StepProgress) -> JobView:
    """The job's state and steps on the bar until it ends (the client follows a stream that ends early
    again); then the job as it ended."""
    job = sd.wait(job.id, on_event=progress.event)
    if job.status == "succeeded":
        progress.finish()
    return job


def _download(
    sd: SDClient, job: JobView, output_format: str, quality: int | None
) -> tuple[list[GeneratedImage], list[str]]:
    """The job's images in `output_format`, each with its seed and the size of the model call that made it."""
    images = [sd.download(job.id, image.index, output_format, quality) for image in job.images]
    warnings = [warning for image in job.images for warning in image.metadata.get("warnings") or []]
    return images, list(dict.fromkeys(warnings))


def _ended(job: JobView) -> SDServeError:
    """A job that failed or was canceled, as the error main() reports."""
    reason = f": {job.error.code}: {job.error.message}" if job.error else ""
    return SDServeError(f"job {job.id} {job.status.value}{reason}")


# -- prompts: a prompt file, resumable ----------------------------------------------------------


@dataclass(frozen=True)
class PromptLine:
    """One line of the prompt file and the files its images go to."""

    line: int
    prompt: str
    seeds: list[int]
    paths: list[Path]

    def done(self) -> bool:
        return all(p.exists() for p in self.paths)


@dataclass
class PromptsOutcome:
    written: int = 0
    elapsed_s: float = 0.0
    failures: list[tuple[PromptLine, SDServeError]] | None = None
    aborted: SDServeConnectionError | None = None

    def summary(self, out_dir: Path, skipped: int) -> str:
        rate = self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"{_count(self.written, 'image')} written to {out_dir} in {self.elapsed_s:.1f} s ({rate:.2f} images/s); "
            f"{skipped} already there, skipped; {_count(len(self.failures or []), 'prompt')} failed"
        )


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for every line that is not blank or a # comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(n, text.strip()) for n, text in enumerate(lines, 1) if text.strip() and not text.lstrip().startswith("#")]


def plan_prompts(
    prompts: list[tuple[int, str]], out_dir: Path, base_seed: int, num_images: int, extension: str
) -> list[PromptLine]:
    """Seeds and file names follow from the line number, so a second run finds what the first wrote.

    Line n, image i gets seed base + (n-1) x num_images + i and the file NNNNN-SEED.EXT.
    """
    entries = []
    for line, prompt in prompts:
        seeds = [(base_seed + (line - 1) * num_images + i) % SEED_MODULUS for i in range(num_images)]
        paths = [out_dir / f"{line:05d}-{seed}.{extension}" for seed in seeds]
        entries.append(PromptLine(line, prompt, seeds, paths))
    return entries


async def _run_prompts(args: argparse.Namespace, pending: list[PromptLine]) -> PromptsOutcome:
    outcome = PromptsOutcome(failures=[])
    params = _params(args, with_seed=False)
    slots = asyncio.Semaphore(args.concurrency)
    progress = tqdm(
        total=sum(len(e.paths) for e in pending), unit="img", desc="generating", file=sys.stderr, disable=args.quiet
    )
    started = time.perf_counter()

    async def run(entry: PromptLine, sd: AsyncSDClient) -> None:
        async with slots:
            if outcome.aborted:
                return
            try:
                result = await sd.generate(
                    entry.prompt,
                    seed=entry.seeds[0],
                    num_images=len(entry.seeds),
                    output_format=args.format,
                    **params,
                )
            except SDServeError as exc:
                if isinstance(exc, SDServeConnectionError) and not isinstance(exc, SDServeTimeout):
                    outcome.aborted = outcome.aborted or exc  # the server is gone: stop here, a rerun resumes
                    return
                outcome.failures.append((entry, exc))
                progress.update(len(entry.paths))
                progress.set_postfix(failed=len(outcome.failures))
                return
        for image, path in zip(result.images, entry.paths):
            if not path.exists():
                write_atomically(path, image.data)
                outcome.written += 1
        progress.update(len(entry.paths))

    async with _async_client(args, max_connections=args.concurrency) as sd:
        await asyncio.gather(*(run(entry, sd) for entry in pending))
    progress.close()
    outcome.elapsed_s = time.perf_counter() - started
    outcome.failures.sort(key=lambda failure: failure[0].line)
    return outcome


def write_atomically(path: Path, data: bytes) -> None:
    """An interrupted run never leaves a half-written file that the next run would skip."""
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)


# -- health ------------------------------------------------------------------------------------


def describe_health(url: str, live: bool, ready: bool | None, info: dict[str, Any] | None) -> str:
    ready_text = {True: "yes", False: "NO (no generator replica ready yet)", None: "not reported (no /readyz)"}[ready]
    rows = [("server", url), ("live", "yes" if live else "NO"), ("ready", ready_text)]
    if info:
        generator = info.get("generator") or {}
        limits = info.get("limits") or {}
        rows.append(("model", f"{info.get('model')} ({generator.get('pipeline', '?')})"))
        if generator:
            rows.append(
                ("device", f"{generator.get('device')}, {generator.get('dtype')}, {generator.get('attention')}")
            )
            defaults = generator.get("defaults") or {}
            rows.append(
                (
                    "defaults",
                    f"{defaults.get('width')}x{defaults.get('height')}, {defaults.get('num_inference_steps')} steps, "
                    f"guidance {defaults.get('guidance_scale')}",
                )
            )
            batching = generator.get("batching") or {}
            rows.append(
                (
                    "batching",
                    f"up to {batching.get('max_batch_size')} images per model call, "
                    f"waits {batching.get('batch_wait_timeout_s')} s for company",
                )
            )
            if generator.get("engine"):
                rows.append(("engine", generator["engine"]))
            calls = generator.get("model_calls_by_batch_size") or {}
            if calls:
                rows.append(("calls", ", ".join(f"{n} model calls of {size} images" for size, n in calls.items())))
        if limits:
            rows.append(
                (
                    "limits",
                    f"width {limits.get('min_size')}-{limits.get('max_width')}, "
                    f"height {limits.get('min_size')}-{limits.get('max_height')}, "
                    f"{limits.get('max_steps')} steps, {limits.get('max_num_images')} images per request",
                )
            )
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


# -- helpers -----------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' (or '512' for a square) as (width, height)."""
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
        raise argparse.ArgumentTypeError(f"size must look like 512x512, not {text!r}")
    width = int(match[1])
    return width, int(match[2] or width)


def _local_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _progress_wanted(args: argparse.Namespace) -> bool:
    """--progress / --no-progress, else on when stderr is a terminal."""
    return args.progress if args.progress is not None else sys.stderr.isatty()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _format_from_suffix(output: str | None) -> str:
    return FORMATS_BY_SUFFIX.get(Path(output).suffix.lower(), "png") if output else "png"


def parse_lora(text: str) -> tuple[str, float]:
    name, _, scale = text.partition(":")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE, e.g. ink:0.8 (got {text!r})") from None


def parse_control(text: str) -> dict[str, Any]:
    """NAME=IMAGE[:SCALE] as a ControlNet unit (the image a path; checked to be a file)."""
    name, equals, rest = text.partition("=")
    if not equals or not name or not rest:
        raise argparse.ArgumentTypeError(
            f"expected NAME=IMAGE or NAME=IMAGE:SCALE, e.g. edges=map.png:0.8 (got {text!r})"
        )
    image, colon, scale = rest.rpartition(":")
    unit: dict[str, Any] = {"name": name, "image": rest}
    if colon:
        try:
            unit = {"name": name, "image": image, "scale": float(scale)}
        except ValueError:
            pass  # a path with a colon in it
    if not Path(unit["image"]).is_file():
        raise argparse.ArgumentTypeError(f"control image {unit['image']} is not a file")
    unit["image"] = Path(unit["image"])
    return unit


def _controls(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    if not args.control:
        if args.control_preprocess:
            raise UsageError("--control-preprocess applies to --control images: give one")
        return None
    preprocess = {"preprocess": args.control_preprocess} if args.control_preprocess else {}
    return [{**unit, **preprocess} for unit in args.control]


def _params(args: argparse.Namespace, with_seed: bool = True) -> dict[str, Any]:
    width, height = args.size or (None, None)
    params = {
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "model": args.model,
        "loras": dict(args.lora) if args.lora else None,
        "controlnet": _controls(args),
        "quality": args.quality,
    }
    if with_seed:
        params["seed"] = args.seed
    return params


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    """What POST /jobs takes of the image options (jobs store PNGs: format and quality apply on download)."""
    return {**{k: v for k, v in _params(args).items() if k != "quality"}, "num_images": args.num_images}


def _save_and_report(images: list[GeneratedImage], output: str | None, output_format: str, warnings: list[str]):
    extension = EXTENSIONS[output_format]
    for image in images:
        if output is None:
            path = Path(f"sd-{image.seed}.{extension}")
        elif len(images) == 1:
            path = Path(output)
        else:
            path = Path(output).with_name(f"{Path(output).stem}-{image.seed}{Path(output).suffix or '.' + extension}")
        image.save(path)
        width, height = image.image.size
        print(f"wrote {path} (seed {image.seed}, {width}x{height}, batch of {image.batch_size})")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "url": getattr(args, "url", None),
        "api_key": getattr(args, "api_key", None),
        "timeout_s": getattr(args, "timeout", None) or 300.0,
        "retry": RetryPolicy(max_retries=getattr(args, "retries", 3)),
    }


def _client(args: argparse.Namespace) -> SDClient:
    return SDClient(**_connection(args))


def _async_client(args: argparse.Namespace, max_connections: int) -> AsyncSDClient:
    return AsyncSDClient(**_connection(args), max_connections=max_connections)


# -- argument parsing ------------------------------------------------------------------------


def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """--url and friends, accepted before or after the command (`sd-serve --url U health`, `sd-serve health --url U`).

    The copy on each command has no defaults, so it does not overwrite a value given before the command.
    """
    default = argparse.SUPPRESS if suppress else None
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("server")
    group.add_argument("--url", default=default, help=f"server address (default: ${URL_ENV} or {DEFAULT_URL})")
    group.add_argument("--api-key", default=default, metavar="KEY", help=f"bearer token (default: ${API_KEY_ENV})")
    group.add_argument("--timeout", type=float, default=default, metavar="SECONDS", help="per request (default: 300)")
    group.add_argument(
        "--retries",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS if suppress else 3,
        help="retries of a 503 (server busy), honouring Retry-After (default: 3)",
    )
    return options


def _progress_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=help_text)


def _async_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--async",
        dest="async_",
        action="store_true",
        help="submit it as a job and print the job's id at once (then: sd-serve job ID --wait -o FILE)",
    )


def _image_options(parser: argparse.ArgumentParser, prompt_file: bool = False) -> None:
    group = parser.add_argument_group("image")
    group.add_argument("--negative", metavar="TEXT", help="negative prompt")
    group.add_argument("--size", type=parse_size, metavar="WxH", help="e.g. 512x512 (default: the model's)")
    group.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    group.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    group.add_argument("--scheduler", help="sampler: euler, euler_a, dpmpp_2m, ... (default: the model's)")
    group.add_argument("--model", help="which of the server's models (GET /models; default: its default)")
    group.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        metavar="NAME[:SCALE]",
        help="apply a LoRA adapter at SCALE (default 1); repeat for several",
    )
    group.add_argument(
        "--control",
        type=parse_control,
        action="append",
        metavar="NAME=IMAGE[:SCALE]",
        help="steer the image's structure with ControlNet NAME (GET /controlnets) reading IMAGE at SCALE (default "
        "1); repeat for several",
    )
    group.add_argument(
        "--control-preprocess",
        choices=["none", "canny", "invert", "scribble_xdog"],
        help="make each --control map from its IMAGE on the server (default: none, IMAGE is the map)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0 if prompt_file else None,
        help="base seed: line n, image i gets seed + (n-1) x num-images + i (default: 0)"
        if prompt_file
        else "seed of the first image; image i gets seed + i (default: random)",
    )
    group.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    group.add_argument(
        "--format",
        choices=sorted(EXTENSIONS),
        default="png" if prompt_file else None,
        help="image format (default: png" + (")" if prompt_file else ", or from the -o file's suffix)"),
    )
    group.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100 (default: 90)")


def _prompt_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", help="text file: one prompt per line; blank lines and # comments are skipped")
    parser.add_argument("--out-dir", required=True, help="where images go, as NNNNN-SEED.png (NNNNN: line number)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _image_options(parser, prompt_file=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-serve",
        description="Client for Stable Diffusion on Ray Serve.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_options(suppress=False)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = _connection_options(suppress=True)

    def command(name: str, help_text: str, example: str, listed: bool = True) -> argparse.ArgumentParser:
        """A command; one not `listed` (an old name) runs but is left out of the list: argparse lists
        only the commands given a help text."""
        return commands.add_parser(
            name,
            **({"help": help_text} if listed else {}),
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[shared],
        )

    generate = command("generate", "text to image", 'sd-serve generate "a lighthouse at dawn" -o out.png --seed 42')
    generate.add_argument("prompt")
    generate.add_argument(
        "-o", "--output", help="file to write (several images: NAME-SEED.EXT; default: sd-SEED.png here)"
    )
    _async_option(generate)
    _progress_option(generate, "denoising steps on stderr (default: when stderr is a terminal)")
    _image_options(generate)
    generate.set_defaults(run=cmd_generate)

    img2img = command("img2img", "image to image", 'sd-serve img2img in.png "the same, at night" --strength 0.6')
    img2img.add_argument("init_image", help="the starting image (PNG, JPEG or WebP)")
    img2img.add_argument("prompt")
    img2img.add_argument("-o", "--output", help="file to write (default: sd-SEED.png here)")
    img2img.add_argument("--strength", type=float, help="0-1: how far to move from the init image (default: 0.75)")
    _async_option(img2img)
    _progress_option(img2img, "denoising steps on stderr, running it as a job (default: when stderr is a terminal)")
    _image_options(img2img)
    img2img.set_defaults(run=cmd_img2img)

    prompts_help = "a prompt file, one prompt per line, N requests at a time; run again to resume"
    prompts_example = "sd-serve prompts prompts.txt --out-dir out/ --concurrency 8 --size 512x512"
    prompts = command("prompts", prompts_help, prompts_example)
    _prompt_file_arguments(prompts)
    prompts.set_defaults(run=cmd_prompts)
    batch = command("batch", f"the old name of `sd-serve prompts`: {prompts_help}", prompts_example, listed=False)
    _prompt_file_arguments(batch)
    batch.set_defaults(run=cmd_batch)

    jobs = command("jobs", "list jobs, newest first", "sd-serve jobs --status running --limit 50")
    jobs.add_argument("--status", choices=JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=20, metavar="N", help="at most this many (default: 20)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as the server shows them")
    jobs.set_defaults(run=cmd_jobs)

    job = command(
        "job",
        "one job: its state, progress, error and images; --wait follows it, -o writes its images",
        "sd-serve job $ID --wait -o castle.png",
    )
    job.add_argument("id", help="the job's id (sd-serve generate --async prints it)")
    job.add_argument("--wait", action="store_true", help="follow it until it ends, its steps on stderr")
    job.add_argument(
        "-o", "--output", help="write its images here (several: NAME-SEED.EXT; default with --save: sd-SEED.png here)"
    )
    job.add_argument("--save", action="store_true", help="write its images, as sd-SEED.png unless -o names them")
    job.add_argument(
        "--format", choices=sorted(EXTENSIONS), help="image format (default: png, or from the -o file's suffix)"
    )
    job.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100 (default: 90)")
    job.add_argument("--json", action="store_true", help="print the job as the server shows it")
    _progress_option(job, "with --wait: the bar of denoising steps on stderr (default: on)")
    job.set_defaults(run=cmd_job)

    cancel = command("cancel", "cancel a queued or running job; prints it after", "sd-serve cancel $ID")
    cancel.add_argument("id", help="the job's id")
    cancel.set_defaults(run=cmd_cancel)

    health = command("health", "is the server up and ready; what does it serve", "sd-serve health --json")
    health.add_argument("--json", action="store_true", help="print /healthz, /readyz and /info as JSON")
    health.set_defaults(run=cmd_health)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic model (real architecture, random weights) that diffusers loads",
        description="Write a synthetic model (real architecture, random weights) in diffusers format. "
        "Needs torch and diffusers installed.",
        epilog="example:\n  sd-serve synth tiny ./tiny-sd    (then model: ./tiny-sd in a Serve config)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import synthetic

    synthetic.add_arguments(synth)
    synth.set_defaults(run=cmd_synth)

    from .bulk import command as bulk_command

    bulk = commands.add_parser(
        "bulk",
        help="every row of a JSONL/CSV/Parquet file on Ray Data, no server (resumable)",
        description=bulk_command.DESCRIPTION,
        epilog=bulk_command.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bulk_command.add_arguments(bulk)
    bulk.set_defaults(run=bulk_command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        parser.error(str(exc))
    except SDServeConnectionError as exc:
        print(f"sd-serve: error: {exc} (is the server running? set --url or ${URL_ENV})", file=sys.stderr)
    except SDServeError as exc:
        print(f"sd-serve: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"sd-serve: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("sd-serve: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
