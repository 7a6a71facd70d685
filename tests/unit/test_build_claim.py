"""One builder per artifact: processes (threads here, each claim with an owner of its own) that need
the same build at once make it once; a failed, dead or hung builder does not keep the others waiting
for ever; and the Marlin loader goes through it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from qlora_ray import build_claim, marlin
from qlora_ray.errors import StoreError
from qlora_ray.local_disk import process_identity
from qlora_ray.store import Store, kernel_claim_key, kernel_key

ARTIFACT, CLAIM = kernel_key("marlin", "abc123"), kernel_claim_key("marlin", "abc123")


@pytest.fixture(autouse=True)
def quick_claims(monkeypatch):
    monkeypatch.setattr(build_claim, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(build_claim, "CLAIM_REFRESH_SECONDS", 0.05)
    monkeypatch.setattr(build_claim, "CLAIM_STALE_SECONDS", 0.5)


def _publish(store, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "kernel.so").write_text(name)
    store.publish(ARTIFACT, folder, kind="kernel", inputs={}, keep_existing=True)


def _race(store, tmp_path, count, build):
    """`count` threads each wanting the artifact; build(i) runs in the ones told to build."""
    outcomes, errors = {}, []

    def want(i):
        try:
            with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
                outcomes[i] = building
                if building:
                    build(i)
        except Exception as error:  # noqa: BLE001 - the test reports what the thread raised
            errors.append(error)

    threads = [threading.Thread(target=want, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes, errors


def test_of_processes_wanting_one_build_at_once_one_builds_and_the_others_wait_for_it(tmp_path):
    store, built = Store(str(tmp_path / "store")), []

    def build(i):
        time.sleep(0.3)  # long enough for every waiter to find the claim taken
        built.append(i)
        _publish(store, tmp_path, f"build-{i}")

    outcomes, errors = _race(store, tmp_path, 4, build)
    assert not errors and len(outcomes) == 4
    assert len(built) == 1 and sum(outcomes.values()) == 1
    assert store.is_complete(ARTIFACT)
    assert store.read_record(CLAIM)["state"] == "released"


def test_a_build_that_fails_gives_its_claim_to_a_waiter(tmp_path):
    store, tries = Store(str(tmp_path / "store")), []

    def build(i):
        tries.append(i)
        time.sleep(0.1)
        if len(tries) == 1:
            raise RuntimeError("compiler crashed")
        _publish(store, tmp_path, f"build-{i}")

    outcomes, errors = _race(store, tmp_path, 2, build)
    assert [str(e) for e in errors] == ["compiler crashed"]
    assert len(tries) == 2 and len(set(tries)) == 2  # the waiter built it after the failure
    assert store.is_complete(ARTIFACT)


def test_a_live_claim_is_waited_for_and_a_stopped_one_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "store"))
    elsewhere = {"host": "another-node", "pid": 1, "pid_started": 1}
    store.write_record(CLAIM, {"state": "building", "owner": "x", "beat": 0, "builder": elsewhere})

    def refresh(stop):
        beat = 0
        while not stop.wait(0.05):
            beat += 1
            store.write_record(CLAIM, {"state": "building", "owner": "x", "beat": beat, "builder": elsewhere})

    stop = threading.Event()
    refresher = threading.Thread(target=refresh, args=(stop,))
    refresher.start()
    started = time.monotonic()
    threading.Timer(1.5, stop.set).start()  # the builder on the other node dies 1.5 s in
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        waited = time.monotonic() - started
        assert building and store.read_record(CLAIM)["builder"] == process_identity()
    refresher.join()
    assert 1.4 + build_claim.CLAIM_STALE_SECONDS <= waited < 1.5 + build_claim.CLAIM_STALE_SECONDS + 1.5


def test_a_claim_of_this_host_whose_process_is_gone_is_free_at_once(tmp_path):
    import psutil

    store = Store(str(tmp_path / "store"))
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    gone = {**process_identity(), "pid": process.pid, "pid_started": int(psutil.Process(process.pid).create_time() * 100)}
    store.write_record(CLAIM, {"state": "building", "owner": "x", "beat": 0, "builder": gone})
    watch = build_claim.ClaimWatch()
    assert not watch.is_free(store.read_record(CLAIM), time.monotonic())  # alive: its claim holds
    process.wait()
    started = time.monotonic()
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        assert building and time.monotonic() - started < build_claim.CLAIM_STALE_SECONDS


def test_an_artifact_published_meanwhile_is_loaded_not_built(tmp_path, monkeypatch):
    monkeypatch.setattr(build_claim, "CLAIM_STALE_SECONDS", 60.0)  # the claim below is never refreshed
    store = Store(str(tmp_path / "store"))
    store.write_record(CLAIM, {"state": "building", "owner": "x", "beat": 0, "builder": process_identity()})
    threading.Timer(0.2, _publish, args=(store, tmp_path, "theirs")).start()
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        assert building is False


def test_a_build_longer_than_the_stale_time_keeps_its_claim_by_refreshing_it(tmp_path):
    store, built = Store(str(tmp_path / "store")), []

    def build(i):
        time.sleep(4 * build_claim.CLAIM_STALE_SECONDS)  # the waiters see the claim change all along
        built.append(i)
        _publish(store, tmp_path, f"build-{i}")

    outcomes, errors = _race(store, tmp_path, 3, build)
    assert not errors and len(built) == 1 and sum(outcomes.values()) == 1
    assert store.read_record(CLAIM)["beat"] >= 10


def test_a_hung_build_is_taken_over_by_one_waiter(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(build_claim, "MAX_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(build_claim, "CLAIM_STALE_SECONDS", 60.0)
    store = Store(str(tmp_path / "store"))
    store.write_record(CLAIM, {"state": "building", "owner": "x", "beat": 0, "builder": {"host": "elsewhere"}})
    outcomes, errors = _race(store, tmp_path, 3, lambda i: _publish(store, tmp_path, f"build-{i}"))
    assert not errors and sum(outcomes.values()) == 1  # one took it over and built; the others loaded its build
    assert "waited" in caplog.text and "building it here" in caplog.text
    assert store.read_record(CLAIM)["owner"] != "x"


def test_a_claim_deleted_while_building_is_not_written_back_damaged(tmp_path):
    store = Store(str(tmp_path / "store"))
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        assert building
        store.delete(CLAIM)  # someone clears kernels/ by hand
        time.sleep(3 * build_claim.CLAIM_REFRESH_SECONDS)
    assert store.read_record(CLAIM) is None
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        assert building and store.read_record(CLAIM)["state"] == "building"  # the key still takes claims


def test_a_store_that_cannot_keep_the_claim_still_gets_its_build(tmp_path, monkeypatch, caplog):
    store = Store(str(tmp_path / "store"))

    def refuse(key, change):
        raise StoreError("access denied")

    monkeypatch.setattr(store, "update_record", refuse)
    with build_claim.one_builder(store, ARTIFACT, CLAIM, what="the test kernel") as building:
        assert building
    assert "cannot keep a build claim (access denied)" in caplog.text


def test_the_marlin_loader_compiles_once_for_processes_starting_together(tmp_path, monkeypatch):
    """Eval tasks and replicas starting on a fresh cluster: one compiles, the others load its build."""
    store = Store(str(tmp_path / "store"))
    monkeypatch.setattr(marlin, "_shared_store", store)
    loaded, compiled = [], []
    monkeypatch.setattr(marlin.torch.ops, "load_library", lambda path: loaded.append(path))

    def start(i):
        library = tmp_path / f"node-{i}" / "qlora_ray_marlin_bf16.so"

        def compile_here():
            time.sleep(0.3)
            library.parent.mkdir(parents=True)
            library.write_bytes(b"kernel")
            compiled.append(i)

        marlin._load_or_build_shared("abc123", library, compile_here, what="the bf16 Marlin kernel", facts={})

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(compiled) == 1
    assert len(loaded) == 2 and all(path.endswith("qlora_ray_marlin_bf16.so") for path in loaded)
    assert store.is_complete(ARTIFACT)
