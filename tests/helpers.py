"""Builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from qlora_ray.store import Store


def forge_manifest(store: Store, key: str, change: Callable[[dict], dict]) -> None:
    """Rewrite a complete artifact's manifest by hand, and its _SUCCESS to vouch for it, as someone
    with write access to the store could: the artifact still reads as complete."""
    marker = json.loads(store.fs.cat_file(store.path(f"{key}/_SUCCESS")))
    folder = f"{key}/{marker['version']}" if marker.get("version") else key
    manifest = change(json.loads(store.fs.cat_file(store.path(f"{folder}/manifest.json"))))
    manifest_bytes = json.dumps(manifest).encode()
    store.fs.pipe_file(store.path(f"{folder}/manifest.json"), manifest_bytes)
    store.fs.pipe_file(store.path(f"{key}/_SUCCESS"),
                       json.dumps({**marker, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}).encode())


def stored_file(store: Store, key: str, rel: str) -> str:
    """The store path of one file of a complete artifact (inside its sealed version)."""
    marker = json.loads(store.fs.cat_file(store.path(f"{key}/_SUCCESS")))
    folder = f"{key}/{marker['version']}" if marker.get("version") else key
    return store.path(f"{folder}/{rel}")
