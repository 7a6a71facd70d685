"""The whole pipeline on a GPU machine, as a user runs it, in one command.

    python3 benchmarks/gpu_pipeline.py --out OUT_DIR                  # the pipeline (at most 9 minutes on an H200)
    python3 benchmarks/gpu_pipeline.py --out OUT_DIR --part starts    # a model replica's cold and warm start
    python3 benchmarks/gpu_pipeline.py --out OUT_DIR --part gptq-8b   # the fuse stage's per-tenant GPTQ on an 8B
    python3 benchmarks/gpu_pipeline.py --out OUT_DIR --part serve     # the engine alone against Serve over HTTP
    python3 benchmarks/gpu_pipeline.py --out OUT_DIR --part tenants   # one tenant's model against several, on one replica

`pipeline`, in order:
1. installs the wheelhouse that ../shared/tools/device-wheelhouse builds (`.whl/`, carried with the
   checkout) into /tmp/site;
2. builds, in the background while training runs, the Marlin kernel in both precisions (fp16 for
   the eval stage's GPTQ rows, bf16 for the replicas), shared through the store as the first eval
   task or replica of a cluster shares it (they then load it from the store);
3. `qlora-ray run` on a GPU job: two tenants (the demo's dates and kv2json rows) on
   shape:smollm2-135m, every scheme, both merge bases, half a GPU per task;
4. `qlora-ray bench` through Ray Serve on one fused model of each scheme and the unmerged baseline,
   with a fresh kernel folder, so the replica loads the kernel from the store as one on another node
   would.

`starts` deploys one model replica twice on fresh kernel folders: with no build in the store (it
compiles: cold) and with the build the first one shared (warm). `gptq-8b` fuses one
shape:llama3-8b tenant (random LoRA factors, r 16 on the seven projections) into gptq-int4 in per-tenant mode
at the job defaults (group size 128, 128 calibration rows): the unit cost of per-tenant GPTQ. `serve`
publishes a shape:llama3-8b gptq-int4 model (random weights, round-to-nearest in GPTQ's layout) and
measures it through the engine alone (in this process) and through Serve over HTTP, at batch =
concurrency 1, 8, 32 and 64, with streams sent at each --stream-intervals value (default 0 and 50
ms), plus the time to first token of a ~512-token prompt and the TTFT p99 at concurrency 32 of
prompts and answers of varied lengths: issue 19's targets (use --bench-seconds 10 or more). With
--gateway-replicas 1,2, Serve is measured with each number of gateway replicas in the same run; with
--baseline-tree DIR (a checkout of an earlier commit), the levels are measured again with that
tree's code, for the ratios of this tree's engine and Serve to the earlier ones.
`tenants` publishes --tenants (default 4) tenants' shape:llama3-8b gptq-int4 models on one replica
and runs `qlora-ray bench --mixed` for 1, 4 and all of them at concurrency 32: issue 20's aggregate
tok/s per tenant count, TTFT, and switches from host memory and from the store.

The base has random weights (the real SmolLM2 ships as a GGUF too large to carry), so the eval
table's accuracies measure nothing but that every configuration loads and runs; its timings and the
bench's are real. Every stage's time, the eval table, the bench table and the replica starts go to
OUT_DIR/pipeline.json and .md (or starts.*, gptq-8b.*), with the whole log in OUT_DIR/<part>.log.
Without a GPU, `--device cpu` runs the same steps on shape:tiny (to try the script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "jobs" / "data"
TENANTS = {"dates": "exact", "kv2json": "json"}
EVAL_ROWS = 20


class Run:
    """One part's run: a log under OUT that every step's output is copied to, and its results."""

    def __init__(self, out: Path, part: str, work: Path, device: str, shape: str, install: bool):
        self.out, self.part, self.work, self.device = out, part, work, device
        self.shape, self.install = shape, install
        self.log = open(out / f"{part}.log", "a", buffering=1)
        self.results: dict = {"part": part, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]), "steps": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
                        PYTHONPATH=os.pathsep.join(p for p in ("/tmp/site", str(REPO), os.environ.get("PYTHONPATH")) if p))

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def step(self, name: str, args: list[str], *, env: dict | None = None, check: bool = True) -> str:
        """Run a command, its output teed to the log; record its wall time. Returns its output."""
        self.say(f"== {name}: {' '.join(args)}")
        started = time.perf_counter()
        process = subprocess.Popen(args, cwd=REPO, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in process.stdout:
            lines.append(line)
            self.log.write(line)
        process.wait()
        seconds = round(time.perf_counter() - started, 1)
        self.results["steps"][name] = {"seconds": seconds, "exit": process.returncode}
        self.say(f"== {name}: exit {process.returncode} in {seconds} s")
        self.keep_library_log()
        if check and process.returncode:
            self.save()
            raise SystemExit(f"{name} failed (exit {process.returncode}); the log is {self.log.name}")
        return "".join(lines)

    def keep_library_log(self) -> None:
        """A copy of what the libraries wrote (qlora_ray/library_output.py) beside the step logs."""
        try:
            from qlora_ray.library_output import libraries_log
        except ImportError:  # before the wheelhouse is installed: nothing has run to write it
            return

        if libraries_log().exists():
            shutil.copy(libraries_log(), self.out / "libraries.log")

    def cli(self, name: str, *args: str, env: dict | None = None, check: bool = True) -> str:
        return self.step(name, [sys.executable, "-m", "qlora_ray", *args], env=env, check=check)

    def save(self, markdown: str = "") -> None:
        (self.out / f"{self.part}.json").write_text(json.dumps(self.results, indent=2))
        if markdown:
            (self.out / f"{self.part}.md").write_text(markdown)


def write_job(run: Run, *, name: str, share_kernels: bool = True, **overrides) -> Path:
    """The GPU job: two tenants on SmolLM2's shape, every scheme, both merge bases, half a GPU a task."""
    gpu = 0.5 if run.device == "cuda" else 0
    resources = {"num_cpus": 2 if run.device == "cuda" else 1, "num_gpus": gpu}
    job = {
        "name": name,
        "store": str(run.work / "store"),
        "base": {"name": run.shape, "source": f"shape:{run.shape}", "shard_size": "100MB"},
        "train": {"max_steps": 20, "batch_size": 8, "seq_len": 256, "learning_rate": 4e-4, "lr_scheduler": "constant",
                  "checkpoint_every": 1000, "resources": resources},
        "tenants": [{"id": tenant, "train_data": str(DATA / tenant / "train.jsonl"),
                     "eval_data": str(eval_rows(run, tenant)), "scorer": scorer}
                    for tenant, scorer in TENANTS.items()],
        "fuse": {"schemes": ["bf16", "nf4", "gptq-int4"], "merge_base": "both",
                 "gptq": {"group_size": 64 if run.shape == "smollm2-135m" else 32, "calibration_samples": 32},
                 "workers": 2, "resources": resources},
        "eval": {"resources": resources},
        # Random weights: the gate's verdicts mean nothing here, and every model must be servable.
        "serve": {"max_resident_models": 8, "allow_failed_quality": True, "share_compiled_kernels": share_kernels,
                  "resources": resources},
    }
    job.update(overrides)
    path = run.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def eval_rows(run: Run, tenant: str, count: int = EVAL_ROWS) -> Path:
    """The first `count` of the tenant's held-out rows (on random weights more rows add only time)."""
    path = run.work / f"{tenant}-eval.jsonl"
    lines = (DATA / tenant / "eval.jsonl").read_text().splitlines()[:count]
    path.write_text("\n".join(lines) + "\n")
    return path


