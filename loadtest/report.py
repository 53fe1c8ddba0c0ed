"""Report writers for sweeps and the benchmark: CSV, Markdown tables and a PNG plot.

A *series* maps a label ("server", "baseline") to the sweep results of that
server, one `LevelResult` per concurrency level.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .sweep import LevelResult

if TYPE_CHECKING:
    from .raw_pipeline import RawResult

Series = dict[str, list[LevelResult]]

CSV_FIELDS = (
    "label",
    "concurrency",
    "requests",
    "errors",
    "error_rate",
    "images",
    "seconds",
    "images_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "mean_batch_size",
    "batch_sizes",
    "server_cpu_ms_per_image",
    "server_cpu_ms_per_image_by_process",
    "client_cpu_ms_per_image",
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def batch_sizes_text(result: LevelResult) -> str:
    """ "size:images" pairs, e.g. "1:3 8:120" (0 means the server did not report a size)."""
    return " ".join(f"{size}:{n}" for size, n in sorted(result.batch_sizes.items()))


def cpu_by_process_text(result: LevelResult) -> str:
    """ "process:ms per image" pairs, largest first, e.g. "ImageGenerator:11.2 Ingress:4.1"."""
    shares = sorted(result.cpu_s, key=lambda name: -result.cpu_s[name])
    return " ".join(f"{name}:{result.cpu_ms_per_image(name):.2f}" for name in shares if result.cpu_s[name] > 0)


def csv_rows(series: Series) -> list[dict]:
    return [
        {
            "label": label,
            "concurrency": r.concurrency,
            "requests": r.requests,
            "errors": r.errors,
            "error_rate": round(r.error_rate, 4),
            "images": r.images,
            "seconds": round(r.seconds, 3),
            "images_per_s": round(r.images_per_s, 2),
            "latency_p50_ms": _ms(r.latency_s(50)),
            "latency_p95_ms": _ms(r.latency_s(95)),
            "latency_p99_ms": _ms(r.latency_s(99)),
            "mean_batch_size": round(r.mean_batch_size, 2),
            "batch_sizes": batch_sizes_text(r),
            "server_cpu_ms_per_image": round(r.cpu_ms_per_image(), 2),
            "server_cpu_ms_per_image_by_process": cpu_by_process_text(r),
            "client_cpu_ms_per_image": round(r.client_cpu_ms_per_image, 2),
        }
        for label, results in series.items()
        for r in results
    ]


def write_csv(path: Path, rows: list[dict], fields: tuple[str, ...] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields or rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(series: Series) -> str:
    headers = ["server", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"]
    headers += ["server CPU ms/image", "batch sizes (size:images)"]
    rows = [
        [
            label,
            r.concurrency,
            r.images_per_s,
            _ms(r.latency_s(50)),
            _ms(r.latency_s(95)),
            _ms(r.latency_s(99)),
            f"{r.error_rate:.1%}",
            r.mean_batch_size,
            r.cpu_ms_per_image(),
            batch_sizes_text(r),
        ]
        for label, results in series.items()
        for r in results
    ]
    return markdown(headers, rows)


def raw_table(results: list[RawResult]) -> str:
    rows = [[r.batch_size, r.ms_per_call, r.images_per_s, r.cpu_ms_per_image] for r in results]
    return markdown(["batch size", "ms per call", "images/s", "CPU ms/image"], rows)


def plot(path: Path, series: Series, title: str = "", ceiling: float | None = None) -> Path:
    """Throughput and p95 latency against concurrency, one line per server; the ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, results in series.items():
        levels = [r.concurrency for r in results]
        throughput.plot(levels, [r.images_per_s for r in results], marker="o", label=label)
        latency.plot(levels, [r.latency_s(95) * 1000 for r in results], marker="o", label=label)
    if ceiling:
        throughput.axhline(ceiling, linestyle="--", color="gray", label=f"raw pipeline best ({ceiling:.1f})")
    throughput.set(xlabel="concurrency", ylabel="images/s", title="throughput", ylim=(0, None))
    latency.set(xlabel="concurrency", ylabel="ms", title="p95 latency", ylim=(0, None))
    levels = sorted({r.concurrency for results in series.values() for r in results})
    for axes in (throughput, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.minorticks_off()
        axes.grid(True, alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_sweep_report(out_dir: Path, series: Series, title: str = "", ceiling: float | None = None) -> list[Path]:
    """sweep.csv, sweep.md and sweep.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = out_dir / "sweep.md"
    markdown_path.write_text((f"# {title}\n\n" if title else "") + sweep_table(series) + "\n")
    return [
        write_csv(out_dir / "sweep.csv", csv_rows(series), CSV_FIELDS),
        markdown_path,
        plot(out_dir / "sweep.png", series, title, ceiling),
    ]
