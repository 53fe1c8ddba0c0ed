"""`sd-serve`: generate images, run prompt files, check a server, write synthetic models.

Speaks HTTP through `serve_app.client`; never imports torch, Ray or diffusers
(`synth` alone loads them, when it runs).
"""

from __future__ import annotations

import argparse
import asyncio
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

from .client import (
    API_KEY_ENV,
    DEFAULT_URL,
    URL_ENV,
    AsyncSDClient,
    GeneratedImage,
    RetryPolicy,
    SDClient,
    SDServeConnectionError,
    SDServeError,
    SDServeTimeout,
)

SEED_MODULUS = 2**32
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}

EXAMPLES = f"""examples:
  sd-serve generate "a lighthouse at dawn" -o lighthouse.png --seed 42
  sd-serve generate "a red fox in snow" --num-images 4 --size 512x512 --steps 20 -o fox.png
  sd-serve img2img lighthouse.png "the same, at night" --strength 0.6 -o night.png
  sd-serve batch prompts.txt --out-dir out/ --concurrency 8     (run it again to resume)
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
    output_format = args.format or _format_from_suffix(args.output)
    with _client(args) as sd:
        result = sd.generate(args.prompt, num_images=args.num_images, output_format=output_format, **_params(args))
    _save_and_report(result.images, args.output, output_format, result.metadata.warnings)
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    output_format = args.format or _format_from_suffix(args.output)
    if not Path(args.init_image).is_file():
        raise UsageError(f"init image {args.init_image} is not a file")
    with _client(args) as sd:
        result = sd.img2img(
            args.prompt,
            Path(args.init_image),
            strength=args.strength,
            num_images=args.num_images,
            output_format=output_format,
            **_params(args),
        )
    _save_and_report(result.images, args.output, output_format, result.metadata.warnings)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    prompts = read_prompts(Path(args.prompts))
    if not prompts:
        raise UsageError(f"{args.prompts} holds no prompts (one per line; blank lines and # comments are skipped)")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = plan_batch(prompts, out_dir, args.seed, args.num_images, EXTENSIONS[args.format])
    pending = [e for e in entries if not e.done()]
    skipped = sum(len(e.paths) for e in entries) - sum(len(e.paths) for e in pending)
    outcome = asyncio.run(_run_batch(args, pending))
    print(outcome.summary(out_dir, skipped))
    for entry, error in outcome.failures:
        print(f"  line {entry.line} ({entry.prompt[:40]!r}): {error}", file=sys.stderr)
    if outcome.aborted:
        raise outcome.aborted
    return 1 if outcome.failures else 0


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


# -- batch: a prompt file, resumable ------------------------------------------------------------


@dataclass(frozen=True)
class BatchEntry:
    """One line of the prompt file and the files its images go to."""

    line: int
    prompt: str
    seeds: list[int]
    paths: list[Path]

    def done(self) -> bool:
        return all(p.exists() for p in self.paths)


@dataclass
class BatchOutcome:
    written: int = 0
    elapsed_s: float = 0.0
    failures: list[tuple[BatchEntry, SDServeError]] | None = None
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


def plan_batch(
    prompts: list[tuple[int, str]], out_dir: Path, base_seed: int, num_images: int, extension: str
) -> list[BatchEntry]:
    """Seeds and file names follow from the line number, so a second run finds what the first wrote.

    Line n, image i gets seed base + (n-1) x num_images + i and the file NNNNN-SEED.EXT.
    """
    entries = []
    for line, prompt in prompts:
        seeds = [(base_seed + (line - 1) * num_images + i) % SEED_MODULUS for i in range(num_images)]
        paths = [out_dir / f"{line:05d}-{seed}.{extension}" for seed in seeds]
        entries.append(BatchEntry(line, prompt, seeds, paths))
    return entries


async def _run_batch(args: argparse.Namespace, pending: list[BatchEntry]) -> BatchOutcome:
    outcome = BatchOutcome(failures=[])
    params = _params(args, with_seed=False)
    slots = asyncio.Semaphore(args.concurrency)
    progress = tqdm(
        total=sum(len(e.paths) for e in pending), unit="img", desc="generating", file=sys.stderr, disable=args.quiet
    )
    started = time.perf_counter()

    async def run(entry: BatchEntry, sd: AsyncSDClient) -> None:
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _format_from_suffix(output: str | None) -> str:
    return FORMATS_BY_SUFFIX.get(Path(output).suffix.lower(), "png") if output else "png"


def _params(args: argparse.Namespace, with_seed: bool = True) -> dict[str, Any]:
    width, height = args.size or (None, None)
    params = {
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "quality": args.quality,
    }
    if with_seed:
        params["seed"] = args.seed
    return params


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


def _image_options(parser: argparse.ArgumentParser, batch: bool = False) -> None:
    group = parser.add_argument_group("image")
    group.add_argument("--negative", metavar="TEXT", help="negative prompt")
    group.add_argument("--size", type=parse_size, metavar="WxH", help="e.g. 512x512 (default: the model's)")
    group.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    group.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    group.add_argument("--scheduler", help="sampler: euler, euler_a, dpmpp_2m, ... (default: the model's)")
    group.add_argument(
        "--seed",
        type=int,
        default=0 if batch else None,
        help="base seed: line n, image i gets seed + (n-1) x num-images + i (default: 0)"
        if batch
        else "seed of the first image; image i gets seed + i (default: random)",
    )
    group.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    group.add_argument(
        "--format",
        choices=sorted(EXTENSIONS),
        default="png" if batch else None,
        help="image format (default: png" + (")" if batch else ", or from the -o file's suffix)"),
    )
    group.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100 (default: 90)")


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

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
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
    _image_options(generate)
    generate.set_defaults(run=cmd_generate)

    img2img = command("img2img", "image to image", 'sd-serve img2img in.png "the same, at night" --strength 0.6')
    img2img.add_argument("init_image", help="the starting image (PNG, JPEG or WebP)")
    img2img.add_argument("prompt")
    img2img.add_argument("-o", "--output", help="file to write (default: sd-SEED.png here)")
    img2img.add_argument("--strength", type=float, help="0-1: how far to move from the init image (default: 0.75)")
    _image_options(img2img)
    img2img.set_defaults(run=cmd_img2img)

    batch = command(
        "batch",
        "a prompt file, one prompt per line, N requests at a time; run again to resume",
        "sd-serve batch prompts.txt --out-dir out/ --concurrency 8 --size 512x512",
    )
    batch.add_argument("prompts", help="text file: one prompt per line; blank lines and # comments are skipped")
    batch.add_argument("--out-dir", required=True, help="where images go, as NNNNN-SEED.png (NNNNN: line number)")
    batch.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _image_options(batch, batch=True)
    batch.set_defaults(run=cmd_batch)

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
