"""Write a synthetic model to a directory that plain diffusers loads.

    python -m serve_app.synthetic tiny ./tiny-sd      (or: sd-serve synth tiny ./tiny-sd)
    python -c "from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained('./tiny-sd')"

Presets: tiny, tiny-xl, tiny-xl-refiner, tiny-sd3, tiny-flux-schnell, tiny-flux-dev (tests, CPU demo) and the
full-size sd15, sd-turbo, sdxl, sd3.5-large, sd3.5-medium, flux.1-schnell (capacity planning on a GPU).

Anyone can then benchmark the same weights with or without this project.
"""

from __future__ import annotations

import argparse
import sys

# Cheap to import: torch and diffusers load only when a pipeline is built.
from .pipeline.synthetic import preset_names, save_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of this command, shared with `sd-serve synth`."""
    parser.add_argument("preset", choices=preset_names(), help="architecture to build")
    parser.add_argument("out_dir", help="directory to write (diffusers format)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (the server's synthetic:<preset> uses 0)")


def run(args: argparse.Namespace) -> int:
    out = save_pipeline(args.preset, args.out_dir, seed=args.seed)
    print(f"wrote synthetic:{args.preset} (seed {args.seed}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.synthetic", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
