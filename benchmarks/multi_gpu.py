"""Train, fuse and serve over the GPUs of one host, each against one GPU of the same machine.

    python3 benchmarks/multi_gpu.py --out OUT_DIR --part train   # tenants packed per GPU, over 1 and N GPUs
    python3 benchmarks/multi_gpu.py --out OUT_DIR --part fuse    # the fuse stage, one worker per GPU
    python3 benchmarks/multi_gpu.py --out OUT_DIR --part serve   # 1 and N model replicas at concurrency 64

Each part runs the same job once per GPU count in --gpus (default: 1 and every GPU of the machine),
the cluster limited to the first k GPUs by CUDA_VISIBLE_DEVICES (Ray counts only those), so the
ratio compares runs on one machine in one call. The job files are what a user writes: only
`resources`, `fuse.workers` and `serve.num_replicas` change with the GPU count.

- `train`: after a warm-up job (two steps of each data set, so that every measured run finds the
  machine's compile caches warm), --tenants tenants (the demo's four data sets, round robin) on
  shape:smollm2-135m, --train-steps steps each, 1/--per-gpu of a GPU per task: `qlora-ray train`'s wall time, the
  speed-up over one GPU and its efficiency (speed-up / GPUs), the GPUs each adapter's manifest
  says it trained on, and where each task's time went (its start, the training loop, the rest).
- `fuse`: --tenants random adapters (r 16, the seven projections) fused into bf16 and nf4 on
  shape:llama3-1b (shard-wise: every tenant's merge per base shard; an 8B's 16 GB bf16 copy per
  tenant would not fit the disk twice), and into gptq-int4 on the same base in bulk mode (the pooled
  Hessian set captured on one worker, then the shard pass), `fuse.workers` = GPUs with a whole GPU each:
  `qlora-ray fuse`'s wall time and the GPUs each fused model's manifest lists.
- `serve`: a shape:llama3-8b gptq-int4 model of random weights behind the Serve app, `qlora-ray bench`
  at concurrency 64, with one replica (batch 64) and with one replica per GPU (batch 64 / replicas,
  the job's default max_ongoing_requests of twice that). A warm-up level runs first (at twice the
  concurrency with several replicas, which makes every replica load the model); the level after it
  is the one reported.

Every artifact the job should make is verified (its files against its manifest), and the GPUs its
manifest says it ran on are counted. Results go to OUT_DIR/<part>.json and .md, the whole log to OUT_DIR/<part>.log. `--device cpu`
runs the same steps on shape:tiny with --gpus 1 (to try the script without a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_pipeline import (DATA, Run, bench_report, gpu_name, gpu_names, install,  # noqa: E402
                                     publish_random_adapter, publish_random_fused, run_part, store_of, write_job)

DATA_SETS = {"dates": "exact", "kv2json": "json", "sql": "exact", "units": "exact"}


def visible(gpus: int, run: Run) -> dict:
    """The environment that limits a command's cluster to the first `gpus` GPUs."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))} if run.device == "cuda" else {}


def tenants(count: int) -> list[dict]:
    names = list(DATA_SETS)
    return [{"id": f"t{i:02d}", "train_data": str(DATA / names[i % len(names)] / "train.jsonl"),
             "scorer": DATA_SETS[names[i % len(names)]]} for i in range(count)]


def artifact_facts(store, keys: list[str], gpu_key: str) -> dict:
    """Each expected artifact verified (its files against its manifest), and the GPUs its manifest
    says it ran on; the ones missing."""
    where, missing = {}, []
    for key in keys:
        if not store.is_complete(key):
            missing.append(key)
            continue
        store.verify(key)
        where[key] = store.read_manifest(key)["metrics"].get(gpu_key)
    return {"complete": len(where), "expected": len(keys), "missing": missing, "gpus_by_artifact": where,
            "artifacts_per_gpu": dict(Counter(",".join(map(str, g or [])) or "none" for g in where.values()))}


