"""QLoRA training speed on one GPU: the baseline stack against what qlora_ray adds, in one process.

Baseline (as measured in shared/research/gpu-anchors.md): a Llama-3-8B-shaped model with random
bf16 weights, every linear but lm_head in bitsandbytes NF4 with double quantization, peft LoRA r16
alpha 32 on the seven projections, non-reentrant gradient checkpointing on every layer, bf16
autocast, torch AdamW, fixed-length batches (seq x batch), labels = inputs.

Variants add one thing at a time on top of the same model and adapter, each with a fresh optimizer,
through the functions qlora_ray's train stage uses (qlora_ray.train.finetune): Liger-Kernel's fused
Triton kernels (RMSNorm, SwiGLU, RoPE, and a linear + cross entropy that never materializes the
128k-vocabulary logits) as transformers' Trainer applies them for `use_liger_kernel`, fused AdamW,
torch.compile of each decoder layer, then leaving the last layers un-checkpointed with the memory
the kernels freed. The baseline is measured twice, first and last, to show the machine's drift.

Real data has rows of many lengths. The second comparison draws rows of 64 to 1024 tokens: the
baseline pads each batch of 4 rows to its longest row (what transformers' collators do), ours packs
the same rows into 4 x 1024 sequences whose position_ids restart at each row, which transformers turns
into a block-diagonal mask (no attention across rows; tests/test_train.py checks it). Tokens/s
counts real tokens only.

Usage (on the GPU machine):  python benchmarks/train_speed.py --out OUT_DIR [--shape llama3-8b]
Writes OUT_DIR/train_speed.json and prints a table. Timings: CUDA-synchronised wall clock per
step, median of the timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*parts) -> None:
    print(*parts, flush=True)


def build_nf4_model(shape: str):
    """Random bf16 weights on the GPU, then every nn.Linear but lm_head swapped for NF4 (+DQ)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    from qlora_ray.shapes import shape_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(shape_config(shape)).to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True, device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to("cuda")
                setattr(module, name, quantized)
    gc.collect()
    torch.cuda.empty_cache()
    return model


def make_optimizer(name: str, params):
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=name == "adamw_torch_fused")


def time_steps(model, params, ids, *, optimizer: str, warmup: int, steps: int) -> dict:
    optimizer = make_optimizer(optimizer, params)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
    step_s = statistics.median(times)
    result = {
        "step_s": round(step_s, 4),
        "tokens_per_s": round(ids.numel() / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "step_s_all": [round(t, 4) for t in times],
        "loss": round(losses[-1], 4),
    }
    del optimizer
    for p in params:
        p.grad = None
    return result


def variable_length_rows(count: int, low: int, high: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(100, 30000, (n,), generator=generator) for n in lengths]


def padded_batches(rows: list[torch.Tensor], batch: int) -> list[dict]:
    """Batches of `batch` rows right-padded to their longest row; padding is masked out of the loss."""
    out = []
    for start in range(0, len(rows) - batch + 1, batch):
        group = rows[start:start + batch]
        width = max(len(r) for r in group)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, row in enumerate(group):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda(),
                    "real_tokens": int(mask.sum())})
    return out


def packed_batches(rows: list[torch.Tensor], batch: int, seq: int) -> list[dict]:
    """The same rows packed first-fit into `batch` x `seq` sequences; position_ids restart per row."""
    bins: list[list[torch.Tensor]] = []
    for row in rows:
        for b in bins:
            if sum(len(r) for r in b) + len(row) <= seq:
                b.append(row)
                break
        else:
            bins.append([row])
    out = []
    for start in range(0, len(bins) - batch + 1, batch):
        ids = torch.zeros(batch, seq, dtype=torch.long)
        positions = torch.zeros(batch, seq, dtype=torch.long)
        labels = torch.full((batch, seq), -100, dtype=torch.long)
        real = 0
        for i, b in enumerate(bins[start:start + batch]):
            offset = 0
            for row in b:
                ids[i, offset:offset + len(row)] = row
                labels[i, offset:offset + len(row)] = row
                positions[i, offset:offset + len(row)] = torch.arange(len(row))
                offset += len(row)
            positions[i, offset:] = torch.arange(seq - offset)  # the tail is one more (ignored) row
            real += offset
        out.append({"input_ids": ids.cuda(), "position_ids": positions.cuda(), "labels": labels.cuda(),
                    "real_tokens": real})
    return out


