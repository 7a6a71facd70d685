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
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import fsspec

from qlora_ray.errors import StoreError
from qlora_ray.manifest import ANNOTATIONS, MANIFEST_NAME, RESERVED_NAMES, SUCCESS_NAME, build_manifest, describe_files, sha256_file

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
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"store {display_uri(uri)}: cannot open: {exc}") from None
        self.root = self.root.rstrip("/")
        self._local = "file" in _protocols(self.fs)

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
            if target.is_file() and target.stat().st_size == expected["size"] and sha256_file(target) == expected["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(f"download {self.url(key)}/{rel}"):
                self.fs.get_file(self.path(f"{key}/{rel}"), str(target))
            size = target.stat().st_size
            if size != expected["size"] or sha256_file(target) != expected["sha256"]:
                target.unlink()
                raise StoreError(
                    f"{self.url(key)}/{rel}: damaged (size {size} vs {expected['size']} in the manifest, "
                    "or a different sha256); republish the artifact"
                )
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
            path = folder / rel
            if expected is None or not path.is_file() or path.stat().st_size != expected["size"] \
                    or sha256_file(path) != expected["sha256"]:
                raise StoreError(f"{self.url(key)}/{rel}: damaged or missing (differs from the manifest); "
                                 "republish the artifact")
        return folder

    def read_json(self, key: str, rel: str) -> dict:
        """One JSON file of a complete artifact, checked against the manifest."""
        manifest = self.read_manifest(key)
        if rel not in manifest["files"]:
            raise StoreError(f"{self.url(key)}: the manifest lists no {rel}")
        with self._errors(f"read {self.url(key)}/{rel}"):
            data = self.fs.cat_file(self.path(f"{key}/{rel}"))
        if hashlib.sha256(data).hexdigest() != manifest["files"][rel]["sha256"]:
            raise StoreError(f"{self.url(key)}/{rel}: damaged (sha256 differs from the manifest)")
        return json.loads(data)

    def verify(self, key: str) -> None:
        """Re-hash every file of a complete artifact in place. Raises StoreError on any mismatch."""
        manifest = self.read_manifest(key)
        for rel, expected in manifest["files"].items():
            digest = hashlib.sha256()
            size = 0
            with self._errors(f"read {self.url(key)}/{rel}"), self.fs.open(self.path(f"{key}/{rel}"), "rb") as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
            if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
                raise StoreError(f"{self.url(key)}/{rel}: damaged (differs from its manifest)")

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
                marker = json.loads(self.fs.cat_file(f"{path}/{SUCCESS_NAME}"))
                manifest_bytes = self.fs.cat_file(f"{path}/{MANIFEST_NAME}")
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

    def _errors(self, action: str) -> "_StoreErrors":
        return _StoreErrors(f"store {display_uri(self.uri)}: cannot {action}")


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
            raise StoreError(f"{self.prefix}: {type(exc).__name__}: {_short(exc)}") from None
        return False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:300]


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"s3", "s3a"} & set(_protocols(fs)))