def install(run: Run) -> None:
    if not run.install:
        run.say("== install: skipped (the environment has the packages)")
        return
    if not (REPO / ".whl" / "install.sh").exists():
        raise SystemExit("no .whl/install.sh: build the wheelhouse with ../shared/tools/device-wheelhouse and carry .whl")
    run.step("install", ["bash", str(REPO / ".whl" / "install.sh")])
    sys.path.insert(0, "/tmp/site")  # for this process's own reads of the store


def store_of(job: Path):
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store

    spec = load_spec(job)
    return spec, Store(spec.store, spec.storage_options)


def bench_report(job: Path) -> dict:
    from qlora_ray.store import run_key

    spec, store = store_of(job)
    latest = store.list_complete(f"{run_key(spec.name)}/bench")[-1]
    return store.read_json(f"{run_key(spec.name)}/bench/{latest}", "bench.json")


def pipeline(run: Run, args) -> str:
    install(run)
    job = write_job(run, name="gpu-pipeline")
    kernel_build = None
    if run.device == "cuda":
        # While the GPU trains: the cluster's one Marlin build of each precision (fp16 for the eval
        # stage's GPTQ rows, bf16 for the replicas), shared through the store as the first eval task
        # or replica would share it; they load it from there, each with an empty kernel folder of its
        # own, as on another node.
        script = ("import time, sys; from qlora_ray import marlin; from qlora_ray.store import Store; "
                  f"store = Store({str(run.work / 'store')!r}); reasons = []\n"
                  "for precision in ('fp16', 'bf16'):\n"
                  "    t = time.perf_counter(); reasons.append(marlin.prepare(store, share=True, precision=precision))\n"
                  "    print('kernel', precision, reasons[-1], round(time.perf_counter() - t, 1), flush=True)\n"
                  "sys.exit(any(reasons))")
        kernel_log = open(run.out / "kernel.log", "w")
        started = time.perf_counter()
        kernel_build = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=kernel_log, stderr=subprocess.STDOUT,
                                        env={**run.env, "TORCH_EXTENSIONS_DIR": str(run.work / "ext-build")})
    output = run.cli("qlora-ray run", "run", str(job), env={"TORCH_EXTENSIONS_DIR": str(run.work / "ext-run")})
    run.results["stages"] = {name: float(seconds) for name, seconds in
                             re.findall(r"stage (\w+): done in ([\d.]+) s", output)}
    run.save()
    if kernel_build is not None:
        code = kernel_build.wait()
        run.results["kernel_build"] = {"seconds": round(time.perf_counter() - started, 1), "exit": code,
                                       "output": (run.out / "kernel.log").read_text()[-400:]}
    spec, store = store_of(job)
    from qlora_ray.store import eval_report_key

    report = store.read_json(eval_report_key(spec.name), "report.json")
    run.results["eval"] = {tenant: {"rows": [{k: row.get(k) for k in ("name", "accuracy", "perplexity", "tokens_per_second",
                                                                       "load_seconds", "seconds", "size_bytes",
                                                                       "resident_bytes", "module_types")}
                                             for row in part["rows"]], "verdicts": part["verdicts"]}
                           for tenant, part in report["tenants"].items()}
    run.save()
    models = ",".join(f"dates/{variant}" for variant in ("bf16.original", "nf4.original", "gptq-int4.original", "unmerged"))
    run.cli("qlora-ray bench", "bench", str(job), "--models", models, "--concurrency", "1,8", "--duration",
            str(args.bench_seconds), "--prompt-tokens", "128", "--output-tokens", "64",
            env={"TORCH_EXTENSIONS_DIR": str(run.work / "ext-replica")})
    bench = bench_report(job)
    run.results["bench"] = {"deploy_seconds": bench.get("deploy_seconds"), "rows": bench["results"]}
    return render_pipeline(run.results)


