"""Storage faults: real s3fs against moto through a proxy that drops, cuts short, refuses or corrupts.

Each test proves one promise of qlora_ray.store's retry design (its module docstring): transient
faults are retried with backoff, bounded; an artifact whose publish failed is never visible; bytes
that differ from the manifest are never handed to a loader; the final error is one StoreError
naming the action and the key, without credentials.
"""

from __future__ import annotations

import json
import os

import pytest

from qlora_ray import store as store_module
from qlora_ray.errors import StoreError
from qlora_ray.store import S3_RETRIES, Store
from tests.conftest import AWS_TEST_ENV
from tests.faulty_proxy import FaultyProxy
from tests.helpers import stored_file
from tests.helpers import make_artifact

KEY = "runs/j/adapters/t"
# s3fs downloads a file larger than its block size as concurrent ranged GETs (weight shards, in
# real runs): this block size sends the 300 kB shard-1.bin of make_artifact down that path.
RANGED = {"default_block_size": 64 * 1024}


@pytest.fixture
def proxy(s3_endpoint):
    proxy = FaultyProxy(s3_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    """Backoff in milliseconds, its shape kept: the Store's through its module setting, botocore's
    (which has no setting) by scaling its standard-mode delay down 100 times."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(store_module, "RETRY_BACKOFF_S", 0.01)
    delay = ExponentialBackoff.delay_amount
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: delay(self, context) / 100)


def proxied(bucket: str, proxy: FaultyProxy, **options) -> Store:
    return Store(f"s3://{bucket}/root", {"client_kwargs": {"endpoint_url": proxy.url}, **options})


def assert_same_files(manifest: dict, source, fetched) -> None:
    for rel in manifest["files"]:
        assert (fetched / rel).read_bytes() == (source / rel).read_bytes(), rel


def assert_no_secret(error: StoreError) -> None:
    assert AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in str(error)
    assert AWS_TEST_ENV["AWS_ACCESS_KEY_ID"] not in str(error)


@pytest.mark.parametrize(("fault", "download"), [
    ("drop", "whole"), ("truncate", "whole"), ("503", "whole"), ("500", "whole"),
    ("truncate", "ranged"),  # the fault s3fs leaves to the Store: a range of a big file cut short
])
def test_a_round_trip_survives_an_endpoint_failing_every_third_request(s3_bucket, proxy, tmp_path, fault, download):
    """Every third request of a publish, a fetch, a verify and a listing fails: all of them succeed."""
    store = proxied(s3_bucket, proxy, **(RANGED if download == "ranged" else {}))
    source = make_artifact(tmp_path / "src")
    proxy.inject(fault, every=3)
    manifest = store.publish(KEY, source, kind="adapter", inputs={})
    store.fetch(KEY, tmp_path / "out")
    store.verify(KEY)
    assert store.read_json(KEY, "config.json") == {"hidden_size": 64}
    assert store.list_complete("runs/j/adapters") == ["t"]
    assert proxy.faults[fault] > 0
    proxy.heal()
    assert store.read_manifest(KEY) == manifest
    assert_same_files(manifest, source, tmp_path / "out")


@pytest.mark.parametrize("failing", ["weights/shard-2.bin", "manifest.json", "_SUCCESS"])
def test_a_publish_that_cannot_finish_is_never_visible_and_a_rerun_publishes(s3_bucket, proxy, tmp_path, failing):
    """Every PUT of one file fails until the retries run out: publish raises one StoreError naming the
    upload, nothing is complete, and once the endpoint is healthy the rerun publishes."""
    store = proxied(s3_bucket, proxy, config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 2}})
    source = make_artifact(tmp_path / "src")
    proxy.inject("500", method="PUT", path_contains=f"/{failing}")
    with pytest.raises(StoreError) as caught:
        store.publish(KEY, source, kind="adapter", inputs={})
    action = "upload" if failing.startswith("weights/") else "write"
    assert f"store s3://{s3_bucket}/root: cannot {action} s3://{s3_bucket}/root/{KEY}/{failing}: " in str(caught.value)
    assert_no_secret(caught.value)
    assert proxy.faults["500"] == 2  # botocore's two attempts, and no more

    proxy.heal()
    assert not store.is_complete(KEY)
    assert store.list_complete("runs/j/adapters") == []
    with pytest.raises(StoreError, match="no complete artifact"):
        store.fetch(KEY, tmp_path / "out")
    manifest = store.publish(KEY, source, kind="adapter", inputs={})
    store.fetch(KEY, tmp_path / "out")
    assert_same_files(manifest, source, tmp_path / "out")


@pytest.mark.parametrize(("download", "verdict"), [
    ("whole", "failed the checksum stored with the object"),  # botocore's CRC32 of a whole-object GET
    ("ranged", "or a different sha256"),  # ranged GETs, which botocore cannot check: the manifest's sha256
])
def test_a_body_corrupted_once_is_caught_by_a_checksum_and_downloaded_again(s3_bucket, proxy, tmp_path, monkeypatch,
                                                                           download, verdict):
    """One byte of shard-1.bin flipped in transit. With no retries, the named check rejects it;
    with the Store's retries, the file is downloaded again and arrives intact."""
    store = proxied(s3_bucket, proxy, **(RANGED if download == "ranged" else {}))
    source = make_artifact(tmp_path / "src")
    manifest = store.publish(KEY, source, kind="adapter", inputs={})
    flip_once = {"method": "GET", "path_contains": "shard-1.bin", "times": 1,
                 "header": "Range" if download == "ranged" else None}
    with monkeypatch.context() as once:
        once.setattr(store_module, "RETRY_ATTEMPTS", 1)
        proxy.inject("flip", **flip_once)
        with pytest.raises(StoreError, match=f"shard-1.bin: damaged .*{verdict}"):
            store.fetch(KEY, tmp_path / "no-retry")
    proxy.inject("flip", **flip_once)
    store.fetch(KEY, tmp_path / "out")
    assert proxy.faults["flip"] == 2
    assert_same_files(manifest, source, tmp_path / "out")


@pytest.mark.parametrize("download", ["whole", "ranged"])
def test_a_body_corrupted_every_time_is_damaged_and_leaves_nothing_behind(s3_bucket, proxy, tmp_path, download):
    store = proxied(s3_bucket, proxy, **(RANGED if download == "ranged" else {}))
    store.publish(KEY, make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    proxy.inject("flip", method="GET", path_contains="shard-1.bin")
    with pytest.raises(StoreError, match=r"cannot download s3://.*/weights/shard-1\.bin: damaged") as caught:
        store.fetch(KEY, tmp_path / "out")
    assert_no_secret(caught.value)
    assert proxy.faults["flip"] >= store_module.RETRY_ATTEMPTS
    assert not (tmp_path / "out" / "weights" / "shard-1.bin").exists()
    with pytest.raises(StoreError, match=r"weights/shard-1\.bin: damaged"):
        store.verify(KEY)  # reads the stored file in place: the same verdict


def test_small_reads_corrupted_once_are_read_again(s3_bucket, proxy, tmp_path):
    """The _SUCCESS marker, the manifest and a JSON file, each flipped once: still complete and read."""
    store = proxied(s3_bucket, proxy)
    store.publish(KEY, make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    for name in ("_SUCCESS", "manifest.json", "config.json"):
        proxy.inject("flip", method="GET", path_contains=f"/{name}", times=1)
        assert store.is_complete(KEY)
        assert store.read_json(KEY, "config.json") == {"hidden_size": 64}
        assert proxy.faults["flip"] == 1, name
        proxy.faults.clear()


def test_a_dead_endpoint_is_one_store_error_naming_action_and_key(s3_bucket, proxy, tmp_path):
    """Every request dropped: the shipped retries run out and end in one StoreError, without secrets."""
    store = proxied(s3_bucket, proxy)
    store.publish(KEY, make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    healthy = proxy.requests
    proxy.inject("drop")
    root = f"s3://{s3_bucket}/root"
    with pytest.raises(StoreError, match=f"^store {root}: cannot read {root}/{KEY}: ") as caught:
        store.fetch(KEY, tmp_path / "out")
    assert_no_secret(caught.value)
    assert 0 < proxy.faults["drop"] == proxy.requests - healthy  # every request was dropped


def test_botocore_gets_bounded_retries_unless_the_job_or_environment_chose(s3_bucket, monkeypatch):
    """S3_RETRIES reaches the botocore client; a job's config_kwargs or AWS_MAX_ATTEMPTS wins over it."""
    assert Store(f"s3://{s3_bucket}/a").fs.s3.meta.config.retries == S3_RETRIES
    own = {"mode": "adaptive", "total_max_attempts": 8}
    assert Store(f"s3://{s3_bucket}/b", {"config_kwargs": {"retries": own}}).fs.s3.meta.config.retries == own
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    fresh = {"skip_instance_cache": True}  # a client made now, under this environment
    assert Store(f"s3://{s3_bucket}/c", fresh).fs.s3.meta.config.retries["total_max_attempts"] == 7


@pytest.mark.parametrize("root", ["folder", "memory"])
def test_folder_and_memory_stores_are_not_retried(tmp_path, monkeypatch, root):
    """A damaged file on a store with no transfer is reported after one read, not three."""
    store = Store(str(tmp_path / "store") if root == "folder" else f"memory://faults-{os.getpid()}-{tmp_path.name}")
    store.publish(KEY, make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    store.fs.pipe_file(stored_file(store, KEY, "config.json"), json.dumps({"hidden_size": 65}).encode())
    reads = []
    real_get = store.fs.get_file
    monkeypatch.setattr(store.fs, "get_file", lambda *a, **k: reads.append(a) or real_get(*a, **k))
    with pytest.raises(StoreError, match="config.json: damaged"):
        store.fetch(KEY, tmp_path / "out", only=["config.json"])
    assert len(reads) == 1
