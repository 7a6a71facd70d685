"""The object store: the one module that builds storage paths and moves artifacts in and out.

One URI root through fsspec: a local folder or file:// (the default), s3://bucket/prefix (s3fs;
credentials and endpoint from the standard AWS environment variables or the job's
storage_options), memory:// in tests.

Layout under the root (only the functions below build these keys):

    bases/<base>/                              sharded safetensors, index, config, tokenizer
    runs/<job>/data/<tenant>/                  the tenant's validated train/eval rows, as trained on
    runs/<job>/adapters/<tenant>/              PEFT adapter
    runs/<job>/checkpoints/<tenant>/step-N/    training checkpoints (resume)
    runs/<job>/status/<tenant>.json            live progress of a stage (a record, not an artifact)
    runs/<job>/fused/<tenant>/<variant>/       HF model folder per fused scheme and merge base
    runs/<job>/ptq/<scheme>/                   the base quantized alone (naive PTQ, for the eval stage)
    runs/<job>/eval/tenants/<tenant>/          a tenant's measured configurations (results.json)
    runs/<job>/eval/report/   runs/<job>/bench/    reports

Publishing is atomic for readers on every backend, S3 included (which has no rename): the files
go first, then manifest.json (sha256 and size of every file), then _SUCCESS (the manifest's own
sha256). Readers treat a folder without a valid _SUCCESS as absent, so a crash at any point never
exposes half an artifact, and a rerun clears the leftovers and publishes again.

Retries, bounded, in three layers; each owns the faults the one below it cannot see:

1. botocore retries each HTTP request that could not connect, lost its connection before the answer,
   or was answered 500/502/503/504 or throttled (SlowDown): mode "standard", S3_RETRIES's
   total_max_attempts, waits of rand(0, 2^i) s. The Store sets this as a default; a job's
   storage_options config_kwargs["retries"] (or AWS_RETRY_MODE / AWS_MAX_ATTEMPTS) replaces it.
2. s3fs tries each call again (5 attempts, waits of 0.1 * 1.7^i s) on connection errors botocore
   gave up on, on SlowDown, and on a response body cut short while it reads it (cat_file, and
   get_file, which resumes with a Range request): botocore cannot, it has returned by then.
3. The Store reads a whole file again (RETRY_ATTEMPTS, waits of rand(0, RETRY_BACKOFF_S * 2^i) s)
   when what arrived is wrong or incomplete, which neither library retries: bytes that differ from
   the manifest's sha256 or fail the CRC32 botocore checks on whole-object GETs, and a body cut
   short in s3fs's ranged download of a file over its block size (50 MB by default: weight shards),
   which reads the ranges outside its retry loop. Errors the libraries already retried are not
   retried here (that would only multiply the wait), nor is FileNotFoundError (absent is an answer).
   Uploads need nothing here: botocore resends a failed PUT or part from memory, s3fs aborts a
   multipart upload that fails, and whatever a failed publish left is unsealed, so invisible.
   Folder and memory stores have no transfer to retry.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, TypeVar

import fsspec

from qlora_ray.errors import StoreError
from qlora_ray.manifest import ANNOTATIONS, MANIFEST_NAME, RESERVED_NAMES, SUCCESS_NAME, build_manifest, describe_files, sha256_file

# botocore's retries for S3 stores unless the job's storage_options or AWS environment set their own.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
# The Store's own whole-file retries on remote stores (layer 3 above); tests make the waits short.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5

T = TypeVar("T")

_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


def _segment(value: str, what: str) -> str:
    # Keys come from validated specs; this guards against a caller passing a raw path ("../x").
    if not _SEGMENT.match(value) or ".." in value:
        raise ValueError(f"unsafe {what} for a storage path: {value!r}")
    return value


def base_key(base: str) -> str:
    return f"bases/{_segment(base, 'base name')}"


def run_key(job: str) -> str:
    return f"runs/{_segment(job, 'job name')}"


def adapter_key(job: str, tenant: str) -> str:
    return f"{run_key(job)}/adapters/{_segment(tenant, 'tenant id')}"


def checkpoint_key(job: str, tenant: str, step: int | None = None) -> str:
    folder = f"{run_key(job)}/checkpoints/{_segment(tenant, 'tenant id')}"
    return folder if step is None else f"{folder}/step-{step:08d}"


def data_key(job: str, tenant: str) -> str:
    return f"{run_key(job)}/data/{_segment(tenant, 'tenant id')}"


def status_key(job: str, tenant: str) -> str:
    return f"{run_key(job)}/status/{_segment(tenant, 'tenant id')}.json"


def fused_key(job: str, tenant: str, variant: str) -> str:
    return f"{run_key(job)}/fused/{_segment(tenant, 'tenant id')}/{_segment(variant, 'fused variant')}"


def ptq_key(job: str, scheme: str) -> str:
    return f"{run_key(job)}/ptq/{_segment(scheme, 'scheme')}"


def eval_key(job: str, tenant: str) -> str:
    return f"{run_key(job)}/eval/tenants/{_segment(tenant, 'tenant id')}"


def eval_report_key(job: str) -> str:
    return f"{run_key(job)}/eval/report"


def api_keys_key(job: str) -> str:
    """The serve stage's API keys: sha256 of each key -> tenant (the keys themselves are never stored)."""
    return f"{run_key(job)}/serve/api-keys.json"


