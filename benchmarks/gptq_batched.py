"""The batched GPTQ solve (many tenants of one site, each against its own Hessian) against
GPTQModel's solver called once per tenant, on the sites of one llama3-8b decoder layer.

    python3 benchmarks/gptq_batched.py --out OUT_DIR [--tenants 8,24] [--reference 8] [--device cuda]

Bulk GPTQ with per-tenant Hessians solves every tenant's weights of every site (issue 22). On an
H200, four walks of an 8B spent 170 of their 247 s in GPTQModel's solver with the GPU busy
throughout. This times one decoder layer's solves (q/k/v stacked, o, gate/up stacked, down: the
stacks the walk makes) for N tenants: GPTQModel once per tenant, for the first --reference tenants
(each tenant's time is the mean), and qlora_ray.fuse.gptq_batched.solve_batched for all N at once.
It also counts the integer codes that differ between the two, and compares GPTQ's objective, the
output error on the calibration rows, for the tenants both solved (GPTQModel's GPU path runs a fused
CUDA kernel, and the batch takes another route to the inverse factor: a rounding tie may fall the
other way).

Weights and Hessians are random (the solver's work does not depend on their values); the job's
default GPTQ settings (4 bits, group size 128, act-group-aware order). Each timing follows a warm-up.
Results: OUT_DIR/gptq-batched.json and .md; with --profile N, OUT_DIR/gptq-batched-profile.txt
holds torch.profiler's table of the ops of one batched solve of N tenants of each site, the ops
that took the most GPU (on a CPU, CPU) time first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from qlora_ray.fuse.gptq_batched import solve_batched  # noqa: E402
from qlora_ray.fuse.gptq_bulk import integer_codes, quantize_config, solve_stacked  # noqa: E402
from qlora_ray.spec import GptqSpec  # noqa: E402

# (in, out) of the walk's stacks of one llama3-8b layer
SITES = {"q/k/v": (4096, 6144), "o": (4096, 4096), "gate/up": (4096, 28672), "down": (14336, 4096)}
TOKENS = 16384


def hessian(columns: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = torch.randn(TOKENS // 8, columns, generator=generator, device=device)
    inputs *= torch.rand(columns, generator=generator, device=device) * 3
    return 2.0 / inputs.shape[0] * inputs.T @ inputs


def gptq_loss(weight: torch.Tensor, hessian: torch.Tensor, codes) -> float:
    """GPTQ's objective for one weight: tr((W - Q) H (W - Q)^T), the output error on the calibration rows."""
    residual = weight.float() - codes.dequantized.float()
    return float(((residual @ hessian) * residual).sum())


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, result


def profiled(fn, device: str) -> str:
    """torch.profiler's table of fn's ops, those of most device time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as trace:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return trace.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tenants", default="8,24", type=lambda text: [int(v) for v in text.split(",")])
    parser.add_argument("--reference", type=int, default=8, help="tenants solved by GPTQModel one at a time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="divide the shapes by this (to try it on a CPU)")
    parser.add_argument("--profile", type=int, default=0, help="profile a batched solve of this many tenants a site")
    args = parser.parse_args()
    profiles = []
    config = quantize_config(GptqSpec())
    most = max(args.tenants + [args.reference])
    rows = []
    for site, (columns, out) in SITES.items():
        columns, out = columns // args.scale, out // args.scale
        generator = torch.Generator(device=args.device).manual_seed(1)
        weights = [(torch.randn(out, columns, generator=generator, device=args.device) * 0.02).to(torch.bfloat16)
                   for _ in range(most)]
        hessians = [hessian(columns, seed, args.device) for seed in range(most)]
        solve_stacked(weights[:1], hessians[0], TOKENS, config)  # warm-up (GPTQModel builds its CUDA kernel once)
        solve_batched(weights[:2], hessians[:2], [TOKENS] * 2, config)
        theirs, their_losses, seconds = [], [], 0.0
        for i in range(args.reference):
            spent, (codes,) = timed(lambda: solve_stacked([weights[i]], hessians[i], TOKENS, config), args.device)
            seconds += spent
            theirs.append(integer_codes(codes, config.bits).cpu())
            their_losses.append(gptq_loss(weights[i], hessians[i], codes))
        row = {"site": site, "in": columns, "out": out, "gptqmodel_seconds_per_tenant": round(seconds / args.reference, 4)}
        for count in args.tenants:
            spent, ours = timed(lambda: solve_batched(weights[:count], hessians[:count], [TOKENS] * count, config),
                                args.device)
            compared = min(count, args.reference)
            differing = sum(int((integer_codes(ours[i], config.bits).cpu() != theirs[i]).sum()) for i in range(compared))
            row[f"batched_{count}_seconds"] = round(spent, 4)
            row[f"batched_{count}_seconds_per_tenant"] = round(spent / count, 4)
            row[f"batched_{count}_speedup"] = round(seconds / args.reference / (spent / count), 2)
            row[f"batched_{count}_differing_fraction"] = differing / (compared * out * columns)
            row[f"batched_{count}_loss_ratio"] = round(sum(gptq_loss(weights[i], hessians[i], ours[i]) for i in range(compared))
                                                       / sum(their_losses[:compared]), 6)
            del ours
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.profile:
            profiles.append(f"## {site}: a batched solve of {args.profile} tenants, ({out}, {columns}) each\n\n"
                            + profiled(lambda: solve_batched(weights[:args.profile], hessians[:args.profile],
                                                             [TOKENS] * args.profile, config), args.device))
        for held in (weights, hessians, theirs):  # freed before the next site's are made
            held.clear()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    layer = {"site": "one layer", "gptqmodel_seconds_per_tenant": round(sum(r["gptqmodel_seconds_per_tenant"] for r in rows), 4)}
    for count in args.tenants:
        per_tenant = sum(r[f"batched_{count}_seconds"] for r in rows) / count
        layer[f"batched_{count}_seconds_per_tenant"] = round(per_tenant, 4)
        layer[f"batched_{count}_speedup"] = round(layer["gptqmodel_seconds_per_tenant"] / per_tenant, 2)
    rows.append(layer)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
              "command": " ".join(sys.argv), "tokens": TOKENS, "reference_tenants": args.reference, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gptq-batched.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Batched GPTQ solve against GPTQModel's, one llama3-8b layer ({result['date']}, {device})", "",
             f"Command: `{result['command']}`", "",
             "| site | GPTQModel s a tenant | " + " | ".join(f"batched {n}: s a tenant | speed-up | codes differing | loss / GPTQModel's"
                                                       for n in args.tenants) + " |",
             "|---|---|" + "---|---|---|---|" * len(args.tenants)]
    for row in rows:
        cells = [row["site"], row["gptqmodel_seconds_per_tenant"]]
        for n in args.tenants:
            fraction = row.get(f"batched_{n}_differing_fraction")
            cells += [row[f"batched_{n}_seconds_per_tenant"], f"{row[f'batched_{n}_speedup']}x",
                      "" if fraction is None else f"{fraction:.2e}", row.get(f"batched_{n}_loss_ratio", "")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    (args.out / "gptq-batched.md").write_text("\n".join(lines) + "\n")
    if profiles:
        (args.out / "gptq-batched-profile.txt").write_text(f"{device}, {result['date']}: `{result['command']}`\n\n"
                                                           + "\n\n".join(profiles) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
