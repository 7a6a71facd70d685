"""The fuse stage's plan: which fused artifacts each tenant gets, the inputs their manifests record,
and the units of work the actor pool runs.

Pure functions over what the driver read from the store (launch.py reads; nothing here does I/O),
so that what gets built, and why a tenant's variant is refused, is tested without Ray or a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_ray.fuse.gptq import group_size_problems
from qlora_ray.fuse.layout import BaseLayout
from qlora_ray.fuse.quant import FourBit, trained_format
from qlora_ray.fuse.shards import GPTQ, SHARD_SCHEMES, ShardTarget
from qlora_ray.spec import FusedVariant, JobSpec, TenantSpec
from qlora_ray.store import Draft, adapter_key, base_key, data_key, hessian_key


@dataclass
class FuseOutcome:
    tenant: str
    variant: str
    state: str  # "done" | "skipped" | "failed"
    metrics: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class AdapterFacts:
    """What the driver read about one tenant's trained adapter and data."""

    manifest: dict
    manifest_sha256: str
    trained: FourBit | None  # the 4-bit format it was trained against, by its manifest (adapter_format)
    layout_problems: list[str]  # where its LoRA factors do not fit the base (fuse/layout.adapter_problems)
    data_manifest: dict | None  # its staged rows, GPTQ's calibration data (None: not in the store)


@dataclass(frozen=True)
class Build:
    """One fused artifact to build: the inputs its manifest records, and the shard target that merges it."""

    variant: FusedVariant
    inputs: dict
    target: ShardTarget
    streamed: bool = False  # bulk gptq-int4 with per-tenant Hessians: quantized in a StreamUnit's walk

    @property
    def tenant(self) -> str:
        return self.target.tenant

    @property
    def shard_wise(self) -> bool:
        return self.variant.scheme in SHARD_SCHEMES or self.target.hessian_pool is not None

    @property
    def drafted(self) -> bool:
        """Whether the driver begins its version and seals it from parts the workers upload (every
        build but per-tenant GPTQ's, whose worker publishes the whole artifact)."""
        return self.shard_wise or self.streamed


@dataclass(frozen=True)
class TenantPlan:
    builds: list[Build]
    failed: list[FuseOutcome]


def adapter_format(tenant: TenantSpec, adapter_manifest: dict) -> FourBit | None:
    """The format the tenant's adapter was trained against, by its manifest (fuse/quant.trained_format);
    ValueError when the manifest names no known one."""
    return trained_format(adapter_manifest, tenant.training.quantization, tenant.training.double_quant)


def output_format(tenant: TenantSpec) -> FourBit:
    """The nf4 scheme's format: NF4, with the tenant's double-quantization choice."""
    return FourBit("nf4", tenant.training.double_quant)


def gptq_problems(spec: JobSpec, layout: BaseLayout) -> list[str]:
    """Why the base cannot be GPTQ-quantized as the job asks (its widths against the group size), if it cannot."""
    if "gptq-int4" not in spec.fuse.schemes:
        return []
    return group_size_problems(spec.fuse.gptq, {name: layout.shapes[name][-1] for name in layout.quantized})


def hessian_pool(merge_base: str, trained: FourBit | None) -> str:
    """The name of the pooled Hessian set a bulk gptq-int4 build is quantized against: one per merge
    base (and 4-bit format, for the NF4-dequantized base)."""
    return merge_base if merge_base == "original" else f"{merge_base}.{trained.quant_type}{'-dq' if trained.double_quant else ''}"


