"""`qlora-ray bench --mixed`: many tenants' models at once, as a multi-tenant server meets them.

Each client picks its next request's model at random with Zipf weights (the first model is the
hottest: weight 1/rank^s), and its prompt and answer lengths uniformly between half and one and a
half times the asked means, so long prefills and short answers mix in one batch. Each level runs for
a fixed time at a fixed concurrency, for each number of tenants asked (the first N models). What
one model per tenant costs shows in the aggregate tokens/s at 1, 4, 16 tenants.

Reported per level: aggregate output tokens/s, requests, errors, overload answers (429/503), TTFT
p50/p99 over all requests and per tenant, the TTFT p99 after the first round (every client sends
its first request at once, a burst the steady state never sees again), and model switches: requests
that waited for their model to load (the server's X-Model-Load-Seconds header), with those waits at
p50/p99/max, split by where the load took the weights from (X-Model-Loaded-From): the replica's host
memory (a switch issue 20 wants under a second) or the store.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict
from pathlib import Path

from qlora_ray.report_files import write_report_files
from qlora_ray.serve.bench import Sample, one_request, percentile, plot_by_concurrency, synthetic_prompt


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Weights 1/rank^exponent for ranks 1..count, summing to 1."""
    raw = [1.0 / rank ** exponent for rank in range(1, count + 1)]
    return [w / sum(raw) for w in raw]


