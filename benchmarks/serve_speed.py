"""Decode speed and time to first token of the serving engine against plain transformers, on a GPU.

Model: shape:llama3-8b with random weights (speed only), greedy, no stop token. In one run:

- transformers baselines (as research/gpu-anchors.md): the base in bf16 through generate() with its
  default dynamic cache; the base with an unmerged random r16 LoRA on the 7 projections (peft);
  the merged model loaded 4-bit by transformers + bitsandbytes (BitsAndBytesConfig NF4);
- ours, qlora_ray.serve.engine.StaticEngine over the same weights: bf16; nf4 (the fuse stage's
  bitsandbytes serialization, bitsandbytes' 4-bit matmul); gptq-int4 (a GPTQ-format checkpoint,
  group 128, repacked at load for the engine's default ("auto": GPTQModel's Marlin kernel, with
  torch's tinygemm for the one-row calls of small weights), for Marlin alone, and for tinygemm
  alone, which serves where Marlin cannot be compiled); and gptq-int4 in activation order
  (`ours-gptq-int4-act-order`, not run unless named in --only: desc_act's layout, one column order
  per layer input, shared by the projections that read it, so the kernels read permuted activations).

The GPTQ checkpoint is made by round-to-nearest in GPTQ's layout (sym, zero point 8, int32
packing): GPTQModel does not run on this machine's image, and calibration changes the values in
the tensors, not their layout or the kernels' speed. Quality of GPTQ is measured on the CPU with
real GPTQModel output (tests/test_serve*.py, the eval stage).

Decode tok/s = batch * (new_tokens - 1) / (time from first to last token); TTFT = time until the
first token of a 512-token prompt; median of --repeats runs after a warm-up.

Usage (on the GPU machine): python benchmarks/serve_speed.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_ray import marlin  # noqa: E402
from qlora_ray.serve.engine import StaticEngine  # noqa: E402
from qlora_ray.serve.sampling import SamplingParams  # noqa: E402
from qlora_ray.serve.scheduler import generate  # noqa: E402
from qlora_ray.serve.weights import build_decoder, pack_int32  # noqa: E402
from qlora_ray.shapes import shape_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rtn_gptq(weight: torch.Tensor, group_size: int, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest 4-bit in GPTQ v1 layout (sym): qweight, qzeros, scales, g_idx. With an
    `order` of the columns (a permutation), the groups are runs of that order, as GPTQ's activation
    order (desc_act) leaves them: g_idx is then a permutation's, not consecutive runs."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    order = torch.arange(in_features, device=weight.device) if order is None else order
    g_idx = torch.empty(in_features, dtype=torch.long, device=weight.device)
    g_idx[order] = torch.arange(in_features, device=weight.device) // group_size
    grouped = weight.float()[:, order].reshape(out_features, groups, group_size)
    scale = (grouped.abs().amax(-1) * 2 / 15).clamp(min=1e-8)  # [out, groups]
    q = (weight.float() / scale[:, g_idx]).round().add(8).clamp(0, 15)
    return {
        "qweight": pack_int32(q.t().contiguous(), 0),
        "qzeros": pack_int32(torch.full((groups, out_features), 7, device=weight.device), 1),  # stored zp - 1
        "scales": scale.t().contiguous().half(),
        "g_idx": g_idx.int(),
    }


ONE_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def gptq_state(state: dict[str, torch.Tensor], act_order: bool = False) -> dict[str, torch.Tensor]:
    """The state dict with every projection in TARGETS as round-to-nearest GPTQ tensors (group 128).
    With `act_order`, each layer's input gets a random column order, which the projections reading
    it share, as GPTQ's desc_act gives them (one Hessian, one order)."""
    tensors, orders = {}, {}
    for name, value in state.items():
        projection = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if projection in TARGETS:
            order = None
            if act_order:
                key = (name.split(".")[2], ONE_INPUT.get(projection, projection))  # (layer, input)
                order = orders.setdefault(key, torch.randperm(value.shape[1], device=value.device))
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in rtn_gptq(value, 128, order).items()})
        else:
            tensors[name] = value
    return tensors


