"""Node-local disk: scratch folders that no dead process leaves behind, and the bounded node cache."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qlora_ray import local_disk
from qlora_ray.local_disk import NodeCache, scratch_dir, sweep_scratch
from qlora_ray.store import Store
from tests.helpers import make_artifact

SPAWN = multiprocessing.get_context("spawn")


def _make_scratch_and_hang(root: str, ready) -> None:
    with scratch_dir("train-a", Path(root)) as folder:
        (folder / "half-written.safetensors").write_bytes(b"x" * 1000)
        ready.set()
        time.sleep(600)


def test_scratch_of_a_killed_process_is_removed_by_the_next_one_and_a_live_ones_is_not(tmp_path):
    ready = SPAWN.Event()
    killed = SPAWN.Process(target=_make_scratch_and_hang, args=(str(tmp_path), ready))
    killed.start()
    assert ready.wait(60)
    (left,) = (tmp_path / "work").iterdir()
    assert sweep_scratch(tmp_path) == []  # its owner still runs
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    foreign = tmp_path / "work" / "eval--another-host--1--1--abcd"
    foreign.mkdir()
    with scratch_dir("eval", tmp_path) as mine:
        assert not left.exists()  # swept when this one was made
        assert foreign.exists()  # another host's processes cannot be asked
        assert mine.is_dir() and mine.name.startswith("eval--")
    assert not mine.exists()


def _entry(size: int) -> callable:
    def fill(folder: Path) -> None:
        target = folder / "weights.bin"
        if not target.exists():
            target.write_bytes(b"w" * size)
    return fill


def test_the_cache_evicts_least_recently_used_entries_down_to_its_budget(tmp_path):
    cache = NodeCache(tmp_path, budget_bytes=2500)
    for entry in ("a", "b"):
        with cache.checkout(entry, _entry(1000)):
            pass
        time.sleep(0.02)  # distinct last-use times
    with cache.checkout("a", _entry(1000)):  # a is used again: b is now the least recent
        pass
    time.sleep(0.02)
    with cache.checkout("c", _entry(1000)) as folder:
        assert (folder / "weights.bin").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a", "c"]
    assert cache.size() <= 2500


def test_an_entry_in_use_is_never_evicted_and_an_oversized_one_still_loads(tmp_path):
    cache = NodeCache(tmp_path, budget_bytes=1500)
    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        with cache.checkout("in-use", _entry(1000)):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=reader)
    thread.start()
    assert holding.wait(30)
    with cache.checkout("big", _entry(4000)) as folder:  # over the budget alone
        assert (folder / "weights.bin").stat().st_size == 4000
    assert (tmp_path / "cache" / "in-use" / "weights.bin").exists()
    release.set()
    thread.join()
    with cache.checkout("next", _entry(100)):
        pass
    assert not (tmp_path / "cache" / "in-use").exists() and not (tmp_path / "cache" / "big").exists()


def test_downloads_a_dead_process_left_in_an_entry_are_removed(tmp_path):
    cache = NodeCache(tmp_path, budget_bytes=10**9)
    leftover = tmp_path / "cache" / "e" / f".weights.bin.1234{local_disk.PARTIAL_SUFFIX}"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"cut short")
    with cache.checkout("e", _entry(10)):
        assert not leftover.exists()


@pytest.mark.parametrize("backend", ["memory", "s3"])
def test_local_copies_of_a_remote_store_come_from_the_cache_once(backend, tmp_path, request, monkeypatch):
    store = Store("memory://cache-test-" + str(os.getpid())) if backend == "memory" else \
        Store(f"s3://{request.getfixturevalue('s3_bucket')}/x")
    store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    downloads = []
    real = store.fs.get_file
    monkeypatch.setattr(store.fs, "get_file", lambda *a, **k: (downloads.append(a[0]), real(*a, **k))[1])
    with store.local_copy("bases/b", ["config.json"]) as folder:
        assert (folder / "config.json").read_text() == '{"hidden_size": 64}'
        assert folder.is_relative_to(local_disk.local_root() / "cache")
    with store.local_copy("bases/b") as again:
        assert again == folder and (again / "weights" / "shard-1.bin").stat().st_size == 300_000
    assert len(downloads) == 3  # each file once


def _copy_after_barrier(uri: str, local_dir: str, barrier, results) -> None:
    """A replica's load: the whole artifact through the node cache, every file's hash checked."""
    import hashlib

    os.environ[local_disk.LOCAL_DIR_ENV] = local_dir
    store = Store(uri)
    barrier.wait()
    with store.local_copy("fused/m") as folder:
        results.put({rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest()
                     for rel in store.read_manifest("fused/m")["files"]})


def test_two_replicas_fetching_one_model_into_one_node_cache_at_once_do_not_tear_it(s3_bucket, tmp_path):
    store = Store(f"s3://{s3_bucket}/x")
    manifest = store.publish("fused/m", make_artifact(tmp_path / "src"), kind="fused", inputs={})
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    replicas = [SPAWN.Process(target=_copy_after_barrier, args=(store.uri, str(tmp_path / "node"), barrier, results))
                for _ in range(2)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(timeout=120)
        assert replica.exitcode == 0
    expected = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    assert [results.get(timeout=5), results.get(timeout=5)] == [expected, expected]
    entries = list((tmp_path / "node" / "cache").iterdir())
    assert len(entries) == 1 and not list(entries[0].rglob(f"*{local_disk.PARTIAL_SUFFIX}"))
