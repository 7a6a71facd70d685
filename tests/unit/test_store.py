"""The store contract on file, memory and S3 (moto): atomic publish, verified reads, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from qlora_ray.errors import StoreError
from qlora_ray.store import Store, adapter_key, base_key, display_uri, fused_key
from tests.helpers import make_artifact, versions


def test_layout_is_built_only_from_safe_segments():
    assert base_key("smollm2") == "bases/smollm2"
    assert adapter_key("demo", "sql") == "runs/demo/adapters/sql"
    assert fused_key("demo", "sql", "gptq-int4") == "runs/demo/fused/sql/gptq-int4"
    for bad in ("../x", "a/b", "", "A", ".hidden"):
        with pytest.raises(ValueError):
            adapter_key("demo", bad)


def test_publish_fetch_round_trip(any_store, tmp_path):
    source = make_artifact(tmp_path / "src")
    manifest = any_store.publish("runs/j/adapters/t", source, kind="adapter", inputs={"spec": "abc"},
                                 metrics={"loss": 0.5})
    assert set(manifest["files"]) == {"config.json", "weights/shard-1.bin", "weights/shard-2.bin"}
    assert manifest["kind"] == "adapter" and manifest["inputs"] == {"spec": "abc"} and manifest["metrics"] == {"loss": 0.5}
    assert manifest["versions"]["torch"].startswith("2.")
    assert any_store.is_complete("runs/j/adapters/t")
    assert any_store.read_manifest("runs/j/adapters/t") == manifest
    out = tmp_path / "out"
    any_store.fetch("runs/j/adapters/t", out)
    for rel in manifest["files"]:
        assert (out / rel).read_bytes() == (source / rel).read_bytes()
    any_store.verify("runs/j/adapters/t")
    assert any_store.read_json("runs/j/adapters/t", "config.json") == {"hidden_size": 64}
    assert any_store.list_complete("runs/j/adapters") == ["t"]


def test_publish_refuses_to_overwrite_a_complete_artifact(any_store, tmp_path):
    source = make_artifact(tmp_path / "src")
    any_store.publish("bases/b", source, kind="base", inputs={})
    with pytest.raises(StoreError, match="already published"):
        any_store.publish("bases/b", source, kind="base", inputs={})
    any_store.delete("bases/b")
    assert not any_store.is_complete("bases/b")
    any_store.publish("bases/b", source, kind="base", inputs={})
    assert any_store.is_complete("bases/b")


@pytest.mark.parametrize("crash_at", ["between files", "writing the manifest", "writing _SUCCESS"])
def test_a_crash_never_exposes_half_an_artifact(any_store, tmp_path, monkeypatch, crash_at):
    """Kill the publish at each step: readers see nothing; a rerun publishes, and once the dead writer
    is known to be gone its version is removed."""
    import qlora_ray.store as store_module

    source = make_artifact(tmp_path / "src")
    fs = any_store.fs
    real_put, real_write, real_swap = fs.put_file, any_store._write_small, any_store._compare_and_swap
    calls = {"put": 0}

    def crashing_put(local, remote, *args, **kwargs):
        calls["put"] += 1
        if crash_at == "between files" and calls["put"] == 2:
            raise KeyboardInterrupt("worker killed")
        return real_put(local, remote, *args, **kwargs)

    def crashing_write(path, data):
        if crash_at == "writing the manifest" and path.endswith("/manifest.json"):
            raise KeyboardInterrupt("worker killed")
        return real_write(path, data)

    def crashing_swap(key, change):
        if crash_at == "writing _SUCCESS":
            raise KeyboardInterrupt("worker killed")
        return real_swap(key, change)

    monkeypatch.setattr(fs, "put_file", crashing_put)
    monkeypatch.setattr(any_store, "_write_small", crashing_write)
    monkeypatch.setattr(any_store, "_compare_and_swap", crashing_swap)
    monkeypatch.setattr(any_store, "abandon", lambda draft: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        any_store.publish("runs/j/adapters/t", source, kind="adapter", inputs={})
    monkeypatch.undo()

    assert len(versions(any_store, "runs/j/adapters/t")) == 1  # debris is there ...
    assert not any_store.is_complete("runs/j/adapters/t")  # ... but nobody sees an artifact
    assert any_store.list_complete("runs/j/adapters") == []
    with pytest.raises(StoreError, match="no complete artifact"):
        any_store.fetch("runs/j/adapters/t", tmp_path / "out")

    # The crashed writer was this process, which still runs: its version is not taken for dead yet.
    monkeypatch.setattr(store_module, "process_is_running", lambda identity: False)
    (source / "weights" / "shard-2.bin").write_bytes(b"second attempt")
    any_store.publish("runs/j/adapters/t", source, kind="adapter", inputs={})
    any_store.fetch("runs/j/adapters/t", tmp_path / "out2")
    assert (tmp_path / "out2" / "weights" / "shard-2.bin").read_bytes() == b"second attempt"
    any_store.verify("runs/j/adapters/t")
    assert len(versions(any_store, "runs/j/adapters/t")) == 1  # the dead writer's version was swept


def test_a_version_of_a_writer_on_another_host_is_swept_only_when_idle(any_store, tmp_path, monkeypatch):
    import qlora_ray.store as store_module

    key = "runs/j/adapters/t"
    elsewhere = any_store.begin(key)
    any_store.put_part(elsewhere, "config.json", make_artifact(tmp_path / "src") / "config.json")
    owner = f"{key}/_drafts/{elsewhere.version}.json"
    any_store.write_record(owner, {**any_store.read_record(owner), "host": "another-host"})
    any_store.abandon(any_store.begin(key))
    assert versions(any_store, key) == [elsewhere.version]  # it may be alive over there
    monkeypatch.setattr(store_module, "STALE_DRAFT_SECONDS", -1)
    here = any_store.begin(key)
    assert versions(any_store, key) == []  # idle too long: swept
    any_store.put_part(here, "config.json", tmp_path / "src" / "config.json")
    any_store.begin(key)
    assert versions(any_store, key) == [here.version]  # this process still runs: never swept


def test_replace_switches_readers_from_the_old_artifact_to_the_new_and_a_failed_one_changes_nothing(
        any_store, tmp_path, monkeypatch):
    """What describes the store as it is now (a report, the quality verdicts) is replaced, never
    deleted first: readers see the old artifact or the new one. The replaced version stays for a
    reader that read the old _SUCCESS, until it has been idle for STALE_DRAFT_SECONDS."""
    import qlora_ray.store as store_module

    key = "runs/j/eval/verdicts"
    first = any_store.replace(key, make_artifact(tmp_path / "one"), kind="eval-verdicts", inputs={"n": 1})
    assert any_store.read_manifest(key) == first  # nothing to replace: a plain publish

    def cut_off(self, draft, rel, local):
        raise StoreError("connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "_upload", cut_off)
        with pytest.raises(StoreError, match="connection lost"):
            any_store.replace(key, make_artifact(tmp_path / "two"), kind="eval-verdicts", inputs={"n": 2})
    assert any_store.read_manifest(key) == first
    (first_version,) = versions(any_store, key)  # the failed attempt removed its own version

    second = any_store.replace(key, tmp_path / "two", kind="eval-verdicts", inputs={"n": 2})
    assert any_store.read_manifest(key) == second
    any_store.fetch(key, tmp_path / "out")
    assert (tmp_path / "out" / "weights" / "shard-1.bin").read_bytes() == (tmp_path / "two" / "weights" / "shard-1.bin").read_bytes()
    any_store.verify(key)
    assert first_version in versions(any_store, key) and len(versions(any_store, key)) == 2
    monkeypatch.setattr(store_module, "STALE_DRAFT_SECONDS", -1)
    third = any_store.replace(key, tmp_path / "one", kind="eval-verdicts", inputs={"n": 3})
    assert any_store.read_manifest(key) == third and len(versions(any_store, key)) == 1


def test_a_marker_that_does_not_vouch_for_the_manifest_is_ignored(any_store, tmp_path):
    any_store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    any_store.fs.pipe_file(any_store.path("bases/b/_SUCCESS"), b'{"manifest_sha256": "forged"}')
    assert not any_store.is_complete("bases/b")


def test_damaged_files_are_caught_on_load(any_store, tmp_path):
    any_store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    any_store.fs.pipe_file(any_store.path(f"bases/b/{versions(any_store, 'bases/b')[0]}/weights/shard-2.bin"), b"tampered")
    with pytest.raises(StoreError, match="shard-2.bin: damaged"):
        any_store.fetch("bases/b", tmp_path / "out")
    with pytest.raises(StoreError, match="damaged"):
        any_store.verify("bases/b")
    assert not (tmp_path / "out" / "weights" / "shard-2.bin").exists()  # the bad copy is not left behind


def test_reserved_names_and_empty_folders_are_refused(any_store, tmp_path):
    source = make_artifact(tmp_path / "src")
    (source / "_SUCCESS").write_text("{}")
    with pytest.raises(ValueError, match="_SUCCESS"):
        any_store.publish("bases/b", source, kind="base", inputs={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to publish"):
        any_store.publish("bases/c", tmp_path / "empty", kind="base", inputs={})


def test_a_real_s3_client_sees_exactly_what_we_wrote(s3_bucket, tmp_path):
    import boto3

    store = Store(f"s3://{s3_bucket}/team")
    source = make_artifact(tmp_path / "src")
    manifest = store.publish("runs/j/adapters/t", source, kind="adapter", inputs={})
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="team/")["Contents"]
    keys = sorted(obj["Key"] for obj in listed)
    marker = json.loads(client.get_object(Bucket=s3_bucket, Key="team/runs/j/adapters/t/_SUCCESS")["Body"].read())
    folder = f"team/runs/j/adapters/t/{marker['version']}"
    expected = sorted([f"{folder}/{rel}" for rel in manifest["files"]]
                      + [f"{folder}/manifest.json", "team/runs/j/adapters/t/_SUCCESS"])
    assert keys == expected
    for rel in manifest["files"]:
        body = client.get_object(Bucket=s3_bucket, Key=f"{folder}/{rel}")["Body"].read()
        assert body == (source / rel).read_bytes()
    stored_manifest = client.get_object(Bucket=s3_bucket, Key=f"{folder}/manifest.json")["Body"].read()
    assert json.loads(stored_manifest) == manifest
    assert marker["manifest_sha256"] == hashlib.sha256(stored_manifest).hexdigest()


def test_storage_options_reach_s3fs(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """Endpoint and credentials from the job's storage_options instead of the environment."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = Store(f"s3://{s3_bucket}/x", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    store.check_reachable()
    store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    assert store.is_complete("bases/b")


