"""Job files: what passes, and that every kind of mistake is reported with its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_ray.errors import SpecError
from qlora_ray.spec import load_spec, parse_size


def write_job(tmp_path: Path, body: dict | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def minimal(**overrides) -> dict:
    job = {
        "name": "acme",
        "store": "store",
        "base": {"name": "tiny", "source": "shape:tiny"},
        "tenants": [{"id": "t1", "train_data": "data/t1.jsonl"}],
    }
    job.update(overrides)
    return job


def problems(tmp_path: Path, body: dict | str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(write_job(tmp_path, body))
    return caught.value.problems


def test_minimal_job_gets_documented_defaults(tmp_path):
    spec = load_spec(write_job(tmp_path, minimal()))
    tenant = spec.tenants[0]
    assert tenant.training.quantization == "nf4" and tenant.training.double_quant
    assert tenant.training.lora.r == 16 and tenant.training.lora.alpha == 32
    assert spec.fuse.schemes == ["bf16", "nf4"]
    assert tenant.scorer == "exact"


def test_relative_paths_resolve_against_the_job_file(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    path = write_job(tmp_path / "jobs", minimal())
    monkeypatch.chdir("/")
    spec = load_spec(path)
    assert spec.store == str(tmp_path / "jobs" / "store")
    assert spec.tenants[0].train_data == str(tmp_path / "jobs" / "data" / "t1.jsonl")
    assert spec.base.source == "shape:tiny"


def test_uris_stay_as_written(tmp_path):
    spec = load_spec(write_job(tmp_path, minimal(store="s3://bucket/prefix", tenants=[
        {"id": "t1", "train_data": "s3://bucket/data/t1.jsonl"}])))
    assert spec.store == "s3://bucket/prefix"
    assert spec.tenants[0].train_data == "s3://bucket/data/t1.jsonl"


def test_tenant_overrides_merge_into_the_defaults(tmp_path):
    job = minimal(train={"lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "max_steps": 20})
    job["tenants"] = [
        {"id": "a", "train_data": "a.jsonl"},
        {"id": "b", "train_data": "b.jsonl", "lora": {"r": 4}, "learning_rate": 1e-3, "quantization": "none"},
    ]
    spec = load_spec(write_job(tmp_path, job))
    a, b = spec.tenant("a").training, spec.tenant("b").training
    assert (a.lora.r, a.lora.alpha, a.learning_rate) == (8, 16, 2e-4)
    assert (b.lora.r, b.lora.alpha, b.lora.dropout) == (4, 16, 0.1)  # only r overridden
    assert (b.learning_rate, b.quantization, b.max_steps) == (1e-3, "none", 20)


def test_the_design_example_message(tmp_path):
    job = minimal(tenants=[{"id": f"t{i}", "train_data": "x.jsonl"} for i in range(3)]
                  + [{"id": "t3", "train_data": "x.jsonl", "lora": {"r": 0}}])
    assert problems(tmp_path, job) == [f"{tmp_path / 'job.yaml'}: tenants[3].lora.r: must be greater than 0 (got 0)"]


def test_every_problem_is_reported_at_once(tmp_path):
    job = minimal(name="Bad Name", train={"learning_rat": 0.1, "batch_size": "4"})
    job["tenants"].append({"id": "../evil", "train_data": "x.jsonl", "scorer": "fuzzy"})
    job["fuse"] = {"schemes": ["bf16", "awq"], "gptq": {"group_size": 100, "desc_act": False, "static_groups": True}}
    found = "\n".join(problems(tmp_path, job))
    for expected in [
        "name: must be lower-case letters",
        "train.learning_rat: unknown field; did you mean 'learning_rate'?",
        "train.batch_size: must be a valid integer (got '4')",
        "tenants[1].id: must be lower-case",
        "tenants[1].scorer: unknown scorer 'fuzzy'",
        "fuse.schemes[1]: must be 'bf16', 'nf4' or 'gptq-int4' (got 'awq')",
        "fuse.gptq.group_size: must be -1 or a positive power of two (got 100)",
        "fuse.gptq.static_groups: needs desc_act: true",
    ]:
        assert expected in found, expected
    # a bad default is reported once, at train.*, not again for every tenant
    assert "tenants[0].batch_size" not in found


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"tenants": []}, "tenants: a job needs at least one tenant"),
        ({"tenants": [{"id": "a", "train_data": "x"}, {"id": "a", "train_data": "y"}]},
         "tenant id 'a' is used by tenants[0] and tenants[1]"),
        ({"tenants": [{"id": "A", "train_data": "x"}]}, "tenants[0].id: must be lower-case"),
        ({"tenants": [{"id": "a/b", "train_data": "x"}]}, "tenants[0].id: must be lower-case"),
        ({"tenants": [{"id": "a"}]}, "tenants[0].train_data: required field is missing"),
        ({"tenants": [{"id": "a", "train_data": "x", "training": {}}]}, "unknown field"),
        ({"train": {"max_steps": 10, "epochs": 1.0}}, "train: give max_steps or epochs, not both"),
        ({"train": {"lora": {"target_modules": []}}}, "train.lora.target_modules: must name at least one module"),
        ({"train": {"lora": {"target_modules": ["q_proj", "q_proj"]}}}, "must not repeat a module"),
        ({"train": {"lora": {"dropout": 1.0}}}, "train.lora.dropout: must be less than 1"),
        ({"train": {"quantization": "int3"}}, "train.quantization: must be 'nf4', 'fp4' or 'none'"),
        ({"train": {"resources": {"num_gpus": -1}}}, "train.resources.num_gpus: must be greater than or equal to 0"),
        ({"train": "fast"}, "train: expected a mapping of settings (got 'fast')"),
        ({"base": {"name": "tiny", "source": "shape:tiny", "shard_size": "lots"}}, "base.shard_size: expected a size"),
        ({"fuse": {"schemes": []}}, "fuse.schemes: must name at least one scheme"),
        ({"fuse": {"schemes": ["nf4", "nf4"]}}, "must not repeat a scheme"),
        ({"fuse": {"merge_base": "nf3"}}, "fuse.merge_base"),
        ({"quality_gate": {"min_accuracy_ratio": 1.5}}, "quality_gate.min_accuracy_ratio: must be less than or equal to 1"),
        ({"serve": {"port": 70000}}, "serve.port: must be less than 65536"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"base": None}, "base"),
    ],
)
def test_bad_fields(tmp_path, change, expected):
    found = "\n".join(problems(tmp_path, minimal(**change)))
    assert expected in found
    assert str(tmp_path / "job.yaml") in found  # every message names the file


def test_missing_required_sections(tmp_path):
    found = "\n".join(problems(tmp_path, {"name": "x"}))
    for field in ("store", "base", "tenants"):
        assert f"{field}: required field is missing" in found


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("name: a\nname: b\n", "key 'name' appears twice"),
        ("- just\n- a list\n", "expected a mapping of job settings at the top level (got list)"),
        ("", "expected a mapping of job settings at the top level (got NoneType)"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),  # safe loading only
    ],
)
def test_malformed_files(tmp_path, text, expected):
    assert expected in "\n".join(problems(tmp_path, text))


def test_unreadable_files(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(binary)


def test_spec_is_frozen_and_hash_is_stable(tmp_path):
    path = write_job(tmp_path, minimal())
    first, second = load_spec(path), load_spec(path)
    assert first.spec_hash() == second.spec_hash()
    with pytest.raises(Exception):
        first.name = "other"
    changed = load_spec(write_job(tmp_path, minimal(train={"max_steps": 7}), name="other.yaml"))
    assert changed.spec_hash() != first.spec_hash()


@pytest.mark.parametrize("text, size", [("64MB", 64_000_000), ("1GiB", 2**30), ("100kb", 100_000), (512, 512)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "0", "5 TB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_yaml_numbers_anchors_and_keys(tmp_path):
    text = yaml.safe_dump(minimal()) + "train: &defaults\n  learning_rate: 2e-4\n  max_steps: 10\n"
    spec = load_spec(write_job(tmp_path, text))
    assert spec.train.learning_rate == 2e-4  # YAML 1.1 would read "2e-4" as a string
    merged = yaml.safe_dump(minimal()) + "x_defaults: &d {r: 4}\n"
    assert "x_defaults: unknown field" in "\n".join(problems(tmp_path, merged))
    anchors = (
        "name: acme\nstore: store\nbase: {name: tiny, source: 'shape:tiny'}\n"
        "train: {lora: &lora {r: 4, alpha: 8}}\n"
        "tenants:\n  - {id: a, train_data: a.jsonl, lora: {<<: *lora, r: 8}}\n"
    )
    assert load_spec(write_job(tmp_path, anchors)).tenant("a").training.lora.r == 8
    assert "a key must be a plain value" in "\n".join(problems(tmp_path, "? [a, b]\n: 1\n"))


def test_fused_variants_per_tenant(tmp_path):
    job = minimal(fuse={"schemes": ["bf16", "gptq-int4"], "merge_base": "both"}, tenants=[
        {"id": "qlora", "train_data": "d.jsonl"},
        {"id": "lora", "train_data": "d.jsonl", "quantization": "none"},
        {"id": "pinned", "train_data": "d.jsonl", "merge_base": "nf4-dequantized"},
    ])
    spec = load_spec(write_job(tmp_path, job))
    names = {t.id: [v.name for v in spec.fused_variants(t)] for t in spec.tenants}
    assert names == {
        "qlora": ["bf16.original", "gptq-int4.original", "bf16.nf4-dequantized", "gptq-int4.nf4-dequantized"],
        "lora": ["bf16.original", "gptq-int4.original"],  # no 4-bit base to merge into
        "pinned": ["bf16.nf4-dequantized", "gptq-int4.nf4-dequantized"],
    }
    job["tenants"][1]["merge_base"] = "nf4-dequantized"
    (problem,) = problems(tmp_path, job)
    assert "tenant 'lora' trains on the 16-bit base" in problem and "merge_base: nf4-dequantized" in problem


def test_the_default_merge_base_is_chosen_per_scheme(tmp_path):
    """auto (the default): gptq-int4 into the NF4-dequantized base a QLoRA adapter was trained
    against, bf16 and nf4 into the original; a LoRA of the 16-bit base has only the original."""
    job = minimal(fuse={"schemes": ["bf16", "nf4", "gptq-int4"]}, tenants=[
        {"id": "qlora", "train_data": "d.jsonl"},
        {"id": "lora", "train_data": "d.jsonl", "quantization": "none"},
        {"id": "pinned", "train_data": "d.jsonl", "merge_base": "original"},
    ])
    spec = load_spec(write_job(tmp_path, job))
    assert spec.fuse.merge_base == "auto"
    names = {t.id: [v.name for v in spec.fused_variants(t)] for t in spec.tenants}
    assert names == {
        "qlora": ["bf16.original", "nf4.original", "gptq-int4.nf4-dequantized"],
        "lora": ["bf16.original", "nf4.original", "gptq-int4.original"],
        "pinned": ["bf16.original", "nf4.original", "gptq-int4.original"],
    }