def plan_tenant(spec: JobSpec, tenant: TenantSpec, todo: list[FusedVariant], adapter: AdapterFacts,
                base_manifest_sha256: str, gptq_problems: list[str]) -> TenantPlan:
    """The builds of one tenant's variants still to fuse (`todo`), and those refused with why."""
    def refuse(message: str, variants: list[FusedVariant]) -> list[FuseOutcome]:
        return [FuseOutcome(tenant.id, v.name, "failed", error=message) for v in variants]

    if adapter.layout_problems:
        problems = adapter.layout_problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return TenantPlan([], refuse(f"the adapter does not fit base {spec.base.name}: {problems[0]}{more}", todo))
    trained = adapter.trained
    failed: list[FuseOutcome] = []
    if gptq_problems:
        failed += refuse(gptq_problems[0], [v for v in todo if v.scheme == "gptq-int4"])
        todo = [v for v in todo if v.scheme != "gptq-int4"]
    builds = []
    for variant in todo:
        inputs = {
            "job": spec.name, "tenant": tenant.id, "scheme": variant.scheme, "merge_base": variant.merge_base,
            "spec_sha256": spec.spec_hash(),
            "base": {"key": base_key(spec.base.name), "manifest_sha256": base_manifest_sha256},
            "adapter": {"key": adapter_key(spec.name, tenant.id), "manifest_sha256": adapter.manifest_sha256,
                        "training_fingerprint": adapter.manifest["inputs"].get("training_fingerprint")},
        }
        if variant.merge_base == "nf4-dequantized":
            if trained is None:
                failed += refuse("its adapter was trained on the 16-bit base (the adapter's manifest says so): there "
                                 "is no 4-bit base to merge into; use merge_base: original", [variant])
                continue
            inputs["trained_format"] = vars(trained)
        if variant.scheme == "nf4":
            inputs["output_format"] = vars(output_format(tenant))
        if variant.scheme == "gptq-int4":
            if adapter.data_manifest is None:
                failed += refuse("its training data is not in the store to calibrate GPTQ on; run train first", [variant])
                continue
            inputs["gptq"] = spec.fuse.gptq.model_dump(mode="json")
            inputs["calibration"] = {"key": data_key(spec.name, tenant.id),
                                     "train_sha256": adapter.data_manifest["inputs"].get("train_sha256")}
        pool, streamed = None, False
        if variant.scheme == GPTQ and spec.fuse.gptq.mode == "bulk":
            if spec.fuse.gptq.hessian == "pooled":
                pool = hessian_pool(variant.merge_base, trained)
                inputs["hessians"] = {"key": hessian_key(spec.name, pool)}
            else:
                streamed = True
        target = ShardTarget(tenant.id, variant.merge_base, (variant.scheme,), trained, output_format(tenant), pool)
        builds.append(Build(variant, inputs, target, streamed))
    return TenantPlan(builds, failed)


@dataclass(frozen=True)
class ShardUnit:
    """One base shard merged for every shard-wise target, each output uploaded into its artifact's
    version (drafts: `<tenant>/<variant>` -> the version the driver began)."""

    shard_file: str
    targets: tuple[ShardTarget, ...]
    drafts: dict[str, Draft]

    @property
    def name(self) -> str:
        return f"shard {self.shard_file}"


@dataclass(frozen=True)
class HessianUnit:
    """One Hessian set captured on its merge base from its tenants' calibration rows, and published."""

    pool: str
    merge_base: str
    trained_format: FourBit | None  # the 4-bit format of the NF4-dequantized merge base
    calibration: dict[str, str | None]  # tenant -> the sha256 of its staged training rows
    inputs: dict  # what its manifest records; an artifact with other inputs is captured again

    @property
    def name(self) -> str:
        return f"hessians {self.pool}"


