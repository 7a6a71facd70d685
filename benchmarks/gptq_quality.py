"""Quality of bulk gptq-int4 against per-tenant GPTQ, on a job's trained tenants (the demo's by default).

    python3 benchmarks/gptq_quality.py --out OUT_DIR [--job jobs/demo.yaml] [--variants per-tenant,bulk,bulk-own]
                                       [--merge-base original] [--gptq '{"group_size": 32}']

Needs the job's adapters trained (`qlora-ray train JOB`, or a `qlora-ray run`). The job's store is
copied into --work first, and every variant works on that copy: for each, the copy's gptq-int4
models and eval results are removed, gptq-int4 is fused in that variant's mode, and the eval stage
scores it (with the base, the adapter unmerged and naive PTQ beside it) and gates it against the
adapter unmerged, as `qlora-ray eval` does. Variants:

- per-tenant: `fuse.gptq.mode: per-tenant` (GPTQModel on each tenant's merged model);
- bulk: `mode: bulk`, one Hessian set from every tenant's rows pooled;
- bulk-own: `mode: bulk, hessian: per-tenant`, each tenant's Hessians from its own rows through its
  own merged model, in walks of the base (fuse/gptq_stream.py).

--gptq overrides the job's fuse.gptq settings for every variant (to try group sizes, activation
order, calibration rows). Results: OUT_DIR/gptq-quality.json and .md, written after every variant.
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
VARIANTS = {"per-tenant": {"mode": "per-tenant"}, "bulk": {"mode": "bulk", "hessian": "pooled"},
            "bulk-own": {"mode": "bulk", "hessian": "per-tenant"}}


def variant_job(job_file: Path, store: Path, work: Path, name: str, merge_base: str, gptq: dict) -> Path:
    job = yaml.safe_load(job_file.read_text())
    job["store"] = str(store)
    for tenant in job["tenants"]:  # the data paths are relative to the job file's folder
        for key in ("train_data", "eval_data"):
            if key in tenant and not Path(tenant[key]).is_absolute():
                tenant[key] = str((job_file.parent / tenant[key]).resolve())
    job["fuse"] = {**job.get("fuse", {}), "schemes": ["gptq-int4"], "merge_base": merge_base,
                   "gptq": {**job.get("fuse", {}).get("gptq", {}), **gptq, **VARIANTS[name]}}
    path = work / f"job-{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def clear(spec, store) -> None:
    """The copy's gptq-int4 models, Hessian sets and eval results: each variant starts from none."""
    from qlora_ray.store import eval_key, eval_report_key, fused_key, hessian_key, run_key, verdicts_key

    for tenant in spec.tenants:
        for variant in spec.fused_variants(tenant):
            store.delete(fused_key(spec.name, tenant.id, variant.name))
        store.delete(eval_key(spec.name, tenant.id))
    for pool in store.list_complete(f"{run_key(spec.name)}/hessians"):
        store.delete(hessian_key(spec.name, pool.rsplit("/", 1)[-1]))
    store.delete(eval_report_key(spec.name))
    store.delete(verdicts_key(spec.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--job", type=Path, default=REPO / "jobs" / "demo.yaml")
    parser.add_argument("--variants", default="per-tenant,bulk,bulk-own")
    parser.add_argument("--merge-base", default="original", choices=["original", "nf4-dequantized"])
    parser.add_argument("--gptq", type=json.loads, default={}, help="fuse.gptq overrides, as JSON")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-quality"))
    args = parser.parse_args()

    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.quality.launch import eval_job
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store

    source = load_spec(args.job)
    if not Path(source.store).is_dir():
        raise SystemExit(f"{source.store}: the job's store is not a local folder with its trained adapters")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.store, args.work / "store", ignore=shutil.ignore_patterns("fused", "eval"))
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "job": str(args.job),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "merge_base": args.merge_base,
               "gptq": args.gptq, "variants": {}}
    for name in args.variants.split(","):
        spec = load_spec(variant_job(args.job, args.work / "store", args.work, name, args.merge_base, args.gptq))
        store = Store(spec.store)
        clear(spec, store)
        started = time.perf_counter()
        outcomes = fuse_job(spec, progress=lambda line: print(f"[{name}] {line}", flush=True))
        fuse_seconds = time.perf_counter() - started
        failed = [(o.tenant, o.error) for o in outcomes if o.state != "done"]
        if failed:
            raise SystemExit(f"{name}: {failed}")
        report = eval_job(spec, progress=lambda line: print(f"[{name}] {line}", flush=True))
        variant = f"gptq-int4.{args.merge_base}"
        tenants = {}
        for tenant, tenant_report in report["tenants"].items():
            rows = {row["name"]: row for row in tenant_report["rows"]}
            verdict = tenant_report["verdicts"][variant]
            tenants[tenant] = {"reference_accuracy": rows[tenant_report["reference"]]["accuracy"],
                               "accuracy": rows[variant]["accuracy"], "perplexity": rows[variant]["perplexity"],
                               "reference_perplexity": rows[tenant_report["reference"]]["perplexity"],
                               "passed": verdict["passed"], "reasons": verdict["reasons"]}
        results["variants"][name] = {"settings": spec.fuse.gptq.model_dump(mode="json"),
                                     "fuse_seconds": round(fuse_seconds, 1), "tenants": tenants}
        (args.out / "gptq-quality.json").write_text(json.dumps(results, indent=2))
        (args.out / "gptq-quality.md").write_text(render(results))
        print(render(results), flush=True)


def render(results: dict) -> str:
    variants = results["variants"]
    tenants = list(next(iter(variants.values()))["tenants"])
    lines = [f"# gptq-int4 quality by GPTQ mode ({results['date']})", "", f"`{results['command']}`", "",
             f"Merge base `{results['merge_base']}`. Accuracy on each tenant's eval rows (exact match), with the "
             f"quality gate's verdict against the adapter unmerged; answer perplexity in brackets.", "",
             "| tenant | adapter unmerged | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for tenant in tenants:
        first = next(iter(variants.values()))["tenants"][tenant]
        cells = [f"{v['tenants'][tenant]['accuracy']:.0%} ({v['tenants'][tenant]['perplexity']:.3f}), "
                 f"{'pass' if v['tenants'][tenant]['passed'] else 'FAIL'}" for v in variants.values()]
        lines.append(f"| {tenant} | {first['reference_accuracy']:.0%} ({first['reference_perplexity']:.3f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "| variant | settings | fuse s (wall, the job's workers) |", "|---|---|---|"]
    lines += [f"| {name} | `{json.dumps(v['settings'])}` | {v['fuse_seconds']} |" for name, v in variants.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