def random_model(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def time_engine(engine, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    prompts = [[(7 * row + i) % 250 + 3 for i in range(prompt_tokens)] for row in range(batch)]
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=0)] * batch
    rates, firsts = [], []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        first = None
        for _step in generate(engine, prompts, params):
            if first is None:
                first = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        rates.append(batch * (new_tokens - 1) / (done - first))
        firsts.append(first - started)
    return {"tok_s": statistics.median(rates[1:]), "first_token_s": statistics.median(firsts[1:])}


def time_engine_ttft(engine, repeats: int) -> float:
    prompt = [[(5 * i) % 250 + 3 for i in range(512)]]
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _step in generate(engine, prompt, [SamplingParams(max_new_tokens=1, temperature=0)]):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def time_generate(model, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """transformers' generate(), default dynamic cache: decode rate from a 1-token and an N-token run."""
    ids = torch.tensor([[(7 * row + i) % 250 + 3 for i in range(prompt_tokens)] for row in range(batch)], device="cuda")

    def run(count):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(2)
    one = statistics.median(run(1) for _ in range(repeats))
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    return {"tok_s": batch * (new_tokens - 1) / (full - one), "first_token_s": one}


def generate_ttft(model, repeats: int) -> float:
    ids = torch.tensor([[(5 * i) % 250 + 3 for i in range(512)]], device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def measure(label: str, kind: str, timed, ttft, batches, args, results, resident_bytes: int):
    row = {"setup": label, "kind": kind, "resident_gib": round(resident_bytes / 2**30, 2)}
    for batch in batches:
        figures = timed(batch)
        row[f"bs{batch}_tok_s"] = round(figures["tok_s"], 1)
    row["ttft_512_ms"] = round(ttft() * 1000, 1)
    results.append(row)
    print(json.dumps(row), flush=True)


def free():
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--only", default="", help="comma-separated setups to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    only = set(filter(None, args.only.split(",")))
    config = shape_config(args.shape)
    results: list[dict] = []
    marlin_build_s = None
    started = time.time()

    def wanted(name):
        if only:
            return name in only
        return not name.endswith("-act-order")  # run only when named

    model = random_model(config)
    state = {k: v for k, v in model.state_dict().items()}
    if wanted("hf-bf16"):
        measure("transformers bf16, generate (dynamic cache)", "hf-bf16",
                lambda b: time_generate(model, b, args.prompt_tokens, args.new_tokens, args.repeats),
                lambda: generate_ttft(model, args.repeats), batches, args, results, model.get_memory_footprint())
    if wanted("hf-unmerged"):
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
        peft_model.to(torch.bfloat16).eval()
        measure("transformers bf16 + unmerged LoRA r16 (peft)", "hf-unmerged",
                lambda b: time_generate(peft_model, b, args.prompt_tokens, args.new_tokens, args.repeats),
                lambda: generate_ttft(peft_model, args.repeats), batches, args, results,
                peft_model.get_memory_footprint())
        model = peft_model.unload()
        del peft_model
        free()
    if wanted("hf-nf4"):
        from qlora_ray.fuse.quant import FourBit
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        folder = Path("/tmp/serve-speed-bf16")
        model.save_pretrained(str(folder))
        cfg = FourBit().quantization_config()
        nf4 = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=BitsAndBytesConfig(**{
            k: v for k, v in cfg.items() if k.startswith("bnb_") or k == "load_in_4bit"}), device_map="cuda").eval()
        measure("transformers + bitsandbytes NF4 (merged), generate", "hf-nf4",
                lambda b: time_generate(nf4, b, args.prompt_tokens, args.new_tokens, args.repeats),
                lambda: generate_ttft(nf4, args.repeats), batches, args, results, nf4.get_memory_footprint())
        del nf4
        free()
    del model
    free()

    def ours(label, kind, tensors, quant, int4_kernel="auto"):
        decoder = build_decoder(config, tensors, quant, device=torch.device("cuda"), dtype=torch.bfloat16,
                                int4_kernel=int4_kernel)
        modules = Counter(type(m).__name__ for m in decoder.modules() if not list(m.children()))
        engine = StaticEngine(decoder, set(), context=args.context, max_batch=max(batches))
        warm = time.perf_counter()
        engine.warm_up()
        warm = time.perf_counter() - warm
        measure(label, kind,
                lambda b: time_engine(engine, b, args.prompt_tokens, args.new_tokens, args.repeats),
                lambda: time_engine_ttft(engine, args.repeats), batches, args, results,
                sum(t.nbytes for t in decoder.parameters()) + sum(t.nbytes for t in decoder.buffers())
                + decoder.cache_bytes())
        results[-1]["warmup_s"] = round(warm, 1)
        results[-1]["modules"] = dict(modules)
        del engine, decoder
        free()

    if wanted("ours-bf16"):
        ours("qlora_ray engine, fused bf16", "ours-bf16", dict(state), None)
    if any(wanted(name) for name in ("ours-gptq-int4", "ours-gptq-int4-marlin", "ours-gptq-int4-tinygemm")):
        tensors = gptq_state(state)
        quant = {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq", "pack_dtype": "int32"}
        if wanted("ours-gptq-int4") or wanted("ours-gptq-int4-marlin"):
            built = time.perf_counter()
            marlin.ops()  # compiled here, once, so that no row's warm-up includes the build
            marlin_build_s = round(time.perf_counter() - built, 1)
        if wanted("ours-gptq-int4"):
            ours("qlora_ray engine, fused gptq-int4 (auto: Marlin, tinygemm at one row for small weights)",
                 "ours-gptq-int4", dict(tensors), quant, "auto")
        if wanted("ours-gptq-int4-marlin"):
            ours("qlora_ray engine, fused gptq-int4 (Marlin only)", "ours-gptq-int4-marlin", dict(tensors), quant,
                 "marlin")
        if wanted("ours-gptq-int4-tinygemm"):
            ours("qlora_ray engine, fused gptq-int4 (tinygemm)", "ours-gptq-int4-tinygemm", dict(tensors), quant,
                 "tinygemm")
        del tensors
    if wanted("ours-gptq-int4-act-order"):
        if marlin_build_s is None:
            built = time.perf_counter()
            marlin.ops()
            marlin_build_s = round(time.perf_counter() - built, 1)
        quant = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "checkpoint_format": "gptq",
                 "pack_dtype": "int32"}
        ours("qlora_ray engine, fused gptq-int4 in activation order (desc_act; auto)",
             "ours-gptq-int4-act-order", gptq_state(state, act_order=True), quant, "auto")
    if wanted("ours-nf4"):
        from qlora_ray.fuse.quant import FourBit, serialize_4bit

        fmt = FourBit()
        tensors = {}
        for name, value in state.items():
            projection = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
            tensors.update(serialize_4bit(name, value, fmt) if projection in TARGETS else {name: value})
        ours("qlora_ray engine, fused nf4 (bitsandbytes)", "ours-nf4", tensors, {"quant_method": "bitsandbytes"})
        del tensors

    report = {
        "command": " ".join(sys.argv), "shape": args.shape, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "context": args.context, "repeats": args.repeats, "seconds": round(time.time() - started, 1),
        "marlin_build_s": marlin_build_s, "results": results,
    }
    (args.out / "serve-engine-speed.json").write_text(json.dumps(report, indent=2))
    print("| setup | " + " | ".join(f"bs{b} tok/s" for b in batches) + " | TTFT 512 ms | resident GiB |")
    for row in results:
        print(f"| {row['setup']} | " + " | ".join(str(row[f'bs{b}_tok_s']) for b in batches)
              + f" | {row['ttft_512_ms']} | {row['resident_gib']} |")


if __name__ == "__main__":
    main()
