"""Model switches on one device (issue 20): a replica's loader (qlora_ray/serve/switching.py) switching
between two tenants' fused models of one shape, timed in this process, against a fresh load (the
path every switch took before) in the same run.

    python3 benchmarks/model_switches.py --out OUT_DIR                 # shape:llama3-8b gptq-int4 on CUDA
    python3 benchmarks/model_switches.py --out OUT_DIR --device cpu    # shape:tiny bf16, to try it

Run it where the packages are importable (on the lent GPU: `bash .whl/install.sh` and
PYTHONPATH=/tmp/site first). Two models of random weights (different seeds) are published as the
fuse stage publishes them (gptq-int4 by round-to-nearest in GPTQ's layout: the kernels' speed does
not depend on the values). The switcher, as one replica holding one model, then loads:
1. the first model from the store (its engine compiled and its CUDA graphs captured);
2. the second, from the store into the first one's engine (left as a spare when it was released);
3. the first again, from host memory into the second one's engine;
4. the second again, from host memory;
and last, the previous path: each model loaded fresh by loading.load_model (a new engine, compiled
and captured; the process's compiled code is warm by then, so this is a lower bound of a new
replica's load). After each load, one request's first token and a greedy answer: each model's
answers must be the same after every switch and on its fresh engine, and the two models' must
differ. Results: OUT_DIR/model-switches.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TENANTS = ("acme", "globex")


def job_spec(work: Path, shape: str, variant: str):
    from qlora_ray.spec import load_spec

    job = {"name": "switches", "store": str(work / "store"), "base": {"name": shape, "source": f"shape:{shape}"},
           "tenants": [{"id": t, "train_data": str(REPO / "jobs" / "data" / "dates" / "train.jsonl")} for t in TENANTS],
           "fuse": {"schemes": [variant.split(".")[0]], "merge_base": "original"},
           "serve": {"context": 2048, "max_batch": 8, "allow_failed_quality": True}}
    path = work / "switches.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return load_spec(path)


def first_token_and_answer(loaded, device: str, new_tokens: int) -> tuple[float, list[int]]:
    """(ms to the first token, the greedy answer's tokens) of one 64-token prompt on the engine."""
    import torch

    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.serve.scheduler import generate

    prompt = [(7 * i) % 250 + 3 for i in range(64)]
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)]
    if device == "cuda":
        torch.cuda.synchronize()
    started, first, tokens = time.perf_counter(), None, []
    for step in generate(loaded.engine, [prompt], params):
        if first is None:
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - started
        tokens.extend(t for t in step if t is not None)
    return round(first * 1000, 2), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-ray-switches"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--host-memory", default="48GB", help="the switcher's host tier (serve.host_memory)")
    args = parser.parse_args()

    from benchmarks.gpu_pipeline import publish_random_fused
    from qlora_ray.serve.catalog import model_catalog
    from qlora_ray.serve.loading import load_model
    from qlora_ray.serve.switching import ModelSwitcher
    from qlora_ray.spec import parse_size
    from qlora_ray.store import Store

    cuda = args.device == "cuda"
    shape, variant = ("llama3-8b", "gptq-int4.original") if cuda else ("tiny", "bf16.original")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = job_spec(args.work, shape, variant)
    store = Store(spec.store)
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": shape, "variant": variant,
               "command": " ".join(sys.argv), "host_memory": args.host_memory, "steps": {}, "loads": []}

    def save() -> None:
        (args.out / "model-switches.json").write_text(json.dumps(results, indent=2))

    for seed, tenant in enumerate(TENANTS):
        started = time.perf_counter()
        folder = args.work / f"random-{tenant}"
        publish_random_fused(spec, store, shape, variant, args.device, folder, tenant=tenant, seed=seed)
        shutil.rmtree(folder)
        results["steps"][f"publish {tenant}"] = round(time.perf_counter() - started, 1)
    if cuda:
        from qlora_ray import marlin

        started = time.perf_counter()
        results["marlin"] = marlin.prepare(store, share=True) or "loaded"
        results["steps"]["Marlin kernel"] = round(time.perf_counter() - started, 1)
    save()
    catalog = model_catalog(spec, store)
    entries = {tenant: catalog[f"{tenant}/{variant}"] for tenant in TENANTS}
    switcher = ModelSwitcher(spec, store, args.device, parse_size(args.host_memory))
    answers: dict[str, list[int]] = {}
    for order, tenant in enumerate(("acme", "globex", "acme", "globex")):
        loaded = switcher.load(entries[tenant])
        first_ms, answer = first_token_and_answer(loaded, args.device, 16)
        same = answers.setdefault(tenant, answer) == answer
        row = {"load": order + 1, "model": loaded.entry.id, "loaded_from": loaded.loaded_from,
               "seconds": round(loaded.load_seconds, 4), "first_token_ms": first_ms, "same_answer": same}
        results["loads"].append(row)
        print(json.dumps(row), flush=True)
        save()
        switcher.release(loaded)
    switcher.settle()  # free the spare before the fresh loads, as a replica does after a load
    results["fresh_loads"] = []
    for tenant in TENANTS:  # each model on an engine of its own: the reference for its answers after switches
        loaded = load_model(spec, store, entries[tenant], args.device)
        first_ms, answer = first_token_and_answer(loaded, args.device, 16)
        results["fresh_loads"].append({"model": loaded.entry.id, "seconds": round(loaded.load_seconds, 4),
                                       "first_token_ms": first_ms, "same_answer": answer == answers[tenant]})
        loaded.close()
    results["models_answer_differently"] = answers["acme"] != answers["globex"]
    host = [row["seconds"] for row in results["loads"] if row["loaded_from"].startswith("host")]
    fresh = [row["seconds"] for row in results["fresh_loads"]]
    results["fresh_over_host_switch"] = round(min(fresh) / max(host), 1) if host and max(host) else None
    save()
    lines = [f"# Model switches, {shape} {variant}, on {args.device} ({results['date']})", "",
             f"`{results['command']}`", "", "| load | model | from | seconds | first token ms | same answer |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['model']} | {r['loaded_from']} | {r['seconds']} | {r['first_token_ms']} | "
              f"{r['same_answer']} |" for r in results["loads"]]
    lines += [f"| fresh (the path before) | {row['model']} | the store, a new engine | {row['seconds']} | "
              f"{row['first_token_ms']} | {row['same_answer']} |" for row in results["fresh_loads"]]
    lines += ["", f"Steps: {json.dumps(results['steps'])}. The faster fresh load took {results['fresh_over_host_switch']}x "
              f"the slowest switch from host memory. The two models answer differently: "
              f"{results['models_answer_differently']} (else `same answer` proves nothing)."]
    (args.out / "model-switches.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
