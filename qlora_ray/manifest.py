"""What an artifact's manifest.json records: its files, its inputs, the library versions, its metrics."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

MANIFEST_SCHEMA = "qlora_ray/manifest/v1"
MANIFEST_NAME = "manifest.json"
SUCCESS_NAME = "_SUCCESS"
RESERVED_NAMES = (MANIFEST_NAME, SUCCESS_NAME)

# Libraries whose version changes what an artifact contains; read from package metadata, not imported.
TRACKED_PACKAGES = (
    "qlora-ray", "torch", "transformers", "peft", "trl", "bitsandbytes", "safetensors", "gguf", "ray",
    "gptqmodel", "fsspec", "s3fs",
)


def sha256_file(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(local_dir: Path) -> dict[str, dict]:
    """{relative posix path: {sha256, size}} for every file under local_dir, sorted by path."""
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(kind: str, key: str, files: dict[str, dict], inputs: dict, metrics: dict) -> dict:
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "key": key,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "inputs": inputs,
        "metrics": metrics,
        "versions": library_versions(),
    }


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON: how a downstream artifact names the exact input it used."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
