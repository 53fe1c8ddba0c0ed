"""Images/s by batch size for each model family, at two text lengths, in one run.

    python -m loadtest.families_benchmark                       # tiny presets, CPU, one thread, ~2 min
    python -m loadtest.families_benchmark --batch-sizes 1,4,16 --seconds 5 --device cuda --models sd3.5-medium

For each model (a UNet, SD 3.5, FLUX.1 [schnell] and [dev] by default) the same whole-pipeline calls as
`loadtest.raw_pipeline` (the request engine's path: one diffusers call over a batch of images) at each
batch size. The transformer families read prompts through T5 at `max_sequence_length` tokens, and those
text tokens go through every block beside every row's image tokens: a batch of long texts gains less from
batching than a batch of short ones. So each transformer model is measured at 77 tokens and at its
pipeline's own length (SD3 256; FLUX.1 [schnell] 256, [dev] 512). Reports images/s and the gain over
batch 1; writes families.json and families.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from .raw_pipeline import measure
from .servers import REPO
from .sweep import parse_levels
from .traffic import RequestMix

MODELS = ("synthetic:tiny", "synthetic:tiny-sd3", "synthetic:tiny-flux-schnell", "synthetic:tiny-flux-dev")
SHORT_TEXT = 77


def text_lengths(model: str) -> list[int | None]:
    """None for CLIP-only models (77 tokens, fixed); else 77 and the pipeline's own default."""
    from serve_app.pipeline.families import FAMILIES, family_of_source

    family = FAMILIES.get(family_of_source(model) or "")
    if family is None or not family.reads_t5:
        return [None]
    own = 512 if "dev" in model else 256
    return [SHORT_TEXT, own]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.families_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="model sources, comma-separated")
    parser.add_argument("--batch-sizes", type=parse_levels, default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("families-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    mix = RequestMix.from_specs(sizes=args.size, steps=str(args.steps), negative_share=0.0)

    rows = []
    for model in args.models.split(","):
        for length in text_lengths(model):
            pipeline = {"device": args.device, "torch_threads": args.threads}
            if length is not None:
                pipeline["max_sequence_length"] = length
            print(f"{model}, text {length or 'CLIP 77'} ...", file=sys.stderr, flush=True)
            results = measure(model, pipeline, args.batch_sizes, mix, {"guidance_scale": 0.0}, args.seconds)
            one = results[0].images_per_s
            for r in results:
                rows.append(
                    {
                        "model": model,
                        "text_tokens": length or 77,
                        "batch_size": r.batch_size,
                        "images_per_s": round(r.images_per_s, 2),
                        "gain_over_batch_1": round(r.images_per_s / one, 2),
                    }
                )
    machine = f"{platform.machine()}, {args.device}, {args.threads} thread(s)"
    lines = [
        f"Images/s by batch size ({args.size}, {args.steps} steps, no guidance; whole pipeline calls) on {machine}.",
        "",
        "| model | text tokens | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |",
        "|---|---:|" + "---:|" * len(args.batch_sizes),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for length in dict.fromkeys(r["text_tokens"] for r in rows if r["model"] == model):
            cells = [
                f"{r['images_per_s']:.1f} ({r['gain_over_batch_1']:.2f}x)"
                for r in rows
                if r["model"] == model and r["text_tokens"] == length
            ]
            lines.append(f"| {model} | {length} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "families.json").write_text(json.dumps(rows, indent=2))
    (out / "families.md").write_text(text)
    print(text)
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
