"""What a job will do, checked against its data and its store before anything runs.

`build_plan` reads every tenant's data (so a bad row fails here, not an hour into training),
checks what needs the imported base (GPTQ group size against the layer widths, a chat template for
chat data), and notes what the store already holds, which a rerun skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlora_ray.data import Dataset, read_rows
from qlora_ray.errors import DataError, StoreError
from qlora_ray.quality.verdicts import read_verdicts
from qlora_ray.spec import JobSpec, TenantSpec
from qlora_ray.store import Store, adapter_key, base_key, display_uri, fused_key
from qlora_ray.tables import text_table
from qlora_ray.train.status import is_stale, read_status, silent_seconds


@dataclass
class TenantPlan:
    tenant: TenantSpec
    train: Dataset | None = None
    eval: Dataset | None = None
    adapter_done: bool = False
    adapter_metrics: dict | None = None
    status: dict | None = None  # the live record of the train stage, if it ran
    fused_done: list[str] = field(default_factory=list)  # the complete fused variants in the store
    gate_failed: list[str] = field(default_factory=list)  # those the eval stage's quality gate failed
    gate_judged: int = 0  # those the eval stage judged

    @property
    def state(self) -> str:
        """done | running | stale | failed | pending, from the store (a complete adapter outranks any
        record); stale: the record says running, but its writer has been silent too long (status.py)."""
        if self.adapter_done:
            return "done"
        if self.status and is_stale(self.status):
            return "stale"
        return (self.status or {}).get("state", "pending")

    @property
    def steps(self) -> int | None:
        """Optimizer steps the fine-tune will take (None until the data is read)."""
        training = self.tenant.training
        if training.max_steps is not None:
            return training.max_steps
        if self.train is None:
            return None
        per_step = training.batch_size * training.grad_accum
        return max(1, math.ceil((training.epochs or 1.0) * len(self.train.rows) / per_step))


@dataclass
class Plan:
    spec: JobSpec
    tenants: list[TenantPlan]
    base_done: bool = False
    base_config: dict | None = None
    data_problems: list[str] = field(default_factory=list)
    store_problems: list[str] = field(default_factory=list)  # refreshed with the store state

    @property
    def problems(self) -> list[str]:
        return self.data_problems + self.store_problems


def build_plan(spec: JobSpec, store: Store | None, *, read_data: bool = True) -> Plan:
    """Check a job against its data and store; problems are collected, not raised."""
    plan = Plan(spec=spec, tenants=[TenantPlan(t) for t in spec.tenants])
    if read_data:
        for tenant_plan in plan.tenants:
            _read_tenant_data(tenant_plan, spec.storage_options, plan.data_problems)
    if store is not None:
        refresh_store_state(plan, store)
    return plan


def refresh_store_state(plan: Plan, store: Store) -> None:
    """(Re)read what the store holds for the plan's job, and run the checks that need the imported base.

    After a stage changes the store, this updates a plan without reading the tenants' data again.
    """
    plan.store_problems = []
    try:
        store.check_reachable()
        _read_store_state(plan, store)
    except StoreError as exc:
        plan.store_problems.append(str(exc))
    if plan.base_config is not None:
        plan.store_problems += _base_problems(plan)


def _read_tenant_data(tenant_plan: TenantPlan, storage_options: dict, problems: list[str]) -> None:
    tenant = tenant_plan.tenant
    for attr, uri in (("train", tenant.train_data), ("eval", tenant.eval_data)):
        if uri is None:
            continue
        try:
            setattr(tenant_plan, attr, read_rows(uri, storage_options))
        except DataError as exc:
            problems.append(f"tenant {tenant.id}: {attr} data: {exc}")


def _read_store_state(plan: Plan, store: Store) -> None:
    key = base_key(plan.spec.base.name)
    plan.base_done = store.is_complete(key)
    if plan.base_done:
        manifest = store.read_manifest(key)
        if manifest["inputs"].get("source") != plan.spec.base.source:
            plan.store_problems.append(
                f"base.source: the store's {plan.spec.base.name!r} was imported from "
                f"{manifest['inputs'].get('source')!r}, not {plan.spec.base.source!r}"
            )
        plan.base_config = store.read_json(key, "config.json")
        plan.base_config["_chat_template"] = manifest["metrics"].get("chat_template", True)
    verdicts = read_verdicts(store, plan.spec.name)
    for tenant_plan in plan.tenants:
        key = adapter_key(plan.spec.name, tenant_plan.tenant.id)
        tenant_plan.adapter_done = store.is_complete(key)
        if tenant_plan.adapter_done:
            tenant_plan.adapter_metrics = store.read_manifest(key)["metrics"]
        tenant_plan.status = read_status(store, plan.spec.name, tenant_plan.tenant.id)
        tenant_plan.fused_done, tenant_plan.gate_failed, tenant_plan.gate_judged = [], [], 0
        for variant in plan.spec.fused_variants(tenant_plan.tenant):
            fused = fused_key(plan.spec.name, tenant_plan.tenant.id, variant.name)
            if store.is_complete(fused):
                tenant_plan.fused_done.append(variant.name)
                quality = verdicts.of(tenant_plan.tenant.id, variant.name, store.read_manifest(fused))
                tenant_plan.gate_judged += quality is not None
                if quality is not None and not quality["passed"]:
                    tenant_plan.gate_failed.append(variant.name)


def _base_problems(plan: Plan) -> list[str]:
    config, spec = plan.base_config, plan.spec
    problems = []
    group = spec.fuse.gptq.group_size
    if "gptq-int4" in spec.fuse.schemes and group != -1:
        widths = {config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        bad = sorted(w for w in widths if w % group)
        if bad:
            fits = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths)]
            hint = f"; {fits[0]} fits" if fits else ""
            problems.append(
                f"fuse.gptq.group_size: {group} does not divide the layer width(s) {bad} of base "
                f"{spec.base.name!r}{hint}"
            )
    if not config.get("_chat_template"):
        for tenant_plan in plan.tenants:
            if tenant_plan.train is not None and tenant_plan.train.format != "prompt-completion":
                problems.append(f"tenant {tenant_plan.tenant.id}: chat rows need a chat template, and base "
                                f"{spec.base.name!r} has none")
    return problems


def render_plan(plan: Plan) -> str:
    spec = plan.spec
    lines = [
        f"job {spec.name}: {len(spec.tenants)} tenant(s), store {display_uri(spec.store)}",
        f"base {spec.base.name} from {spec.base.source}: " + ("in the store" if plan.base_done else "to import"),
        "",
    ]
    rows = []
    for tp in plan.tenants:
        training = tp.tenant.training
        lora = training.lora
        rows.append([
            tp.tenant.id,
            f"{len(tp.train.rows)} {tp.train.format}" if tp.train else "?",
            len(tp.eval.rows) if tp.eval else "-",
            tp.tenant.scorer,
            training.quantization,
            f"r{lora.r}/a{lora.alpha:g}" + ("/rs" if lora.use_rslora else ""),
            tp.steps if tp.steps is not None else "?",
            f"{training.resources.num_cpus:g} cpu, {training.resources.num_gpus:g} gpu",
            tp.state,
        ])
    lines.append(text_table(["tenant", "train rows", "eval", "scorer", "quant", "lora", "steps", "resources", "train"], rows))
    outputs = sum(len(spec.fused_variants(tenant)) for tenant in spec.tenants)
    lines += [
        "",
        f"fuse: {', '.join(spec.fuse.schemes)} x merge base {spec.fuse.merge_base} -> {outputs} fused model(s), "
        f"{spec.fuse.workers} worker(s)",
        f"quality gate: {'on' if spec.quality_gate.enabled else 'off'} (keep >= {spec.quality_gate.min_accuracy_ratio:.0%} "
        f"of the adapter's accuracy, perplexity rise <= {spec.quality_gate.max_perplexity_rise:.0%})",
        f"serve: http://{spec.serve.host}:{spec.serve.port}, {spec.serve.num_replicas} replica(s), "
        f"{spec.serve.max_resident_models} resident model(s) each",
    ]
    return "\n".join(lines)


def _gate_cell(tenant_plan: TenantPlan) -> str:
    """The quality gate on the tenant's fused models: "-" before the eval stage, else how many passed
    and which failed."""
    if not tenant_plan.gate_judged:
        return "-"
    passed = tenant_plan.gate_judged - len(tenant_plan.gate_failed)
    return f"{passed}/{tenant_plan.gate_judged} pass" + (f"; failed: {', '.join(tenant_plan.gate_failed)}"
                                                          if tenant_plan.gate_failed else "")


def _problem(tenant_plan: TenantPlan, record: dict) -> str:
    if tenant_plan.state == "stale":
        return (f"no update for {silent_seconds(record) / 60:.0f} min: its worker or driver is likely gone; "
                "a rerun resumes it")
    if tenant_plan.state == "failed" and record.get("error"):
        return record["error"].splitlines()[0]
    return ""


def render_status(plan: Plan) -> str:
    """One row per tenant: its train state, progress and figures, and how many of its fused models
    are complete, from the store alone."""
    rows = []
    for tp in plan.tenants:
        record, metrics = tp.status or {}, tp.adapter_metrics or {}
        step = metrics.get("steps", record.get("step"))
        total = record.get("max_steps") or tp.tenant.training.max_steps
        rows.append([
            tp.tenant.id,
            tp.state,
            f"{step}/{total}" if step is not None and total else step,
            metrics.get("final_loss", record.get("loss")),
            metrics.get("tokens_per_second", record.get("tokens_per_second")),
            record.get("attempt"),
            record.get("updated_at"),
            f"{len(tp.fused_done)}/{len(plan.spec.fused_variants(tp.tenant))}",
            _gate_cell(tp),
            _problem(tp, record),
        ])
    header = f"job {plan.spec.name}: base {plan.spec.base.name} " + ("in the store" if plan.base_done else "not imported")
    table = text_table(["tenant", "state", "step", "loss", "tok/s", "attempt", "updated", "fused", "gate", "error"], rows)
    return f"{header}\n\n{table}"