def task_seconds(store, spec, launched: float) -> dict:
    """Where each training task's time went, from its status record and its adapter's manifest, in
    seconds from the command's start: when the task began training its tenant (its worker started
    and imported), how long it took before and after the training loop (loading the base, the data,
    saving), the loop itself, and when it ended."""
    from qlora_ray.store import adapter_key
    from qlora_ray.train.status import read_status

    rows = {}
    for tenant in spec.tenants:
        status, key = read_status(store, spec.name, tenant.id), adapter_key(spec.name, tenant.id)
        if not status or not store.is_complete(key):
            continue
        metrics = store.read_manifest(key)["metrics"]
        loop = metrics["train_seconds"]
        busy = status["finished_ts"] - status["started_ts"]
        rows[tenant.id] = {"started": round(status["started_ts"] - launched, 1), "outside_loop": round(busy - loop, 1),
                           "load": metrics.get("load_seconds"), "setup": metrics.get("setup_seconds"),
                           "loop": round(loop, 1), "ended": round(status["finished_ts"] - launched, 1)}
    return rows


def scaling_rows(walls: dict[int, float]) -> dict:
    one = walls[min(walls)]
    return {str(g): {"wall_s": wall, "speedup": round(one / wall, 2), "efficiency": round(one / wall / g * min(walls), 2)}
            for g, wall in walls.items()}


def train_part(run: Run, args) -> str:
    install(run)
    from qlora_ray.store import adapter_key

    shape = "smollm2-135m" if run.device == "cuda" else "tiny"
    gpu_share = round(1 / args.per_gpu, 4) if run.device == "cuda" else 0
    walls, facts = {}, {}

    def job(name: str, count: int, steps: int) -> Path:
        return write_job(run, name=name, base={"name": shape, "source": f"shape:{shape}", "shard_size": "100MB"},
                         tenants=tenants(count),
                         train={"max_steps": steps, "batch_size": 8, "seq_len": 256, "learning_rate": 4e-4,
                                "lr_scheduler": "constant", "checkpoint_every": 1000,
                                "resources": {"num_cpus": 2 if run.device == "cuda" else 1, "num_gpus": gpu_share}})

    warm_up = job("train-warm-up", len(DATA_SETS), 2)
    run.cli("base import", "base", "import", "--job", str(warm_up), "--device", run.device)
    # One tenant of each data set, two steps: the machine's compile caches are then warm for every
    # measured run alike (a first run on a fresh machine compiles; the 1-GPU run's second wave would
    # otherwise be the only warm one).
    run.cli("warm-up: 2 steps of each data set", "train", str(warm_up), env=visible(1, run))
    for gpus in args.gpus:
        path = job(f"train-{gpus}gpu", args.tenants, args.train_steps)
        launched = time.time()
        run.cli(f"train on {gpus} GPU(s)", "train", str(path), env=visible(gpus, run))
        walls[gpus] = run.results["steps"][f"train on {gpus} GPU(s)"]["seconds"]
        spec, store = store_of(path)
        facts[str(gpus)] = artifact_facts(store, [adapter_key(spec.name, t.id) for t in spec.tenants], "gpu_ids")
        facts[str(gpus)]["task_seconds"] = task_seconds(store, spec, launched)
        run.results["train"] = {"tenants": args.tenants, "steps": args.train_steps, "gpu_share": gpu_share,
                                "scaling": scaling_rows(walls), "artifacts": facts}
        run.save()
    lines = ["", "Each task's time (seconds from the command's start; min to max over its tenants):", "",
             "| GPUs | task started | outside the loop | of it, loading the base | of it, the trainer's set-up | "
             "training loop | task ended |", "|---|---|---|---|---|---|---|"]
    for gpus, fact in facts.items():
        spread = {part: [row[part] for row in fact["task_seconds"].values() if row[part] is not None]
                  for part in ("started", "outside_loop", "load", "setup", "loop", "ended")}
        lines.append(f"| {gpus} | " + " | ".join(f"{min(v)} to {max(v)}" if v else "-" for v in spread.values()) + " |")
    return render(run.results["train"], f"{args.tenants} tenants, {args.train_steps} steps each, "
                  f"{gpu_share:g} GPU per task, on shape:{shape}") + "\n".join(lines) + "\n"


