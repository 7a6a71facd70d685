"""Several writers on one key, on folder and S3 stores: publishing, records, and local copies.

Real processes where the race is between processes (two runs of one job, a Ray retry racing an
attempt cut off from the cluster); a barrier makes them reach the contended step together.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from qlora_ray.errors import StoreError
from qlora_ray.serve.keys import key_digest, new_key, revoke_tenant
from qlora_ray.store import AlreadyPublished, Store, api_keys_key
from tests.helpers import make_artifact, versions

KEY = "runs/j/fused/t/bf16.original"
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=["file", "s3"])
def shared_store(request, tmp_path) -> Store:
    """A store that other processes can open too."""
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    return Store(f"s3://{request.getfixturevalue('s3_bucket')}/root")


def _publish_after_barrier(uri: str, payload: bytes, barrier, results) -> None:
    """One writer: upload its own bytes, wait for the other writer to be ready to seal too, seal."""
    store = Store(uri)
    draft = store.begin(KEY)
    files = {"model.safetensors": store.put_part(draft, "model.safetensors", _file_with(payload))}
    barrier.wait(timeout=60)
    try:
        store.seal(draft, files, kind="fused", inputs={"writer": payload.decode()})
        results.put(("sealed", payload.decode()))
    except AlreadyPublished as exc:
        results.put(("lost", str(exc)))


def _file_with(payload: bytes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "model.safetensors"
    path.write_bytes(payload * 1000)
    return path


def test_two_processes_sealing_one_key_leave_exactly_one_verified_artifact(shared_store, tmp_path):
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    writers = [SPAWN.Process(target=_publish_after_barrier, args=(shared_store.uri, payload, barrier, results))
               for payload in (b"first-writer", b"other-writer")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in writers)
    assert [state for state, _ in outcomes] == ["lost", "sealed"], outcomes
    assert "published meanwhile by another writer" in outcomes[0][1]
    winner = outcomes[1][1]
    shared_store.verify(KEY)  # the manifest vouches for the bytes that are there
    assert shared_store.read_manifest(KEY)["inputs"] == {"writer": winner}
    shared_store.fetch(KEY, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == winner.encode() * 1000
    assert len(versions(shared_store, KEY)) == 1  # the loser removed its own version, nothing else


def test_a_retry_racing_an_attempt_keeps_the_first_seal_and_never_deletes_it(shared_store, tmp_path):
    """Attempt 1 uploads and stalls (its node cut off); the retry publishes; attempt 1 then seals, and
    its failure path runs: the retry's artifact stays complete and verified."""
    source = make_artifact(tmp_path / "retry")
    stalled = shared_store.begin(KEY)
    stale_parts = {"config.json": shared_store.put_part(stalled, "config.json", _file_with(b"stale"))}
    shared_store.publish(KEY, source, kind="fused", inputs={"attempt": 2})
    with pytest.raises(AlreadyPublished):
        shared_store.seal(stalled, stale_parts, kind="fused", inputs={"attempt": 1})
    shared_store.abandon(stalled)  # what a failure path does: its own version only
    with pytest.raises(AlreadyPublished, match="already published"):
        shared_store.begin(KEY)
    shared_store.verify(KEY)
    assert shared_store.read_manifest(KEY)["inputs"] == {"attempt": 2}
    assert shared_store.publish(KEY, source, kind="fused", inputs={"attempt": 3}, keep_existing=True)["inputs"] == {
        "attempt": 2}


def _add_keys(uri: str, tenant: str, count: int, barrier, results) -> None:
    store = Store(uri)
    barrier.wait(timeout=60)
    results.put([new_key(store, "j", tenant) for _ in range(count)])


