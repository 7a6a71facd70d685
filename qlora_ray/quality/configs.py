"""The configurations a tenant is evaluated in, and how each one is loaded.

Every configuration loads through the libraries a user would serve it with (transformers, peft,
bitsandbytes, GPTQModel), from the store's artifacts, never from our own decoder: the table must
show what those artifacts are worth anywhere. Each load reports the quantized module types it got,
so a row can be checked to really be the configuration it claims.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qlora_ray.fuse.quant import FourBit
from qlora_ray.hardware import native_bf16
from qlora_ray.spec import FusedVariant, JobSpec

log = logging.getLogger(__name__)

# Naive post-training quantization with GPTQ: the job's base quantized once (no adapter merged),
# the tenant's bf16 adapter attached on top.
PTQ_GPTQ = "ptq.gptq-int4"

# The precision GPTQ rows run in on a GPU (load_config says why), and of the Marlin build they need.
GPTQ_MARLIN_PRECISION = "fp16"


@dataclass(frozen=True)
class EvalConfig:
    name: str  # the row's name in the report, e.g. "gptq-int4.original", "unmerged.nf4-base"
    kind: str  # "base" | "unmerged" | "unmerged-4bit" | "fused" | "ptq"
    description: str
    variant: FusedVariant | None = None  # the fused artifact, for kind "fused"
    trained: FourBit | None = None  # the 4-bit format the adapter was trained against, for kind "unmerged-4bit"

    @property
    def has_adapter(self) -> bool:
        return self.kind in ("unmerged", "unmerged-4bit", "ptq")

    @property
    def loads_gptq(self) -> bool:
        return self.kind == "ptq" or (self.kind == "fused" and self.variant.scheme == "gptq-int4")


# The reference row, and what serve's `<tenant>/unmerged` loads.
UNMERGED_ROW = EvalConfig("unmerged", "unmerged", "adapter unmerged on the 16-bit base (what <tenant>/unmerged serves)")


def configurations(fused_variants: Sequence[FusedVariant], naive_ptq: bool, trained: FourBit | None) -> list[EvalConfig]:
    """The rows of a tenant's table, in order: the base, the adapter unmerged (on the 16-bit base,
    and on the 4-bit base it was trained on: `trained`, as the adapter's manifest records it), every
    fused artifact, and naive PTQ with GPTQ (if `naive_ptq`). Naive PTQ with bitsandbytes 4-bit is
    the "unmerged on the 4-bit base" row: the same quantized base."""
    rows = [EvalConfig("base", "base", "the base model alone (16-bit)"), UNMERGED_ROW]
    if trained is not None:
        kind = trained.quant_type.upper()
        rows.append(EvalConfig(f"unmerged.{trained.quant_type}-base", "unmerged-4bit",
                               f"adapter unmerged on the {kind} base, as trained (= naive PTQ, bitsandbytes {kind})",
                               trained=trained))
    for variant in fused_variants:
        base = "16-bit original" if variant.merge_base == "original" else "NF4-dequantized base"
        rows.append(EvalConfig(variant.name, "fused", f"fused {variant.scheme}, merged into the {base}", variant))
    if naive_ptq:
        rows.append(EvalConfig(PTQ_GPTQ, "ptq", "naive PTQ: the GPTQ int4 base + the adapter unmerged"))
    return rows


def reference_name(spec: JobSpec, rows: list[dict]) -> str:
    """The row the gate compares every fused artifact with (quality_gate.reference): the adapter on
    the 4-bit base it was trained on, if asked and measured, else the adapter on the 16-bit base."""
    as_trained = next((row["name"] for row in rows if row["kind"] == "unmerged-4bit"), None)
    return as_trained if spec.quality_gate.reference == "as-trained" and as_trained else "unmerged"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    module_types: dict[str, int]  # library.class -> count, for the linear layers (quantized or LoRA-wrapped)


def load_config(config: EvalConfig, paths: dict[str, Path], device: str) -> Loaded:
    """Load one configuration. paths: "base" (16-bit base folder), "adapter", and "model" (the fused
    or naive-PTQ folder) as the configuration needs them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On the CPU fp32 is the fast 16-bit path; 4-bit layers compute in the dtype their config names.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    common = {"use_safetensors": True, "trust_remote_code": False, "device_map": {"": device}}
    if config.kind in ("base", "unmerged"):
        folder, kwargs = paths["base"], {"dtype": dtype}
    elif config.kind == "unmerged-4bit":
        from transformers import BitsAndBytesConfig

        folder = paths["base"]
        kwargs = {"dtype": dtype, "quantization_config": BitsAndBytesConfig.from_dict(config.trained.quantization_config())}
    else:  # fused or naive PTQ: the folder's config.json says how it is quantized
        folder = paths["model"]
        kwargs = {"dtype": dtype} if config.kind == "fused" and config.variant.scheme == "bf16" else {}
        backend = gptq_kernel(folder, device)
        if backend is not None:
            from transformers import GPTQConfig

            # fp16: the layers transformers builds for GPTQModel compute in fp16 whatever dtype the
            # model is loaded in (optimum passes them no dtype), so bf16 activations would need
            # GPTQModel's Marlin of both precisions; fp16 needs one, the cluster's shared build.
            kwargs["dtype"] = torch.float16
            kwargs["quantization_config"] = GPTQConfig(bits=_gptq_settings(folder)["bits"], backend=backend)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **common, **kwargs)
    if device == "cpu" and not native_bf16(device):
        _bitsandbytes_in_fp32(model)
    if config.has_adapter:
        from peft import PeftModel

        from qlora_ray.adapter_files import checked_adapter_dir

        model = PeftModel.from_pretrained(model, str(checked_adapter_dir(paths["adapter"])))
    model.eval()
    return Loaded(model, tokenizer, linear_module_types(model))


