"""Unbatched baseline: the common tutorial pattern, one FastAPI process, one request at a time.

A benchmark baseline only, not part of the product. A synchronous FastAPI
endpoint calls one shared diffusers pipeline for each request. The lock is the
one thing added to the tutorial: without it, concurrent calls corrupt the
scheduler's step index and most requests fail (see ENVIRONMENT.md). It speaks
the same `POST /generate` as the real server, so the same request mix runs
against both.

    python -m loadtest.baseline_server --model synthetic:tiny --port 8100 --threads 1

Weights and per-model defaults are loaded with the project's loader, so the
baseline and the server run exactly the same model; everything about serving
(no batching, no queueing policy, encoding on the request thread) is the
tutorial's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import secrets
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from serve_app.pipeline.loading import ModelSource, PipelineOptions, load_pipeline
from serve_app.pipeline.model import model_defaults
from serve_app.pipeline.params import GenerationDefaults, ImageParams

# The server's PNG level (serve_app/api/encoding.py), so the comparison measures serving, not zlib.
PNG_COMPRESS_LEVEL = 1


class BaselineRequest(ImageParams):
    response_format: str = "image"


def create_app(model: str, options: PipelineOptions, overrides: dict | None = None) -> FastAPI:
    """`overrides`: a Serve config's `args.defaults`, so that requests leaving a parameter out get the same."""
    pipe = load_pipeline(ModelSource.parse(model), options)
    defaults = GenerationDefaults.model_validate(overrides or {}).over(model_defaults(pipe, ModelSource.parse(model)))
    lock = threading.Lock()
    app = FastAPI(title="Unbatched baseline (benchmark only)")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: BaselineRequest):  # sync: FastAPI runs it on its thread pool
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        params = body.with_defaults(defaults)
        with lock:
            started = time.perf_counter()
            image = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt or None,
                width=params.width,
                height=params.height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            seconds = time.perf_counter() - started
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        if body.response_format == "json":
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            return JSONResponse({"images": [{"b64": data, "seed": seed, "batch_size": 1}]})
        headers = {"X-Seed": str(seed), "X-Batch-Size": "1", "X-Generation-Time-S": f"{seconds:.4f}"}
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="synthetic:tiny", help="model source, as in a Serve config's args.model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (the server's generator: 1)")
    parser.add_argument("--defaults", type=json.loads, default={}, help="JSON, e.g. '{\"num_inference_steps\": 1}'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    options = PipelineOptions(device=args.device, dtype=args.dtype, torch_threads=args.threads)
    app = create_app(args.model, options, args.defaults)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
