"""Job records and images in a directory or any fsspec URL (a shared filesystem, `s3://...` with s3fs).

    <root>/records/<id>.json        the job record (JobRecord), replaced whole on every change
    <root>/images/<id>/<n>.png      image n, PNG with its generation parameters embedded
    <root>/inputs/<id>.png          the init image of an image-to-image job

Every file is written whole or not at all (written aside, then moved into place), so a reader
never sees half a record and a job that runs again replaces its images instead of adding more.
Blocking I/O: call it off the event loop.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec

from .records import JobRecord, JobStatus, is_job_id


class JobStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        for folder in ("records", "images", "inputs"):
            self.fs.makedirs(self._path(folder), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write(self, path: str, data: bytes) -> None:
        aside = f"{path}.{uuid.uuid4().hex}.part"
        with self.fs.open(aside, "wb") as file:
            file.write(data)
        self.fs.mv(aside, path)

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open(path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    # -- records ------------------------------------------------------------------------------

    def put(self, record: JobRecord) -> None:
        self._write(self._path("records", f"{record.id}.json"), record.model_dump_json().encode())

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        data = self._read(self._path("records", f"{job_id}.json"))
        return None if data is None else JobRecord.model_validate_json(data)

    def ids(self) -> list[str]:
        """Every stored job id, newest first (ids sort by creation time)."""
        names = (posixpath.basename(p) for p in self.fs.ls(self._path("records"), detail=False))
        return sorted((n.removesuffix(".json") for n in names if n.endswith(".json")), reverse=True)

    def list(
        self, status: JobStatus | None = None, owner: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first, after `cursor` (the last id of the previous page); the next cursor, or None at the end."""
        found: list[JobRecord] = []
        ids = self.ids()
        start = 0 if cursor is None else next((i for i, job_id in enumerate(ids) if job_id < cursor), len(ids))
        for position, job_id in enumerate(ids[start:], start):
            record = self.get(job_id)
            if record is None or record.owner != owner or (status is not None and record.status != status):
                continue
            found.append(record)
            if len(found) == limit:
                more = position + 1 < len(ids)
                return found, (job_id if more else None)
        return found, None

    def unfinished(self) -> list[JobRecord]:
        """Jobs that are queued or were running, oldest first: what a new queue holder must take over."""
        records = (self.get(job_id) for job_id in reversed(self.ids()))
        return [r for r in records if r is not None and not r.status.final]

    # -- images ---------------------------------------------------------------------------------

    def put_image(self, job_id: str, index: int, png: bytes) -> str:
        name = f"{index}.png"
        self.fs.makedirs(self._path("images", job_id), exist_ok=True)
        self._write(self._path("images", job_id, name), png)
        return name

    def get_image(self, job_id: str, index: int) -> bytes | None:
        return self._read(self._path("images", job_id, f"{index}.png")) if is_job_id(job_id) else None

    def put_input(self, job_id: str, png: bytes) -> None:
        self._write(self._path("inputs", f"{job_id}.png"), png)

    def get_input(self, job_id: str) -> bytes | None:
        return self._read(self._path("inputs", f"{job_id}.png"))

    # -- retention ------------------------------------------------------------------------------

    def delete(self, job_id: str) -> None:
        for path in (self._path("images", job_id), self._path("inputs", f"{job_id}.png")):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        record = self._path("records", f"{job_id}.json")
        if self.fs.exists(record):
            self.fs.rm(record)

    def size_bytes(self, job_id: str) -> int:
        total = 0
        for path in (self._path("records", f"{job_id}.json"), self._path("inputs", f"{job_id}.png")):
            if self.fs.exists(path):
                total += self.fs.size(path)
        images = self._path("images", job_id)
        if self.fs.exists(images):
            total += sum(self.fs.du(images, total=False).values())
        return total