def bench_key(job: str, run_id: str) -> str:
    return f"{run_key(job)}/bench/{_segment(run_id, 'bench run id')}"


def display_uri(uri: str) -> str:
    """The URI without any user:password@ part, for messages and logs."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", uri)


class Store:
    """A store root and the operations the stages need on it."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/") or uri
        options = dict(storage_options or {})
        if fsspec.core.split_protocol(self.uri)[0] in ("s3", "s3a"):
            options = _with_s3_retries(options)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"store {display_uri(uri)}: cannot open: {exc}") from None
        self.root = self.root.rstrip("/")
        self._local = "file" in _protocols(self.fs)
        self._remote = not (self._local or "memory" in _protocols(self.fs))

    def __repr__(self) -> str:
        return f"Store({display_uri(self.uri)!r})"

    # -- paths -------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str) -> str:
        """A display URI for a key, e.g. s3://bucket/prefix/bases/smollm2."""
        return display_uri(f"{self.uri}/{key}")

    # -- health ------------------------------------------------------------------------------
    def check_reachable(self) -> None:
        """Raise StoreError unless the root can be listed (or, for a new local store, created)."""
        with self._errors("reach the store"):
            if self._local:
                self.fs.makedirs(self.root, exist_ok=True)
            elif _is_s3(self.fs):
                # head_bucket, not exists(): s3fs's exists() turns a dead endpoint into "False"
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.call_s3("head_bucket", Bucket=bucket)
                except FileNotFoundError:
                    raise StoreError(f"store {display_uri(self.uri)}: bucket {bucket!r} does not exist") from None
            else:
                self.fs.exists(self.root)

    # -- reading -----------------------------------------------------------------------------
    def is_complete(self, key: str) -> bool:
        """True when the artifact at key was fully published (its _SUCCESS matches its manifest)."""
        return self._complete_manifest(key) is not None

    def read_manifest(self, key: str) -> dict:
        manifest = self._complete_manifest(key)
        if manifest is None:
            raise StoreError(f"{self.url(key)}: no complete artifact here (missing or unfinished)")
        return manifest

    def list_complete(self, prefix: str) -> list[str]:
        """Names of the complete artifacts directly under prefix (e.g. the tenants under adapters/)."""
        with self._errors(f"list {self.url(prefix)}"):
            try:
                entries = self.fs.ls(self.path(prefix), detail=False, refresh=True)
            except FileNotFoundError:
                return []
        names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [name for name in names if self.is_complete(f"{prefix}/{name}")]

    def fetch(self, key: str, local_dir: Path, only: list[str] | None = None) -> dict:
        """Download a complete artifact (or only the listed files of it) into local_dir, verifying
        every file's size and sha256.

        `safetensors.safe_open` and `from_pretrained` need local files, so every stage that loads an
        artifact stages it here first. A file already in local_dir with the right size and sha256 is
        kept (a worker's cache). Returns the manifest. Raises StoreError on any mismatch.
        """
        manifest = self.read_manifest(key)
        wanted = list(manifest["files"]) if only is None else only
        unknown = [rel for rel in wanted if rel not in manifest["files"]]
        if unknown:
            raise StoreError(f"{self.url(key)}: the manifest lists no {', '.join(unknown)}")
        local_dir.mkdir(parents=True, exist_ok=True)
        for rel in wanted:
            expected = manifest["files"][rel]
            target = local_dir / rel
            if _matches(target, expected):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(f"download {self.url(key)}/{rel}"):
                self._retrying(lambda again: self._download(key, rel, target, expected, one_stream=again))
        return manifest

    def readable_copy(self, key: str, cache_dir: Path, files: list[str] | None = None) -> Path:
        """A local folder holding the listed files (default: all) of a complete artifact, each verified.

        A folder store is read in place (no copy: an 8B base is 16 GB); any other store is
        fetched into cache_dir. Raises StoreError on any mismatch with the manifest.
        """
        if not self._local:
            self.fetch(key, cache_dir, only=files)
            return cache_dir
        manifest = self.read_manifest(key)
        folder = Path(self.path(key))
        for rel in manifest["files"] if files is None else files:
            expected = manifest["files"].get(rel)
            if expected is None or not _matches(folder / rel, expected):
                raise StoreError(f"{self.url(key)}/{rel}: damaged or missing (differs from the manifest); "
                                 "republish the artifact")
        return folder

    def read_json(self, key: str, rel: str) -> dict:
        """One JSON file of a complete artifact, checked against the manifest."""
        manifest = self.read_manifest(key)
        if rel not in manifest["files"]:
            raise StoreError(f"{self.url(key)}: the manifest lists no {rel}")
        expected_sha256 = manifest["files"][rel]["sha256"]

        def read() -> bytes:
            data = self.fs.cat_file(self.path(f"{key}/{rel}"))
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise _Damaged(f"{self.url(key)}/{rel}: damaged (sha256 differs from the manifest)")
            return data

        with self._errors(f"read {self.url(key)}/{rel}"):
            return json.loads(self._retrying(lambda _: read()))

    def verify(self, key: str) -> None:
        """Re-hash every file of a complete artifact in place. Raises StoreError on any mismatch."""
        manifest = self.read_manifest(key)
        for rel, expected in manifest["files"].items():
            with self._errors(f"read {self.url(key)}/{rel}"):
                self._retrying(lambda _: self._rehash(key, rel, expected))

    # -- writing -----------------------------------------------------------------------------
    def publish(
        self,
        key: str,
        local_dir: Path,
        *,
        kind: str,
        inputs: dict,
        metrics: dict | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> dict:
        """Publish the files of local_dir at key: files, then manifest.json, then _SUCCESS.

        Any leftovers of an earlier, unfinished publish at key are removed first. Refuses to
        overwrite a complete artifact (the caller decides to skip or delete it). Returns the manifest.
        """
        self.begin(key)
        files = describe_files(local_dir)
        if not files:
            raise ValueError(f"{local_dir}: nothing to publish")
        total = sum(f["size"] for f in files.values())
        if progress:
            progress(f"uploading {len(files)} files ({total / 1e6:.1f} MB) to {self.url(key)}")
        for rel in files:
            self._upload(key, rel, local_dir / rel)
        return self.seal(key, files, kind=kind, inputs=inputs, metrics=metrics)

    # An artifact written by several workers (the fuse stage's shard-wise outputs) is published in
    # three steps: begin() once, put_part() from any worker for each file, seal() once at the end.
    # Until seal() writes _SUCCESS, readers see nothing; a retried worker simply uploads again.
    def begin(self, key: str) -> None:
        """Clear the leftovers of an unfinished publish at key; refuse a complete artifact."""
        if self.is_complete(key):
            raise StoreError(f"{self.url(key)}: already published; delete it first to replace it")
        self.delete(key)

    def put_part(self, key: str, rel: str, local_file: Path) -> dict:
        """Upload one file of an artifact being built. Returns its {sha256, size} for seal()."""
        described = {"sha256": sha256_file(local_file), "size": local_file.stat().st_size}
        self._upload(key, rel, local_file)
        return described

    def seal(self, key: str, files: dict[str, dict], *, kind: str, inputs: dict, metrics: dict | None = None) -> dict:
        """Write manifest.json and then _SUCCESS for files already uploaded at key.

        Checks that every listed file is there with its size first (a part lost to a crash would
        otherwise be vouched for). Returns the manifest.
        """
        for reserved in RESERVED_NAMES:
            if reserved in files:
                raise ValueError(f"{self.url(key)}: {reserved} is written by the store, not by a stage")
        for rel, expected in files.items():
            with self._errors(f"check {self.url(key)}/{rel}"):
                try:
                    size = self.fs.info(self.path(f"{key}/{rel}"))["size"]
                except FileNotFoundError:
                    size = None
            if size != expected["size"]:
                raise StoreError(f"{self.url(key)}/{rel}: expected {expected['size']} bytes, found "
                                 f"{'nothing' if size is None else size}; the artifact was not sealed")
        manifest = build_manifest(kind, key, dict(sorted(files.items())), inputs, metrics or {})
        self._write_manifest(key, manifest)
        return manifest

    def annotate(self, key: str, field: str, value) -> dict:
        """Set a top-level field of a complete artifact's manifest (the eval stage's quality verdict
        on a fused model): manifest.json, then _SUCCESS vouching for it. The files are untouched.
        A crash between the two writes leaves the artifact unfinished, as a crash while publishing
        would: readers skip it and the next run of its stage publishes it again. Returns the manifest."""
        if field not in ANNOTATIONS:
            raise ValueError(f"manifest field {field!r} is not an annotation (those are: {', '.join(ANNOTATIONS)})")
        manifest = {**self.read_manifest(key), field: value}
        self._write_manifest(key, manifest)
        return manifest

    def delete(self, key: str) -> None:
        """Remove everything at key (complete or not). The _SUCCESS marker goes first, so a reader
        never sees a complete artifact whose files are half gone."""
        path = self.path(key)
        with self._errors(f"delete {self.url(key)}"):
            if self.fs.exists(f"{path}/{SUCCESS_NAME}"):
                self.fs.rm_file(f"{path}/{SUCCESS_NAME}")
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    # -- records ----------------------------------------------------------------------------
    def write_record(self, key: str, payload: dict) -> None:
        """Overwrite a small JSON record (live status). One PUT on S3; readers may see the old one."""
        with self._errors(f"write {self.url(key)}"):
            if self._local:
                self.fs.makedirs(self.path(key).rsplit("/", 1)[0], exist_ok=True)
            self._write_small(self.path(key), json.dumps(payload, sort_keys=True).encode())

    def read_record(self, key: str) -> dict | None:
        """A record, or None if absent or caught mid-write (a record is advisory, never an input)."""
        with self._errors(f"read {self.url(key)}"):
            try:
                return json.loads(self.fs.cat_file(self.path(key)))
            except (FileNotFoundError, ValueError):
                return None

    # -- internals ---------------------------------------------------------------------------
    def _complete_manifest(self, key: str) -> dict | None:
        path = self.path(key)
        with self._errors(f"read {self.url(key)}"):
            try:
                marker_bytes, manifest_bytes = self._retrying(
                    lambda _: (self.fs.cat_file(f"{path}/{SUCCESS_NAME}"), self.fs.cat_file(f"{path}/{MANIFEST_NAME}")))
                marker = json.loads(marker_bytes)
            except (FileNotFoundError, ValueError):  # absent, or a marker cut short by a crash
                return None
        if not isinstance(marker, dict) or marker.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
            return None  # a marker that does not vouch for this manifest: treat as unfinished
        return json.loads(manifest_bytes)

    def _write_manifest(self, key: str, manifest: dict) -> None:
        """manifest.json, then the _SUCCESS marker that vouches for exactly those bytes."""
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        with self._errors(f"write {self.url(key)}/{MANIFEST_NAME}"):
            self._write_small(self.path(f"{key}/{MANIFEST_NAME}"), manifest_bytes)
        marker = {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
        with self._errors(f"write {self.url(key)}/{SUCCESS_NAME}"):
            self._write_small(self.path(f"{key}/{SUCCESS_NAME}"), json.dumps(marker).encode())

    def _write_small(self, path: str, data: bytes) -> None:
        """One small file, never seen half-written: a single PUT on object stores, write + rename locally."""
        if self._local:
            self.fs.pipe_file(f"{path}.partial", data)
            self.fs.mv(f"{path}.partial", path)
        else:
            self.fs.pipe_file(path, data)

    def _upload(self, key: str, rel: str, local: Path) -> None:
        if rel in RESERVED_NAMES:
            raise ValueError(f"{self.url(key)}: {rel} is written by the store, not by a stage")
        remote = self.path(f"{key}/{rel}")
        with self._errors(f"upload {self.url(key)}/{rel}"):
            if self._local:
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local), remote)

    def _download(self, key: str, rel: str, target: Path, expected: dict, one_stream: bool = False) -> None:
        """Download one file of an artifact to target and check it against its manifest entry.

        Nothing is left at target unless it matches; bytes that differ from the manifest raise
        _Damaged, which _retrying downloads again (as it does a body failing botocore's CRC32).
        one_stream (a retry, on S3): one GET that s3fs resumes where it was cut, rather than the
        concurrent ranged GETs that fail the whole file when any one of them is cut, so a flaky
        link that defeated the fast way still gets the file through.
        """
        try:
            self.fs.get_file(self.path(f"{key}/{rel}"), str(target),
                             **({"max_concurrency": 1} if one_stream and _is_s3(self.fs) else {}))
        except BaseException:
            target.unlink(missing_ok=True)  # s3fs leaves what it got of a failed download
            raise
        if not _matches(target, expected):
            size = target.stat().st_size
            target.unlink()
            raise _Damaged(f"{self.url(key)}/{rel}: damaged (size {size} vs {expected['size']} in the manifest, "
                           "or a different sha256); republish the artifact")

    def _rehash(self, key: str, rel: str, expected: dict) -> None:
        """Stream one stored file through sha256; _Damaged unless it matches its manifest entry."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(self.path(f"{key}/{rel}"), "rb") as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
            raise _Damaged(f"{self.url(key)}/{rel}: damaged (differs from its manifest)")

    def _retrying(self, attempt: Callable[[bool], T]) -> T:
        """attempt(again), run again on a remote store while what arrived was wrong or incomplete (layer 3
        of the retries in the module docstring), with exponential backoff and full jitter; `again` is
        False only the first time. The last failure is raised as it is, for the caller's _errors to name."""
        if not self._remote:
            return attempt(False)
        for failed in range(RETRY_ATTEMPTS):
            try:
                return attempt(failed > 0)
            except _transfer_faults():
                if failed + 1 == RETRY_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, RETRY_BACKOFF_S * 2**failed))

    def _errors(self, action: str) -> "_StoreErrors":
        return _StoreErrors(f"store {display_uri(self.uri)}: cannot {action}")


