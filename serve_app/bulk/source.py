"""Ray Data reads the input: JSONL, CSV or Parquet files, each row with its index in the input.

A bulk run needs a stable index for every row (its seed and its file name follow from it,
and a resumed run finds finished rows by it), and Ray Data's own readers give rows no
position. This datasource is Ray Data's file reader (`FileBasedDatasource`: path listing,
any pyarrow or fsspec filesystem, retries, read tasks spread over the cluster) with a
reader per format that numbers the rows it yields: row = the file's offset + the row's
position in it. The offsets come from counting the rows of the files before it (sorted by
path); a single file, the usual case, needs no counting.

A row comes out as `fields` (its JSON, or its raw text where it is not a JSON object) and
`read_error`; checking it against the API's rules is the next stage's work (`rows`).
What counts as a row: JSONL, every line that is not blank; CSV, every record under the
header line (an empty cell means "not given"); Parquet, every row (null: "not given").
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from .settings import InputFormat

FORMATS_BY_SUFFIX: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")
ROWS_PER_BLOCK = 1024
SCHEMA = pa.schema([("row", pa.int64()), ("fields", pa.string()), ("read_error", pa.string())])


class InputError(ValueError):
    """The input cannot be read as rows (unknown format, unreadable file); the message says which."""


def format_of(path: str) -> InputFormat:
    name = PurePosixPath(path).name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    fmt = FORMATS_BY_SUFFIX.get(PurePosixPath(name).suffix)
    if fmt is None:
        known = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise InputError(f"cannot tell the format of {path} from its name ({known}); pass --input-format")
    return fmt


class RequestFiles(FileBasedDatasource):
    """Rows of JSONL, CSV or Parquet files as (row, fields, read_error), row counted across the files."""

    def __init__(self, paths: str | list[str], input_format: InputFormat | None = None, filesystem=None):
        super().__init__(paths, filesystem=filesystem)
        files = sorted(self._paths())
        self._formats = {path: input_format or format_of(path) for path in files}
        self._offsets = {files[0]: 0}
        for before, path in zip(files, files[1:]):
            self._offsets[path] = self._offsets[before] + self._count_rows(before)

    def _count_rows(self, path: str) -> int:
        with self._open_input_source(self._filesystem, path) as f:
            if self._formats[path] == "parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(f).metadata.num_rows
            return sum(1 for _ in _records(self._formats[path], f.readall()))

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._formats[path] == "parquet":  # Parquet needs random access (the footer first)
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        fmt, row = self._formats[path], self._offsets[path]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
                records = [(fields, None) for fields in batch.to_pylist()]
                yield _block(row, records)
                row += len(records)
            return
        chunk = []
        for record in _records(fmt, f.readall()):
            chunk.append(record)
            if len(chunk) == ROWS_PER_BLOCK:
                yield _block(row, chunk)
                row += len(chunk)
                chunk = []
        if chunk:
            yield _block(row, chunk)


def _records(fmt: InputFormat, data: bytes) -> Iterator[tuple[dict | str, str | None]]:
    """(fields, None) for each row, or (raw text, why it is not a row of fields)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"input is not UTF-8 text: {exc}") from None
    if fmt == "jsonl":
        # Not splitlines(): JSON strings may hold U+2028 and other characters it splits on.
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line.rstrip("\r"), f"not JSON: {exc}"
                continue
            if isinstance(fields, dict):
                yield fields, None
            else:
                yield line.rstrip("\r"), f"a row must be a JSON object, not {type(fields).__name__}"
    elif fmt == "csv":
        for record in csv.DictReader(io.StringIO(text, newline="")):
            if None in record:
                record["(extra cells)"] = record.pop(None)
                yield json.dumps(record, ensure_ascii=False), "the row has more cells than the header has columns"
                continue
            yield {name: value for name, value in record.items() if value not in ("", None)}, None
    else:
        raise InputError(f"unknown input format {fmt!r}")


def _block(first_row: int, records: list[tuple[dict | str, str | None]]) -> pa.Table:
    fields = [
        value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str) for value, _ in records
    ]
    return pa.Table.from_arrays(
        [
            pa.array(range(first_row, first_row + len(records)), pa.int64()),
            pa.array(fields, pa.string()),
            pa.array([error for _, error in records], pa.string()),
        ],
        schema=SCHEMA,
    )
