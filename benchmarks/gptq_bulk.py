"""Bulk gptq-int4 (one shard-wise pass for every tenant) against per-tenant GPTQ, on a GPU.

    python3 benchmarks/gptq_bulk.py --out OUT_DIR [--tenants 24] [--per-tenant 2] [--phases per-tenant,bulk,bulk-own,shard16]

Base: shape:llama3-8b (random weights: speed only). Tenants: N adapters with random LoRA factors
(r 16, the seven projections of every layer), each with the dates task's training rows staged as
its calibration data. Every phase is `qlora_ray.fuse.launch.fuse_job` on a local Ray cluster, on the
same base, in the same run, with --workers workers sharing the GPU (per-tenant: one, see below;
bulk-own: --bulk-workers, each walk sizing its batches to its share of the GPU):

- per-tenant: `fuse.gptq.mode: per-tenant` for the first --per-tenant tenants (a whole GPTQModel
  run each, on one worker holding the whole GPU: each worker keeps a 16-bit merged copy on local
  disk, and two would not fit beside the base on the machine's 64 GiB); its wall time is scaled to
  N tenants;
- bulk: `fuse.gptq.mode: bulk` (one Hessian set from every tenant's rows pooled, captured layer by
  layer) for all N tenants, the capture included;
- bulk-own: `mode: bulk, hessian: per-tenant` (each tenant's Hessians from its own rows through
  its own merged model, in walks of the base, one per worker, never stored) for all N tenants;
- shard16: bf16 and nf4 for all N tenants (the shard-wise pass the other schemes already had), so
  the table shows what each scheme costs per tenant.

The gptq-int4 phases merge into --merge-base (default: the NF4-dequantized base, where bulk GPTQ
with each tenant's own rows kept the demo tenants' accuracy: docs/quality.md).

The machine's disk cannot hold N tenants' outputs: fused shards go to a sink (sparse files, see
fuse_speed.py; FUSE_SINK_KEEP="" keeps none). The base and the pooled Hessian sets are stored for real.
Results: OUT_DIR/gptq-bulk.json and .md, written after every phase.

A device call is limited to 10 minutes, less than the phases take on an 8B. With --resume, a
call reuses the base, the adapters and the results that an earlier call (on the same, still warm
machine) left in --work, so the phases can be spread over back-to-back calls of one run. Keep
--work under /tmp there: the repository's ignored folders are not kept between calls.

    gptq_bulk.py --out OUT --phases per-tenant
    gptq_bulk.py --out OUT --phases bulk --resume

--gptq overrides fuse.gptq settings in every phase of the call, and --label names its phases apart
(`bulk-own, LABEL`), so that settings can be compared in one run:

    gptq_bulk.py --out OUT --tenants 8 --phases bulk-own
    gptq_bulk.py --out OUT --tenants 8 --phases bulk-own --resume --gptq '{"desc_act": false}' --label natural
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
              workers: int, device: str, merge_base: str = "original") -> Path:
    import yaml

    job = {"name": "bench", "store": store_url, "base": {"name": "base", "source": f"shape:{shape}"},
           "tenants": [{"id": t, "train_data": str(CALIBRATION)} for t in tenants],
           "fuse": {"schemes": schemes, "merge_base": merge_base, "workers": workers, "gptq": gptq,
                    "resources": {"num_cpus": max(1, 12 // workers) if device == "cuda" else 1,
                                  "num_gpus": 1 / workers if device == "cuda" else 0}}}
    path = work / f"job-{'-'.join(schemes)}-{gptq.get('mode', 'default')}-{gptq.get('hessian', 'default')}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_phase(name: str, job: Path, store, results: dict, out: Path) -> dict:
    import ray

    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.spec import load_spec
    from qlora_ray.store import fused_key, hessian_key, run_key

    spec = load_spec(job)
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "benchmarks.fuse_speed.register_sink",
                          "env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "FUSE_SINK_KEEP": ""}})
    started = time.perf_counter()
    last_unit = [0.0]  # when the last unit of work came back: the rest of the wall time is sealing

    def progress(line: str) -> None:
        if " done " in line or "captured" in line:
            last_unit[0] = time.perf_counter() - started
        print(f"[{name}] {line}", flush=True)

    outcomes = fuse_job(spec, progress=progress)
    seconds = time.perf_counter() - started
    ray.shutdown()
    failed = [(o.tenant, o.variant, o.error) for o in outcomes if o.state != "done"]
    if failed:
        raise SystemExit(f"{name}: {failed[:3]}")
    tenants = len({o.tenant for o in outcomes})
    peak = lambda key: round(max(o.metrics.get(key, 0) for o in outcomes) / 2**30, 2)  # noqa: E731
    row = {"phase": name, "schemes": sorted({o.variant for o in outcomes}), "tenants": tenants,
           "gptq": spec.fuse.gptq.model_dump(), "workers": spec.fuse.workers,
           "gpus_per_worker": spec.fuse.resources.num_gpus, "wall_seconds": round(seconds, 1),
           "seconds_per_tenant": round(seconds / tenants, 2), "last_unit_done_seconds": round(last_unit[0], 1),
           "worker_peak_rss_gib": peak("worker_peak_rss_bytes"), "worker_peak_gpu_gib": peak("worker_peak_gpu_bytes"),
           "size_gb_per_tenant": {o.variant: round(o.metrics["size_bytes"] / 1e9, 2) for o in outcomes}}
    if spec.fuse.gptq.mode == "per-tenant":  # each tenant's unit, slowest first
        row["unit_seconds"] = sorted((o.metrics["seconds"] for o in outcomes), reverse=True)
    hessian_sets = [hessian_key(spec.name, pool) for pool in store.list_complete(f"{run_key(spec.name)}/hessians")]
    if hessian_sets:
        metrics = [store.read_manifest(key)["metrics"] for key in hessian_sets]
        row["hessians"] = {"sets": len(metrics), **{k: round(sum(m[k] for m in metrics), 2) for k in (
            "seconds", "load_seconds", "capture_seconds", "write_seconds", "calibration_rows", "calibration_tokens",
            "sites", "size_bytes")}}
        row["hessians"]["worker_peak_gpu_gib"] = round(max(m.get("worker_peak_gpu_bytes", 0) for m in metrics) / 2**30, 2)
        for key in hessian_sets:
            store.delete(key)
    for outcome in outcomes:  # sparse shards, but their small files are real; the next phase starts clean
        store.delete(fused_key(spec.name, outcome.tenant, outcome.variant))
    results["phases"][name] = row
    print(json.dumps(row), flush=True)
    save(results, out)
    return row


def save(results: dict, out: Path) -> None:
    phases = results["phases"]
    lines = [f"# Bulk gptq-int4 against per-tenant GPTQ, {results['tenants']} tenants of shape:{results['shape']} "
             f"({results['date']})", "", f"Device: {results['device']}. Commands: "
             + "; ".join(f"`{command}`" for command in results["commands"]), "",
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
    if "per-tenant" in phases and "bulk-own" in phases:
        own, alone = phases["bulk-own"], phases["per-tenant"]
        scaled = alone["seconds_per_tenant"] * own["tenants"]
        results["bulk_own_speedup"] = round(scaled / own["wall_seconds"], 2)
        lines += ["", f"Bulk with each tenant's own Hessians: {own['tenants']} tenants in {own['wall_seconds']} s "
                  f"({own['seconds_per_tenant']} s a tenant) against per-tenant GPTQ's {scaled:.0f} s scaled to as many: "
                  f"**{results['bulk_own_speedup']}x** (target: 5x)."]
        units = alone.get("unit_seconds", [])
        if len(units) >= 2:  # the slowest unit carries the worker's one-time costs: the others are the rate
            steady = alone["wall_seconds"] + (own["tenants"] - len(units)) * sum(units[1:]) / len(units[1:])
            results["per_tenant_steady_scaled_seconds"] = round(steady, 1)
            results["bulk_own_speedup_steady"] = round(steady / own["wall_seconds"], 2)
            lines += ["", f"Per-tenant GPTQ's units took {', '.join(f'{u:.1f}' for u in units)} s. Its wall time plus "
                      f"{own['tenants'] - len(units)} more units at the mean of all but the slowest: {steady:.0f} s, "
                      f"against bulk: **{results['bulk_own_speedup_steady']}x**."]
    for name, row in phases.items():
        plain = phases.get(name.split(", ")[0])
        if ", " in name and plain:  # a labelled call's phase against the same phase at the defaults
            lines += ["", f"{name} ({row['gptq']}): {row['wall_seconds']} s for {row['tenants']} tenants, "
                      f"{row['wall_seconds'] / plain['wall_seconds']:.2f}x the wall time of {name.split(', ')[0]} "
                      f"({plain['wall_seconds']} s)."]
    for name, row in phases.items():
        if "hessians" in row:
            h = row["hessians"]
            lines += ["", f"{name}: {h['sets']} Hessian set(s) from {h['calibration_rows']} rows "
                      f"({h['calibration_tokens']} tokens), {h['size_bytes'] / 1e9:.1f} GB, {h['seconds']} s of "
                      f"capture units (loading the base {h['load_seconds']} s, capturing {h['capture_seconds']} s, "
                      f"writing and publishing {h['write_seconds']} s); a capture worker's peak GPU memory "
                      f"{h['worker_peak_gpu_gib']} GiB. Its last unit was done at {row['last_unit_done_seconds']} s "
                      f"of {row['wall_seconds']} s (the rest: sealing the artifacts)."]
    for folder in (out, Path(results["work"])):  # the work copy is what a --resume call continues
        (folder / "gptq-bulk.json").write_text(json.dumps(results, indent=2))
    (out / "gptq-bulk.md").write_text("\n".join(lines) + "\n")


def make_base_and_tenants(args, store, tenants: list[str], device: str, results: dict) -> None:
    import torch
    from transformers import AutoConfig

    from qlora_ray.bases import import_base
    from qlora_ray.store import adapter_key, data_key

    started = time.perf_counter()
    import_base(f"shape:{args.shape}", "base", store, shard_size=args.shard_size, device=device, progress=print)
    results["base_import_seconds"] = round(time.perf_counter() - started, 1)
    if device == "cuda":
        torch.cuda.empty_cache()  # the base was made on the GPU the workers share
    store.fetch("bases/base", args.work / "base-config", only=["config.json"])
    config = AutoConfig.from_pretrained(str(args.work / "base-config"))
    rows = args.work / "rows"
    rows.mkdir(parents=True)
    shutil.copy(CALIBRATION, rows / "train.jsonl")
    for i, tenant in enumerate(tenants):
        folder = args.work / "adapters" / tenant
        make_adapter(folder, config, seed=i, rank=16)
        store.publish(adapter_key("bench", tenant), folder, kind="adapter", inputs={"training_fingerprint": "random"})
        store.publish(data_key("bench", tenant), rows, kind="data", inputs={"train_sha256": "dates"})
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tenants", type=int, default=24)
    parser.add_argument("--per-tenant", type=int, default=2, help="tenants timed through per-tenant GPTQ")
    parser.add_argument("--phases", default="per-tenant,bulk,bulk-own,shard16")
    parser.add_argument("--merge-base", default="nf4-dequantized", choices=["original", "nf4-dequantized"],
                        help="the gptq-int4 phases' merge base (shard16 merges into the original)")
    parser.add_argument("--workers", type=int, default=4, help="fuse workers sharing the GPU (bulk and shard16)")
    parser.add_argument("--bulk-workers", type=int, help="fuse workers sharing the GPU in bulk-own (default: --workers)")
    parser.add_argument("--shard-size", default="2GB", help="the base's shard size")
    parser.add_argument("--shape", default="llama3-8b", help="shape:NAME of the base (tiny to try it on a CPU)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-bulk"))
    parser.add_argument("--resume", action="store_true", help="continue the run an earlier call left in --work")
    parser.add_argument("--gptq", type=json.loads, default={}, help="fuse.gptq settings (JSON) for every phase")
    parser.add_argument("--label", help="a name added to this call's phase names in the results")
    args = parser.parse_args()
    import torch

    from qlora_ray.store import Store

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    register_sink()
    store_url = f"sink://{args.work}/store"
    store = Store(store_url)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    tenants = [f"tenant-{i:02d}" for i in range(args.tenants)]
    if args.resume:
        if not (args.work / "gptq-bulk.json").is_file():
            raise SystemExit(f"--resume: no earlier call's results in {args.work}")
        results = json.loads((args.work / "gptq-bulk.json").read_text())
        if (results["shape"], results["tenants"]) != (args.shape, args.tenants):
            raise SystemExit(f"--resume: {args.work} holds {results['tenants']} tenants of shape:{results['shape']}")
        results["commands"].append(command)
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
                   "tenants": args.tenants, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                   "commands": [command], "work": str(args.work), "phases": {}}
        make_base_and_tenants(args, store, tenants, device, results)
    save(results, args.out)
    gptq = ({} if device == "cuda" else {"group_size": 32, "calibration_samples": 16}) | args.gptq
    for phase in args.phases.split(","):
        if phase == "per-tenant":
            job = phase_job(args.work, store_url, args.shape, tenants[:args.per_tenant], ["gptq-int4"],
                            {**gptq, "mode": "per-tenant"}, 1, device, args.merge_base)
        elif phase == "bulk":
            job = phase_job(args.work, store_url, args.shape, tenants, ["gptq-int4"], {**gptq, "mode": "bulk", "hessian": "pooled"},
                            args.workers, device, args.merge_base)
        elif phase == "bulk-own":
            job = phase_job(args.work, store_url, args.shape, tenants, ["gptq-int4"],
                            {**gptq, "mode": "bulk", "hessian": "per-tenant"}, args.bulk_workers or args.workers, device,
                            args.merge_base)
        elif phase == "shard16":
            job = phase_job(args.work, store_url, args.shape, tenants, ["bf16", "nf4"], gptq, args.workers, device)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        run_phase(f"{phase}, {args.label}" if args.label else phase, job, store, results, args.out)
    print((args.out / "gptq-bulk.md").read_text())


if __name__ == "__main__":
    main()
