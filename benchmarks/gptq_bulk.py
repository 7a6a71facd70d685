"""Bulk gptq-int4 (one shard-wise pass for every tenant) against per-tenant GPTQ, on a GPU.

    python3 benchmarks/gptq_bulk.py --out OUT_DIR [--tenants 24] [--per-tenant 2] [--phases per-tenant,bulk,shard16]

Base: shape:llama3-8b (random weights: speed only). Tenants: N adapters with random LoRA factors
(r 16, the seven projections of every layer), each with the dates task's training rows staged as
its calibration data. Every phase is `qlora_ray.fuse.launch.fuse_job` on a local Ray cluster, on the
same base, in the same run, with --workers workers sharing the GPU (per-tenant: one, see below):

- per-tenant: `fuse.gptq.mode: per-tenant` for the first --per-tenant tenants (a whole GPTQModel
  run each, on one worker holding the whole GPU: each worker keeps a 16-bit merged copy on local
  disk, and two would not fit beside the base on the machine's 64 GiB); its wall time is scaled to
  N tenants;
- bulk: `fuse.gptq.mode: bulk` (pooled Hessian, the default capture) for all N tenants, Hessian
  capture included;
- shard16: bf16 and nf4 for all N tenants (the shard-wise pass the other schemes already had), so
  the table shows what each scheme costs per tenant.

The machine's disk cannot hold N tenants' outputs: fused shards go to a sink (sparse files, see
fuse_speed.py; FUSE_SINK_KEEP="" keeps none). The base and the Hessian sets are stored for real.
Results: OUT_DIR/gptq-bulk.json and .md, written after every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["FUSE_SINK_KEEP"] = ""
from benchmarks.fuse_speed import make_adapter, register_sink  # noqa: E402

CALIBRATION = REPO / "jobs" / "data" / "dates" / "train.jsonl"


def phase_job(work: Path, store_url: str, shape: str, tenants: list[str], schemes: list[str], gptq: dict,
              workers: int, device: str) -> Path:
    import yaml

    job = {"name": "bench", "store": store_url, "base": {"name": "base", "source": f"shape:{shape}"},
           "tenants": [{"id": t, "train_data": str(CALIBRATION)} for t in tenants],
           "fuse": {"schemes": schemes, "merge_base": "original", "workers": workers, "gptq": gptq,
                    "resources": {"num_cpus": max(1, 12 // workers) if device == "cuda" else 1,
                                  "num_gpus": 1 / workers if device == "cuda" else 0}}}
    path = work / f"job-{'-'.join(schemes)}-{gptq.get('mode', 'per-tenant')}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_phase(name: str, job: Path, store, results: dict, out: Path) -> dict:
    import ray

    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.spec import load_spec
    from qlora_ray.store import fused_key, hessian_key

    spec = load_spec(job)
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "benchmarks.fuse_speed.register_sink",
                          "env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "FUSE_SINK_KEEP": ""}})
    started = time.perf_counter()
    outcomes = fuse_job(spec, progress=lambda line: print(f"[{name}] {line}", flush=True))
    seconds = time.perf_counter() - started
    ray.shutdown()
    failed = [(o.tenant, o.variant, o.error) for o in outcomes if o.state != "done"]
    if failed:
        raise SystemExit(f"{name}: {failed[:3]}")
    tenants = len({o.tenant for o in outcomes})
    peak = lambda key: round(max(o.metrics.get(key, 0) for o in outcomes) / 2**30, 2)  # noqa: E731
    row = {"phase": name, "schemes": sorted({o.variant for o in outcomes}), "tenants": tenants,
           "wall_seconds": round(seconds, 1), "seconds_per_tenant": round(seconds / tenants, 2),
           "worker_peak_rss_gib": peak("worker_peak_rss_bytes"), "worker_peak_gpu_gib": peak("worker_peak_gpu_bytes"),
           "size_gb_per_tenant": {o.variant: round(o.metrics["size_bytes"] / 1e9, 2) for o in outcomes}}
    if "gptq-int4" in spec.fuse.schemes and spec.fuse.gptq.mode == "bulk":
        pool = "original"  # the one pooled set of merge base original
        metrics = store.read_manifest(hessian_key(spec.name, pool))["metrics"]
        row["hessians"] = {k: metrics[k] for k in ("seconds", "load_seconds", "capture_seconds", "write_seconds",
                                                   "calibration_rows", "calibration_tokens", "sites", "size_bytes")}
        row["hessians"]["worker_peak_gpu_gib"] = round(metrics.get("worker_peak_gpu_bytes", 0) / 2**30, 2)
        store.delete(hessian_key(spec.name, pool))
    for outcome in outcomes:  # sparse shards, but their small files are real; the next phase starts clean
        store.delete(fused_key(spec.name, outcome.tenant, outcome.variant))
    results["phases"][name] = row
    print(json.dumps(row), flush=True)
    save(results, out)
    return row


def save(results: dict, out: Path) -> None:
    (out / "gptq-bulk.json").write_text(json.dumps(results, indent=2))
    phases = results["phases"]
    lines = [f"# Bulk gptq-int4 against per-tenant GPTQ, {results['tenants']} tenants of shape:{results['shape']} "
             f"({results['date']})", "", f"Device: {results['device']}. Command: `{results['command']}`", "",
             "| phase | tenants timed | wall s | s per tenant | worker peak GPU GiB | worker peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} ({', '.join(row['schemes'])}) | {row['tenants']} | {row['wall_seconds']} | "
              f"{row['seconds_per_tenant']} | {row['worker_peak_gpu_gib']} | {row['worker_peak_rss_gib']} |"
              for name, row in phases.items()]
    if "per-tenant" in phases and "bulk" in phases:
        scaled = phases["per-tenant"]["seconds_per_tenant"] * results["tenants"]
        results["per_tenant_scaled_seconds"] = round(scaled, 1)
        results["bulk_speedup"] = round(scaled / phases["bulk"]["wall_seconds"], 2)
        lines += ["", f"Per-tenant GPTQ scaled to {results['tenants']} tenants: {scaled:.0f} s; bulk took "
                  f"{phases['bulk']['wall_seconds']} s: **{results['bulk_speedup']}x** (target: 5x)."]
    if "bulk" in phases and "hessians" in phases["bulk"]:
        h = phases["bulk"]["hessians"]
        lines += ["", f"Bulk's Hessian set: {h['calibration_rows']} rows ({h['calibration_tokens']} tokens), "
                  f"{h['sites']} sites, {h['size_bytes'] / 1e9:.1f} GB: base loaded in {h['load_seconds']} s, "
                  f"captured in {h['capture_seconds']} s, written and published in {h['write_seconds']} s."]
        (out / "gptq-bulk.json").write_text(json.dumps(results, indent=2))
    (out / "gptq-bulk.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tenants", type=int, default=24)
    parser.add_argument("--per-tenant", type=int, default=2, help="tenants timed through per-tenant GPTQ")
    parser.add_argument("--phases", default="per-tenant,bulk,shard16")
    parser.add_argument("--workers", type=int, default=4, help="fuse workers sharing the GPU (bulk and shard16)")
    parser.add_argument("--shard-size", default="2GB", help="the base's shard size")
    parser.add_argument("--shape", default="llama3-8b", help="shape:NAME of the base (tiny to try it on a CPU)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-bulk"))
    args = parser.parse_args()
    import torch

    from qlora_ray.bases import import_base
    from qlora_ray.store import Store, adapter_key, data_key

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    register_sink()
    store_url = f"sink://{args.work}/store"
    store = Store(store_url)
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
               "tenants": args.tenants, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "phases": {}}
    started = time.perf_counter()
    import_base(f"shape:{args.shape}", "base", store, shard_size=args.shard_size, device=device, progress=print)
    results["base_import_seconds"] = round(time.perf_counter() - started, 1)
    if device == "cuda":
        torch.cuda.empty_cache()  # the base was made on the GPU the workers share
    from transformers import AutoConfig

    store.fetch("bases/base", args.work / "base-config", only=["config.json"])
    config = AutoConfig.from_pretrained(str(args.work / "base-config"))
    tenants = [f"tenant-{i:02d}" for i in range(args.tenants)]
    rows = args.work / "rows"
    rows.mkdir(parents=True)
    shutil.copy(CALIBRATION, rows / "train.jsonl")
    for i, tenant in enumerate(tenants):
        folder = args.work / "adapters" / tenant
        make_adapter(folder, config, seed=i, rank=16)
        store.publish(adapter_key("bench", tenant), folder, kind="adapter", inputs={"training_fingerprint": "random"})
        store.publish(data_key("bench", tenant), rows, kind="data", inputs={"train_sha256": "dates"})
        shutil.rmtree(folder)
    save(results, args.out)
    gptq = {} if device == "cuda" else {"group_size": 32, "calibration_samples": 16}
    for phase in args.phases.split(","):
        if phase == "per-tenant":
            job = phase_job(args.work, store_url, args.shape, tenants[:args.per_tenant], ["gptq-int4"], gptq,
                            1, device)
        elif phase == "bulk":
            job = phase_job(args.work, store_url, args.shape, tenants, ["gptq-int4"], {**gptq, "mode": "bulk"},
                            args.workers, device)
        elif phase == "shard16":
            job = phase_job(args.work, store_url, args.shape, tenants, ["bf16", "nf4"], gptq, args.workers, device)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        run_phase(phase, job, store, results, args.out)
    print((args.out / "gptq-bulk.md").read_text())


if __name__ == "__main__":
    main()
