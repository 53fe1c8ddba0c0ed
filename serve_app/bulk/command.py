"""`sd-serve bulk INPUT OUTPUT` (also `python -m serve_app.bulk INPUT OUTPUT`): every row of a file, on Ray Data.

Loads nothing heavy until it runs: the `sd-serve` CLI builds its parser from `add_arguments`
without importing Ray or torch.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Generate an image for every row of a JSONL, CSV or Parquet file on Ray Data (no HTTP server): "
    "images and a manifest in OUTPUT; run it again on the same OUTPUT to finish what is left."
)
EXAMPLES = """examples:
  sd-serve bulk prompts.jsonl out/ --model stabilityai/sd-turbo
  sd-serve bulk prompts.parquet s3://bucket/run1 --config serve_config.yaml --address auto
  sd-serve bulk prompts.csv out/ --config configs/cpu-demo.yaml --steps 4 --format webp

rows: a `prompt` column, and any field of POST /generate as a column (negative_prompt, width,
height, num_inference_steps, guidance_scale, scheduler, seed, num_images, output_format, quality).
A row without a seed gets --base-seed + its row index (0-based); image i of a row gets seed + i.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of this command, shared with `sd-serve bulk`."""
    from ..cli import parse_size

    parser.add_argument("input", help="JSONL, CSV or Parquet file, a folder of them, or an fsspec URL; one row each")
    parser.add_argument("output", help="folder or fsspec URL: images/ and manifest.parquet (run again to resume)")
    parser.add_argument("--input-format", choices=("jsonl", "csv", "parquet"), help="default: from the file names")

    model = parser.add_argument_group("model (the same sources and options as a Serve config's args)")
    model.add_argument(
        "--config",
        metavar="FILE",
        help="a Serve config: model (its default one, when it lists several), pipeline, defaults and limits of "
        "its first application, batching of its ImageGenerator; the options below override it",
    )
    model.add_argument(
        "--model",
        help="synthetic:<preset>, a Hugging Face repo id, a diffusers folder, or the id of one of --config's models",
    )
    model.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default: the config's, else auto)")
    model.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"))
    model.add_argument("--torch-threads", type=int, metavar="N", help="CPU threads per worker (default: its CPUs)")
    model.add_argument(
        "--engine",
        choices=("step", "request"),
        help="request: whole pipeline calls (the default: sorted rows share them); step: continuous batching "
        "(the default with --no-sort, where neighbouring rows differ). A config's engine is the server's choice",
    )

    rows = parser.add_argument_group("rows (values for rows that leave the column out)")
    rows.add_argument("--base-seed", type=int, default=0, metavar="N", help="row r without a seed: N + r (default 0)")
    rows.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's")
    rows.add_argument("--steps", type=int, metavar="N", help="default: the model's")
    rows.add_argument("--guidance", type=float, metavar="SCALE", help="default: the model's")
    rows.add_argument("--scheduler", help="sampler: euler, euler_a, dpmpp_2m, ... (default: the model's)")
    rows.add_argument("--negative", metavar="TEXT", help="negative prompt")
    rows.add_argument("--format", choices=("png", "jpeg", "webp"), help="image format (default: png)")
    rows.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100 (default: 90)")

    work = parser.add_argument_group("work")
    work.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else Ray on this machine)")
    work.add_argument(
        "--workers",
        metavar="N|MIN-MAX",
        help="engine actors (default: one per GPU in the cluster; without GPUs one per --cpus-per-worker CPUs, "
        "one CPU left for reading and writing)",
    )
    work.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N", help="default: 1")
    work.add_argument("--gpus-per-worker", type=float, metavar="N", help="default: 1 where the cluster has GPUs")
    work.add_argument("--max-batch-size", type=int, metavar="N", help="images per model call (default: 8)")
    work.add_argument("--batch-size", type=int, metavar="N", help="rows per worker call (default: 2 x max-batch-size)")
    work.add_argument("--rows-per-task", type=int, metavar="N", help="rows per Ray Data task (default: up to 128)")
    work.add_argument("--no-sort", action="store_true", help="keep input order (rows are sorted by size etc.)")
    work.add_argument("--manifest-format", choices=("parquet", "jsonl"), default="parquet")
    work.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_settings(args: argparse.Namespace):
    """BulkSettings from the command line (and the Serve config it names)."""
    from pydantic import ValidationError

    from ..config import AppArgs, BatchingConfig, format_validation_error
    from .settings import BulkSettings, SettingsError, serve_config_args

    if args.config:
        app, batching = serve_config_args(args.config)
    elif args.model:
        app, batching = AppArgs(), BatchingConfig()
    else:
        raise SettingsError("say which model to run: --model SOURCE, or --config FILE (a Serve config)")
    if args.model and args.model not in [model.id for model in app.served_models()]:
        # A model source rather than one of the config's model ids: run it with the config's shared options.
        try:
            app = AppArgs.model_validate(
                {**app.model_dump(exclude={"models", "default_model", "refiner"}), "model": args.model}
            )
        except ValidationError as exc:
            problem = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
            if args.config:  # more likely a misspelt id than a source
                ids = ", ".join(model.id for model in app.served_models())
                problem = (
                    f"--model {args.model!r} is not one of {args.config}'s models ({ids}), nor a source: {problem}"
                )
            raise SettingsError(problem) from None
    served = next(model for model in app.served_models() if model.id == (args.model or app.default_model_id))
    pipeline = served.pipeline.model_copy(
        update={
            name: value
            for name, value in (
                ("device", args.device),
                ("dtype", args.dtype),
                ("torch_threads", args.torch_threads),
                ("engine", args.engine or bulk_engine(sort=not args.no_sort)),
            )
            if value is not None
        }
    )
    width, height = args.size or (None, None)
    row_defaults = {
        "width": width,
        "height": height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "negative_prompt": args.negative,
        "output_format": args.format,
        "quality": args.quality,
    }
    settings = {
        "model": served.source,
        "pipeline": pipeline,
        "defaults": served.defaults,
        "limits": served.limits,
        "row_defaults": {k: v for k, v in row_defaults.items() if v is not None},
        "base_seed": args.base_seed,
        "max_batch_size": args.max_batch_size or batching.max_batch_size,
        "max_active_requests": batching.max_active_requests,
        "batch_size": args.batch_size,
        "rows_per_task": args.rows_per_task,
        "workers": {
            **_workers(args.workers),
            "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker,
        },
        "sort": not args.no_sort,
        "manifest_format": args.manifest_format,
    }
    try:
        return BulkSettings.model_validate(settings)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, "bulk settings")) from None


def bulk_engine(sort: bool) -> str:
    """The engine bulk runs when not told. Measured in-process on synthetic:tiny, two calls in flight as
    Ray Data makes them, CPU ms per image (median of 3, engines alternated): uniform rows, request 33.4
    and step 36.4; rows of mixed sizes and steps in input order, step 52.0 and request 56.6; the same
    rows sorted by compatibility key, within noise of each other. Bulk sorts by default, so its batches
    are mostly uniform: whole pipeline calls. Unsorted (--no-sort), neighbouring rows differ, and the
    step engine lets them share UNet calls."""
    return "request" if sort else "step"


def _workers(text: str | None) -> dict:
    if not text:
        return {}
    low, _, high = text.partition("-")
    try:
        return {"min_workers": int(low), "max_workers": int(high or low)}
    except ValueError:
        from .settings import SettingsError

        raise SettingsError(f"--workers takes N or MIN-MAX, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 when every row of the input is done, 1 when some failed (see the manifest), 2 for
    a command that cannot run."""
    from .manifest import OutputMismatchError
    from .settings import SettingsError
    from .source import InputError

    try:
        settings = build_settings(args)
        from .runner import run_bulk

        summary = run_bulk(
            args.input,
            args.output,
            settings,
            input_format=args.input_format,
            address=args.address,
            progress=not args.quiet,
        )
    except (SettingsError, InputError, OutputMismatchError, FileNotFoundError) as exc:
        print(f"sd-serve bulk: error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0 if summary.complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.bulk",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("sd-serve bulk: interrupted; run the same command again to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