def time_batches(model, params, batches: list[dict], *, optimizer: str, warmup: int) -> dict:
    """Train on a list of batches (the first `warmup` untimed); tokens/s counts real tokens."""
    optimizer = make_optimizer(optimizer, params)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        inputs = {k: v for k, v in batch.items() if k != "real_tokens"}
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            seconds += time.perf_counter() - start
            tokens += batch["real_tokens"]
    del optimizer
    for p in params:
        p.grad = None
    return {"tokens_per_s": round(tokens / seconds, 1), "real_tokens": tokens, "seconds": round(seconds, 3),
            "steps": len(batches) - warmup, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-layers", default="4,8,12,16")
    parser.add_argument("--rows", type=int, default=96, help="variable-length rows for the packing comparison")
    parser.add_argument("--packed-uncheckpointed", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from peft import LoraConfig, get_peft_model

    import bitsandbytes
    import peft
    import transformers

    report = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "shape": args.shape, "seq": args.seq, "batch": args.batch,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "variants": {},
    }

    def save() -> None:
        (out / "train_speed.json").write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    base = build_nf4_model(args.shape)
    report["build_s"] = round(time.perf_counter() - started, 1)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    report["trainable_parameters"] = sum(p.numel() for p in params)
    torch.manual_seed(1)
    ids = torch.randint(100, 30000, (args.batch, args.seq), device="cuda")

    def run(name: str, **kwargs) -> dict | None:
        try:
            result = time_steps(model, params, ids, warmup=args.warmup, steps=args.steps, **kwargs)
        except Exception as exc:  # noqa: BLE001 - record the failure of one variant, keep measuring the rest
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        report["variants"][name] = result
        save()
        log(name, json.dumps({k: v for k, v in result.items() if k != "step_s_all"}))
        return result

    from transformers.integrations.liger import apply_liger_kernel

    from qlora_ray.train.finetune import configure_layers

    baseline = run("baseline", optimizer="adamw_torch")
    rows = variable_length_rows(args.rows, 64, args.seq)
    report["variable_length"] = {"rows": len(rows), "lengths": [64, args.seq],
                                 "mean_length": round(sum(len(r) for r in rows) / len(rows), 1)}

    def run_batches(name: str, batches: list[dict], **kwargs) -> None:
        try:
            result = time_batches(model, params, batches, warmup=args.warmup, **kwargs)
        except Exception as exc:  # noqa: BLE001
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        report["variable_length"][name] = result
        save()
        log(name, json.dumps(result))

    run_batches("baseline_padded", padded_batches(rows, args.batch), optimizer="adamw_torch")
    try:
        apply_liger_kernel(model, None)  # what Trainer(use_liger_kernel=True) does
    except Exception as exc:  # noqa: BLE001
        report["liger_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    else:
        run("fused_kernels", optimizer="adamw_torch")
        run("fused_kernels+fused_adamw", optimizer="adamw_torch_fused")
        if not args.no_compile:
            configure_layers(model, uncheckpointed_layers=0, compile_layers=True)
            run("fused_kernels+fused_adamw+compiled", optimizer="adamw_torch_fused")
            run("fused_kernels+paged_adamw_8bit+compiled", optimizer="paged_adamw_8bit")
        for skip in [int(s) for s in args.skip_layers.split(",") if s]:
            configure_layers(model, uncheckpointed_layers=skip, compile_layers=False)
            name = f"fused_kernels+fused_adamw{'' if args.no_compile else '+compiled'}+uncheckpointed_{skip}"
            if "error" in run(name, optimizer="adamw_torch_fused"):
                break
        configure_layers(model, uncheckpointed_layers=args.packed_uncheckpointed, compile_layers=False)
        run_batches(f"ours_packed_uncheckpointed_{args.packed_uncheckpointed}",
                    packed_batches(rows, args.batch, args.seq), optimizer="adamw_torch_fused")
    # the same step on a fresh baseline model, last, to see how much the machine drifted
    del model, base, params
    gc.collect()
    torch.cuda.empty_cache()
    fresh = get_peft_model(build_nf4_model(args.shape),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    fresh.train()
    fresh.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, params = fresh, [p for p in fresh.parameters() if p.requires_grad]
    run("baseline_again", optimizer="adamw_torch")
    base_tps, base_mem = baseline.get("tokens_per_s"), baseline.get("peak_gib")
    for result in report["variants"].values():
        if "tokens_per_s" in result and base_tps:
            result["speedup"] = round(result["tokens_per_s"] / base_tps, 3)
            result["memory_ratio"] = round(result["peak_gib"] / base_mem, 3)
    save()
    vl = report["variable_length"]
    padded = vl.get("baseline_padded", {})
    for key, result in vl.items():
        if isinstance(result, dict) and "tokens_per_s" in result and padded.get("tokens_per_s"):
            result["speedup"] = round(result["tokens_per_s"] / padded["tokens_per_s"], 3)
            result["memory_ratio"] = round(result["peak_gib"] / padded["peak_gib"], 3)
    save()
    log(f"\nvariable-length rows (mean {vl['mean_length']} tokens): " + json.dumps(
        {k: {m: v.get(m) for m in ("tokens_per_s", "speedup", "peak_gib", "memory_ratio", "error")}
         for k, v in vl.items() if isinstance(v, dict)}))
    log(f"\n{'variant':48s} {'tok/s':>9s} {'x base':>7s} {'peak GiB':>9s} {'x mem':>6s}")
    for name, r in report["variants"].items():
        if "error" in r:
            log(f"{name:48s} ERROR {r['error'][:80]}")
        else:
            log(f"{name:48s} {r['tokens_per_s']:9.0f} {r['speedup']:7.3f} {r['peak_gib']:9.2f} {r['memory_ratio']:6.3f}")


if __name__ == "__main__":
    main()