def hessian_units(spec: JobSpec, builds: list[Build]) -> list[HessianUnit]:
    """One unit per Hessian set the bulk gptq-int4 builds read, each listing the tenants it pools."""
    pools: dict[str, list[Build]] = {}
    for build in builds:
        if build.variant.scheme == GPTQ and build.target.hessian_pool is not None:
            pools.setdefault(build.target.hessian_pool, []).append(build)
    units = []
    for pool, members in sorted(pools.items()):
        first = members[0].target
        calibration = {b.tenant: b.inputs["calibration"]["train_sha256"] for b in sorted(members, key=lambda b: b.tenant)}
        inputs = {"job": spec.name, "pool": pool, "merge_base": first.merge_base,
                  "trained_format": vars(first.trained_format) if first.merge_base == "nf4-dequantized" else None,
                  "base": members[0].inputs["base"], "calibration_samples": spec.fuse.gptq.calibration_samples,
                  # a sequential capture quantizes the merge base as it goes: its Hessians depend on these too
                  "sequential": spec.fuse.gptq.sequential,
                  "gptq": spec.fuse.gptq.model_dump(include={"bits", "group_size", "desc_act", "static_groups"}) if spec.fuse.gptq.sequential else None,
                  "calibration": calibration}
        units.append(HessianUnit(pool, first.merge_base, first.trained_format if first.merge_base == "nf4-dequantized"
                                 else None, calibration, inputs))
    return units


@dataclass(frozen=True)
class StreamUnit:
    """Bulk gptq-int4 with per-tenant Hessians for a group of tenants under one merge base: one walk
    over the base, each base shard's part of every tenant's artifact uploaded into its version as the
    walk completes it (drafts: `<tenant>/<variant>` -> the version the driver began)."""

    targets: tuple[ShardTarget, ...]
    drafts: dict[str, Draft]

    @property
    def name(self) -> str:
        return f"gptq {self.targets[0].merge_base} for {', '.join(t.tenant for t in self.targets)}"


def stream_units(builds: dict[str, tuple[Build, Draft]], workers: int) -> list[StreamUnit]:
    """The streamed builds (keyed by `<tenant>/<variant>`) in groups that share a merge base, each
    split into at most `workers` near-equal units: each unit holds the base once, and the pool walks
    its units side by side."""
    groups: dict[tuple, list[tuple[str, Build, Draft]]] = {}
    for name, (build, draft) in builds.items():
        target = build.target  # the 4-bit format makes another merge base only for the NF4-dequantized one
        base = (target.merge_base, target.trained_format if target.merge_base == "nf4-dequantized" else None)
        groups.setdefault(base, []).append((name, build, draft))
    units = []
    for members in groups.values():
        count = min(workers, len(members))
        size = -(-len(members) // count)
        for at in range(0, len(members), size):
            chunk = members[at:at + size]
            units.append(StreamUnit(tuple(build.target for _, build, _ in chunk),
                                    {name: draft for name, _, draft in chunk}))
    return units


@dataclass(frozen=True)
class GptqUnit:
    """One tenant's model under one merge base, merged whole and GPTQ-quantized; publishes its own artifact."""

    build: Build

    @property
    def name(self) -> str:
        return f"{self.build.tenant} {self.build.variant.name}"


def shard_targets(builds: list[Build]) -> tuple[ShardTarget, ...]:
    """One target per tenant and merge base, with every shard-wise scheme it wants (its base shard
    merge is shared by them)."""
    grouped: dict[tuple[str, str], ShardTarget] = {}
    for build in builds:
        key = (build.tenant, build.variant.merge_base)
        target = grouped.get(key)
        schemes = (target.schemes if target else ()) + (build.variant.scheme,)
        pool = build.target.hessian_pool or (target.hessian_pool if target else None)
        grouped[key] = ShardTarget(build.tenant, build.variant.merge_base, schemes,
                                   build.target.trained_format, build.target.output_format, pool)
    return tuple(grouped.values())


def fuse_units(shard_files: list[str], shard_builds: dict[str, tuple[Build, Draft]],
               gptq_builds: list[Build]) -> list[ShardUnit | GptqUnit]:
    """The pool's work, in order: every base shard once for all shard-wise builds (keyed by
    `<tenant>/<variant>`, each with its version), then one unit per GPTQ build."""
    units: list[ShardUnit | GptqUnit] = []
    if shard_builds:
        targets = shard_targets([build for build, _ in shard_builds.values()])
        drafts = {name: draft for name, (_, draft) in shard_builds.items()}
        units += [ShardUnit(shard_file, targets, drafts) for shard_file in shard_files]
    units += [GptqUnit(build) for build in gptq_builds]
    return units
