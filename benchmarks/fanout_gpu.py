"""Eight small tenants on one GPU through the real train stage: packed (fractional GPUs) vs in turn.

Both runs use `qlora_ray.train.launch.train_job` unchanged, on a local Ray cluster, with a
SmolLM2-135M-shaped base (random weights: speed only) and the demo tenants' data (each task used by
two tenants). "packed" gives each tenant num_gpus = 1/8, so Ray runs all eight at once on the one
GPU; "in turn" gives each num_gpus = 1, so they run one after another. Wall time covers the whole
stage: task start-up, model loads, training, evaluation loss and publishing to the store.

Usage (on the GPU machine):  python benchmarks/fanout_gpu.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TASKS = ["sql", "dates", "kv2json", "units"]


def write_job(folder: Path, name: str, store: str, num_gpus: float, tenants: int, steps: int) -> Path:
    job = {
        "name": name,
        "store": store,
        "base": {"name": "smollm2-shape", "source": "shape:smollm2-135m"},
        "train": {"max_steps": steps, "batch_size": 8, "seq_len": 256, "learning_rate": 4e-4,
                  "gradient_checkpointing": False, "checkpoint_every": 1000,
                  "resources": {"num_cpus": 1, "num_gpus": num_gpus}},
        "tenants": [{"id": f"t{i}-{TASKS[i % 4]}",
                     "train_data": str(REPO / "jobs" / "data" / TASKS[i % 4] / "train.jsonl"),
                     "eval_data": str(REPO / "jobs" / "data" / TASKS[i % 4] / "eval.jsonl")}
                    for i in range(tenants)],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from qlora_ray.bases import import_base
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store
    from qlora_ray.train.launch import train_job

    work = Path(tempfile.mkdtemp(prefix="fanout-"))
    store_uri = str(work / "store")
    import_base("shape:smollm2-135m", "smollm2-shape", Store(store_uri), shard_size="100MB")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "tenants": args.tenants, "steps": args.steps, "runs": {}}
    for name, num_gpus in (("packed", 1 / args.tenants), ("in_turn", 1.0)):
        spec = load_spec(write_job(work, name.replace("_", "-"), store_uri, num_gpus, args.tenants, args.steps))
        started = time.perf_counter()
        outcomes = train_job(spec, progress=print)
        wall = time.perf_counter() - started
        done = [o for o in outcomes if o.state == "done"]
        report["runs"][name] = {
            "num_gpus_per_tenant": num_gpus,
            "wall_s": round(wall, 1),
            "done": len(done),
            "errors": [o.error for o in outcomes if o.error],
            "tokens_per_s_per_tenant": [o.metrics["tokens_per_second"] for o in done],
            "train_s_per_tenant": [o.metrics["train_seconds"] for o in done],
            "peak_gib_per_tenant": [round(o.metrics["peak_memory_bytes"] / 2**30, 2) for o in done],
            "tokens_total": sum(o.metrics["tokens_seen"] for o in done),
        }
        run = report["runs"][name]
        run["aggregate_tokens_per_s"] = round(run["tokens_total"] / wall, 1)
        (out / "fanout.json").write_text(json.dumps(report, indent=2))
        print(name, json.dumps({k: v for k, v in run.items() if not isinstance(v, list)}), flush=True)
    ray.shutdown()
    packed, in_turn = report["runs"]["packed"], report["runs"]["in_turn"]
    report["speedup_wall"] = round(in_turn["wall_s"] / packed["wall_s"], 2)
    (out / "fanout.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.tenants} tenants x {args.steps} steps: packed {packed['wall_s']} s, in turn {in_turn['wall_s']} s "
          f"-> {report['speedup_wall']}x; aggregate {packed['aggregate_tokens_per_s']} vs "
          f"{in_turn['aggregate_tokens_per_s']} tok/s", flush=True)


if __name__ == "__main__":
    main()
