"""Bulk fuse (one pass over the base for every tenant) against the per-tenant baseline, on a GPU.

Base: shape:llama3-8b (random weights: speed only). Tenants: N adapters with random LoRA factors
(r 16, the seven projections of every layer). Both sides produce the nf4 scheme (and bf16 on the
way) from the same adapters, on the same machine, in the same run:

- ours: `qlora_ray.fuse.launch.fuse_job` unchanged, on a local Ray cluster, GPU workers;
- baseline, per tenant: load the base (transformers, bf16, on the GPU), attach the adapter (peft),
  merge_and_unload, save the merged bf16 model, load it back with BitsAndBytesConfig NF4 and save
  that: the transformers + peft + bitsandbytes path of the peft and bitsandbytes docs.

The machine's 64 GiB disk cannot hold 24 tenants' outputs, so the store is a "sink": fused shard
files uploaded to it become sparse files of the right size (no data), except tenant 0's, kept to
compare with the baseline's. Both sides still write every output file once to local disk (ours:
the worker's scratch shard before upload; baseline: save_pretrained); ours also computes every
file's sha256 for its manifest, which the baseline does not.

The baseline runs for --baseline-tenants tenants (each one is the same independent job), and its
mean per-tenant time is scaled to N tenants; the report says so.

Usage (on the GPU machine):  python benchmarks/fuse_speed.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The tenant whose fused shards the sink keeps (FUSE_SINK_KEEP="" keeps none); an environment variable so
# that Ray's workers, which import this module afresh, see what the driver chose.
KEEP = os.environ.get("FUSE_SINK_KEEP", "tenant-00")
DEVICE = "cuda"  # "cpu" with --shape tiny, to try the script on a machine without a GPU


class SinkFileSystem(LocalFileSystem):
    """A local folder, except that fused shards (but tenant 0's) are stored as sparse files."""

    protocol = ("sink", "file")

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("sink://"))

    def put_file(self, lpath, rpath, **kwargs):
        rpath = self._strip_protocol(rpath)
        if "/fused/" in rpath and rpath.endswith(".safetensors") and not (KEEP and f"/{KEEP}/" in rpath):
            os.makedirs(os.path.dirname(rpath), exist_ok=True)
            with open(rpath, "wb") as handle:
                handle.truncate(os.path.getsize(lpath))
            return
        super().put_file(lpath, rpath, **kwargs)


def register_sink() -> None:
    """Ray worker_process_setup_hook: every worker resolves sink:// the same way (and the store, which
    accepts only the schemes it supports, accepts this benchmark's own)."""
    from qlora_ray import store

    fsspec.register_implementation("sink", SinkFileSystem, clobber=True)
    if "sink" not in store.SUPPORTED_SCHEMES:
        store.SUPPORTED_SCHEMES = (*store.SUPPORTED_SCHEMES, "sink")


def make_adapter(folder: Path, config, seed: int, rank: int) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    dims = {"q_proj": (config.hidden_size, config.num_attention_heads * config.head_dim),
            "k_proj": (config.hidden_size, config.num_key_value_heads * config.head_dim),
            "v_proj": (config.hidden_size, config.num_key_value_heads * config.head_dim),
            "o_proj": (config.num_attention_heads * config.head_dim, config.hidden_size),
            "gate_proj": (config.hidden_size, config.intermediate_size),
            "up_proj": (config.hidden_size, config.intermediate_size),
            "down_proj": (config.intermediate_size, config.hidden_size)}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in dims.items():
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.02).bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    lora.save_pretrained(str(folder))


