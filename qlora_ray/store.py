"""The object store: the one module that builds storage paths and moves artifacts in and out.

One URI root through fsspec: a local folder or file:// (the default), s3://bucket/prefix (s3fs;
credentials and endpoint from the standard AWS environment variables or the job's
storage_options), memory:// in tests. No other scheme is accepted (SUPPORTED_SCHEMES), so a job file
can never make the store connect to a host it did not name as a store.

Layout under the root (only the functions below build these keys):

    bases/<base>/                              sharded safetensors, index, config, tokenizer
    runs/<job>/data/<tenant>/                  the tenant's validated train/eval rows, as trained on
    runs/<job>/adapters/<tenant>/              PEFT adapter
    runs/<job>/checkpoints/<tenant>/step-N/    training checkpoints (resume)
    runs/<job>/status/<tenant>.json            live progress of a stage (a record, not an artifact)
    runs/<job>/fused/<tenant>/<variant>/       HF model folder per fused scheme and merge base
    runs/<job>/ptq/<scheme>/                   the base quantized alone (naive PTQ, for the eval stage)
    runs/<job>/eval/tenants/<tenant>/          a tenant's measured configurations (results.json)
    runs/<job>/eval/verdicts/                  the quality gate's verdict on each fused model (verdicts.json)
    runs/<job>/eval/report/   runs/<job>/bench/    reports
    runs/<job>/serve/api-keys.json             the serve stage's keys (a record)
    kernels/<name>/<fingerprint>/              a compiled GPU kernel (the serve stage's Marlin build)
    kernels/<name>/<fingerprint>.claim.json    who is compiling it now (a record: build_claim.py)

Publishing is atomic for readers on every backend, S3 included (which has no rename), and safe with
several writers on one key (two runs of one job, a Ray retry racing an attempt cut off from the
cluster). Each publish writes its own version of the artifact:

    <key>/<version>/...              the files, then manifest.json (sha256 and size of every file)
    <key>/_drafts/<version>.json     who writes that version (host, pid), until it is sealed
    <key>/_SUCCESS                   {"version", "manifest_sha256"}: the version readers see

The version is sealed by creating _SUCCESS only if it does not exist yet: O_EXCL-like on a folder
(an exclusive lock on the key's folder), `If-None-Match: *` on S3. The first writer to seal wins;
the others find an artifact there, discard their own version and are told (AlreadyPublished).
Writers never touch each other's versions, and a failed publish removes only its own version, so
a complete artifact (perhaps one being served) is never deleted by a failure. Readers treat a key
without a _SUCCESS that vouches for its manifest as absent, so a crash at any point never exposes half
an artifact. The versions a crash left behind are removed by the next publish at that key: at once
if their writer was a process of the same host that is gone, and those of writers on other hosts
once idle for STALE_DRAFT_SECONDS.
Artifacts published before versions existed (files directly under <key>/, a _SUCCESS without a
version) still read.

Manifests are as untrusted as the files beside them (a user may place an adapter by hand): a file
name that is absolute, holds '..', a backslash or an empty segment is refused when the manifest is
read, and again when the file is placed on local disk.

Records (status, API keys) are small JSON files that are overwritten, not published.
`update_record` changes one atomically against other writers: under the folder's lock locally, and
by a conditional PUT on the record's ETag on S3 (`If-Match`), tried again when another writer got in
first.

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

Local copies (`local_copy`) of a folder store are the store's own files, verified in place; those of
any other store come from the node's cache (local_disk.NodeCache).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, TypeVar

import fsspec

from qlora_ray.errors import StoreError
from qlora_ray.local_disk import PARTIAL_SUFFIX, NodeCache, cache_entry_id, process_identity, process_is_running
from qlora_ray.manifest import MANIFEST_NAME, RESERVED_NAMES, SUCCESS_NAME, build_manifest, describe_files, manifest_digest, sha256_file

log = logging.getLogger(__name__)

# botocore's retries for S3 stores unless the job's storage_options or AWS environment set their own.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
# The Store's own whole-file retries on remote stores (layer 3 above); tests make the waits short.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5
# Tries of a conditional write that another writer keeps beating (a record under heavy contention).
CAS_ATTEMPTS = 20
# A version nobody sealed, whose writer is not known to be gone, is left alone this long after its
# last write: longer than any writer goes between two uploads of one artifact.
STALE_DRAFT_SECONDS = 24 * 3600

# The schemes a store (or a tenant's data file) may use: a folder or file://, s3:// (s3a:// is the same
# S3), and memory:// (one process: tests). Anything else is refused before fsspec is asked.
SUPPORTED_SCHEMES = ("file", "s3", "s3a", "memory")
DRAFTS = "_drafts"
_VERSION = re.compile(r"v\d{8}T\d{6}-[0-9a-f]{12}")

T = TypeVar("T")

_SEGMENT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
_MEMORY_LOCK = threading.RLock()  # memory:// lives in one process: a process-wide lock is its lock


def _segment(value: str, what: str) -> str:
    # Keys come from validated specs; this guards against a caller passing a raw path ("../x").
    if not _SEGMENT.fullmatch(value) or ".." in value:
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


def hessian_key(job: str, pool: str) -> str:
    """A bulk-GPTQ Hessian set of the job (fuse/hessians.py): one per merge base, or per tenant too."""
    return f"{run_key(job)}/hessians/{_segment(pool, 'Hessian pool')}"


def ptq_key(job: str, scheme: str) -> str:
    return f"{run_key(job)}/ptq/{_segment(scheme, 'scheme')}"


def eval_key(job: str, tenant: str) -> str:
    return f"{run_key(job)}/eval/tenants/{_segment(tenant, 'tenant id')}"


def eval_report_key(job: str) -> str:
    return f"{run_key(job)}/eval/report"


def verdicts_key(job: str) -> str:
    return f"{run_key(job)}/eval/verdicts"


def api_keys_key(job: str) -> str:
    """The serve stage's API keys: sha256 of each key -> tenant (the keys themselves are never stored)."""
    return f"{run_key(job)}/serve/api-keys.json"


