"""Job records and images in a directory or any fsspec URL (`s3://bucket/prefix` with s3fs, a shared filesystem).

    <root>/records/<id>.json                   the job record (JobRecord), replaced whole on every change
    <root>/images/<id>/<n>.png                 image n, PNG with its generation parameters embedded
                                               (<n>.jpeg/.webp beside it when an answer linked that format)
    <root>/inputs/<id>.png                     the init image of an image-to-image job
    <root>/inputs/<id>.control-<n>.png         the control map of its ControlNet unit n (preprocessed, at size)
    <root>/by_owner/<owner>/<~id>              every job of an owner (empty marker)
    <root>/by_status/<owner>/<status>/<~id>    finished jobs by final status (empty marker, written as they end)
    <root>/unfinished/<~id>                    jobs queued or running (empty marker, removed as they end)
    <root>/layout.json                         which layout this is (the markers exist for every record)
    <root>/quota/<day>/<tenant>/<writer>.json  images a tenant was granted that UTC day, as one ingress replica
                                               counted them (`{"images": n}`; the day's total is their sum)

`~id` is the id with every hex digit inverted (0<->f): names sort newest first, so a page of a listing
is one ordered listing call that starts after the cursor (S3's ListObjectsV2 `StartAfter`) and reads
only the records of that page; nothing on the request path lists or reads a whole store. `<owner>` is
the hash of the caller's API key (`_` without keys).

Every file is written whole or not at all, so a reader never sees half a record or half an image:
on an object store one PUT is atomic; on a local or shared filesystem it is written aside and renamed
into place. A job that runs again replaces its images instead of adding more. Blocking I/O: call it
off the event loop.
"""

from __future__ import annotations

import functools
import json
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable

import fsspec

from ..pipeline.params import MAX_CONTROLNET_UNITS
from .records import JobImage, JobRecord, JobStatus, is_job_id

LAYOUT = {"layout": 2, "markers": ["by_owner", "by_status", "unfinished"]}
_STORAGE_OPTIONS = {
    # SigV4 presigned URLs: what every region and S3-compatible server accepts (botocore may pick SigV2).
    "s3": {"config_kwargs": {"signature_version": "s3v4"}},
}
_INVERT = str.maketrans("0123456789abcdef", "fedcba9876543210")
NO_OWNER = "_"

Observer = Callable[[str, float, BaseException | None], None]


class StoreUnavailable(RuntimeError):
    """The store cannot be used: one line naming its URL and why."""


def inverted(job_id: str) -> str:
    """The id with each hex digit inverted: sorts in the opposite order (its own inverse)."""
    return job_id.translate(_INVERT)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def missing_backend(url: str) -> str | None:
    """Why `url`'s fsspec filesystem cannot be loaded here (a package not installed, an unknown
    protocol), in one line naming the URL and the package; None when it can."""
    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        from fsspec.registry import known_implementations

        known = known_implementations.get(protocol, {})
        package = known.get("class", protocol).split(".", 1)[0]
        extra = " (or this project's extra: pip install 'ray-sd-serve[s3]')" if protocol in ("s3", "s3a") else ""
        return (
            f"{url}: the {protocol}:// filesystem needs the package '{package}', which is not installed here: "
            f"pip install {package}{extra}"
        )
    except ValueError as exc:
        return f"{url}: {exc}"
    return None


def _measured(op: str):
    """Time the method and report it (and any error but 'not found') to the store's observer."""

    def wrap(method):
        @functools.wraps(method)
        def timed(self: JobStore, *args, **kwargs):
            if self.observe is None:
                return method(self, *args, **kwargs)
            started = time.perf_counter()
            error = None
            try:
                return method(self, *args, **kwargs)
            except FileNotFoundError:
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.observe(op, time.perf_counter() - started, error)

        return timed

    return wrap