def baseline_tenant(base_dir: Path, adapter_dir: Path, scratch: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16, device_map=DEVICE)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(scratch / "bf16"))
    del model, merged
    bf16_seconds = time.perf_counter() - started
    quantized = AutoModelForCausalLM.from_pretrained(
        str(scratch / "bf16"), device_map=DEVICE,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    quantized.save_pretrained(str(scratch / "nf4"))
    del quantized
    shutil.rmtree(scratch / "bf16")  # the disk holds one tenant's outputs at a time
    return {"bf16_seconds": round(bf16_seconds, 2), "bf16_and_nf4_seconds": round(time.perf_counter() - started, 2)}


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: identical tensors, and the largest difference of those that are not."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})
        return out

    a, b = tensors(ours), tensors(theirs)
    same_names = sorted(set(a) & set(b))
    identical = sum(torch.equal(a[k], b[k]) for k in same_names)
    diffs = [(a[k].float() - b[k].float()).abs().max().item() for k in same_names
             if a[k].is_floating_point() and a[k].shape == b[k].shape and not torch.equal(a[k], b[k])]
    element_equal = [(a[k] == b[k]).float().mean().item() for k in same_names if a[k].shape == b[k].shape]
    return {"tensors_ours": len(a), "tensors_baseline": len(b), "common": len(same_names), "identical": identical,
            "max_abs_diff_float": max(diffs, default=0.0),
            "min_elementwise_equal_fraction": round(min(element_equal, default=1.0), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tenants", type=int, default=24)
    parser.add_argument("--baseline-tenants", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shard-size", default="4GB")
    parser.add_argument("--work", default="/tmp/fusebench")
    parser.add_argument("--shape", default="llama3-8b", help="shape:NAME of the base (tiny to try it on a CPU)")
    args = parser.parse_args()
    global DEVICE
    import torch

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {"args": vars(args)}

    def save() -> None:
        (out / "fuse_speed.json").write_text(json.dumps(results, indent=2))

    import ray
    import torch
    import yaml

    from qlora_ray.bases import import_base
    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store, adapter_key

    register_sink()
    results["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    store = Store(f"sink://{work}/store")
    started = time.perf_counter()
    import_base(f"shape:{args.shape}", "base", store, shard_size=args.shard_size, device=DEVICE, progress=print)
    results["base_import_seconds"] = round(time.perf_counter() - started, 1)
    base_dir = Path(store.path("bases/base"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    tenants = [f"tenant-{i:02d}" for i in range(args.tenants)]
    for i, tenant in enumerate(tenants):
        folder = work / "adapters" / tenant
        make_adapter(folder, config, seed=i, rank=args.rank)
        store.publish(adapter_key("bench", tenant), folder, kind="adapter", inputs={"training_fingerprint": "random"})
    print(f"{len(tenants)} adapters ready", flush=True)
    save()

    job = {"name": "bench", "store": f"sink://{work}/store", "base": {"name": "base", "source": f"shape:{args.shape}"},
           "tenants": [{"id": t, "train_data": str(REPO / "jobs/data/dates/train.jsonl")} for t in tenants],
           "fuse": {"schemes": ["nf4"], "merge_base": "original", "workers": args.workers,
                    "resources": {"num_cpus": 3 if DEVICE == "cuda" else 1,
                                  "num_gpus": 1 / args.workers if DEVICE == "cuda" else 0}}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_spec(work / "job.yaml")
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "benchmarks.fuse_speed.register_sink",
                          "env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    started = time.perf_counter()
    outcomes = fuse_job(spec, progress=print)
    ours_seconds = time.perf_counter() - started
    ray.shutdown()
    assert all(o.state == "done" for o in outcomes), [o.error for o in outcomes if o.state != "done"]
    results["ours"] = {
        "scheme": "nf4", "tenants": len(tenants), "wall_seconds": round(ours_seconds, 1),
        "seconds_per_tenant": round(ours_seconds / len(tenants), 2),
        "worker_peak_rss_gib": round(max(o.metrics.get("worker_peak_rss_bytes", 0) for o in outcomes) / 2**30, 2),
        "worker_peak_gpu_gib": round(max(o.metrics.get("worker_peak_gpu_bytes", 0) for o in outcomes) / 2**30, 2),
        "base_shards": len(outcomes[0].metrics and [f for f in store.read_manifest("bases/base")["files"] if f.endswith(".safetensors")]),
        "size_gb_per_tenant": round(outcomes[0].metrics["size_bytes"] / 1e9, 2),
    }
    print(results["ours"], flush=True)
    save()

    runs = []
    for tenant in tenants[: args.baseline_tenants]:
        scratch = work / "baseline" / tenant
        runs.append(baseline_tenant(base_dir, work / "adapters" / tenant, scratch))
        print(tenant, runs[-1], flush=True)
        if tenant != KEEP:
            shutil.rmtree(scratch)
        results["baseline"] = {"runs": runs}
        save()
    per_tenant = sum(r["bf16_and_nf4_seconds"] for r in runs) / len(runs)
    bf16_per_tenant = sum(r["bf16_seconds"] for r in runs) / len(runs)
    results["baseline"].update({
        "scheme": "nf4 (merged bf16 saved, reloaded 4-bit, saved)", "tenants_measured": len(runs),
        "seconds_per_tenant": round(per_tenant, 2), "bf16_only_seconds_per_tenant": round(bf16_per_tenant, 2),
        "scaled_wall_seconds": round(per_tenant * len(tenants), 1),
    })
    results["speedup_nf4"] = round(per_tenant * len(tenants) / ours_seconds, 2)
    results["speedup_vs_baseline_bf16_merge_only"] = round(bf16_per_tenant * len(tenants) / ours_seconds, 2)
    ours_dir = Path(store.path(f"runs/bench/fused/{KEEP}/nf4.original"))
    results["equal_outputs_nf4_tenant0"] = compare(ours_dir, work / "baseline" / KEEP / "nf4")
    print(json.dumps(results, indent=2), flush=True)
    save()


if __name__ == "__main__":
    main()
