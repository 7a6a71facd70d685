"""Security promises (docs/reliability.md): no pickle, no remote code, credentials never shown.

Tenant isolation is proven elsewhere: storage keys from safe segments only and no artifact ever
replaced (test_store.py), hostile tenant ids and job names refused (test_bad_inputs.py), API keys
that see only their tenant's models (test_serve.py).
"""

from __future__ import annotations

import logging
import re

import boto3
import pytest
import yaml

from qlora_ray.adapter_files import checked_adapter_dir
from qlora_ray.cli import main
from qlora_ray.errors import AdapterError
from qlora_ray.spec import load_spec
from tests.conftest import REPO, free_port
from tests.helpers import booby_trapped_pickle

PACKAGE = REPO / "qlora_ray"
# Calls that can run code from a file or a model repository. None may appear in the package.
FORBIDDEN = {
    r"trust_remote_code\s*=\s*True": "remote code",
    r"\btorch\.load\(": "pickle (torch.load)",
    r"\bpickle\.loads?\(": "pickle",
    r"weights_only\s*=\s*False": "pickle (torch.load without weights_only)",
    r"\byaml\.load\((?!.*Loader=_UniqueKeyLoader\))": "YAML read by a loader that can build Python objects",
    r"\b(unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b": "unsafe YAML",
    r"use_safetensors\s*=\s*False": "pickle weights",
}


def test_the_package_never_unpickles_or_runs_remote_code():
    found = [f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             for pattern, what in FORBIDDEN.items() if re.search(pattern, line)]
    assert not found, "\n".join(found)


def test_job_files_are_read_by_a_safe_loader():
    import yaml

    from qlora_ray import spec

    assert issubclass(spec._UniqueKeyLoader, yaml.SafeLoader)


def test_peft_never_sees_a_pickled_adapter(tiny_store, tmp_path):
    """peft unpickles adapter_model.bin when no safetensors file is there; our loaders check first."""
    from qlora_ray.quality.configs import UNMERGED_ROW, load_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (adapter / "adapter_model.bin").write_bytes(booby_trapped_pickle(tmp_path / "pickle-ran"))
    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    with pytest.raises(AdapterError, match="adapter_model.bin: pickle files are never loaded"):
        load_config(UNMERGED_ROW, {"base": base, "adapter": adapter}, "cpu")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        checked_adapter_dir(adapter)
    assert not (tmp_path / "pickle-ran").exists()


SECRET = "qlora-ray-storage-secret-never-shown"


def test_credentials_never_reach_output_logs_manifests_or_errors(s3_endpoint, tmp_path, monkeypatch, capsys, caplog):
    """Credentials given in storage_options: a base import, a status and a failing run print, log and
    publish nothing that holds them, and the spec's repr and hash leave them out."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bucket = f"qlora-ray-creds-{free_port()}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket=bucket)
    options = {"key": "qlora-ray-key-id", "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    job = {"name": "j", "store": f"s3://{bucket}/team", "storage_options": options,
           "base": {"name": "tiny", "source": "shape:tiny"}, "tenants": [{"id": "a", "train_data": "train.jsonl"}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    caplog.set_level(logging.DEBUG)

    assert main(["base", "import", "--job", str(path)]) == 0
    assert main(["status", str(path)]) == 0
    broken = tmp_path / "broken.yaml"  # the same credentials, a bucket that does not exist
    broken.write_text(yaml.safe_dump({**job, "store": "s3://no-such-bucket-qlora/x"}))
    assert main(["base", "import", "--job", str(broken)]) == 1

    output = capsys.readouterr()
    shown = output.out + output.err + caplog.text
    assert "does not exist" in shown
    assert SECRET not in shown
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="y")
    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert any(re.fullmatch(r".*/bases/tiny/v[^/]+/manifest.json", o["Key"]) for o in objects)
    for obj in objects:
        assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), obj["Key"]

    spec = load_spec(path)
    assert SECRET not in repr(spec)
    rotated = tmp_path / "rotated.yaml"
    rotated.write_text(yaml.safe_dump({**job, "storage_options": {**options, "secret": "another"}}))
    assert load_spec(rotated).spec_hash() == spec.spec_hash()