def starts(run: Run, args) -> str:
    """A model replica's start, cold (compiling the kernel) and warm (loading the store's build)."""
    install(run)
    job = write_job(run, name="gpu-starts", train={"max_steps": 2, "resources": {"num_gpus": 0.5 if run.device == "cuda" else 0}},
                    fuse={"schemes": ["bf16"], "merge_base": "original"}, tenants=[
                        {"id": "dates", "train_data": str(DATA / "dates" / "train.jsonl")}])
    run.cli("train and fuse one tenant", "run", str(job))
    rows = []
    for label in ("cold", "warm"):
        run.cli(f"bench ({label} start)", "bench", str(job), "--models", "dates/bf16.original", "--concurrency", "1",
                "--requests", "2", env={"TORCH_EXTENSIONS_DIR": str(run.work / f"ext-{label}")})
        bench = bench_report(job)
        rows.append({"start": label, "deploy_seconds": bench.get("deploy_seconds"),
                     "replica_start_seconds": bench["results"][0].get("replica_start_seconds"),
                     "first_model_load_seconds": bench["results"][0].get("load_seconds")})
    run.results["starts"] = rows
    lines = ["| start | deploy (s) | replica start (s) | first model load (s) |", "|---|---|---|---|"]
    lines += [f"| {r['start']} | {r['deploy_seconds']} | {r['replica_start_seconds']} | {r['first_model_load_seconds']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def gptq_8b(run: Run, args) -> str:
    """One shape:llama3-8b tenant through the fuse stage's per-tenant gptq-int4, at the job's other defaults."""
    install(run)
    shape = "llama3-8b" if run.device == "cuda" else "tiny"
    job = write_job(run, name="gpu-gptq", base={"name": shape, "source": f"shape:{shape}", "shard_size": "5GB"},
                    tenants=[{"id": "acme", "train_data": str(DATA / "dates" / "train.jsonl")}],
                    fuse={"schemes": ["gptq-int4"], "merge_base": "original", "workers": 1,
                          "gptq": {"mode": "per-tenant"} if run.device == "cuda" else {"mode": "per-tenant", "group_size": 32},
                          "resources": {"num_cpus": 8 if run.device == "cuda" else 1, "num_gpus": 1 if run.device == "cuda" else 0}})
    run.cli("base import", "base", "import", "--job", str(job), "--device", run.device)
    spec, store = store_of(job)
    publish_random_adapter(run, spec, store)
    run.cli("qlora-ray fuse", "fuse", str(job))
    from qlora_ray.store import fused_key

    manifest = store.read_manifest(fused_key(spec.name, "acme", "gptq-int4.original"))
    run.results["gptq"] = {"settings": manifest["inputs"]["gptq"], "metrics": manifest["metrics"]}
    m = manifest["metrics"]
    return ("| base | group size | calibration rows | fuse unit s | merge s | GPTQModel load s | quantize s | save s | "
            "size GB |\n|---|---|---|---|---|---|---|---|---|\n"
            f"| shape:{shape} | {manifest['inputs']['gptq']['group_size']} | {m.get('calibration_rows')} | {m.get('seconds')} | "
            f"{m.get('merge_seconds')} | {m.get('gptq_load_seconds')} | {m.get('gptq_quantize_seconds')} | "
            f"{m.get('gptq_save_seconds')} | {m.get('size_bytes', 0) / 1e9:.2f} |\n")


def publish_random_adapter(run: Run, spec, store, tenant: str = "acme", seed: int = 0) -> None:
    """A PEFT adapter with random factors (r 16, alpha 32, the seven projections), and the tenant's
    training rows to calibrate on, published as the train stage would."""
    import torch
    from safetensors.torch import save_file

    from qlora_ray.store import adapter_key, base_key, data_key

    config = store.read_json(base_key(spec.base.name), "config.json")
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            where = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{where}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(16, fan_in, generator=generator) / fan_in ** 0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, 16, generator=generator) * 0.01).to(torch.bfloat16)
    folder = run.work / f"adapter-{spec.name}-{tenant}"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(shapes), "bias": "none",
        "task_type": "CAUSAL_LM", "use_rslora": False, "lora_dropout": 0.0}))
    store.publish(adapter_key(spec.name, tenant), folder, kind="adapter", inputs={"training_fingerprint": "random"},
                  keep_existing=True)
    shutil.rmtree(folder)
    rows = run.work / "rows"
    rows.mkdir(exist_ok=True)
    shutil.copy(DATA / "dates" / "train.jsonl", rows / "train.jsonl")
    store.publish(data_key(spec.name, tenant), rows, kind="data", inputs={"train_sha256": "dates"}, keep_existing=True)


