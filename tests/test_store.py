"""The store contract on file, memory and S3 (moto): atomic publish, verified reads, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qlora_ray.errors import StoreError
from qlora_ray.store import Store, adapter_key, base_key, display_uri, fused_key


def make_artifact(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "shard-1.bin").write_bytes(os.urandom(300_000))
    (root / "weights" / "shard-2.bin").write_bytes(os.urandom(1000))
    return root


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
    """Kill the publish at each step: readers see nothing; a rerun clears the leftovers and publishes."""
    source = make_artifact(tmp_path / "src")
    fs = any_store.fs
    real_put, real_pipe = fs.put_file, fs.pipe_file
    calls = {"put": 0}

    def crashing_put(local, remote, *args, **kwargs):
        calls["put"] += 1
        if crash_at == "between files" and calls["put"] == 2:
            raise KeyboardInterrupt("worker killed")
        return real_put(local, remote, *args, **kwargs)

    def crashing_pipe(path, data, *args, **kwargs):
        name = path.rsplit("/", 1)[-1].removesuffix(".partial")
        if (crash_at, name) in {("writing the manifest", "manifest.json"), ("writing _SUCCESS", "_SUCCESS")}:
            raise KeyboardInterrupt("worker killed")
        return real_pipe(path, data, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", crashing_put)
    monkeypatch.setattr(fs, "pipe_file", crashing_pipe)
    with pytest.raises(KeyboardInterrupt):
        any_store.publish("runs/j/adapters/t", source, kind="adapter", inputs={})
    monkeypatch.setattr(fs, "put_file", real_put)
    monkeypatch.setattr(fs, "pipe_file", real_pipe)

    assert fs.exists(any_store.path("runs/j/adapters/t"))  # debris is there ...
    assert not any_store.is_complete("runs/j/adapters/t")  # ... but nobody sees an artifact
    assert any_store.list_complete("runs/j/adapters") == []
    with pytest.raises(StoreError, match="no complete artifact"):
        any_store.fetch("runs/j/adapters/t", tmp_path / "out")

    (source / "weights" / "shard-2.bin").write_bytes(b"second attempt")
    any_store.publish("runs/j/adapters/t", source, kind="adapter", inputs={})
    any_store.fetch("runs/j/adapters/t", tmp_path / "out2")
    assert (tmp_path / "out2" / "weights" / "shard-2.bin").read_bytes() == b"second attempt"
    any_store.verify("runs/j/adapters/t")


def test_a_marker_that_does_not_vouch_for_the_manifest_is_ignored(any_store, tmp_path):
    any_store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    any_store.fs.pipe_file(any_store.path("bases/b/_SUCCESS"), b'{"manifest_sha256": "forged"}')
    assert not any_store.is_complete("bases/b")


def test_damaged_files_are_caught_on_load(any_store, tmp_path):
    any_store.publish("bases/b", make_artifact(tmp_path / "src"), kind="base", inputs={})
    any_store.fs.pipe_file(any_store.path("bases/b/weights/shard-2.bin"), b"tampered")
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
    expected = sorted([f"team/runs/j/adapters/t/{rel}" for rel in manifest["files"]]
                      + ["team/runs/j/adapters/t/manifest.json", "team/runs/j/adapters/t/_SUCCESS"])
    assert keys == expected
    for rel in manifest["files"]:
        body = client.get_object(Bucket=s3_bucket, Key=f"team/runs/j/adapters/t/{rel}")["Body"].read()
        assert body == (source / rel).read_bytes()
    stored_manifest = json.loads(client.get_object(Bucket=s3_bucket, Key="team/runs/j/adapters/t/manifest.json")["Body"].read())
    assert stored_manifest == manifest


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
