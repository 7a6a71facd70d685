"""The fuse stage end to end on the tiny base: every scheme and merge base, against peft and transformers.

Adapters here are peft LoRA adapters with random factors (B is not zero, so every merge shows), put
in the store exactly where the train stage publishes them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_ray.fuse.launch import fuse_job
from qlora_ray.fuse.quant import FourBit, roundtrip_4bit
from qlora_ray.quality.configs import gptq_layer_shapes
from qlora_ray.store import Store, adapter_key, fused_key
from tests.conftest import copy_base
from tests.helpers import base_dir_of, fuse_spec, publish_adapter, stored_file

LORAS = {
    # alpha != r, and per-module patterns: a wrong scale or rank shows in the merged weights
    "acme": dict(r=4, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3}),
    "globex": dict(r=8, lora_alpha=16, use_rslora=True),
}


def fetch_fused(store: Store, tenant: str, variant: str, tmp_path: Path) -> Path:
    local = tmp_path / "fetched" / tenant / variant
    store.fetch(fused_key("t", tenant, variant), local)
    return local


@pytest.fixture(scope="module")
def fused_tiny(tiny_store, tmp_path_factory, local_ray):
    """Two tenants fused into bf16 and nf4 under both merge bases, once for the module's tests."""
    tmp_path = tmp_path_factory.mktemp("fused-tiny")
    store = Store(str(tmp_path / "store"))
    copy_base(tiny_store, store, tmp_path)
    base_dir = base_dir_of(store, tmp_path)
    adapters = {tenant: publish_adapter(store, tenant, base_dir, tmp_path, seed=i, **lora)
                for i, (tenant, lora) in enumerate(LORAS.items())}
    spec = fuse_spec(tmp_path, store, list(LORAS), merge_base="both")
    outcomes = fuse_job(spec, progress=lambda _: None)
    return store, base_dir, adapters, outcomes, tmp_path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10]])


def test_every_variant_is_published_once_and_verifies(fused_tiny):
    store, _, _, outcomes, _ = fused_tiny
    assert {(o.tenant, o.variant, o.state) for o in outcomes} == {
        (t, f"{s}.{m}", "done") for t in LORAS for s in ("bf16", "nf4") for m in ("original", "nf4-dequantized")}
    for tenant in LORAS:
        assert store.list_complete(f"runs/t/fused/{tenant}") == sorted(
            f"{s}.{m}" for s in ("bf16", "nf4") for m in ("original", "nf4-dequantized"))
        manifest = store.read_manifest(fused_key("t", tenant, "nf4.nf4-dequantized"))
        assert manifest["inputs"]["merge_base"] == "nf4-dequantized" and manifest["inputs"]["scheme"] == "nf4"
        assert manifest["inputs"]["trained_format"] == {"quant_type": "nf4", "double_quant": True}
        assert manifest["metrics"]["shards"] > 1 and manifest["metrics"]["worker_peak_rss_bytes"] > 0
        for variant in store.list_complete(f"runs/t/fused/{tenant}"):
            store.verify(fused_key("t", tenant, variant))


@pytest.mark.parametrize("tenant", list(LORAS))
def test_fused_bf16_equals_peft(fused_tiny, tenant):
    """Weights: bit-equal to peft's merge_and_unload (fp32, cast once). Logits: the unmerged adapter's,
    up to bf16 rounding of the stored weights."""
    store, base_dir, adapters, _, tmp_path = fused_tiny
    fused = AutoModelForCausalLM.from_pretrained(str(fetch_fused(store, tenant, "bf16.original", tmp_path)),
                                                 dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), str(adapters[tenant]))
    expected = logits(unmerged, IDS)
    peft_merged = unmerged.merge_and_unload().to(torch.bfloat16).state_dict()
    for name, tensor in fused.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), peft_merged[name]), name
    got = logits(fused, IDS)
    base = logits(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), IDS)
    assert (got - expected).abs().max() < 0.05 * (expected - base).abs().max()  # rounding, not the adapter


