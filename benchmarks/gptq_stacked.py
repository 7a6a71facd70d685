"""GPTQModel's GPTQ solver on many tenants' weights stacked as one tall matrix, against one tenant at a time.

    python3 benchmarks/gptq_stacked.py --out OUT_DIR [--tenants 8] [--device cuda]

Groundwork for bulk GPTQ (issue 22). GPTQ quantizes a weight's columns in order, spreading each
column's error over the columns still to come through the inverse Hessian of the layer's inputs; the
rows never mix. Tenants whose weights share one Hessian (one pool of calibration inputs) can therefore be
stacked row-wise and solved in one call. This checks that the stacked call gives each tenant exactly
the codes, scales and zeros of its own call, and times both, for the two llama3-8b projection shapes
(gate_proj: 4096 in, 14336 out; down_proj: 14336 in, 4096 out), with and without activation order.

Weights and calibration inputs are random (the solver's work does not depend on their values). The
Hessian is accumulated once (GPTQModel's add_batch) and handed to every call (adopt_hessian_from),
so the timings are the solver's alone. Results: OUT_DIR/gptq-stacked.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SHAPES = {"gate_proj": (4096, 14336), "down_proj": (14336, 4096)}  # (in, out) of llama3-8b


def solver(weight, config, device):
    import torch
    from gptqmodel.quantization.gptq import GPTQ

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=torch.float16)
    linear.weight.data = weight
    task = GPTQ(linear, config)
    task.quantizer.configure(perchannel=True)  # as GPTQModel's own GPTQ processor does
    task.fallback, task.expected_nsamples = config.fallback, None
    return task


def measure(shape: str, tenants: int, desc_act: bool, calibration_rows: int, device: str) -> dict:
    import torch
    from gptqmodel.quantization.config import QuantizeConfig

    columns, rows = SHAPES[shape]
    config = QuantizeConfig(bits=4, group_size=128, desc_act=desc_act, sym=True, act_group_aware=False)
    generator = torch.Generator(device=device).manual_seed(0)
    weights = [(torch.randn(rows, columns, generator=generator, device=device) * 0.02).half() for _ in range(tenants)]
    leader = solver(weights[0].clone(), config, device)
    for _ in range(calibration_rows // 512):
        leader.add_batch(torch.randn(1, 512, columns, generator=generator, device=device).half(), None)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def solve(weight):
        task = solver(weight, config, device)
        task.adopt_hessian_from(leader)
        sync()
        started = time.perf_counter()
        q, scale, zero, g_idx = task.quantize()[:4]
        sync()
        return time.perf_counter() - started, (q.cpu(), scale.cpu(), zero.cpu(), g_idx.cpu())

    solve(weights[0].clone())  # warm-up: first-use costs of the kernels
    one_at_a_time = [solve(w.clone()) for w in weights]
    stacked_seconds, (q, scale, zero, g_idx) = solve(torch.cat(weights))
    own = [result for _, result in one_at_a_time]
    same = (torch.equal(q, torch.cat([r[0] for r in own])) and torch.equal(scale, torch.cat([r[1] for r in own]))
            and torch.equal(zero, torch.cat([r[2] for r in own])) and all(torch.equal(g_idx, r[3]) for r in own))
    separate_seconds = sum(seconds for seconds, _ in one_at_a_time)
    return {"shape": shape, "in": columns, "out": rows, "tenants": tenants, "desc_act": desc_act,
            "calibration_rows": calibration_rows, "one_at_a_time_s": round(separate_seconds, 3),
            "stacked_s": round(stacked_seconds, 3), "speedup": round(separate_seconds / stacked_seconds, 2),
            "identical": same, "max_abs_q_difference": (q - torch.cat([r[0] for r in own])).abs().max().item(),
            "q_elements_differing": int((q != torch.cat([r[0] for r in own])).sum()), "q_elements": q.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--calibration-rows", type=int, default=128 * 512, help="tokens in the Hessian")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=int, default=1, help="divide the shapes by this (to try the script on a CPU)")
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    for name, (columns, rows) in SHAPES.items():
        SHAPES[name] = (columns // args.scale, rows // args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": []}
    for shape in SHAPES:
        for desc_act in (False, True):
            row = measure(shape, args.tenants, desc_act, args.calibration_rows, args.device)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            (args.out / "gptq-stacked.json").write_text(json.dumps(results, indent=2))
    lines = [f"# GPTQModel's solver, {args.tenants} tenants stacked against one at a time ({results['date']})", "",
             f"`{results['command']}`", "",
             "| projection (in x out) | act order | one at a time s | stacked s | speed-up | identical codes, scales, zeros |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} ({r['in']} x {r['out']}) | {r['desc_act']} | {r['one_at_a_time_s']} | {r['stacked_s']} | "
              f"{r['speedup']}x | {r['identical']} |" for r in results["rows"]]
    (args.out / "gptq-stacked.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
