"""The serve stage through Ray Serve over HTTP on a GPU: fused models against the unmerged baseline.

One run, in order:
1. `shape:llama3-8b` (random weights: speed only) imported as the job's base, and one tenant with
   a random r16 LoRA on the 7 projections published as its adapter;
2. the fuse stage (`fuse_job`, on the GPU) writes the tenant's bf16 and nf4 models; its gptq-int4
   model is written here by round-to-nearest in GPTQ's layout (benchmarks/serve_speed.py explains
   why: GPTQModel does not run on the GPU machine's image; the layout and the kernels are the same);
3. `qlora-ray bench JOB` itself: it deploys the job's Serve application (fused models and the
   unmerged base + adapter through peft, each deployment with half the GPU) and streams
   completions at each concurrency level, then publishes bench.json, bench.md and bench.png.

The base's tokenizer is a byte tokenizer (one token per byte), so `--prompt-tokens 24` (words)
gives prompts of ~130 tokens; the report gives the exact count the server saw.

Usage (on the GPU machine): python benchmarks/serve_http.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JOB, TENANT = "http", "acme"


def publish_rtn_gptq(store, work: Path, group_size: int) -> None:
    """The tenant's gptq-int4 model from its fused bf16 one, by round-to-nearest in GPTQ v1 layout."""
    import torch
    from safetensors.torch import save_file

    from benchmarks.serve_speed import TARGETS, rtn_gptq
    from qlora_ray.manifest import RESERVED_NAMES
    from qlora_ray.serve.weights import read_tensors
    from qlora_ray.store import fused_key

    folder = work / "gptq-int4"
    folder.mkdir(parents=True)
    with store.local_copy(fused_key(JOB, TENANT, "bf16.original")) as source:
        tensors = read_tensors(source)
        small_files = [path for path in source.iterdir()
                       if path.is_file() and not path.name.startswith("model") and path.name not in RESERVED_NAMES]
        for path in small_files:
            shutil.copy(path, folder / path.name)
    quantized = {}
    for name in list(tensors):
        value = tensors.pop(name)
        projection = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if projection in TARGETS:
            for key, part in rtn_gptq(value.cuda(), group_size).items():
                quantized[f"{name.removesuffix('.weight')}.{key}"] = part.cpu()
        else:
            quantized[name] = value
    save_file(quantized, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                     "sym": True, "checkpoint_format": "gptq", "pack_dtype": "int32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    store.publish(fused_key(JOB, TENANT, "gptq-int4.original"), folder, kind="fused",
                  inputs={"method": "round-to-nearest in GPTQ layout (benchmark)", "group_size": group_size})
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work", default="/tmp/servebench", type=Path)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--duration", default="25", help="seconds per model and concurrency level")
    parser.add_argument("--prompt-tokens", default="24", help="words of the synthetic prompt (bytes ~ 5.5x)")
    parser.add_argument("--output-tokens", default="128")
    parser.add_argument("--plot", type=Path, help="only draw bench.png beside this bench.json (no GPU needed)")
    args = parser.parse_args()
    if args.plot:
        from qlora_ray.serve.bench import write_report

        write_report(json.loads(args.plot.read_text()), args.plot.parent)
        return

    import ray
    import yaml
    from transformers import AutoConfig

    from benchmarks.fuse_speed import make_adapter
    from qlora_ray.bases import import_base
    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store, adapter_key, bench_key

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        timings[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        print(f"== {name}: {timings[name]} s", flush=True)
        (args.out / "serve-http-steps.json").write_text(json.dumps(timings, indent=2))

    store = Store(str(args.work / "store"))
    import_base(f"shape:{args.shape}", "base", store, shard_size="4GB", device="cuda", progress=print)
    make_adapter(args.work / "adapter", AutoConfig.from_pretrained(store.path("bases/base")), seed=0, rank=16)
    store.publish(adapter_key(JOB, TENANT), args.work / "adapter", kind="adapter", inputs={"training_fingerprint": "random"})
    lap("base and adapter")

    job = {"name": JOB, "store": store.uri, "base": {"name": "base", "source": f"shape:{args.shape}"},
           "tenants": [{"id": TENANT, "train_data": str(REPO / "jobs/data/dates/train.jsonl")}],
           "fuse": {"schemes": ["bf16", "nf4", "gptq-int4"], "merge_base": "original", "workers": 1,
                    "resources": {"num_cpus": 4, "num_gpus": 1}},
           "serve": {"port": 8000, "context": 1024, "max_tokens": 512, "max_resident_models": 3, "max_batch": 8,
                     "resources": {"num_cpus": 1, "num_gpus": 0.5}}}
    job_file = args.work / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    spec = load_spec(job_file)
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    fast = spec.model_copy(update={"fuse": spec.fuse.model_copy(update={"schemes": ["bf16", "nf4"]})})
    outcomes = fuse_job(fast, progress=print)
    assert all(o.state == "done" for o in outcomes), [(o.state, o.error) for o in outcomes]
    ray.shutdown()
    lap("fuse bf16 + nf4")
    publish_rtn_gptq(store, args.work, group_size=128)
    lap("gptq-int4 (round-to-nearest)")

    command = [sys.executable, "-m", "qlora_ray", "bench", str(job_file), "--concurrency", args.concurrency,
               "--duration", args.duration, "--prompt-tokens", args.prompt_tokens, "--output-tokens", args.output_tokens]
    print("$ " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, env=dict(os.environ), check=False)
    lap("qlora-ray bench")
    runs = store.fs.ls(store.path(bench_key(JOB, "x")).rsplit("/", 1)[0])
    latest = sorted(runs)[-1]
    for name in ("bench.json", "bench.md", "bench.png"):
        if store.fs.exists(f"{latest}/{name}"):
            store.fs.get_file(f"{latest}/{name}", str(args.out / name))
    report = json.loads((args.out / "bench.json").read_text())
    report.update(command="python3 benchmarks/serve_http.py --out $OUT", bench_command=" ".join(command[1:]),
                  steps_s=timings, exit_code=result.returncode)
    import torch

    report["device"] = torch.cuda.get_device_name()
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