def test_nf4_scheme_loads_in_plain_transformers_as_its_bf16_quantized(fused_tiny):
    """The nf4 folder loads with no arguments into bitsandbytes 4-bit layers, and equals the bf16
    fused model quantized by transformers' own load_in_4bit."""
    import bitsandbytes as bnb

    store, _, _, _, tmp_path = fused_tiny
    for merge_base in ("original", "nf4-dequantized"):
        nf4 = AutoModelForCausalLM.from_pretrained(str(fetch_fused(store, "acme", f"nf4.{merge_base}", tmp_path)))
        assert isinstance(nf4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        reference = AutoModelForCausalLM.from_pretrained(
            str(fetch_fused(store, "acme", f"bf16.{merge_base}", tmp_path)),
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        for model in (nf4, reference):
            model.eval()
        assert torch.equal(logits(nf4, IDS), logits(reference, IDS))


def test_dequantized_merge_base_is_the_base_qlora_trained_on(fused_tiny):
    """bf16.nf4-dequantized = dequantize(quantize_nf4(W)) + delta, where the 4-bit loader's weights
    are what QLoRA training saw; untouched weights (norms, embeddings) stay as they were."""
    from safetensors.torch import load_file

    store, base_dir, adapters, _, tmp_path = fused_tiny
    qlora_base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                              bnb_4bit_use_double_quant=True))
    seen_in_training = qlora_base.model.layers[1].mlp.down_proj.weight
    import bitsandbytes.functional as bnbf

    trained_on = bnbf.dequantize_4bit(seen_in_training.data, seen_in_training.quant_state).to(torch.bfloat16)
    original = AutoModelForCausalLM.from_pretrained(str(base_dir)).model.layers[1].mlp.down_proj.weight.data
    assert torch.equal(roundtrip_4bit(original, FourBit("nf4", True)), trained_on)

    fused_dir = fetch_fused(store, "acme", "bf16.nf4-dequantized", tmp_path)
    fused = {}
    for shard in fused_dir.glob("*.safetensors"):
        fused.update(load_file(str(shard)))
    from qlora_ray.fuse.math import delta_weight
    from qlora_ray.fuse.worker import load_adapter_deltas

    delta = load_adapter_deltas(adapters["acme"])["model.layers.1.mlp.down_proj.weight"]
    expected = (trained_on.float() + delta_weight(delta)).to(torch.bfloat16)
    assert torch.equal(fused["model.layers.1.mlp.down_proj.weight"], expected)
    base_norm = AutoModelForCausalLM.from_pretrained(str(base_dir)).model.norm.weight
    assert torch.equal(fused["model.norm.weight"], base_norm.data)


def test_many_shards_equal_one_shard(fused_tiny, tmp_path, local_ray):
    """The same adapter fused into the base cut in 100 KB shards and in a single shard: equal tensors."""
    from safetensors.torch import load_file

    from qlora_ray.bases import import_base

    store, _, adapters, _, fused_tmp = fused_tiny
    single = Store(str(tmp_path / "single"))
    import_base("shape:tiny", "tiny", single, shard_size="100MB", progress=lambda _: None)
    assert len([f for f in single.read_manifest("bases/tiny")["files"] if f.endswith(".safetensors")]) == 1
    single.publish(adapter_key("t", "acme"), adapters["acme"], kind="adapter", inputs={})
    outcomes = fuse_job(fuse_spec(tmp_path, single, ["acme"], merge_base="both"), progress=lambda _: None)
    assert {o.state for o in outcomes} == {"done"}

    def tensors(folder: Path) -> dict:
        out = {}
        for shard in folder.glob("*.safetensors"):
            out.update(load_file(str(shard)))
        return out

    for variant in ("bf16.original", "nf4.original", "bf16.nf4-dequantized", "nf4.nf4-dequantized"):
        many = tensors(fetch_fused(store, "acme", variant, fused_tmp))
        one = tensors(fetch_fused(single, "acme", variant, tmp_path))
        assert many.keys() == one.keys() and len(many) > 20
        for name in many:
            assert torch.equal(many[name], one[name]), (variant, name)