def fuse_part(run: Run, args) -> str:
    install(run)
    from qlora_ray.store import fused_key, run_key

    cuda = run.device == "cuda"
    results = {}
    parts = (("bf16+nf4", "llama3-1b" if cuda else "tiny", ["bf16", "nf4"], "300MB"),
             ("gptq-int4", "llama3-1b" if cuda else "tiny", ["gptq-int4"], "300MB"))
    for label, shape, schemes, shard in (part for part in parts if part[0] in args.fuse_schemes):
        walls, facts = {}, {}
        for gpus in args.gpus:
            job = write_job(run, name=f"fuse-{label.replace('+', '-')}-{gpus}gpu",
                            base={"name": shape, "source": f"shape:{shape}", "shard_size": shard},
                            tenants=tenants(args.tenants),
                            fuse={"schemes": schemes, "merge_base": "original", "workers": gpus,
                                  "gptq": {"mode": "bulk", "hessian": "pooled", "group_size": 128 if cuda else 32,
                                           "calibration_samples": 32},
                                  "resources": {"num_cpus": 6 if cuda else 1, "num_gpus": 1 if cuda else 0}})
            spec, store = store_of(job)
            if gpus == args.gpus[0]:
                run.cli(f"base import {shape}", "base", "import", "--job", str(job), "--device", run.device)
            started = time.perf_counter()
            for index, tenant in enumerate(spec.tenants):
                publish_random_adapter(run, spec, store, tenant.id, seed=index)
            run.results["steps"][f"{label}: random adapters, {gpus} GPU(s)"] = {
                "seconds": round(time.perf_counter() - started, 1), "exit": 0}
            name = f"fuse {label} on {gpus} GPU(s)"
            run.cli(name, "fuse", str(job), env=visible(gpus, run))
            walls[gpus] = run.results["steps"][name]["seconds"]
            facts[str(gpus)] = artifact_facts(store, [fused_key(spec.name, t.id, f"{s}.original") for t in spec.tenants
                                                      for s in schemes], "worker_gpu_ids")
            results[label] = {"shape": shape, "schemes": schemes, "tenants": args.tenants,
                              "scaling": scaling_rows(walls), "artifacts": facts}
            run.results["fuse"] = results
            run.save()
            store.delete(f"{run_key(spec.name)}/fused")  # a run's fused 16-bit models would fill the disk
    return "\n".join(render(part, f"{label}: {args.tenants} tenants on shape:{part['shape']}, one worker per GPU")
                     for label, part in results.items())


