"""Where the serving engine's time goes on a GPU: the kernels of one decode step and of one prompt.

Builds the engine over a `shape:llama3-8b` model with random weights (bf16, or gptq-int4 by
round-to-nearest as in serve_speed.py), then profiles, without CUDA graphs so each kernel shows:
a decode step at batch 1 (compiled layers) and the prefill of a 512-token prompt. Prints the
kernels by total CUDA time.

Usage (on the GPU machine): python benchmarks/profile_serve.py [--quant gptq-int4|bf16] [--context 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_speed import gptq_state, random_model  # noqa: E402
from qlora_ray.serve.engine import StaticEngine  # noqa: E402
from qlora_ray.serve.weights import build_decoder  # noqa: E402
from qlora_ray.shapes import shape_config  # noqa: E402


def profile(label: str, run, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"\n== {label}: {total / 1000:.2f} ms of kernels")
    for event in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{event.self_device_time_total / 1000:8.3f} ms {event.count:5d}x  {event.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", default="gptq-int4", choices=["gptq-int4", "bf16"])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    config = shape_config("llama3-8b")
    state = dict(random_model(config).state_dict())
    quant = None
    if args.quant == "gptq-int4":
        state = gptq_state(state)
        quant = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    decoder = build_decoder(config, state, quant, device=torch.device("cuda"), dtype=torch.bfloat16)
    del state
    engine = StaticEngine(decoder, set(), context=args.context, max_batch=1)
    tokens = torch.tensor([[7]], device="cuda")
    positions = torch.tensor([300], device="cuda")

    def step():
        with torch.inference_mode():
            engine._decode_step(tokens, positions, span=next(s for s in engine.spans if s > 300))

    profile(f"{args.quant} decode step, batch 1, context {args.context} (compiled, no graph)", step, args.rows)
    prompt = [[(5 * i) % 250 + 3 for i in range(512)]]

    def prefill():
        from qlora_ray.serve.sampling import SamplingParams
        from qlora_ray.serve.scheduler import generate

        for _ in generate(engine, prompt, [SamplingParams(max_new_tokens=1, temperature=0)]):
            pass

    profile(f"{args.quant} prefill of 512 tokens", prefill, args.rows)


if __name__ == "__main__":
    main()