class JobStore:
    def __init__(self, url: str, observe: Observer | None = None):
        problem = missing_backend(url)
        if problem is not None:
            raise StoreUnavailable(f"job store {problem}")
        self.url = url
        self.observe = observe
        self.fs, self.root = fsspec.core.url_to_fs(url, **_STORAGE_OPTIONS.get(protocol_of(url), {}))
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        self.is_s3 = "s3" in protocols
        if self.is_local:
            for folder in ("records", "images", "inputs", "by_owner", "by_status", "unfinished"):
                self.fs.makedirs(self._path(folder), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- bytes --------------------------------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        self._write_many({path: data})

    def _write_many(self, files: dict[str, bytes]) -> None:
        """Each file whole or not at all; on an object store all in one concurrent round of PUTs."""
        if not self.is_local:
            self.fs.pipe(files)
            return
        for path, data in files.items():
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            aside = f"{path}.{uuid.uuid4().hex}.part"
            with self.fs.open(aside, "wb") as file:
                file.write(data)
            self.fs.mv(aside, path)

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _read_many(self, paths: list[str]) -> dict[str, bytes]:
        """The files that exist, read concurrently on an object store."""
        if not paths:
            return {}
        if self.is_local:
            found = {path: self._read(path) for path in paths}
            return {path: data for path, data in found.items() if data is not None}
        found = self.fs.cat(paths, on_error="return")
        if not isinstance(found, dict):  # one path: fsspec answers with its bytes
            found = {paths[0]: found}
        errors = [e for e in found.values() if isinstance(e, Exception) and not isinstance(e, FileNotFoundError)]
        if errors:
            raise errors[0]
        return {path: data for path, data in found.items() if isinstance(data, bytes)}

    def _remove(self, paths: Iterable[str]) -> None:
        """Delete files; those already gone are no error."""
        paths = list(paths)
        if not self.is_local:
            if paths:
                self.fs.rm(paths)  # one bulk delete; missing keys are not errors on S3
            return
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def _remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    # -- ordered listings ---------------------------------------------------------------------------

    def _names_after(self, folder: str, start_after: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` names in `folder` (not recursive), ascending, after `start_after`; and whether more follow."""
        if self.is_s3:
            names = self._s3_names(folder, start_after, stop_at=None, limit=limit + 1)
        else:
            names = [n for n in self._all_names(folder) if start_after is None or n > start_after][: limit + 1]
        return names[:limit], len(names) > limit

    def _names_before(self, folder: str, stop_at: str) -> list[str]:
        """Every name in `folder` below `stop_at`, ascending (the listing stops there)."""
        if self.is_s3:
            return self._s3_names(folder, None, stop_at=stop_at, limit=None)
        return [n for n in self._all_names(folder) if n < stop_at]

    def _all_names(self, folder: str) -> list[str]:
        path = self._path(folder)
        if not self.is_local:
            self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")
        return sorted(name for name in names if not name.endswith(".part"))  # .part: a local write in progress

    def _s3_names(self, folder: str, start_after: str | None, stop_at: str | None, limit: int | None) -> list[str]:
        """ListObjectsV2 from `start_after`, a page of at most 1000 keys at a time, until `limit` names or `stop_at`."""
        bucket, _, key = self._path(folder).partition("/")
        prefix = f"{key}/"
        names: list[str] = []
        request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        if start_after is not None:
            request["StartAfter"] = prefix + start_after
        while True:
            if limit is not None:
                request["MaxKeys"] = min(1000, limit - len(names))
            try:
                page = self.fs.call_s3("list_objects_v2", **request)
            except FileNotFoundError:
                return names
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if stop_at is not None and name >= stop_at:
                    return names
                names.append(name)
            if not page.get("IsTruncated") or (limit is not None and len(names) >= limit):
                return names
            request["ContinuationToken"] = page["NextContinuationToken"]

    # -- records ------------------------------------------------------------------------------------

    def _record_path(self, job_id: str) -> str:
        return self._path("records", f"{job_id}.json")

    def _markers(self, record: JobRecord) -> dict[str, str]:
        owner = record.owner or NO_OWNER
        name = inverted(record.id)
        return {
            "owner": self._path("by_owner", owner, name),
            "status": self._path("by_status", owner, record.status.value, name),
            "unfinished": self._path("unfinished", name),
        }

    @_measured("put_record")
    def put(self, record: JobRecord) -> None:
        """Store the record. A new job (queued, never run) is indexed in the same round of writes; a finished
        one is indexed by its final status first, so whoever reads the final record finds it listed, and leaves
        the unfinished jobs last (a crash in between leaves a marker the next queue holder drops)."""
        files = {self._record_path(record.id): record.model_dump_json().encode()}
        markers = self._markers(record)
        if record.status.final:
            self._write_many({markers["owner"]: b"", markers["status"]: b""})
            self._write_many(files)
            self._remove([markers["unfinished"]])
        elif record.status == JobStatus.queued and record.attempts == 0:
            files.update({markers["owner"]: b"", markers["unfinished"]: b""})
            self._write_many(files)
        else:
            self._write_many(files)

    @_measured("get_record")
    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        data = self._read(self._record_path(job_id))
        return None if data is None else JobRecord.model_validate_json(data)

    def _get_many(self, job_ids: list[str]) -> dict[str, JobRecord]:
        found = self._read_many([self._record_path(job_id) for job_id in job_ids])
        records = (JobRecord.model_validate_json(data) for data in found.values())
        return {record.id: record for record in records}

    @_measured("list")
    def list(
        self, status: JobStatus | None = None, owner: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs newest first, after `cursor` (the last id of the previous page); the next cursor,
        or None at the end. One ordered listing call and the page's records: the store's size does not matter.
        Queued or running jobs are found among the unfinished ones (at most `jobs.max_queued`)."""
        start = None if cursor is None or not is_job_id(cursor) else inverted(cursor)
        if status in (JobStatus.queued, JobStatus.running):
            return self._list_unfinished(status, owner, limit, start)
        folder = posixpath.join("by_owner", owner or NO_OWNER)
        if status is not None:
            folder = posixpath.join("by_status", owner or NO_OWNER, status.value)
        names, more = self._names_after(folder, start, limit)
        ids = [inverted(name) for name in names]
        records = self._get_many(ids)
        page = [
            records[i]
            for i in ids
            if i in records and records[i].owner == owner and (status is None or records[i].status == status)
        ]
        return page, (ids[-1] if more and ids else None)

    def _list_unfinished(
        self, status: JobStatus, owner: str | None, limit: int, start: str | None
    ) -> tuple[list[JobRecord], str | None]:
        found: list[JobRecord] = []
        while True:
            names, more = self._names_after("unfinished", start, max(limit, 50))
            records = self._get_many([inverted(name) for name in names])
            for position, name in enumerate(names):
                record = records.get(inverted(name))
                if record is None or record.owner != owner or record.status != status:
                    continue
                found.append(record)
                if len(found) == limit:
                    return found, (record.id if more or position + 1 < len(names) else None)
            if not more:
                return found, None
            start = names[-1]

    def unfinished(self) -> list[JobRecord]:
        """Jobs that are queued or were running, oldest first: what a new queue holder must take over.
        Markers of jobs that ended (or were never stored: a submit cut short) are removed."""
        names = list(reversed(self._names_before("unfinished", "g")))  # every name: "g" sorts after hex
        records = self._get_many([inverted(name) for name in names])
        taken, stale = [], []
        for name in names:
            record = records.get(inverted(name))
            if record is None or record.status.final:
                stale.append(self._path("unfinished", name))
            else:
                taken.append(record)
        self._remove(stale)
        return taken

    def ids(self) -> list[str]:
        """Every stored job id, newest first (a whole listing of records/: not for the request path)."""
        names = self._names_before("records", "g")
        return sorted((n.removesuffix(".json") for n in names if n.endswith(".json")), reverse=True)

    @_measured("list_expired")
    def ids_before(self, when: float) -> list[str]:
        """Ids of jobs submitted before `when` (seconds since the epoch), oldest first. On S3 the listing stops
        at the first younger id: a sweep reads what it deletes, not the whole store."""
        horizon = f"{max(0, int(when * 1000)):012x}"
        names = self._names_before("records", horizon)
        return [n.removesuffix(".json") for n in names if n.endswith(".json") and is_job_id(n.removesuffix(".json"))]

    # -- images ---------------------------------------------------------------------------------------

    def _image_path(self, job_id: str, index: int, fmt: str = "png") -> str:
        return self._path("images", job_id, f"{index}.{fmt}")

    @_measured("put_image")
    def put_image(self, job_id: str, index: int, data: bytes, fmt: str = "png") -> str:
        self._write(self._image_path(job_id, index, fmt), data)
        return f"{index}.{fmt}"

    @_measured("put_image")
    def put_images(self, job_id: str, images: dict[str, bytes]) -> None:
        """Several images at once ({file name: bytes}), concurrently on an object store."""
        self._write_many({self._path("images", job_id, name): data for name, data in images.items()})

    @_measured("get_image")
    def get_image(self, job_id: str, index: int, fmt: str = "png") -> bytes | None:
        return self._read(self._image_path(job_id, index, fmt)) if is_job_id(job_id) else None

    @_measured("put_image")
    def put_input(self, job_id: str, png: bytes) -> None:
        self._write(self._path("inputs", f"{job_id}.png"), png)

    @_measured("get_image")
    def get_input(self, job_id: str) -> bytes | None:
        return self._read(self._path("inputs", f"{job_id}.png"))

    def _control_path(self, job_id: str, index: int) -> str:
        return self._path("inputs", f"{job_id}.control-{index}.png")

    @_measured("put_image")
    def put_controls(self, job_id: str, pngs: list[bytes]) -> None:
        """The control maps of a job's ControlNet units, in unit order."""
        self._write_many({self._control_path(job_id, i): png for i, png in enumerate(pngs)})

    @_measured("get_image")
    def get_controls(self, job_id: str, count: int) -> list[bytes] | None:
        """The job's `count` control maps, or None if one is missing."""
        paths = [self._control_path(job_id, i) for i in range(count)]
        found = self._read_many(paths)
        return [found[path] for path in paths] if len(found) == count else None

    @property
    def can_presign(self) -> bool:
        return not self.is_local

    @_measured("presign")
    def presigned_url(self, job_id: str, index: int, expires_s: float, fmt: str = "png") -> str:
        """A URL of the stored image that needs no credentials until it expires (the object store signs it;
        no request is made)."""
        return self.fs.sign(self._image_path(job_id, index, fmt), expiration=int(expires_s))

    # -- retention ------------------------------------------------------------------------------------

    @_measured("delete")
    def delete(self, job_id: str, only_final: bool = False) -> bool:
        """Delete a job's images, input, markers and record (the record last: a sweep cut short finds it
        again). With `only_final`, a job whose record says it has not ended is kept (False)."""
        record = self.get(job_id)
        if only_final and record is not None and not record.status.final:
            return False
        self._remove_tree(self._path("images", job_id))
        files = [self._path("inputs", f"{job_id}.png"), self._path("unfinished", inverted(job_id))]
        units = len(record.params.controlnet) if record is not None else MAX_CONTROLNET_UNITS
        files += [self._control_path(job_id, i) for i in range(units)]
        if record is not None:
            markers = self._markers(record)
            files += [markers["owner"], markers["status"]]
        self._remove(files)
        self._remove([self._record_path(job_id)])
        return True

    def size_bytes(self, job_id: str) -> int:
        """Bytes of one job: record, input and images."""
        total = 0
        controls = [self._control_path(job_id, i) for i in range(MAX_CONTROLNET_UNITS)]
        for path in (self._record_path(job_id), self._path("inputs", f"{job_id}.png"), *controls):
            try:
                total += self.fs.size(path)
            except FileNotFoundError:
                pass
        return total + sum(self._sizes(self._path("images", job_id)).values())

    def _sizes(self, folder: str) -> dict[str, int]:
        """Size of every file under `folder`, from one recursive listing."""
        if not self.is_local:
            self.fs.invalidate_cache(folder)
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return {}
        return {path: int(info.get("size") or 0) for path, info in found.items() if not path.endswith(".part")}

    @_measured("usage")
    def usage(self) -> dict[str, int]:
        """Bytes per job id (record, input, images), from one recursive listing with sizes per folder:
        the byte cap's sweep, in the background."""
        sizes: dict[str, int] = {}
        for folder in ("records", "inputs", "images"):
            base = self._path(folder)
            for path, size in self._sizes(base).items():
                job_id = path[len(base) + 1 :].split("/", 1)[0].split(".", 1)[0]
                if is_job_id(job_id):
                    sizes[job_id] = sizes.get(job_id, 0) + size
        return sizes

    # -- daily quotas ---------------------------------------------------------------------------------

    @_measured("put_quota")
    def put_quota_count(self, day: str, tenant: str, writer: str, images: int) -> None:
        """The images `writer` (one ingress replica) granted `tenant` on `day` (YYYY-MM-DD, UTC), replaced whole."""
        self._write(self._path("quota", day, tenant, f"{writer}.json"), json.dumps({"images": images}).encode())

    @_measured("get_quota")
    def quota_counts(self, day: str) -> dict[str, dict[str, int]]:
        """Every writer's count of `day`, by tenant: {tenant: {writer: images}} (one listing, then the files)."""
        folder = self._path("quota", day)
        paths = [path for path in self._sizes(folder) if path.endswith(".json")]
        counts: dict[str, dict[str, int]] = {}
        for path, data in self._read_many(paths).items():
            tenant, writer = path[len(folder) + 1 :].removesuffix(".json").split("/", 1)
            counts.setdefault(tenant, {})[writer] = int(json.loads(data).get("images", 0))
        return counts

    def drop_quota_days_before(self, day: str) -> None:
        """Forget the counts of days before `day` (they no longer limit anyone)."""
        for name in self._names_under("quota"):
            if name < day:
                self._remove_tree(self._path("quota", name))

    def _names_under(self, folder: str) -> list[str]:
        path = self._path(folder)
        if not self.is_local:
            self.fs.invalidate_cache(path)
        try:
            return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    # -- health and layout ----------------------------------------------------------------------------

    @_measured("probe")
    def probe(self) -> None:
        """One cheap request that needs the store to answer (a listing of at most one key); raises if it cannot."""
        if self.is_s3:
            bucket, _, key = self.root.partition("/")
            self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        elif self.is_local:
            if not self.fs.isdir(self.root):
                raise FileNotFoundError(f"{self.root} is not a directory")
        else:
            self.fs.invalidate_cache(self.root)
            try:
                self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                pass  # an empty prefix: the store answered

    def ensure_layout(self) -> int:
        """Index the records of a store written before the markers existed (once; the queue holder does it at
        start). Returns how many records it indexed."""
        if self._read(self._path("layout.json")) is not None:
            return 0
        indexed = 0
        for job_id in self.ids():
            record = self.get(job_id)
            if record is None:
                continue
            markers = self._markers(record)
            files = {markers["owner"]: b""}
            files[markers["status"] if record.status.final else markers["unfinished"]] = b""
            self._write_many(files)
            indexed += 1
        self._write(self._path("layout.json"), json.dumps(LAYOUT).encode())
        return indexed


def open_store(url: str, timeout_s: float = 30, observe: Observer | None = None) -> JobStore:
    """The store at `url`, once it has answered a request; StoreUnavailable (one line naming the URL and the
    error) when its package is missing, it cannot be reached, or it does not answer within `timeout_s`."""
    import threading

    store = JobStore(url, observe)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            store.probe()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises, said in one line
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="store-probe", daemon=True)  # never holds up an exit
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise StoreUnavailable(f"job store {url} cannot be reached: no answer within {timeout_s:g} s")
    if outcome[0] is not None:
        raise StoreUnavailable(f"job store {url} cannot be reached: {describe_error(outcome[0])}")
    return store


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


def store_results(
    store: JobStore, record: JobRecord, results: list, also_as: tuple[str, int] | None = None
) -> list[JobImage]:
    """Encode a job's images (PNG with their parameters) and write them all in one round; their entries for
    the record. `also_as` (format, quality): a copy in that format beside each PNG, for links to it."""
    from ..service.encoding import encode_image, parameters_text

    files: dict[str, bytes] = {}
    images = []
    for index, result in enumerate(results):
        files[f"{index}.png"] = encode_image(
            result.pixels, "png", parameters=parameters_text(result.params, record.model)
        )
        if also_as is not None and also_as[0] != "png":
            fmt, quality = also_as
            files[f"{index}.{fmt}"] = encode_image(
                result.pixels, fmt, quality, parameters=parameters_text(result.params, record.model)
            )
        metadata = {
            **result.params.model_dump(),
            "batch_size": result.batch_size,
            "generation_time_s": round(result.generation_time_s, 4),
            "warnings": result.warnings,
        }
        images.append(JobImage(index=index, seed=result.seed, file=f"{index}.png", metadata=metadata))
    store.put_images(record.id, files)
    return images