def test_the_merge_base_is_the_format_the_adapter_was_trained_on_not_todays_job_file(tiny_job_store, tmp_path,
                                                                                      local_ray):
    """The adapter's manifest says it trained on FP4 without double quantization; the job file (edited
    since) says NF4 with it. The nf4-dequantized merge base follows the manifest. A manifest naming no
    known format fails that tenant alone, by name."""
    from safetensors.torch import load_file

    from qlora_ray.fuse.math import fuse_weight
    from qlora_ray.fuse.worker import load_adapter_deltas

    base_dir = base_dir_of(tiny_job_store, tmp_path)
    fp4 = {"quantization": "fp4", "double_quant": False}
    for tenant, seed, training in (("acme", 1, fp4), ("globex", 2, {"quantization": "int3", "double_quant": True})):
        folder = publish_adapter(tiny_job_store, tenant, base_dir, tmp_path, seed=seed, r=4, lora_alpha=8)
        tiny_job_store.delete(adapter_key("t", tenant))
        tiny_job_store.publish(adapter_key("t", tenant), folder, kind="adapter", inputs={"training": training})
    spec = fuse_spec(tmp_path, tiny_job_store, ["acme", "globex"], schemes=["bf16"], merge_base="nf4-dequantized")
    assert spec.tenant("acme").training.quantization == "nf4" and spec.tenant("acme").training.double_quant
    acme, globex = fuse_job(spec, progress=lambda _: None)
    assert acme.state == "done", acme.error
    assert globex.state == "failed" and "training quantization 'int3'" in globex.error
    key = fused_key("t", "acme", "bf16.nf4-dequantized")
    assert tiny_job_store.read_manifest(key)["inputs"]["trained_format"] == {"quant_type": "fp4", "double_quant": False}
    fused = {}
    for shard in fetch_fused(tiny_job_store, "acme", "bf16.nf4-dequantized", tmp_path).glob("*.safetensors"):
        fused.update(load_file(str(shard)))
    name = "model.layers.1.mlp.down_proj.weight"
    original = AutoModelForCausalLM.from_pretrained(str(base_dir)).model.layers[1].mlp.down_proj.weight.data
    delta = load_adapter_deltas(tmp_path / "adapter-acme")[name]
    assert torch.equal(fused[name], fuse_weight(roundtrip_4bit(original, FourBit("fp4", False)), delta))
    assert not torch.equal(fused[name], fuse_weight(roundtrip_4bit(original, FourBit("nf4", True)), delta))


def test_a_rerun_skips_complete_artifacts(fused_tiny):
    store, _, _, _, tmp_path = fused_tiny
    spec = fuse_spec(tmp_path, store, list(LORAS), merge_base="both")
    before = store.read_manifest(fused_key("t", "acme", "nf4.original"))["created_at"]
    outcomes = fuse_job(spec, progress=lambda _: None)
    assert {o.state for o in outcomes} == {"skipped"} and len(outcomes) == 8
    assert store.read_manifest(fused_key("t", "acme", "nf4.original"))["created_at"] == before


def test_gptq_scheme_loads_in_plain_transformers_and_keeps_the_adapter(fused_tiny, tmp_path, local_ray):
    """gptq-int4 at the default (bulk, each tenant's own Hessians), calibrated on the tenant's rows: a
    GPTQ checkpoint transformers loads into GPTQModel's quantized layers, whose logits follow the
    merged model rather than the base."""
    store, base_dir, _, _, _ = fused_tiny
    spec = fuse_spec(tmp_path, store, ["acme"], schemes=["gptq-int4"], gptq={"group_size": 32, "calibration_samples": 16})
    (outcome,) = fuse_job(spec, progress=lambda _: None)
    assert (outcome.variant, outcome.state) == ("gptq-int4.original", "done"), outcome.error
    manifest = store.read_manifest(fused_key("t", "acme", "gptq-int4.original"))
    assert (manifest["inputs"]["gptq"]["mode"], manifest["inputs"]["gptq"]["hessian"]) == ("bulk", "per-tenant")
    assert manifest["inputs"]["gptq"]["group_size"] == 32 and manifest["metrics"]["calibration_rows"] == 16
    folder = fetch_fused(store, "acme", "gptq-int4.original", tmp_path)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)
    assert gptq_layer_shapes(folder) == {(64, 64), (64, 32), (64, 128), (128, 64)}  # what the eval stage checks kernels on
    quantized = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(quantized.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel.")
    merged = logits(AutoModelForCausalLM.from_pretrained(str(fetch_fused(store, "acme", "bf16.original", tmp_path)),
                                                         dtype=torch.float32), IDS)
    base = logits(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), IDS)
    got = logits(quantized, IDS)
    assert (got - merged).norm() < (got - base).norm()


def corrupt_keys(folder: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = {k.replace(old, new): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))