def varied(mean: int, rng: random.Random) -> int:
    """A length drawn uniformly between half and one and a half times `mean` (at least 1)."""
    return max(1, rng.randint(mean // 2, mean + mean // 2))


async def send_mixed(url: str, keys: dict[str, str], models: list[str], *, concurrency: int, duration: float,
                     zipf: float, prompt_tokens: int, output_tokens: int, seed: int) -> list[Sample]:
    """`concurrency` clients for `duration` seconds, each request's model drawn by Zipf weight."""
    import aiohttp

    rng = random.Random(seed)
    weights = zipf_weights(len(models), zipf)
    t0 = time.perf_counter()
    samples: list[Sample] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        async def client():
            while time.perf_counter() - t0 < duration:
                model = rng.choices(models, weights)[0]
                sample = await one_request(session, url, keys[model], model, synthetic_prompt(varied(prompt_tokens, rng)),
                                           varied(output_tokens, rng), concurrency, t0)
                samples.append(sample)
                if sample.overloaded:
                    await asyncio.sleep(sample.retry_after)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def tenant_of(model: str) -> str:
    return model.split("/", 1)[0]


def summarize_mixed(samples: list[Sample]) -> dict:
    """The figures of one level (see the module docstring)."""
    def ms(value):
        return None if value is None else round(value * 1000, 1)

    ok = [s for s in samples if s.error is None]
    ttft = [s.first_token - s.started for s in ok if s.first_token is not None]
    rounds_after_first = sorted(samples, key=lambda s: s.started)[max((s.concurrency for s in samples), default=0):]
    steady = [s.first_token - s.started for s in rounds_after_first if s.error is None and s.first_token is not None]
    span = (max(s.finished for s in samples) - min(s.started for s in samples)) if samples else 0.0
    switches = [s.load_seconds for s in samples if s.load_seconds is not None]
    from_host = [s.load_seconds for s in samples if s.load_seconds is not None and from_host_memory(s)]
    from_store = [s.load_seconds for s in samples if s.load_seconds is not None and not from_host_memory(s)]
    per_tenant = {}
    for tenant in sorted({tenant_of(s.model) for s in samples}):
        mine = [s for s in ok if tenant_of(s.model) == tenant]
        first = [s.first_token - s.started for s in mine if s.first_token is not None]
        per_tenant[tenant] = {"requests": sum(1 for s in samples if tenant_of(s.model) == tenant),
                           "ttft_ms_p50": ms(percentile(first, 50)), "ttft_ms_p99": ms(percentile(first, 99))}
    tokens = sum(s.output_tokens for s in ok)
    return {
        "requests": len(samples), "errors": sum(1 for s in samples if s.error is not None and not s.overloaded),
        "overloaded": sum(1 for s in samples if s.overloaded), "output_tokens": tokens, "seconds": round(span, 2),
        "output_tok_s": round(tokens / span, 1) if span > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "ttft_ms_p99_after_first_round": ms(percentile(steady, 99)),
        "worst_tenant_ttft_ms_p99": max(
            (t["ttft_ms_p99"] for t in per_tenant.values() if t["ttft_ms_p99"] is not None), default=None),
        "switches": len(switches), "switch_s_p50": _seconds(percentile(switches, 50)),
        "switch_s_p99": _seconds(percentile(switches, 99)), "switch_s_max": _seconds(max(switches, default=None)),
        "host_switches": len(from_host), "host_switch_s_max": _seconds(max(from_host, default=None)),
        "store_loads": len(from_store), "store_load_s_max": _seconds(max(from_store, default=None)),
        "per_tenant": per_tenant,
    }


def from_host_memory(sample: Sample) -> bool:
    """Whether the load the sample waited for copied its model from the replica's host memory (a
    switch), rather than reading it from the store (switching.ModelSwitcher's loaded_from)."""
    return (sample.loaded_from or "").startswith("host memory")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_mixed_bench(url: str, keys: dict[str, str], models: list[str], *, tenant_counts: list[int],
                    concurrency: list[int], duration: float, zipf: float, prompt_tokens: int, output_tokens: int,
                    seed: int = 0, progress=print) -> dict:
    """Every tenant count (the first N of `models`, one model per tenant) at every concurrency."""
    if max(tenant_counts) > len(models):
        raise ValueError(f"{max(tenant_counts)} tenants asked, but only {len(models)} model(s) given")
    rows, raw = [], []
    for count in tenant_counts:
        chosen = models[:count]
        for level in concurrency:
            progress(f"bench --mixed: {count} tenant(s) at concurrency {level} for {duration:g} s (Zipf {zipf:g})")
            samples = asyncio.run(send_mixed(url, keys, chosen, concurrency=level, duration=duration, zipf=zipf,
                                             prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed))
            rows.append({"tenants": count, "concurrency": level, **summarize_mixed(samples)})
            raw += [{**asdict(s), "tenants": count} for s in samples]
    return {"url": url, "mode": "mixed", "models": models, "zipf": zipf, "duration_s": duration,
            "prompt_tokens_mean": prompt_tokens, "output_tokens_mean": output_tokens, "seed": seed,
            "results": rows, "samples": raw}


COLUMNS = [("tenants", "tenants"), ("concurrency", "conc."), ("requests", "req."), ("errors", "errors"),
           ("overloaded", "429/503"), ("output_tok_s", "output tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
           ("ttft_ms_p99", "TTFT p99 ms"), ("ttft_ms_p99_after_first_round", "TTFT p99 ms after the first round"),
           ("worst_tenant_ttft_ms_p99", "worst tenant's TTFT p99 ms"),
           ("switches", "switches"), ("switch_s_p50", "switch p50 s"), ("switch_s_max", "switch max s"),
           ("host_switches", "from host memory"), ("host_switch_s_max", "from host max s"),
           ("store_loads", "from the store"), ("store_load_s_max", "from the store max s")]


def render_mixed(report: dict) -> str:
    def cell(value):
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key]) for key, _ in COLUMNS) + " |" for row in report["results"]]
    lines += ["", "Per tenant (TTFT ms p50 / p99, requests):", "",
              "| tenants | conc. | " + " | ".join(tenant_of(m) for m in report["models"]) + " |",
              "|---|---|" + "---|" * len(report["models"])]
    for row in report["results"]:
        cells = []
        for model in report["models"]:
            figures = row["per_tenant"].get(tenant_of(model))
            cells.append("-" if not figures else f"{cell(figures['ttft_ms_p50'])} / {cell(figures['ttft_ms_p99'])}, {figures['requests']}")
        lines.append(f"| {row['tenants']} | {row['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_mixed_report(report: dict, folder: Path) -> list[Path]:
    """bench.json, bench.md and bench.png (tokens/s and TTFT p99 by concurrency, per tenant count)."""
    header = (f"# Mixed-tenant bench: {report['url']}\n\n{report.get('when', '')}; Zipf {report['zipf']:g} over "
              f"{', '.join(report['models'])}; prompts ~{report['prompt_tokens_mean']} and answers "
              f"~{report['output_tokens_mean']} tokens (each 0.5-1.5x), {report['duration_s']:g} s a level.\n\n")
    return write_report_files(folder, "bench", report, header + render_mixed(report) + "\n", plot_mixed)


def plot_mixed(report: dict, path: Path) -> None:
    plot_by_concurrency(report, path, "tenants", lambda count: f"{count} tenant(s)",
                        [("output_tok_s", "aggregate output tokens/s"), ("ttft_ms_p99", "TTFT p99 (ms)"),
                         ("switches", "model switches")])