def kernel_key(name: str, fingerprint: str) -> str:
    """A compiled GPU kernel shared by the replicas of every node (marlin.py), per build fingerprint."""
    return f"kernels/{_segment(name, 'kernel name')}/{_segment(fingerprint, 'kernel fingerprint')}"


def kernel_claim_key(name: str, fingerprint: str) -> str:
    """The record of the one process compiling that kernel for the cluster (build_claim.py)."""
    return f"{kernel_key(name, fingerprint)}.claim.json"


def bench_key(job: str, run_id: str) -> str:
    return f"{run_key(job)}/bench/{_segment(run_id, 'bench run id')}"


def display_uri(uri: str) -> str:
    """The URI without any user:password@ part, for messages and logs."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", uri)


def unsupported_scheme(uri: str) -> str | None:
    """Why a store or data URI is refused (an unsupported or chained scheme), or None if it is fine."""
    if "::" in uri:
        return "chained URLs (a::b) are not supported"
    scheme = fsspec.core.split_protocol(uri)[0]
    if scheme is None or scheme.lower() in SUPPORTED_SCHEMES:
        return None
    return f"unsupported scheme {scheme!r} (supported: a folder, file://, s3://, and memory:// for tests)"


def unsafe_file_name(rel: object) -> str | None:
    """Why a manifest's file name cannot be a path inside an artifact folder, or None if it can."""
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if "\\" in rel or "\0" in rel:
        return "holds a backslash or a NUL"
    if rel.startswith("/") or re.match(r"[A-Za-z]:", rel):
        return "is absolute"
    segments = rel.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "holds an empty, '.' or '..' segment"
    if segments[0] in (*RESERVED_NAMES, DRAFTS):
        return "is a name the store writes itself"
    return None