def _bitsandbytes_in_fp32(model) -> None:
    """4-bit bitsandbytes layers compute in the dtype their config names (bf16 for ours); on a CPU
    where bf16 is emulated that is several times slower than fp32, which the CPU path uses anyway."""
    import torch

    for module in model.modules():
        if getattr(module, "compute_dtype", None) == torch.bfloat16 and type(module).__module__.startswith("bitsandbytes"):
            module.compute_dtype = torch.float32


def _gptq_settings(folder: Path) -> dict | None:
    settings = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    return settings if settings.get("quant_method") == "gptq" else None


def gptq_layer_shapes(folder: Path) -> set[tuple[int, int]]:
    """(in_features, out_features) of every GPTQ linear in a folder, from its qweight headers
    ([in * bits / 32, out] int32), without reading the weights."""
    from safetensors import safe_open

    bits = _gptq_settings(folder)["bits"]
    shapes = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith(".qweight"):
                    packed, out_features = handle.get_slice(name).get_shape()
                    shapes.add((packed * 32 // bits, out_features))
    return shapes


def gptq_kernel(folder: Path, device: str) -> str | None:
    """The GPTQModel kernel (its `backend` name) to load a GPTQ folder with on `device`; None off CUDA
    and for folders that are not GPTQ.

    transformers asks GPTQModel for one kernel per model, chosen on the bits, group size and device
    alone; the layers are checked against it only as they are built. On Hopper its first choice,
    Machete, refuses widths that are not multiples of 128 (SmolLM2's 192-wide k/v projections), and
    the load fails. So the kernels GPTQModel would choose from, in its own order of preference, are
    checked here against every layer's shape with GPTQModel's own validation, and the first that
    takes them all is named explicitly; a fallback from its first choice is logged."""
    if device != "cuda":
        return None  # on the CPU GPTQModel's kernels take any shape its group size divides
    settings = _gptq_settings(folder)
    if settings is None:
        return None
    import torch
    from gptqmodel.models._const import DEVICE
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING, validate_quant_linear

    contract = {"bits": settings["bits"], "group_size": settings["group_size"], "desc_act": settings.get("desc_act", False),
                "sym": settings.get("sym", True)}
    shapes = sorted(gptq_layer_shapes(folder))
    fmt = FORMAT(str(settings.get("checkpoint_format", settings.get("format", "gptq"))).lower())
    refusals = []
    # GPTQModel's own order of preference. A kernel's shape rules are read from its class first:
    # validating one builds its extension on first use (minutes for some), so only the kernel that
    # will be used is validated in full.
    for backend, kernel in AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ].get(fmt, {}).items():
        if DEVICE.CUDA not in kernel.SUPPORTS_DEVICES and DEVICE.ALL not in kernel.SUPPORTS_DEVICES:
            continue
        misfit = next(((i, o) for i, o in shapes if any(i % d for d in kernel.SUPPORTS_IN_FEATURES_DIVISIBLE_BY)
                       or any(o % d for d in kernel.SUPPORTS_OUT_FEATURES_DIVISIBLE_BY)), None)
        refused = f"layer shape {misfit[0]}x{misfit[1]}" if misfit else next(
            (error for i, o in shapes for ok, error in [validate_quant_linear(
                kernel, **contract, in_features=i, out_features=o, pack_dtype=torch.int32, dtype=torch.bfloat16,
                device=DEVICE.CUDA)] if not ok), None)
        if refused is None:
            if refusals:
                log.warning("%s: loading it with GPTQModel's %s (%s)", folder.name, kernel.__name__, "; ".join(refusals))
            return backend.value
        refusals.append(f"{kernel.__name__} refuses {refused}")
    raise RuntimeError(f"{folder}: no GPTQModel kernel on this GPU takes every layer shape ({'; '.join(refusals)})")


def linear_module_types(model) -> dict[str, int]:
    """How many modules of each linear-like class the model holds, named by library and class
    ("torch.Linear", "bitsandbytes.Linear4bit", "gptqmodel.TorchAtenLinear", peft's LoRA wrappers
    "peft.Linear" and "peft.GPTQLoraLinear"): what a row really ran, not what it was asked to."""
    counts: dict[str, int] = {}
    for module in model.modules():
        cls = type(module)
        if "Linear" in cls.__name__:
            name = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def resident_bytes(model) -> int:
    """Bytes of the loaded weights and buffers (what the model holds in memory, whatever its format)."""
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