def serve_part(run: Run, args) -> str:
    install(run)
    cuda = run.device == "cuda"
    shape, variant = ("llama3-8b", "gptq-int4.original") if cuda else ("tiny", "bf16.original")
    level, output_tokens, prompt_words = (64, 128, 24) if cuda else (4, 16, 8)
    model = f"acme/{variant}"

    def job(replicas: int) -> Path:
        return write_job(run, name="multi-gpu-serve", base={"name": shape, "source": f"shape:{shape}"},
                         tenants=[{"id": "acme", "train_data": str(DATA / "dates" / "train.jsonl")}],
                         fuse={"schemes": [variant.split(".")[0]], "merge_base": "original"},
                         serve={"num_replicas": replicas, "max_batch": level // replicas,
                                "context": 1024, "max_tokens": 512, "unmerged_baseline": False,
                                "allow_failed_quality": True,
                                "resources": {"num_cpus": 2, "num_gpus": 1 if cuda else 0}})

    spec, store = store_of(job(1))
    started = time.perf_counter()
    publish_random_fused(spec, store, shape, variant, run.device, run.work / "random-fused")
    if cuda:  # the replicas' Marlin build, shared through the store as the first replica would share it
        from qlora_ray import marlin

        marlin.prepare(store, share=True, precision="bf16")
    run.results["steps"]["random fused model and kernel"] = {"seconds": round(time.perf_counter() - started, 1), "exit": 0}
    rows = {}
    for gpus in args.gpus:
        path = job(gpus)
        # Serve's router sends a model's requests to the replicas that hold it, and to another only
        # when those are full (max_ongoing_requests: twice the batch by default): the warm-up level
        # fills the first replica so that every replica loads the model before the measured level.
        warm_up = level if gpus == 1 else 2 * level
        run.cli(f"bench, {gpus} replica(s)", "bench", str(path), "--models", model, "--concurrency", f"{warm_up},{level}",
                "--duration", str(args.bench_seconds), "--prompt-tokens", str(prompt_words),
                "--output-tokens", str(output_tokens), env=visible(gpus, run))
        report = bench_report(path)
        rows[str(gpus)] = {"warm_up": report["results"][0], "measured": report["results"][1],
                           "deploy_seconds": report.get("deploy_seconds")}
        run.results["serve"] = {"model": model, "concurrency": level, "output_tokens": output_tokens, "replicas": rows}
        run.save()
    one = rows[str(args.gpus[0])]["measured"]["output_tok_s"]
    lines = [f"Model `{model}`, concurrency {level}, answers of {output_tokens} tokens, one replica per GPU "
             f"(batch {level} / replicas).", "",
             "| replicas (GPUs) | output tok/s | vs 1 | TTFT p50 / p99 ms | TPOT p50 ms | errors | 429 |",
             "|---|---|---|---|---|---|---|"]
    for gpus, row in rows.items():
        m = row["measured"]
        lines.append(f"| {gpus} | {m['output_tok_s']} | {m['output_tok_s'] / one:.2f}x | {m['ttft_ms_p50']} / "
                     f"{m['ttft_ms_p99']} | {m['tpot_ms_p50']} | {m['errors']} | {m['overloaded']} |")
    return "\n".join(lines) + "\n"


def render(part: dict, title: str) -> str:
    lines = [f"### {title}", "", "| GPUs | wall s | speed-up | efficiency | artifacts complete / expected | "
             "artifacts per GPU |", "|---|---|---|---|---|---|"]
    for gpus, row in part["scaling"].items():
        facts = part["artifacts"][gpus]
        spread = ", ".join(f"GPU {g}: {n}" for g, n in sorted(facts["artifacts_per_gpu"].items()))
        lines.append(f"| {gpus} | {row['wall_s']} | {row['speedup']}x | {row['efficiency']:.0%} | "
                     f"{facts['complete']} / {facts['expected']} | {spread} |")
    return "\n".join(lines) + "\n"


PARTS = {"train": train_part, "fuse": fuse_part, "serve": serve_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-ray-multi-gpu"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--gpus", type=lambda text: sorted({int(v) for v in text.split(",")}),
                        help="GPU counts to run on (default: 1 and every GPU of the machine)")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--per-gpu", type=int, default=4, help="--part train: tenants trained at once on one GPU")
    parser.add_argument("--fuse-schemes", default="bf16+nf4,gptq-int4", type=lambda text: text.split(","),
                        help="--part fuse: bf16+nf4 (shard-wise), gptq-int4 (bulk, pooled Hessians) or both, "
                             "each on shape:llama3-1b")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--bench-seconds", type=float, default=10.0)
    parser.add_argument("--no-install", action="store_true", help="use the environment as it is (default on cpu)")
    args = parser.parse_args()
    if args.gpus is None:
        args.gpus = sorted({1, len(gpu_names())}) if args.device == "cuda" else [1]
    run_part(args, PARTS[args.part], "", f"over {max(args.gpus)} x {gpu_name()}", {"gpus": args.gpus})


if __name__ == "__main__":
    main()