def serve_engine_rate(run: Run, args) -> str:
    """Issue 19's comparison: one fused model served by the engine alone (in this process, through
    the scheduler's generate) and through Ray Serve over HTTP (`qlora-ray bench`), at the same batch
    and concurrency, with streams sent at each --stream-intervals value (serve.stream_interval_ms)."""
    install(run)
    cuda = run.device == "cuda"
    shape, variant = ("llama3-8b", "gptq-int4.original") if cuda else ("tiny", "bf16.original")
    levels = [1, 8, 32, 64] if cuda else [1, 4]
    output_tokens, prompt_words, long_prompt_words = (128, 24, 93) if cuda else (16, 8, 20)
    model = f"acme/{variant}"

    def job(interval: float, gateways: int = 1) -> Path:
        return write_job(run, name="gpu-serve", base={"name": shape, "source": f"shape:{shape}"},
                         tenants=[{"id": "acme", "train_data": str(DATA / "dates" / "train.jsonl")}],
                         fuse={"schemes": [variant.split(".")[0]], "merge_base": "original"},
                         serve={"max_batch": max(levels), "max_ongoing_requests": 2 * max(levels), "context": 1024,
                                "max_tokens": 512, "unmerged_baseline": False, "allow_failed_quality": True,
                                "stream_interval_ms": interval, "gateway_replicas": gateways,
                                "resources": {"num_cpus": 2, "num_gpus": 1 if cuda else 0}})

    spec, store = store_of(job(0))
    started = time.perf_counter()
    publish_random_fused(spec, store, shape, variant, run.device, run.work / "random-fused")
    run.results["steps"]["random fused model"] = {"seconds": round(time.perf_counter() - started, 1), "exit": 0}
    started = time.perf_counter()
    engine = engine_rates(spec, store, model, run.device, levels, prompt_words, long_prompt_words, output_tokens)
    run.results["steps"]["engine alone"] = {"seconds": round(time.perf_counter() - started, 1), "exit": 0}
    run.results["engine"] = engine
    run.say(json.dumps(engine))
    run.save()
    served: dict[str, list] = {}
    for interval in args.stream_intervals:
        for gateways in args.gateway_replicas:
            for mode in args.serve_modes:
                label = (f"{interval} ms" + (f", {gateways} gateway(s)" if len(args.gateway_replicas) > 1 else "")
                         + (f", {mode}" if len(args.serve_modes) > 1 else ""))
                path = job(interval, gateways)
                run.cli(f"bench, stream interval {interval} ms, {gateways} gateway replica(s), Serve {mode}", "bench",
                        str(path), "--models", model, "--concurrency", ",".join(map(str, levels)), "--duration",
                        str(args.bench_seconds), "--prompt-tokens", str(prompt_words), "--output-tokens",
                        str(output_tokens), env=SERVE_MODES[mode])
                served[label] = bench_report(path)["results"]
        run.results["served"] = served
        run.save()
    if args.baseline_tree:
        run.results["baseline"] = baseline_run(run, args)
        run.save()
    if args.levels_only:
        return render_serve_engine_rate(run.results, model)
    # The job file as the last interval and gateway count wrote it.
    run.cli("bench, long prompts", "bench", str(path), "--models", model, "--concurrency", "1",
            "--requests", "8", "--prompt-tokens", str(long_prompt_words), "--output-tokens", "2")
    run.results["served_long_prompt"] = bench_report(path)["results"][0]
    # Issue 19's TTFT p99 target: varied prompt and answer lengths (each 0.5-1.5x its mean), so prompts
    # arrive while others decode and long ones are prefilled in chunks. The bench starts a fresh app, so
    # a first level at concurrency 1 takes the model's load; the second gives the lone TTFT.
    varied_levels = [1, 1, 32] if cuda else [1, 1, 4]
    run.cli("bench, varied lengths", "bench", str(path), "--models", model, "--mixed", "--tenants", "1",
            "--concurrency", ",".join(map(str, varied_levels)), "--duration", str(args.varied_seconds or args.bench_seconds),
            "--prompt-tokens", str(long_prompt_words), "--output-tokens", str(output_tokens))
    run.results["served_varied"] = bench_report(path)["results"]
    run.save()
    return render_serve_engine_rate(run.results, model)


def baseline_run(run: Run, args) -> dict:
    """The same measures (engine alone and Serve; the long and varied prompts too unless
    --levels-only) taken with another tree's code, in this run: that tree's own gpu_pipeline.py, its
    code first on the path of the process and of Ray's workers."""
    tree = args.baseline_tree.resolve()
    if not (tree / "benchmarks" / "gpu_pipeline.py").exists() or not (tree / "qlora_ray").is_dir():
        raise SystemExit(f"--baseline-tree {tree}: not a qlora_ray tree (no benchmarks/gpu_pipeline.py or qlora_ray/)")
    out = run.out / "baseline"
    command = [sys.executable, str(tree / "benchmarks" / "gpu_pipeline.py"), "--part", "serve", "--no-install",
               "--out", str(out), "--work", str(run.work / "baseline"), "--bench-seconds", str(args.bench_seconds),
               "--stream-intervals", ",".join(map(str, args.stream_intervals)), "--device", run.device,
               "--gateway-replicas", ",".join(map(str, args.gateway_replicas)),
               "--serve-modes", ",".join(args.serve_modes)]
    if args.levels_only:
        command.append("--levels-only")
    elif args.varied_seconds:
        command += ["--varied-seconds", str(args.varied_seconds)]
    run.step(f"baseline tree {tree}", command,
             env={"PYTHONPATH": os.pathsep.join(p for p in (str(tree), run.env["PYTHONPATH"]) if p)})
    measured = json.loads((out / "serve.json").read_text())
    return {"tree": str(tree), **{key: measured[key] for key in
                                  ("engine", "served", "served_long_prompt", "served_varied") if key in measured}}