def test_concurrent_keys_commands_lose_no_key(shared_store):
    barrier, results = SPAWN.Barrier(3), SPAWN.Queue()
    writers = [SPAWN.Process(target=_add_keys, args=(shared_store.uri, tenant, 5, barrier, results))
               for tenant in ("a", "b", "c")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    made = [key for _ in writers for key in results.get(timeout=5)]
    record = shared_store.read_record(api_keys_key("j"))
    assert sorted(record["keys"]) == sorted(key_digest(key) for key in made)


def test_a_revoke_racing_a_new_key_never_brings_the_revoked_key_back(shared_store):
    revoked = [new_key(shared_store, "j", "a") for _ in range(3)]
    added: list[str] = []
    threads = [threading.Thread(target=lambda: revoke_tenant(shared_store, "j", "a")),
               threading.Thread(target=lambda: added.extend(new_key(shared_store, "j", "b") for _ in range(5)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = shared_store.read_record(api_keys_key("j"))["keys"]
    assert not {key_digest(key) for key in revoked} & set(keys)
    assert {key_digest(key) for key in added} == set(keys)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"keys": ["x"]}'])
def test_a_damaged_key_record_is_refused_not_overwritten(any_store, content):
    any_store.fs.makedirs(any_store.path("runs/j/serve"), exist_ok=True)
    any_store.fs.pipe_file(any_store.path(api_keys_key("j")), content)
    with pytest.raises(StoreError, match="damaged"):
        new_key(any_store, "j", "a")
    with pytest.raises(StoreError, match="damaged"):
        revoke_tenant(any_store, "j", "a")
    assert any_store.fs.cat_file(any_store.path(api_keys_key("j"))) == content


def test_records_written_by_many_threads_at_once_never_fail_and_updates_add_up(any_store):
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for step in range(10):
                any_store.write_record("runs/j/status/t.json", {"writer": index, "step": step})
                any_store.update_record("runs/j/serve/counter.json", lambda r: {"n": (r or {"n": 0})["n"] + 1})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert any_store.read_record("runs/j/serve/counter.json") == {"n": 40}
    assert any_store.read_record("runs/j/status/t.json")["step"] == 9


def _fetch_many_times(uri: str, key: str, folder: str, barrier) -> None:
    store = Store(uri)
    files = store.read_manifest(key)["files"]
    barrier.wait(timeout=60)
    for _ in range(5):
        store.fetch(key, Path(folder))
        for rel in files:  # what a loader reads meanwhile (not the other fetch's temporary files)
            (Path(folder) / rel).read_bytes()


def test_two_processes_fetching_into_one_folder_never_tear_a_file(shared_store, tmp_path):
    source = make_artifact(tmp_path / "src")
    (source / "weights" / "shard-1.bin").write_bytes(bytes(range(256)) * 40_000)
    shared_store.publish(KEY, source, kind="fused", inputs={})
    folder = tmp_path / "shared-folder"
    barrier = SPAWN.Barrier(2)
    readers = [SPAWN.Process(target=_fetch_many_times, args=(shared_store.uri, KEY, str(folder), barrier))
               for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=180)
        assert reader.exitcode == 0
    for rel in shared_store.read_manifest(KEY)["files"]:
        assert (folder / rel).read_bytes() == (source / rel).read_bytes()
    assert not [p for p in folder.rglob("*.partial")]


def test_the_marker_names_its_version_and_a_forged_version_is_not_followed(any_store, tmp_path):
    any_store.publish(KEY, make_artifact(tmp_path / "src"), kind="fused", inputs={})
    marker = json.loads(any_store.fs.cat_file(any_store.path(f"{KEY}/_SUCCESS")))
    assert marker["version"] in versions(any_store, KEY)
    any_store.fs.pipe_file(any_store.path(f"{KEY}/_SUCCESS"), json.dumps({**marker, "version": "../../../bases/b"}).encode())
    assert not any_store.is_complete(KEY)


def test_while_the_store_is_unreachable_known_keys_stay_valid_and_the_log_says_revocation_waits(
        any_store, monkeypatch, caplog):
    from qlora_ray.serve.keys import KeyRing

    key = new_key(any_store, "j", "a")
    ring = KeyRing(any_store, "j")
    real = any_store.read_record

    def unreachable(record_key):
        raise StoreError("store x: cannot read x: ConnectionError: no route to host")

    monkeypatch.setattr(any_store, "read_record", unreachable)
    with caplog.at_level("WARNING", logger="qlora_ray.serve.keys"):
        ring.reload()
        ring.reload()
        assert ring.tenant(key) == "a"
    warnings = [r.getMessage() for r in caplog.records if r.name == "qlora_ray.serve.keys"]
    assert len(warnings) == 1 and "keys revoked meanwhile still work" in warnings[0] and "no route" in warnings[0]
    monkeypatch.setattr(any_store, "read_record", real)
    revoke_tenant(any_store, "j", "a")
    ring.reload()
    assert ring.tenant(key) is None
