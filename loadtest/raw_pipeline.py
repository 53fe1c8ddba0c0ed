"""The raw pipeline, in-process, at fixed batch sizes: the ceiling one replica can reach.

    python -m loadtest.raw_pipeline --model synthetic:tiny --device cpu --threads 1 --batch-sizes 1,2,4,8,16

Calls `LoadedModel.generate` (the pipeline layer the server's generator
calls: defaults, grouping, one diffusers call per group, uint8 output) with
`batch_size` jobs drawn from the same request mix as the load tests, again
and again for a few seconds per batch size. No HTTP, no Ray, no encoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from .traffic import RequestMix, RequestStream


@dataclass
class RawResult:
    batch_size: int
    calls: int
    images: int
    seconds: float
    cpu_s: float = 0.0  # CPU time of this process over the same calls

    @property
    def cpu_ms_per_image(self) -> float:
        return self.cpu_s * 1000 / self.images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def ms_per_call(self) -> float:
        return self.seconds / self.calls * 1000


def job_from_body(body: dict):
    """The job a native /generate body makes (its image parameters; output options aside)."""
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    return ImageTask(ImageParams.model_validate({k: v for k, v in body.items() if k in ImageParams.model_fields}))


def measure(
    model: str,
    pipeline: dict,
    batch_sizes: list[int],
    mix: RequestMix,
    defaults: dict | None = None,
    seconds_per_size: float = 3.0,
    min_calls: int = 3,
    seed: int = 0,
) -> list[RawResult]:
    """Images/s at each batch size; the model is loaded once, warmed up, and released at the end.

    `pipeline` and `defaults` are a Serve config's `args.pipeline` and `args.defaults`: the same
    device, dtype, threads and optimisations, and the same parameters for what requests leave out.
    """
    import gc

    import torch

    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel
    from serve_app.pipeline.params import GenerationDefaults

    threads_before = torch.get_num_threads()
    loaded = LoadedModel.load(
        model, PipelineOptions.model_validate(pipeline), GenerationDefaults.model_validate(defaults or {})
    )
    loaded.warmup()
    stream = RequestStream(mix, seed=seed)
    results = []
    try:
        for batch_size in batch_sizes:
            batches = [[job_from_body(stream.next().body) for _ in range(batch_size)] for _ in range(8)]
            loaded.generate(batches[-1])  # first call at a new shape pays for allocation
            calls = images = 0
            started, cpu_started = time.perf_counter(), time.process_time()
            while calls < min_calls or time.perf_counter() - started < seconds_per_size:
                results_of_call = loaded.generate(batches[calls % len(batches)])
                _synchronize(loaded)
                failed = [r for r in results_of_call if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
                calls += 1
                images += len(results_of_call)
            seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            results.append(RawResult(batch_size, calls, images, seconds, cpu_s))
    finally:
        del loaded
        gc.collect()
        torch.set_num_threads(threads_before)  # the caller's process goes on as before
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the GPU to the servers measured next
    return results


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize(model.device)


def main(argv: list[str] | None = None) -> int:
    from .report import raw_table
    from .sweep import add_mix_arguments, mix_from_arguments, parse_levels

    parser = argparse.ArgumentParser(prog="python -m loadtest.raw_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="synthetic:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--batch-sizes", type=parse_levels, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per batch size")
    add_mix_arguments(parser)
    args = parser.parse_args(argv)
    pipeline = {"device": args.device, "dtype": args.dtype, "torch_threads": args.threads}
    results = measure(
        args.model, pipeline, args.batch_sizes, mix_from_arguments(args), seconds_per_size=args.seconds, seed=args.seed
    )
    print(raw_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