class _Damaged(StoreError):
    """Bytes read from the store that differ from the manifest: a StoreError for the caller, and
    for _retrying a reason to read them again (they may have been damaged in transit)."""


def _matches(path: Path, expected: dict) -> bool:
    """True when the local file at path has the size and sha256 of its manifest entry."""
    return path.is_file() and path.stat().st_size == expected["size"] and sha256_file(path) == expected["sha256"]


@functools.cache
def _checksum_errors() -> tuple[type[BaseException], ...]:
    """botocore's verdict that a body failed the checksum S3 stored with the object (CRC32 by default).
    Imported when first needed, on an error: folder and memory stores have no use for botocore."""
    from botocore.exceptions import FlexibleChecksumError

    return (FlexibleChecksumError,)


@functools.cache
def _transfer_faults() -> tuple[type[BaseException], ...]:
    """What _retrying reads again: bytes that failed a checksum, and a response body cut short
    (aiohttp's ClientPayloadError and botocore's wrappers around a broken body read)."""
    from aiohttp import ClientPayloadError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    return (_Damaged, *_checksum_errors(), ClientPayloadError, IncompleteReadError, ResponseStreamingError,
            http.client.IncompleteRead)


def _with_s3_retries(options: dict) -> dict:
    """storage_options with S3_RETRIES as botocore's retry config, unless the job or the AWS
    environment chose one (their choice wins)."""
    config = options.get("config_kwargs") or {}
    if "retries" in config or os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS"):
        return options
    return {**options, "config_kwargs": {**config, "retries": dict(S3_RETRIES)}}


class _StoreErrors:
    """Turn backend exceptions (botocore, aiohttp, OSError) into one StoreError naming the action.

    FileNotFoundError passes through: callers treat "absent" as an answer, not a failure.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (FileNotFoundError, StoreError)):
            return False
        if isinstance(exc, Exception):
            detail = f"{type(exc).__name__}: {_short(exc)}"
            if isinstance(exc, _checksum_errors()):
                detail = f"damaged (the bytes read failed the checksum stored with the object: {detail})"
            raise StoreError(f"{self.prefix}: {detail}") from None
        return False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:300]


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"s3", "s3a"} & set(_protocols(fs)))