def serve_tenants(run: Run, args) -> str:
    """Issue 20's price of one model per tenant: --tenants tenants' fused models (random weights) on
    one replica, under `qlora-ray bench --mixed` with Zipf traffic at one concurrency, for 1, 4 and
    all of them. The replica keeps what its GPU's budget holds and switches the others in from host
    memory or the store. Each tenant count runs two levels: the first takes the models' loads, the
    second is the measure. Where the disk cannot hold every tenant's model (16 of an 8B take 92 GB),
    the later tenants' artifacts share an earlier one's files by hard links: distinct artifacts the
    replica loads, holds and switches one by one, only their bytes alike."""
    install(run)
    cuda = run.device == "cuda"
    shape, variant = ("llama3-8b", "gptq-int4.original") if cuda else ("tiny", "bf16.original")
    concurrency, prompt_words, output_tokens = (32, 24, 128) if cuda else (4, 8, 16)
    tenants = [f"t{i:02d}" for i in range(args.tenants)]
    # Prompts of ~24 words and answers of at most 192 tokens fit a 512-token context, which halves
    # each model's KV cache against 1024: more models stay on the GPU.
    path = write_job(run, name="gpu-tenants", base={"name": shape, "source": f"shape:{shape}"},
                     tenants=[{"id": t, "train_data": str(DATA / "dates" / "train.jsonl")} for t in tenants],
                     fuse={"schemes": [variant.split(".")[0]], "merge_base": "original"},
                     serve={"max_batch": concurrency, "max_resident_models": len(tenants), "context": 512,
                            "max_tokens": 256, "unmerged_baseline": False, "allow_failed_quality": True,
                            "resources": {"num_cpus": 2, "num_gpus": 1 if cuda else 0}})
    spec, store = store_of(path)
    started = time.perf_counter()
    distinct = len(tenants)
    for seed, tenant in enumerate(tenants):
        if seed >= distinct:
            publish_linked_fused(spec, store, variant, tenants[seed % distinct], tenant)
            continue
        model_bytes = publish_random_fused(spec, store, shape, variant, run.device, run.work / f"random-{tenant}",
                                           tenant=tenant, seed=seed)
        if seed == 0:
            distinct = distinct_models_that_fit(len(tenants), model_bytes, run.work)
            run.results["distinct_models"] = distinct
            if distinct < len(tenants):
                run.say(f"the disk holds {distinct} distinct models of {model_bytes / 1e9:.1f} GB: the other "
                        f"{len(tenants) - distinct} tenants' artifacts link to their files")
    run.results["steps"]["random fused models"] = {"seconds": round(time.perf_counter() - started, 1), "exit": 0}
    counts = sorted({count for count in (1, 4, len(tenants)) if count <= len(tenants)})
    run.cli("bench, tenants", "bench", str(path), "--mixed", "--tenants", ",".join(map(str, counts)),
            "--concurrency", f"{concurrency},{concurrency}", "--duration", str(args.bench_seconds),
            "--prompt-tokens", str(prompt_words), "--output-tokens", str(output_tokens))
    rows = bench_report(path)["results"]
    run.results["tenants"] = rows
    run.save()
    measured = [row for i, row in enumerate(rows) if i % 2 == 1]  # each count's second level
    lines = [f"{len(tenants)} tenants' {shape} {variant} models (random weights; {distinct} distinct) on one "
             f"replica; Zipf traffic at concurrency {concurrency}, prompts ~{prompt_words} words and answers "
             f"~{output_tokens} tokens (each 0.5-1.5x); the second level of each tenant count:", "",
             "| tenants | requests | errors | output tok/s | TTFT p50 ms | TTFT p99 ms | after the first round | "
             "switches | from host memory, max s | from the store, max s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in measured:
        lines.append(f"| {row['tenants']} | {row['requests']} | {row['errors']} | {row['output_tok_s']} | "
                     f"{row['ttft_ms_p50']} | {row['ttft_ms_p99']} | {row.get('ttft_ms_p99_after_first_round')} | "
                     f"{row['switches']} | {row['host_switches']}, {row['host_switch_s_max']} | "
                     f"{row['store_loads']}, {row['store_load_s_max']} |")
    if len(measured) > 1 and measured[0]["output_tok_s"]:
        lines += [""] + [f"{row['tenants']} tenants keep {row['output_tok_s'] / measured[0]['output_tok_s']:.0%} "
                         "of one tenant's aggregate output tok/s." for row in measured[1:]]
    return "\n".join(lines) + "\n"


def distinct_models_that_fit(models: int, model_bytes: int, folder: Path) -> int:
    """How many of `models` models of `model_bytes` (one of them already written) the disk of
    `folder` holds as distinct files, keeping a reserve for the replicas' caches and logs."""
    reserve = 8e9
    room = shutil.disk_usage(folder).free - reserve
    return max(1, min(models, 1 + int(room // model_bytes)))


def publish_linked_fused(spec, store, variant: str, source_tenant: str, tenant: str) -> None:
    """`tenant`'s fused model as an artifact of its own whose files are hard links to
    `source_tenant`'s (a folder store only: the benchmark's disk cannot hold a copy per tenant)."""
    from qlora_ray.store import fused_key

    source = fused_key(spec.name, source_tenant, variant)
    manifest = store.read_manifest(source)
    draft = store.begin(fused_key(spec.name, tenant, variant))
    with store.local_copy(source) as folder:
        for rel in manifest["files"]:
            target = Path(store.path(f"{draft.prefix}/{rel}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / rel, target)
    store.seal(draft, manifest["files"], kind="fused",
               inputs={"method": f"random weights (benchmark): {source_tenant}'s files, hard-linked"})


def publish_random_fused(spec, store, shape: str, variant: str, device: str, folder: Path, *, tenant: str = "acme",
                         seed: int = 0) -> int:
    """A fused model of random weights (from `seed`) for `tenant`, as the fuse stage publishes it:
    gptq-int4 by round-to-nearest in GPTQ's layout (benchmarks/serve_speed.py; the kernels' speed
    does not depend on the values). Returns its bytes in the store, from its manifest."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from benchmarks.serve_speed import gptq_state
    from qlora_ray.shapes import byte_tokenizer, shape_config
    from qlora_ray.store import fused_key

    config = shape_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    state = {name: value.detach() for name, value in model.state_dict().items()}
    del model
    if variant.startswith("gptq-int4"):
        state = gptq_state(state)
        config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                      "sym": True, "checkpoint_format": "gptq", "pack_dtype": "int32"}
    folder.mkdir(parents=True)
    save_file({name: value.contiguous().cpu() for name, value in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.torch_dtype = "bfloat16"
    config.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    manifest = store.publish(fused_key(spec.name, tenant, variant), folder, kind="fused",
                             inputs={"method": "random weights (benchmark)"})
    shutil.rmtree(folder)  # the store holds its copy: an 8B's second copy would take another 5.7 GB of disk
    del state
    if device == "cuda":
        torch.cuda.empty_cache()
    return sum(entry["size"] for entry in manifest["files"].values())


def engine_rates(spec, store, model_id: str, device: str, levels: list[int], prompt_words: int,
                 long_prompt_words: int, output_tokens: int) -> dict:
    """The model loaded as a replica loads it, driven by the scheduler's generate() in this process:
    tokens per second at each batch (first request to last token, as a client of Serve counts them)
    and the time to first token of one long prompt."""
    import statistics

    import torch

    from qlora_ray.serve.bench import synthetic_prompt
    from qlora_ray.serve.catalog import model_catalog
    from qlora_ray.serve.loading import load_model
    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.serve.scheduler import generate

    loaded = load_model(spec, store, model_catalog(spec, store)[model_id], device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, seconds to the last) of one batch."""
        params = [SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)] * batch
        sync()
        started, first = time.perf_counter(), None
        for _ in generate(loaded.engine, [prompt] * batch, params):
            if first is None:
                sync()
                first = time.perf_counter() - started
        sync()
        return first, time.perf_counter() - started

    prompt, long_prompt = (loaded.tokenizer(synthetic_prompt(words), add_special_tokens=False)["input_ids"]
                           for words in (prompt_words, long_prompt_words))
    rates = {}
    for batch in levels:
        timed(prompt, batch, output_tokens)  # warm-up: first uses of this batch's shapes
        runs = [timed(prompt, batch, output_tokens)[1] for _ in range(3)]
        rates[str(batch)] = round(batch * output_tokens / statistics.median(runs), 1)
    timed(long_prompt, 1, 1)
    ttft = statistics.median(timed(long_prompt, 1, 1)[0] for _ in range(5))
    result = {"model": model_id, "prompt_tokens": len(prompt), "output_tokens": output_tokens, "tok_s": rates,
              "long_prompt_tokens": len(long_prompt), "long_prompt_ttft_ms": round(ttft * 1000, 2),
              "engine": loaded.engine_name, "lone_first_token_ms": lone_first_tokens(loaded, prompt, long_prompt, sync)}
    loaded.close()
    return result


def lone_first_tokens(loaded, prompt: list[int], long_prompt: list[int], sync) -> dict:
    """A lone request's first token (median of 8, 20 ms apart, as a client's requests come), through
    the scheduler's generate() in this thread and through the replica's Batcher (its worker thread,
    handing tokens to an asyncio loop): what the batcher adds to the time to first token, without
    Serve or another process."""
    import asyncio
    import contextlib
    import statistics

    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.serve.scheduler import generate

    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)

    def by_generate(ids: list[int]) -> float:
        sync()
        started = time.perf_counter()
        next(iter(generate(loaded.engine, [ids], [one])))
        return time.perf_counter() - started

    async def by_batcher(ids: list[int]) -> float:
        started = time.perf_counter()
        async with contextlib.aclosing(loaded.batcher.tokens(ids, one)) as tokens:
            await anext(tokens)
        return time.perf_counter() - started

    async def series(ids: list[int], how) -> float:
        times = []
        for _ in range(9):
            await asyncio.sleep(0.02)
            times.append(await how(ids) if how is by_batcher else how(ids))
        return round(statistics.median(times[1:]) * 1000, 2)

    async def all_of_them() -> dict:
        return {f"{name}, {len(ids)} tokens": await series(ids, how) for ids in (prompt, long_prompt)
                for name, how in (("generate", by_generate), ("batcher", by_batcher))}

    return asyncio.run(all_of_them())


def render_serve_engine_rate(results: dict, model: str) -> str:
    engine, served = results["engine"], results["served"]
    intervals = list(served)
    lines = [f"Model `{model}` ({engine['engine']}), prompts of {engine['prompt_tokens']} tokens, answers of "
             f"{engine['output_tokens']}. Engine alone: tokens/s of whole batches through the scheduler's "
             "generate(); Serve: `qlora-ray bench` output tokens/s over HTTP, streams sent per step (0 ms) or in "
             "intervals (serve.stream_interval_ms).", "",
             "| batch = concurrency | engine tok/s | "
             + " | ".join(f"Serve {i} tok/s (share)" for i in intervals) + " | "
             + " | ".join(f"TTFT p50 / p99 ms, {i}" for i in intervals) + " | "
             + f"TTFT p50 ms, {intervals[-1]}: before the replica (to the gateway, in it, to the replica) / "
             "in the replica / of it the engine | "
             + " | ".join(f"replica, {i}: mean decode batch, decode steps/s" for i in intervals) + " |",
             "|---|---|" + "---|" * (3 * len(intervals) + 1)]
    for level, rate in engine["tok_s"].items():
        cells = [level, str(rate)]
        rows = {interval: next(r for r in served[interval] if str(r["concurrency"]) == level) for interval in served}
        cells += [f"{rows[i]['output_tok_s']} ({rows[i]['output_tok_s'] / rate:.0%})" for i in served]
        cells += [f"{rows[i]['ttft_ms_p50']} / {rows[i]['ttft_ms_p99']}" for i in served]
        last = rows[intervals[-1]]
        way = last.get("replica_first_token") or {}
        cells.append(f"{last.get('before_replica_ms_p50')} ({way.get('to_gateway_ms_p50')}, "
                     f"{way.get('in_gateway_ms_p50')}, {way.get('to_replica_ms_p50')}) / "
                     f"{last.get('replica_ttft_ms_p50')} / {last.get('engine_ttft_ms_p50')}")
        cells += [f"{rows[i].get('replica_mean_batch')}, {rows[i].get('replica_steps_per_s')}" for i in served]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = results.get("baseline")
    if baseline:
        lines += ["", f"Against the baseline tree `{baseline['tree']}`, measured in this run after this tree "
                      "(tok/s, this tree / baseline):", "",
                  "| batch = concurrency | engine | " + " | ".join(f"Serve {i}" for i in intervals)
                  + " | " + " | ".join(f"Serve's share of its engine, {i}" for i in intervals) + " |",
                  "|---|---|" + "---|" * 2 * len(intervals)]
        for level, rate in engine["tok_s"].items():
            before = baseline["engine"]["tok_s"][level]
            cells = [level, f"{rate} / {before} ({rate / before:.2f}x)"]
            rows = {i: next(r for r in served[i] if str(r["concurrency"]) == level) for i in intervals}
            old = {i: next(r for r in baseline["served"][i] if str(r["concurrency"]) == level) for i in intervals}
            cells += [f"{rows[i]['output_tok_s']} / {old[i]['output_tok_s']} "
                      f"({rows[i]['output_tok_s'] / old[i]['output_tok_s']:.2f}x)" for i in intervals]
            cells += [f"{rows[i]['output_tok_s'] / rate:.0%} / {old[i]['output_tok_s'] / before:.0%}" for i in intervals]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "A lone request's first token (one token asked), in the driver: "
              + "; ".join(f"{name} {ms} ms" for name, ms in engine.get("lone_first_token_ms", {}).items()) + "."]
    long_row = results.get("served_long_prompt")
    if long_row:
        lines += ["", f"Time to first token of a {engine['long_prompt_tokens']}-token prompt: engine "
                      f"{engine['long_prompt_ttft_ms']} ms; through Serve ({intervals[-1]}, concurrency 1) p50 "
                      f"{long_row['ttft_ms_p50']} ms (prompt {long_row['mean_prompt_tokens']} tokens), of which "
                      f"{long_row.get('replica_ttft_ms_p50')} ms in the replica and "
                      f"{long_row.get('engine_ttft_ms_p50')} ms from the scheduler's queue to the first token."]
    varied = results.get("served_varied")
    if varied:
        lines += ["", "Varied lengths (`bench --mixed --tenants 1`, prompts and answers each 0.5-1.5x their means): "
                  + varied_summary(varied)]
        if baseline and baseline.get("served_varied"):
            lines += ["", f"The baseline tree, in this run: {varied_summary(baseline['served_varied'])}"]
    return "\n".join(lines) + "\n"


def varied_summary(varied: list[dict]) -> str:
    """The varied-length bench's levels (load, lone, busy) against issue 19's TTFT p99 target."""
    lone, busy = varied[1], varied[-1]
    ratio = f"{busy['ttft_ms_p99'] / lone['ttft_ms_p50']:.1f}x" if busy["ttft_ms_p99"] and lone["ttft_ms_p50"] else "-"
    after = busy.get("ttft_ms_p99_after_first_round")
    after_ratio = f" ({after / lone['ttft_ms_p50']:.1f}x)" if after and lone["ttft_ms_p50"] else ""
    return (f"TTFT p99 at concurrency {busy['concurrency']} {busy['ttft_ms_p99']} ms against p50 "
            f"{lone['ttft_ms_p50']} ms at concurrency {lone['concurrency']}: {ratio} (target: under 4x); after the "
            f"first round (the clients' first requests, sent at once) {after} ms{after_ratio}; TTFT p50 at "
            f"{busy['concurrency']} {busy['ttft_ms_p50']} ms; {busy['output_tok_s']} output tok/s at "
            f"{busy['concurrency']} ({busy['requests']} requests), {busy['errors']} errors.")


def render_pipeline(results: dict) -> str:
    lines = ["## Stages (`qlora-ray run`)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {step['seconds']} |" for name, step in results["steps"].items()]
    lines += [f"| stage {name} | {seconds} |" for name, seconds in results.get("stages", {}).items()]
    if "kernel_build" in results:
        lines.append(f"| Marlin build, in the background (exit {results['kernel_build']['exit']}) | "
                     f"{results['kernel_build']['seconds']} |")
    lines += ["", "## Eval (random base weights: accuracies mean nothing; every configuration loaded and ran)", "",
              "| tenant | configuration | accuracy | perplexity | tok/s | load s | row s | kernels |",
              "|---|---|---|---|---|---|---|---|"]
    for tenant, part in results.get("eval", {}).items():
        for row in part["rows"]:
            kernels = ", ".join(f"{k} x{v}" for k, v in (row.get("module_types") or {}).items())
            lines.append(f"| {tenant} | {row['name']} | {row['accuracy']:.1%} | {row['perplexity']:.3g} | "
                         f"{row['tokens_per_second']:.1f} | {row['load_seconds']} | {row['seconds']} | {kernels} |")
    bench = results.get("bench")
    if bench:
        lines += ["", f"## Bench through Ray Serve (deployed in {bench['deploy_seconds']} s)", "",
                  "| model | conc. | requests | errors | TTFT p50 ms | TPOT p50 ms | output tok/s | replica start s | load s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in bench["rows"]:
            lines.append(f"| {row['model']} | {row['concurrency']} | {row['requests']} | {row['errors']} | "
                         f"{row.get('ttft_ms_p50')} | {row.get('tpot_ms_p50')} | {row.get('output_tok_s')} | "
                         f"{row.get('replica_start_seconds')} | {row.get('load_seconds')} |")
    return "\n".join(lines) + "\n"


# --part serve --serve-modes: Ray Serve's settings, which every Serve process reads from its
# environment (the bench's local Ray passes its environment on to them). `default`: as the tree's
# `qlora-ray bench` starts it (this tree: with Ray's high-throughput settings, cluster.init_ray);
# `plain`: as Ray Serve comes; `throughput`: Ray's high-throughput settings (user code on the
# replica's event loop, gRPC between deployments, direct ingress, a frozen garbage collector).
SERVE_MODES = {"default": {}, "plain": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
               "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}

PARTS = {"pipeline": pipeline, "starts": starts, "gptq-8b": gptq_8b, "serve": serve_engine_rate,
         "tenants": serve_tenants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--part", choices=list(PARTS), default="pipeline")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-ray-gpu-pipeline"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shape", help="the pipeline's base shape (default: smollm2-135m on cuda, tiny on cpu)")
    parser.add_argument("--no-install", action="store_true", help="use the environment as it is (default on cpu)")
    parser.add_argument("--bench-seconds", type=float, default=4.0, help="seconds per model and concurrency")
    parser.add_argument("--stream-intervals", default="0,50", type=lambda text: [int(v) for v in text.split(",")],
                        help="--part serve: the serve.stream_interval_ms values Serve is measured at (the last "
                             "one also for the long prompts)")
    parser.add_argument("--tenants", type=int, default=4, help="with --part tenants: how many tenants' models")
    parser.add_argument("--gateway-replicas", default="1", type=lambda text: [int(v) for v in text.split(",")],
                        help="--part serve: the serve.gateway_replicas values Serve is measured at, at each interval "
                             "(the last one also for the long prompts and varied lengths)")
    parser.add_argument("--serve-modes", default="default", type=lambda text: text.split(","),
                        help=f"--part serve: Ray Serve's settings to measure Serve at ({', '.join(SERVE_MODES)})")
    parser.add_argument("--baseline-tree", type=Path,
                        help="--part serve: a checkout of another commit (its qlora_ray/, benchmarks/ and jobs/) whose "
                             "engine and Serve are measured at the same levels after this tree's, for the ratios")
    parser.add_argument("--varied-seconds", type=float,
                        help="--part serve: seconds per level of the varied-length bench (default: --bench-seconds)")
    parser.add_argument("--levels-only", action="store_true",
                        help="--part serve: only the levels, without the long prompts and varied lengths")
    args = parser.parse_args()
    if unknown := set(args.serve_modes) - set(SERVE_MODES):
        parser.error(f"--serve-modes: unknown {', '.join(sorted(unknown))} (known: {', '.join(SERVE_MODES)})")
    shape = args.shape or ("smollm2-135m" if args.device == "cuda" else "tiny")
    run_part(args, PARTS[args.part], shape, f"on {gpu_name()}")


def run_part(args, part, shape: str, where: str, results: dict | None = None) -> None:
    """Run one part in a fresh work folder (args: out, work, part, device, no_install); its results,
    with `results` and its wall time, go to OUT/<part>.json and its table, under a header, to .md."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work / args.part
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Run(args.out, args.part, work, args.device, shape, install=args.device == "cuda" and not args.no_install)
    run.results.update(results or {})
    started = time.perf_counter()
    try:
        markdown = part(run, args)
    finally:
        run.results["seconds"] = round(time.perf_counter() - started, 1)
        run.save()
    header = (f"# {args.part} {where} ({run.results['date']})\n\n`{run.results['command']}`: "
              f"{run.results['seconds']} s in all.\n\n")
    run.save(header + markdown)
    print(header + markdown)


def gpu_names() -> list[str]:
    """The name of each GPU nvidia-smi lists; none without it."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def gpu_name() -> str:
    return (gpu_names() or ["CPU"])[0]


if __name__ == "__main__":
    main()