def test_a_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        Store("s3://no-such-bucket-here/x").check_reachable()


def test_an_unreachable_endpoint_is_a_clear_error_without_secrets(s3_endpoint, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = Store("s3://bucket-x/y", {"config_kwargs": {"retries": {"max_attempts": 1}}})
    with pytest.raises(StoreError) as caught:
        store.check_reachable()
    message = str(caught.value)
    assert "store s3://bucket-x/y: cannot reach the store" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message


def test_a_local_store_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot reach the store"):
        Store(str(blocker / "store")).check_reachable()


def test_a_fault_is_named_as_itself_where_botocore_is_not_installed(tmp_path, monkeypatch):
    """Folder and memory stores need no botocore (a GPU image may lack it): a disk that fills up
    during a publish is reported as that, not as a failed import of botocore."""
    import sys

    from qlora_ray import store as store_module

    monkeypatch.setitem(sys.modules, "botocore", None)
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    store_module._checksum_errors.cache_clear()
    store = Store(str(tmp_path / "store"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.fs, "put_file", disk_full)
    try:
        with pytest.raises(StoreError, match="No space left on device"):
            store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    finally:
        store_module._checksum_errors.cache_clear()


def test_display_uri_hides_credentials():
    assert display_uri("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert display_uri("/local/path") == "/local/path"


def test_a_marker_cut_short_by_a_crash_is_not_complete_and_a_rerun_publishes(any_store, tmp_path):
    source = make_artifact(tmp_path / "src")
    any_store.publish("bases/b", source, kind="base", inputs={})
    any_store.fs.pipe_file(any_store.path("bases/b/_SUCCESS"), b'{"manifest_sha')
    assert not any_store.is_complete("bases/b")
    any_store.publish("bases/b", source, kind="base", inputs={})
    assert any_store.is_complete("bases/b")


@pytest.mark.parametrize("name", ["{tmp}/escaped", "../escaped", "weights/../../escaped", "weights\\..\\escaped",
                                  "weights//shard", "./config.json", "_SUCCESS", "_drafts/x.json", ""])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(any_store, tmp_path, name):
    """A manifest is as untrusted as the files beside it: names that are absolute, climb with '..', use
    backslashes or empty segments are refused on read, and nothing is written anywhere."""
    from tests.helpers import forge_manifest

    name = name.format(tmp=tmp_path)
    any_store.publish("runs/j/adapters/t", make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    entry = {"sha256": "0" * 64, "size": 3}
    forge_manifest(any_store, "runs/j/adapters/t", lambda m: {**m, "files": {**m["files"], name: entry}})
    assert any_store.is_complete("runs/j/adapters/t")
    out = tmp_path / "deep" / "out"
    for read in (lambda: any_store.fetch("runs/j/adapters/t", out), lambda: any_store.verify("runs/j/adapters/t"),
                 lambda: any_store.read_json("runs/j/adapters/t", "config.json"),
                 lambda: any_store.local_copy("runs/j/adapters/t").__enter__()):
        with pytest.raises(StoreError, match="the artifact is refused"):
            read()
    assert not list(tmp_path.rglob("escaped*")) and not out.exists()


def test_a_file_that_would_land_outside_the_folder_through_a_link_is_refused(any_store, tmp_path):
    any_store.publish("runs/j/adapters/t", make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "weights").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="outside"):
        any_store.fetch("runs/j/adapters/t", out)
    assert list(elsewhere.iterdir()) == []


def test_a_file_missing_under_a_complete_manifest_is_damaged_not_absent(any_store, tmp_path):
    from tests.helpers import stored_file

    any_store.publish("runs/j/adapters/t", make_artifact(tmp_path / "src"), kind="adapter", inputs={})
    any_store.fs.rm_file(stored_file(any_store, "runs/j/adapters/t", "config.json"))
    message = "config.json: missing, though the manifest lists it (damaged); republish the artifact"
    with pytest.raises(StoreError, match=re.escape(message)):
        any_store.fetch("runs/j/adapters/t", tmp_path / "out")
    with pytest.raises(StoreError, match=re.escape(message)):
        any_store.verify("runs/j/adapters/t")
    with pytest.raises(StoreError, match=re.escape(message)):
        any_store.read_json("runs/j/adapters/t", "config.json")
    with pytest.raises(StoreError, match="config.json: missing"):
        with any_store.local_copy("runs/j/adapters/t"):
            pass


@pytest.mark.parametrize("uri", ["ftp://nowhere.invalid/x", "http://127.0.0.1:9/x", "simplecache::s3://b/x",
                                 "gcs://bucket/x"])
def test_unsupported_schemes_are_refused_before_any_connection(uri, monkeypatch):
    import fsspec

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda *a, **k: pytest.fail("fsspec was asked to connect"))
    with pytest.raises(StoreError, match="not supported|unsupported scheme"):
        Store(uri)


def test_names_with_a_trailing_newline_are_not_safe_segments():
    with pytest.raises(ValueError):
        adapter_key("demo", "acme\n")
    with pytest.raises(ValueError):
        base_key("smollm2\n")