def inside(folder: Path, rel: str) -> Path:
    """folder/rel, refused (StoreError) unless it resolves inside folder: the last check before a
    manifest's file name becomes a local path."""
    target = folder / PurePosixPath(rel)
    if not target.resolve().is_relative_to(folder.resolve()):
        raise StoreError(f"{rel!r} would be placed outside {folder}; refused")
    return target


class AlreadyPublished(StoreError):
    """A complete artifact is at the key: published before, or by another writer while this one wrote."""


@dataclass(frozen=True)
class Draft:
    """One writer's version of an artifact being written: its files go under `prefix`."""

    key: str
    version: str

    @property
    def prefix(self) -> str:
        return f"{self.key}/{self.version}"


@dataclass(frozen=True)
class _Published:
    """A complete artifact as read: its manifest, and the key prefix its files are under."""

    manifest: dict
    prefix: str


class Store:
    """A store root and the operations the stages need on it."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/") or uri
        refused = unsupported_scheme(self.uri)
        if refused:
            raise StoreError(f"store {display_uri(uri)}: {refused}")
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
        # Files of a folder store this process has hashed already: path -> (size, mtime_ns).
        self._verified_in_place: dict[str, tuple[int, int]] = {}

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
        return self._published(key) is not None

    def read_manifest(self, key: str) -> dict:
        """The manifest of the complete artifact at key, its file names checked (StoreError if unsafe)."""
        return self._read(key).manifest

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
        artifact stages it here first (or through local_copy). A file already in local_dir with the
        right size and sha256 is kept. Each file is downloaded under a temporary name and renamed into
        place once verified, so two processes fetching into one folder never tear each other's files.
        Returns the manifest. Raises StoreError on any mismatch.
        """
        published = self._read(key)
        self._fetch(key, published, local_dir, only, trust_present=False)
        return published.manifest

    @contextlib.contextmanager
    def local_copy(self, key: str, files: list[str] | None = None) -> Iterator[Path]:
        """A local folder holding the listed files (default: all) of a complete artifact, each verified,
        for the length of the block.

        A folder store is read in place (no copy: an 8B base is 16 GB); any other store is fetched into
        the node's cache, which other processes of the node share, and which keeps the files until the
        block ends. Raises StoreError on any mismatch with the manifest.
        """
        published = self._read(key)
        wanted = self._wanted(key, published.manifest, files)
        if self._local:
            folder = Path(self.path(published.prefix))
            for rel in wanted:
                self._verify_in_place(key, folder, rel, published.manifest["files"][rel])
            yield folder
            return
        entry = cache_entry_id(self.uri, key, manifest_digest(published.manifest))
        fill = lambda folder: self._fetch(key, published, folder, wanted, trust_present=True)  # noqa: E731
        with NodeCache().checkout(entry, fill) as folder:
            yield folder

    def read_json(self, key: str, rel: str) -> dict:
        """One JSON file of a complete artifact, checked against the manifest."""
        published = self._read(key)
        (rel,) = self._wanted(key, published.manifest, [rel])
        expected_sha256 = published.manifest["files"][rel]["sha256"]

        def read() -> bytes:
            data = self._cat_listed(key, published, rel)
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise _Damaged(f"{self.url(key)}/{rel}: damaged (sha256 differs from the manifest)")
            return data

        with self._errors(f"read {self.url(key)}/{rel}"):
            return json.loads(self._retrying(lambda _: read()))

    def verify(self, key: str) -> None:
        """Re-hash every file of a complete artifact in place. Raises StoreError on any mismatch."""
        published = self._read(key)
        for rel, expected in published.manifest["files"].items():
            with self._errors(f"read {self.url(key)}/{rel}"):
                self._retrying(lambda _: self._rehash(key, published, rel, expected))

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
        keep_existing: bool = False,
    ) -> dict:
        """Publish the files of local_dir at key as a new version: files, then manifest.json, then _SUCCESS.

        If a complete artifact is at key, before or by the time this one is sealed, raises
        AlreadyPublished, or with keep_existing returns that artifact's manifest (two runs of one job,
        or a retry racing an attempt, made the same thing). On any failure this version is removed
        and nothing else. Returns the manifest.
        """
        if keep_existing:
            try:
                return self.publish(key, local_dir, kind=kind, inputs=inputs, metrics=metrics, progress=progress)
            except AlreadyPublished:
                return self.read_manifest(key)
        return self._publish(key, local_dir, kind=kind, inputs=inputs, metrics=metrics, progress=progress,
                             replacing=False)

    def replace(self, key: str, local_dir: Path, *, kind: str, inputs: dict, metrics: dict | None = None) -> dict:
        """Publish the files of local_dir at key in place of the complete artifact there, if any: for
        what describes the store as it is now (the eval report, the quality verdicts). Readers see the
        old artifact or the new one, never neither: the new version is written beside the old, and
        one conditional write of _SUCCESS switches to it. The replaced version stays until a publish
        at this key finds it idle for STALE_DRAFT_SECONDS, so a reader that read the old _SUCCESS can
        still read its files. Of two writers replacing at once, the later seal wins. Returns the manifest."""
        return self._publish(key, local_dir, kind=kind, inputs=inputs, metrics=metrics, progress=None, replacing=True)

    def _publish(self, key: str, local_dir: Path, *, kind: str, inputs: dict, metrics: dict | None,
                 progress: Callable[[str], None] | None, replacing: bool) -> dict:
        files = describe_files(local_dir)
        if not files:
            raise ValueError(f"{local_dir}: nothing to publish")
        for reserved in RESERVED_NAMES:
            if reserved in files:
                raise ValueError(f"{self.url(key)}: {reserved} is written by the store, not by a stage")
        draft = self.begin(key, replacing=replacing)
        try:
            total = sum(f["size"] for f in files.values())
            if progress:
                progress(f"uploading {len(files)} files ({total / 1e6:.1f} MB) to {self.url(key)}")
            for rel in files:
                self._upload(draft, rel, local_dir / rel)
            return self.seal(draft, files, kind=kind, inputs=inputs, metrics=metrics, replacing=replacing)
        except BaseException:
            self.abandon(draft)
            raise

    # An artifact written by several workers (the fuse stage's shard-wise outputs) is published in
    # three steps: begin() once, put_part() from any worker for each file, seal() once at the end
    # (or abandon() if it failed). Until seal() writes _SUCCESS, readers see nothing; a retried
    # worker simply uploads its parts again.
    def begin(self, key: str, *, replacing: bool = False) -> Draft:
        """Start a new version of the artifact at key. Refuses a complete artifact (AlreadyPublished)
        unless replacing it. Removes the versions that crashed writers left (see the module
        docstring), never a live one's."""
        if not replacing and self.is_complete(key):
            raise AlreadyPublished(f"{self.url(key)}: already published; delete it first to replace it")
        self._sweep_drafts(key)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        draft = Draft(key, f"v{stamp}-{uuid.uuid4().hex[:12]}")
        owner = {**process_identity(), "began_at": time.time()}
        with self._errors(f"write {self.url(key)}/{DRAFTS}"):
            self._write_small(self.path(f"{key}/{DRAFTS}/{draft.version}.json"), json.dumps(owner).encode())
        return draft

    def put_part(self, draft: Draft, rel: str, local_file: Path) -> dict:
        """Upload one file of a version being built. Returns its {sha256, size} for seal()."""
        described = {"sha256": sha256_file(local_file), "size": local_file.stat().st_size}
        self._upload(draft, rel, local_file)
        return described

    def seal(self, draft: Draft, files: dict[str, dict], *, kind: str, inputs: dict, metrics: dict | None = None,
             replacing: bool = False) -> dict:
        """Write the version's manifest.json, then claim _SUCCESS for it, unless another version got
        there first (and this one is not replacing it): then this version is removed and
        AlreadyPublished raised.

        Checks that every listed file is there with its size first (a part lost to a crash would
        otherwise be vouched for). Returns the manifest.
        """
        key = draft.key
        for rel in files:
            refused = unsafe_file_name(rel)
            if refused:
                raise ValueError(f"{self.url(key)}: file name {rel!r} {refused}")
        for rel, expected in files.items():
            with self._errors(f"check {self.url(key)}/{rel}"):
                try:
                    size = self.fs.info(self.path(f"{draft.prefix}/{rel}"))["size"]
                except FileNotFoundError:
                    size = None
            if size != expected["size"]:
                raise StoreError(f"{self.url(key)}/{rel}: expected {expected['size']} bytes, found "
                                 f"{'nothing' if size is None else size}; the artifact was not sealed")
        manifest = build_manifest(kind, key, dict(sorted(files.items())), inputs, metrics or {})
        manifest_bytes = _manifest_bytes(manifest)
        with self._errors(f"write {self.url(key)}/{MANIFEST_NAME}"):
            self._write_small(self.path(f"{draft.prefix}/{MANIFEST_NAME}"), manifest_bytes)
        marker = _marker(draft.version, manifest_bytes)
        # Claim an empty place, or one whose marker vouches for nothing (damaged, forged): never a
        # complete artifact.
        won = self._compare_and_swap(
            f"{key}/{SUCCESS_NAME}",
            lambda current: marker if replacing or current is None or not self.is_complete(key) else None)
        if won != marker:
            self.abandon(draft)
            raise AlreadyPublished(f"{self.url(key)}: published meanwhile by another writer; this copy was discarded")
        self._forget_draft(draft)
        try:
            self._sweep_drafts(key)  # what crashed writers left beside it
        except StoreError as exc:
            log.warning("%s; left for a later publish at this key", exc)
        return manifest

    def abandon(self, draft: Draft) -> None:
        """Remove one version that will not be sealed (its writer failed): its files and its owner record,
        nothing else. Never raises: it runs on failure paths, and what it leaves is swept later."""
        try:
            with self._errors(f"delete {self.url(draft.prefix)}"):
                if self.fs.exists(self.path(draft.prefix)):
                    self.fs.rm(self.path(draft.prefix), recursive=True)
            self._forget_draft(draft)
        except StoreError as exc:
            log.warning("%s; it will be removed by a later publish at this key", exc)

    def delete(self, key: str) -> None:
        """Remove everything at key (complete or not, every version). The _SUCCESS marker goes first,
        so a reader never sees a complete artifact whose files are half gone."""
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
            self._write_small(self.path(key), json.dumps(payload, sort_keys=True).encode())

    def read_record(self, key: str) -> dict | None:
        """A record, or None if absent or unreadable (a status record is advisory, never an input)."""
        with self._errors(f"read {self.url(key)}"):
            try:
                record = json.loads(self.fs.cat_file(self.path(key)))
            except (FileNotFoundError, ValueError):
                return None
        return record if isinstance(record, dict) else None

    def update_record(self, key: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Replace a record by change(current record, or None if absent), atomically against other
        writers of it (see the module docstring); change() returning None writes nothing. A record
        that is there but not a JSON object is not guessed at: StoreError, and nothing is written.
        Returns the record there afterwards (None if absent)."""

        def apply(current: bytes | None) -> bytes | None:
            record = None
            if current is not None:
                try:
                    record = json.loads(current)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    raise StoreError(f"{self.url(key)}: the record is damaged (not a JSON object); fix or "
                                     "delete it by hand, nothing was changed")
            changed = change(record)
            return None if changed is None else json.dumps(changed, sort_keys=True).encode()

        after = self._compare_and_swap(key, apply)
        return None if after is None else json.loads(after)

    # -- internals ---------------------------------------------------------------------------
    def _published(self, key: str) -> _Published | None:
        """The complete artifact at key (marker and manifest read and matched), or None."""
        marker_path = self.path(f"{key}/{SUCCESS_NAME}")
        with self._errors(f"read {self.url(key)}"):
            try:
                marker_bytes = self._retrying(lambda _: self.fs.cat_file(marker_path))
                marker = json.loads(marker_bytes)
            except (FileNotFoundError, ValueError):  # absent, or a marker cut short by a crash
                return None
            if not isinstance(marker, dict):
                return None
            version = marker.get("version")
            if version is not None and not (isinstance(version, str) and _VERSION.fullmatch(version)):
                return None  # not a version this store writes (forged): treat as unfinished
            prefix = f"{key}/{version}" if version else key
            try:
                manifest_bytes = self._retrying(lambda _: self.fs.cat_file(self.path(f"{prefix}/{MANIFEST_NAME}")))
                manifest = json.loads(manifest_bytes)
            except (FileNotFoundError, ValueError):
                return None
        if marker.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest() or not isinstance(manifest, dict):
            return None  # a marker that does not vouch for this manifest: treat as unfinished
        return _Published(manifest, prefix)

    def _read(self, key: str) -> _Published:
        """The complete artifact at key with its manifest checked, or StoreError."""
        published = self._published(key)
        if published is None:
            raise StoreError(f"{self.url(key)}: no complete artifact here (missing or unfinished)")
        files = published.manifest.get("files")
        if not isinstance(files, dict):
            raise StoreError(f"{self.url(key)}: the manifest has no file list; the artifact is refused")
        for rel, entry in files.items():
            refused = unsafe_file_name(rel)
            if refused:
                raise StoreError(f"{self.url(key)}: the manifest lists a file name that {refused} ({rel[:100]!r}); "
                                 "the artifact is refused")
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                    and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
                raise StoreError(f"{self.url(key)}: the manifest's entry for {rel!r} is not a size and a sha256; "
                                 "the artifact is refused")
        return published

    def _wanted(self, key: str, manifest: dict, files: list[str] | None) -> list[str]:
        wanted = list(manifest["files"]) if files is None else list(files)
        unknown = [rel for rel in wanted if rel not in manifest["files"]]
        if unknown:
            raise StoreError(f"{self.url(key)}: the manifest lists no {', '.join(map(str, unknown))}")
        return wanted

    def _fetch(self, key: str, published: _Published, local_dir: Path, only: list[str] | None, *,
               trust_present: bool) -> None:
        """Download the listed files into local_dir. trust_present: a file there with the right size is
        kept without hashing it again (the node cache, where only verified files are ever renamed in)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        for rel in self._wanted(key, published.manifest, only):
            expected = published.manifest["files"][rel]
            target = inside(local_dir, rel)
            if target.is_file() and target.stat().st_size == expected["size"] and (
                    trust_present or sha256_file(target) == expected["sha256"]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(f"download {self.url(key)}/{rel}"):
                self._retrying(lambda again: self._download(key, published, rel, target, expected, one_stream=again))

    def _verify_in_place(self, key: str, folder: Path, rel: str, expected: dict) -> None:
        path = inside(folder, rel)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{self.url(key)}/{rel}: missing, though the manifest lists it (damaged); "
                             "republish the artifact") from None
        seen = (stat.st_size, stat.st_mtime_ns)
        if self._verified_in_place.get(str(path)) == seen:
            return
        if stat.st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            raise StoreError(f"{self.url(key)}/{rel}: damaged (differs from the manifest); republish the artifact")
        self._verified_in_place[str(path)] = seen

    def _cat_listed(self, key: str, published: _Published, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(f"{published.prefix}/{rel}"))
        except FileNotFoundError:
            raise _missing(self.url(key), rel) from None

    def _sweep_drafts(self, key: str) -> None:
        """Remove the unsealed versions at key whose writer is gone: a process of this host that no
        longer runs, or a writer elsewhere idle for STALE_DRAFT_SECONDS."""
        with self._errors(f"list {self.url(key)}"):
            try:
                entries = self.fs.ls(self.path(key), detail=False, refresh=True)
            except FileNotFoundError:
                return
            try:
                owners = self.fs.ls(self.path(f"{key}/{DRAFTS}"), detail=False, refresh=True)
            except FileNotFoundError:
                owners = []
        versions = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries} | {
            o.rsplit("/", 1)[-1].removesuffix(".json") for o in owners}
        sealed = self._published(key)  # sealed since the caller looked: never swept
        versions.discard(sealed.prefix.rsplit("/", 1)[-1] if sealed else None)
        for version in sorted(v for v in versions if _VERSION.fullmatch(v)):
            draft = Draft(key, version)
            if self._writer_is_gone(draft):
                self.abandon(draft)

    def _writer_is_gone(self, draft: Draft) -> bool:
        owner = self.read_record(f"{draft.key}/{DRAFTS}/{draft.version}.json") or {}
        if owner.get("host") == process_identity()["host"]:  # its process can be asked directly
            return not process_is_running(owner)
        return time.time() - self._last_write(draft) > STALE_DRAFT_SECONDS

    def _last_write(self, draft: Draft) -> float:
        """When anything of the version (or its owner record) was last written, in epoch seconds."""
        latest = 0.0
        with self._errors(f"list {self.url(draft.prefix)}"):
            paths = [self.path(f"{draft.key}/{DRAFTS}/{draft.version}.json")]
            with contextlib.suppress(FileNotFoundError):
                paths += list(self.fs.find(self.path(draft.prefix)))
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    latest = max(latest, _modified(self.fs.info(path)))
        return latest

    def _forget_draft(self, draft: Draft) -> None:
        with self._errors(f"delete {self.url(draft.key)}/{DRAFTS}/{draft.version}.json"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(f"{draft.key}/{DRAFTS}/{draft.version}.json"))
        if self._local:  # no empty _drafts/ folder left in a sealed artifact, nor an empty abandoned key
            for folder in (f"{draft.key}/{DRAFTS}", draft.key):
                with contextlib.suppress(OSError):
                    os.rmdir(self.path(folder))

    def _compare_and_swap(self, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Write change(current bytes, or None if absent) at key, unless it returns None, atomically
        against other writers. Returns what is at key afterwards, as far as this writer knows: its own
        bytes if it wrote, the current ones if change() declined."""
        path = self.path(key)
        if not _is_s3(self.fs):
            with self._errors(f"write {self.url(key)}"), self._locked(path.rsplit("/", 1)[0]):
                try:
                    current = self.fs.cat_file(path)
                except FileNotFoundError:
                    current = None
                new = change(current)
                if new is None:
                    return current
                self._write_small(path, new)
                return new
        for _ in range(CAS_ATTEMPTS):
            with self._errors(f"write {self.url(key)}"):
                try:
                    etag = self.fs.info(path, refresh=True)["ETag"]
                    current = self.fs.cat_file(path)
                except FileNotFoundError:
                    etag, current = None, None
                new = change(current)
                if new is None:
                    return current
                condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
                try:
                    self.fs.pipe_file(path, new, **condition)
                    return new
                except OSError as exc:
                    if not _lost_a_conditional_write(exc):
                        raise
            time.sleep(random.uniform(0, 0.05))
        raise StoreError(f"store {display_uri(self.uri)}: cannot write {self.url(key)}: other writers kept "
                         f"changing it ({CAS_ATTEMPTS} tries)")

    @contextlib.contextmanager
    def _locked(self, folder: str) -> Iterator[None]:
        """An exclusive lock on a folder of a folder store (flock on the folder itself: no lock files in
        the store); memory stores take the process-wide lock."""
        if not self._local:
            with _MEMORY_LOCK:
                yield
            return
        os.makedirs(folder, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

    def _write_small(self, path: str, data: bytes) -> None:
        """One small file, never seen half-written: a single PUT on object stores, write + rename locally
        (under a name of this write's own, so concurrent writers never share a temporary file)."""
        if self._local:
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
            try:
                with open(partial, "wb") as handle:
                    handle.write(data)
                os.replace(partial, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
        else:
            self.fs.pipe_file(path, data)

    def _upload(self, draft: Draft, rel: str, local: Path) -> None:
        refused = unsafe_file_name(rel)
        if refused:
            raise ValueError(f"{self.url(draft.key)}: file name {rel!r} {refused}")
        remote = self.path(f"{draft.prefix}/{rel}")
        with self._errors(f"upload {self.url(draft.key)}/{rel}"):
            if self._local:
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local), remote)

    def _download(self, key: str, published: _Published, rel: str, target: Path, expected: dict,
                  one_stream: bool = False) -> None:
        """Download one file of an artifact to target and check it against its manifest entry.

        The bytes land under a temporary name and are renamed to target only once they match, so
        nothing is ever at target unless it matches; bytes that differ from the manifest raise
        _Damaged, which _retrying downloads again (as it does a body failing botocore's CRC32).
        one_stream (a retry, on S3): one GET that s3fs resumes where it was cut, rather than the
        concurrent ranged GETs that fail the whole file when any one of them is cut, so a flaky
        link that defeated the fast way still gets the file through.
        """
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
        try:
            self.fs.get_file(self.path(f"{published.prefix}/{rel}"), str(partial),
                             **({"max_concurrency": 1} if one_stream and _is_s3(self.fs) else {}))
            if not (partial.stat().st_size == expected["size"] and sha256_file(partial) == expected["sha256"]):
                raise _Damaged(f"{self.url(key)}/{rel}: damaged (size {partial.stat().st_size} vs {expected['size']} "
                               "in the manifest, or a different sha256); republish the artifact")
            os.replace(partial, target)
        except FileNotFoundError:
            if not partial.exists():
                raise _missing(self.url(key), rel) from None
            raise
        finally:
            partial.unlink(missing_ok=True)  # s3fs leaves what it got of a failed download

    def _rehash(self, key: str, published: _Published, rel: str, expected: dict) -> None:
        """Stream one stored file through sha256; _Damaged unless it matches its manifest entry."""
        digest = hashlib.sha256()
        size = 0
        try:
            handle = self.fs.open(self.path(f"{published.prefix}/{rel}"), "rb")
        except FileNotFoundError:
            raise _missing(self.url(key), rel) from None
        with handle:
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


def _missing(url: str, rel: str) -> StoreError:
    """A file a complete manifest lists but the store no longer holds (a lifecycle rule, a hand)."""
    return StoreError(f"{url}/{rel}: missing, though the manifest lists it (damaged); republish the artifact")


def _manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def _marker(version: str | None, manifest_bytes: bytes) -> bytes:
    marker = {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    if version is not None:
        marker["version"] = version
    return json.dumps(marker, sort_keys=True).encode()


def _modified(info: dict) -> float:
    """A file's last write in epoch seconds, from an fsspec info dict (local: mtime; S3: LastModified)."""
    value = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value or 0)


def _lost_a_conditional_write(exc: OSError) -> bool:
    """True when S3 refused a conditional PUT because another writer changed the object first:
    412 PreconditionFailed (s3fs raises FileExistsError for If-None-Match, EINVAL for If-Match) or
    409 ConditionalRequestConflict (another conditional write in flight)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = getattr(exc.__cause__, "response", None) or {}
    return cause.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


@functools.cache
def _checksum_errors() -> tuple[type[BaseException], ...]:
    """botocore's verdict that a body failed the checksum S3 stored with the object (CRC32 by default).
    Imported when first needed, on an error: folder and memory stores have no use for botocore, and
    may run where it is not installed (the GPU image): then there is no such fault to recognise."""
    try:
        from botocore.exceptions import FlexibleChecksumError
    except ImportError:
        return ()
    return (FlexibleChecksumError,)


@functools.cache
def _transfer_faults() -> tuple[type[BaseException], ...]:
    """What _retrying reads again: bytes that failed a checksum, and a response body cut short
    (aiohttp's ClientPayloadError and botocore's wrappers around a broken body read)."""
    faults = [_Damaged, *_checksum_errors(), http.client.IncompleteRead]
    try:  # absent where the store's protocol does not use them; their faults cannot happen there either
        from aiohttp import ClientPayloadError
        faults.append(ClientPayloadError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError
        faults += [IncompleteReadError, ResponseStreamingError]
    except ImportError:
        pass
    return tuple(faults)


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
