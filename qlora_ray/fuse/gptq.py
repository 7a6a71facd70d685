"""The gptq-int4 scheme: GPTQ through GPTQModel, calibrated on the tenant's own training rows.

GPTQ needs each layer's input activations, so it runs through the whole model layer by layer and
cannot be done shard by shard: the worker first merges the tenant's shards into a local 16-bit
folder (fuse/shards.py), then quantizes that. GPTQModel (the maintained successor of AutoGPTQ)
writes the GPTQ checkpoint format that transformers, GPTQModel and vLLM load.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import time
from pathlib import Path

from qlora_ray.errors import DataError
from qlora_ray.hardware import compute_dtype
from qlora_ray.spec import GptqSpec

# Longest calibration row, in tokens: the tenant's rows are its real traffic; this only guards memory.
MAX_CALIBRATION_TOKENS = 2048
# Rows per calibration forward: batches cut the per-layer replays through the model (padding is masked).
CALIBRATION_BATCH = 8


def calibration_texts(rows: list[dict], tokenizer, count: int, *, seed: int = 0) -> list[str]:
    """Up to `count` training rows as the full text the model sees (prompt and answer), chosen by a
    seeded shuffle so reruns calibrate on the same rows."""
    chosen = list(rows)
    random.Random(seed).shuffle(chosen)
    texts = []
    for row in chosen[:count]:
        if "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif isinstance(row["prompt"], str):
            texts.append(row["prompt"] + row["completion"])
        else:  # conversational prompt/completion
            texts.append(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False))
    return texts


def calibration_batch(texts: list[str], tokenizer) -> list[dict]:
    """Token ids in the shape GPTQModel's quantize() takes."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_CALIBRATION_TOKENS]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def calibration_rows(texts: list[str], tokenizer) -> list[dict]:
    """The rows of calibration_batch that hold tokens; a DataError when none does."""
    rows = [row for row in calibration_batch(texts, tokenizer) if row["input_ids"]]
    if not rows:
        raise DataError(f"GPTQ calibration: the {len(texts)} training row(s) chosen hold no tokens")
    return rows


def group_size_problems(spec: GptqSpec, in_features: dict[str, int]) -> list[str]:
    """GPTQ groups split each weight's input columns; a group size must divide all of them."""
    if spec.group_size == -1:
        return []
    bad = sorted((size, name) for name, size in in_features.items() if size % spec.group_size)
    if not bad:
        return []
    sizes = sorted({size for size, _ in bad})
    return [f"fuse.gptq.group_size: {spec.group_size} does not divide the input size {sizes[0]} of "
            f"{bad[0][1]} (and {len(bad) - 1} other weight(s)); use a power of two that divides "
            f"{', '.join(map(str, sizes))}, or -1"]


def gptq_quantize(merged_dir: Path, out_dir: Path, texts: list[str], spec: GptqSpec, *, device: str) -> dict:
    """Quantize the merged 16-bit model in merged_dir into out_dir. Returns metrics."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    calibration = calibration_rows(texts, tokenizer)
    # GPTQModel offloads finished layers to disk, by default into a temporary folder of its own that
    # outlives a worker process Ray ends (a model's 16-bit size left in /tmp per tenant): into the
    # caller's scratch folder instead, removed with it.
    config = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act,
                            static_groups=spec.static_groups, sym=True,
                            offload_to_disk_path=str(merged_dir.parent / "gptqmodel-offload"))
    # GPTQModel prints ~1.5 MB of progress per SmolLM2 and writes a ./logs folder: both go to the
    # scratch folder, and the log's tail is shown only if quantization fails.
    log_path = merged_dir.parent / "gptqmodel.log"
    previous = os.getcwd()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        os.chdir(merged_dir.parent)
        try:
            marks = [time.perf_counter()]
            # GPTQModel computes in bf16 on any CPU; where that is emulated, fp32 is many times faster.
            model = GPTQModel.load(str(merged_dir), config, device=device, trust_remote_code=False,
                                   dtype=compute_dtype(device))
            marks.append(time.perf_counter())
            # Every row counts, short ones too: they are the tenant's traffic. GPTQModel drops rows of
            # 10 tokens or fewer (and fails with a ZeroDivisionError when that leaves none); its
            # quantize() takes calibration_data_min_length but does not pass it on (7.6), so it goes to
            # the dataset preparation the quantizer calls.
            model.prepare_dataset = functools.partial(model.prepare_dataset, calibration_data_min_length=0)
            model.quantize(calibration, batch_size=CALIBRATION_BATCH, tokenizer=tokenizer)
            marks.append(time.perf_counter())
            model.save(str(out_dir))
            dense_in_bf16(out_dir)
            marks.append(time.perf_counter())
        except Exception:
            log.flush()
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print("GPTQModel's last output:\n" + "\n".join(tail), file=sys.__stderr__)
            raise
        finally:
            os.chdir(previous)
    return {
        "gptq_seconds": round(time.perf_counter() - started, 2),
        **{f"gptq_{phase}_seconds": round(end - start, 2)
           for phase, start, end in zip(("load", "quantize", "save"), marks, marks[1:])},
        "calibration_rows": len(calibration),
        "calibration_tokens": sum(len(row["input_ids"]) for row in calibration),
    }


def dense_in_bf16(folder: Path) -> None:
    """Store a GPTQ checkpoint's dense tensors (embeddings, norms, LM head) in bf16, as every other
    fused model holds them, whatever dtype GPTQModel computed in (fp32 on CPUs without native bf16):
    the artifact must not depend on the machine that made it. Quantized tensors keep their dtypes."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        if any(t.dtype == torch.float32 for t in tensors.values()):
            save_file({k: t.to(torch.bfloat16) if t.dtype == torch.float32 else t for k, t in tensors.items()},
                      str(path), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("dtype") == "float32" or config.get("torch_dtype") == "float32":
        config["dtype"] = "bfloat16"
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