def test_bad_adapters_and_a_damaged_base_publish_nothing(tiny_job_store, tmp_path, local_ray):
    """An adapter for another base, one with a target the base lacks, and a damaged base shard:
    each a clear error; no fused artifact of theirs appears; a good tenant is unaffected."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = base_dir_of(tiny_job_store, tmp_path)
    publish_adapter(tiny_job_store, "good", base_dir, tmp_path, seed=1, r=4, lora_alpha=8)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    publish_adapter(tiny_job_store, "other-base", base_dir, tmp_path, seed=2, model=other, r=4, lora_alpha=8)
    renamed = tmp_path / "renamed"
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                LoraConfig(r=4, target_modules=["gate_proj"]))
    peft_model.save_pretrained(str(renamed))
    corrupt_keys(renamed, "mlp.gate_proj", "mlp.gate2_proj")
    tiny_job_store.publish(adapter_key("t", "unknown-target"), renamed, kind="adapter", inputs={})
    publish_adapter(tiny_job_store, "weights-gone", base_dir, tmp_path, seed=4, r=4, lora_alpha=8)
    tiny_job_store.fs.rm_file(stored_file(tiny_job_store, adapter_key("t", "weights-gone"), "adapter_model.safetensors"))

    spec = fuse_spec(tmp_path, tiny_job_store, ["good", "other-base", "unknown-target", "missing", "weights-gone"])
    outcomes = {(o.tenant, o.variant): o for o in fuse_job(spec, progress=lambda _: None)}
    assert outcomes[("good", "nf4.original")].state == "done"
    mismatch = outcomes[("other-base", "bf16.original")]
    assert mismatch.state == "failed" and "trained for another base model" in mismatch.error
    assert "model.layers.0.mlp.down_proj.weight" in mismatch.error and "(64, 128)" in mismatch.error
    unknown = outcomes[("unknown-target", "nf4.original")]
    assert unknown.state == "failed" and "gate2_proj" in unknown.error and "does not have" in unknown.error
    missing = outcomes[("missing", "bf16.original")]
    assert missing.state == "failed" and "no adapter" in missing.error
    gone = outcomes[("weights-gone", "nf4.original")]
    assert gone.state == "failed" and "adapter_model.safetensors: missing, though the manifest lists it" in gone.error
    assert tiny_job_store.list_complete("runs/t/fused/good") == ["bf16.original", "nf4.original"]
    for tenant in ("other-base", "unknown-target", "missing", "weights-gone"):
        assert not tiny_job_store.fs.exists(tiny_job_store.path(f"runs/t/fused/{tenant}"))

    # a base shard damaged in the store after import: caught by its checksum, nothing published
    shard = sorted(f for f in tiny_job_store.read_manifest("bases/tiny")["files"] if f.endswith(".safetensors"))[1]
    path = Path(stored_file(tiny_job_store, "bases/tiny", shard))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    spec = fuse_spec(tmp_path, tiny_job_store, ["good"], merge_base="nf4-dequantized")
    outcomes = fuse_job(spec, progress=lambda _: None)
    assert {o.state for o in outcomes} == {"failed"}
    assert all(shard in o.error and "damaged" in o.error for o in outcomes), outcomes[0].error
    assert tiny_job_store.list_complete("runs/t/fused/good") == ["bf16.original", "nf4.original"]
    assert not tiny_job_store.fs.exists(tiny_job_store.path("runs/t/fused/good/nf4.nf4-dequantized"))


def test_a_failed_or_late_fuse_never_deletes_what_another_run_published(tiny_job_store, tmp_path):
    """Two runs of one job fuse the same variant: the one that fails, or seals second, keeps its hands
    off the artifact the other published (a gateway may be serving it)."""
    from qlora_ray.fuse.launch import _Artifact, _seal
    from qlora_ray.fuse.layout import read_layout
    from qlora_ray.fuse.plan import Build, output_format
    from qlora_ray.fuse.shards import ShardTarget
    from qlora_ray.spec import FusedVariant

    base_dir = base_dir_of(tiny_job_store, tmp_path)
    spec = fuse_spec(tmp_path, tiny_job_store, ["acme"])
    layout = read_layout(base_dir)
    key = fused_key("t", "acme", "bf16.original")
    build = Build(FusedVariant("bf16", "original"), {},
                  ShardTarget("acme", "original", ("bf16",), None, output_format(spec.tenant("acme"))))
    failed = _Artifact(build, tiny_job_store.begin(key), error="shard x: worker lost")
    late = _Artifact(build, tiny_job_store.begin(key))
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "config.json").write_text("{}")
    for shard in layout.shard_files:  # every part of the late run is in: it only has to seal
        late.parts[shard] = {**tiny_job_store.put_part(late.draft, shard, other_run / "config.json"), "tensors": [],
                             "tensor_bytes": 0, "seconds": 0.0, "worker_node_id": "node"}
    tiny_job_store.publish(key, other_run, kind="fused", inputs={"run": "other"})

    small_files = tmp_path / "base-small-files"  # what the driver holds of the base
    tiny_job_store.fetch("bases/tiny", small_files,
                         only=[f for f in tiny_job_store.read_manifest("bases/tiny")["files"] if not f.endswith(".safetensors")])
    assert _seal(spec, tiny_job_store, layout, failed, small_files).state == "failed"
    tiny_job_store.verify(key)
    outcome = _seal(spec, tiny_job_store, layout, late, small_files)
    assert outcome.state == "skipped", outcome.error
    tiny_job_store.verify(key)
    assert tiny_job_store.read_manifest(key)["inputs"] == {"run": "other"}


def test_gptq_calibrates_on_short_rows_and_names_rows_without_tokens(tiny_store, tmp_path):
    """A tenant's rows are its traffic, however short: GPTQModel's default would drop every row of 10
    tokens or fewer and then divide by zero. Rows that hold no token at all are a clear DataError."""
    from qlora_ray.errors import DataError
    from qlora_ray.fuse.gptq import gptq_quantize
    from qlora_ray.spec import GptqSpec

    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("gptqmodel_*"))
    metrics = gptq_quantize(base, tmp_path / "out", ["2 km", "3 m"], GptqSpec(group_size=32), device="cpu")
    assert metrics["calibration_rows"] == 2 and 2 <= metrics["calibration_tokens"] <= 10
    assert (tmp_path / "out" / "config.json").exists()
    # GPTQModel's layer offload goes beside the model, into the caller's scratch, not a folder of its own in /tmp
    assert (tmp_path / "gptqmodel-offload").is_dir() and set(temp.glob("gptqmodel_*")) <= before
    with pytest.raises(DataError, match="hold no tokens"):
        gptq_quantize(base, tmp_path / "out2", ["", ""], GptqSpec(group_size=32), device="cpu")


def test_the_pool_is_no_larger_than_the_machine_and_one_that_cannot_start_fails_at_once(tiny_job_store, tmp_path,
                                                                                     local_ray):
    """On a cluster we started (nothing will join it), a fuse worker that no node can place would
    wait without end, and so would the unit handed to it: the pool shrinks to what fits, and a job
    whose one worker cannot fit fails now, naming the setting, with nothing published."""
    from qlora_ray.fuse.launch import _pool_size

    base_dir = base_dir_of(tiny_job_store, tmp_path)
    publish_adapter(tiny_job_store, "acme", base_dir, tmp_path, seed=1, r=4, lora_alpha=8)
    lines = []
    assert _pool_size(fuse_spec(tmp_path, tiny_job_store, ["acme"], workers=4), 4, lines.append) == 2  # 2 CPUs
    assert lines == ["fuse.workers: 4 asked, but this machine has room for 2 worker(s) of CPU 1 (fuse.resources); "
                     "fusing on 2"]
    assert _pool_size(fuse_spec(tmp_path, tiny_job_store, ["acme"], workers=4), 1, lines.append) == 1
    assert len(lines) == 1  # fewer units than room: nothing to say

    spec = fuse_spec(tmp_path, tiny_job_store, ["acme"], resources={"num_cpus": 3})
    outcomes = fuse_job(spec, progress=lines.append)
    assert [(o.variant, o.state) for o in outcomes] == [("bf16.original", "failed"), ("nf4.original", "failed")]
    assert all("fuse.resources: no node of this Ray cluster has room for one fuse worker (CPU 3)" in o.error
               for o in outcomes)
    assert not tiny_job_store.list_complete("runs/t/fused/acme")
    assert not tiny_job_store.fs.exists(tiny_job_store.path("runs/t/fused/acme/bf16.original"))
