"""`qlora-ray bench`: load an OpenAI-compatible endpoint and report latency and throughput per model.

Each request streams a completion (`stream_options.include_usage`), so the client sees its first
token and counts the tokens the server says it produced. `ignore_eos` (vLLM's extension, which this
server implements) fixes the output length, so every model answers the same number of tokens.

A server at capacity answers 429 (or 503) with Retry-After: such a request counts as overloaded, not
as an error, and its client waits that long before its next request, as OpenAI's clients do. So
`--concurrency 32 --duration 60` is a load test: any error that is not an overload answer is a fault.

Per model and concurrency level: requests, errors and error rate, overload answers, TTFT (time to first token),
TPOT (time per output token after the first), end-to-end latency, each at p50 and p99, output
tokens per second over the run, and the model's resident memory when the server reports it. A
qlora_ray server also says where the first token's time went on its side: the replica's p50 from a
request's arrival to its first token, the engine's share of it, and the p50 from the client's send
(the X-Request-Start header each request carries) to the replica's handler; the rest of the client's
TTFT is the first token's way back.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_ray.report_files import write_report_files
from qlora_ray.serve.protocol import REQUEST_START_HEADER


@dataclass
class Sample:
    """One request as the client saw it (seconds from the run's start; tokens from the server).
    status: the HTTP status, None without an answer; retry_after: the answer's Retry-After, seconds."""

    model: str
    concurrency: int
    started: float
    first_token: float | None
    finished: float
    prompt_tokens: int
    output_tokens: int
    error: str | None = None
    status: int | None = None
    retry_after: float | None = None
    load_seconds: float | None = None  # how long the request waited for its model to load (a switch), if it did
    loaded_from: str | None = None  # where that load took the weights from, as the server says

    @property
    def overloaded(self) -> bool:
        """An explicit overload answer: the server asked to be tried again later."""
        return self.status in (429, 503) and self.retry_after is not None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: list[Sample]) -> dict:
    """The figures for one model at one concurrency, from its raw samples."""
    ok = [s for s in samples if s.error is None]
    errors = sum(1 for s in samples if s.error is not None and not s.overloaded)
    ttft = [s.first_token - s.started for s in ok if s.first_token is not None]
    tpot = [(s.finished - s.first_token) / (s.output_tokens - 1) for s in ok if s.first_token is not None and s.output_tokens > 1]
    latency = [s.finished - s.started for s in ok]
    span = (max(s.finished for s in samples) - min(s.started for s in samples)) if samples else 0.0
    tokens = sum(s.output_tokens for s in ok)

    def ms(value):
        return None if value is None else round(value * 1000, 2)

    return {
        "requests": len(samples), "errors": errors, "error_rate": round(errors / len(samples), 4) if samples else 0.0,
        "overloaded": sum(1 for s in samples if s.overloaded),
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
        "latency_ms_p50": ms(percentile(latency, 50)), "latency_ms_p99": ms(percentile(latency, 99)),
        "output_tokens": tokens, "seconds": round(span, 3),
        "output_tok_s": round(tokens / span, 2) if span > 0 else None,
        "mean_output_tokens": round(statistics.mean(s.output_tokens for s in ok), 2) if ok else None,
        "mean_prompt_tokens": round(statistics.mean(s.prompt_tokens for s in ok), 2) if ok else None,
    }


async def one_request(session, url: str, key: str, model: str, prompt: str, output_tokens: int, concurrency: int, t0: float) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    started = time.perf_counter() - t0
    first, prompt_tokens, produced, status, done, error, load_seconds, loaded_from = (None, 0, 0, None, False, None,
                                                                                      None, None)
    headers = {"Authorization": f"Bearer {key}", REQUEST_START_HEADER: f"t={time.time():.6f}"}
    try:
        async with session.post(f"{url}/completions", json=body, headers=headers) as response:
            status = response.status
            load_header = response.headers.get("X-Model-Load-Seconds")
            load_seconds = float(load_header) if load_header is not None else None
            loaded_from = response.headers.get("X-Model-Loaded-From") if load_header is not None else None
            if status != 200:
                retry_after = response.headers.get("Retry-After")
                return Sample(model, concurrency, started, None, time.perf_counter() - t0, 0, 0,
                              f"HTTP {status}: {(await response.text())[:200]}", status,
                              float(retry_after) if retry_after is not None else None)
            async for raw in response.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data:"):
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:  # the server failed after its 200
                    error = f"stream error: {chunk['error']['message']}"
                if chunk.get("choices") and first is None:  # a token's chunk, its text possibly empty
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
                    produced = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is a sample, not a crash of the run
        error = f"{type(exc).__name__}: {exc}"
    if error is None and not done:
        error = "the stream ended before data: [DONE]"
    if error is not None:
        return Sample(model, concurrency, started, first, time.perf_counter() - t0, 0, 0, error, status,
                      load_seconds=load_seconds, loaded_from=loaded_from)
    return Sample(model, concurrency, started, first, time.perf_counter() - t0, prompt_tokens, produced, None, status,
                  load_seconds=load_seconds, loaded_from=loaded_from)


async def send_requests(url: str, key: str, model: str, *, concurrency: int, requests: int, prompt: str,
                        output_tokens: int, duration: float | None = None) -> list[Sample]:
    """`concurrency` clients at once, each starting its next request on finishing (after Retry-After,
    when the answer was an overload): `requests` in all, or, with `duration`, as many as start within
    that many seconds."""
    import aiohttp

    t0 = time.perf_counter()
    queue = list(range(requests))
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    def more() -> bool:
        if duration is not None:
            return time.perf_counter() - t0 < duration
        if queue:
            queue.pop()
            return True
        return False

    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client():
            while more():
                sample = await one_request(session, url, key, model, prompt, output_tokens, concurrency, t0)
                samples.append(sample)
                if sample.overloaded:
                    await asyncio.sleep(sample.retry_after)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def synthetic_prompt(tokens: int) -> str:
    """Plain English of roughly `tokens` tokens for BPE tokenizers (the server reports the exact count)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge each boxing match".split()
    return " ".join(words[i % len(words)] for i in range(tokens))


def server_facts(url: str, key: str, model: str, since: float | None = None) -> dict:
    """What this server reports of a model once it is loaded (loading it if it is not): its resident
    bytes, how long its load took, how long its replica took to start, and where the first-token
    time of its requests since `since` (a Unix time) went. Empty for servers without the route (any
    other OpenAI-compatible server)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    query = {"model": model} if since is None else {"model": model, "since": f"{since:.6f}"}
    request = urllib.request.Request(f"{url}/qlora-ray/resident?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            facts = json.loads(response.read())
    except (urllib.error.URLError, ValueError):
        return {}
    keep = ("resident_bytes", "load_seconds", "replica_start_seconds", "first_token", "mean_batch", "decode_steps_per_s")
    return {name: facts[name] for name in keep if name in facts} if isinstance(facts, dict) else {}


def run_bench(url: str, keys: dict[str, str], models: list[str], *, concurrency: list[int], requests: int,
              prompt_tokens: int, output_tokens: int, duration: float | None = None, progress=print) -> dict:
    """Every model at every concurrency; keys maps a model id to the key that may use it. Each level
    sends max(requests, concurrency) requests, or runs for `duration` seconds when that is given."""
    prompt = synthetic_prompt(prompt_tokens)
    rows, raw = [], []
    for model in models:
        facts = server_facts(url, keys[model], model)  # also loads it before the timed requests
        asyncio.run(send_requests(url, keys[model], model, concurrency=1, requests=1, prompt=prompt, output_tokens=2))
        for level in concurrency:
            amount = f"{duration:g} s" if duration is not None else f"{max(requests, level)} requests"
            progress(f"bench: {model} at concurrency {level}: {amount}")
            level_started = time.time()
            samples = asyncio.run(send_requests(url, keys[model], model, concurrency=level, requests=max(requests, level),
                                                prompt=prompt, output_tokens=output_tokens, duration=duration))
            # One replica's requests: with several replicas, the one this call reaches.
            level_facts = server_facts(url, keys[model], model, since=level_started)
            server_side = level_facts.get("first_token") or {}
            rows.append({"model": model, "concurrency": level, "resident_bytes": facts.get("resident_bytes"),
                         "load_seconds": facts.get("load_seconds"),
                         "replica_start_seconds": facts.get("replica_start_seconds"), **summarize(samples),
                         "replica_ttft_ms_p50": server_side.get("in_replica_ms_p50"),
                         "engine_ttft_ms_p50": server_side.get("engine_ms_p50"),
                         "before_replica_ms_p50": server_side.get("before_replica_ms_p50"),
                         "replica_mean_batch": level_facts.get("mean_batch"),
                         "replica_steps_per_s": level_facts.get("decode_steps_per_s"), "replica_first_token": server_side})
            raw += [asdict(s) for s in samples]
    return {"url": url, "prompt_tokens_asked": prompt_tokens, "output_tokens": output_tokens, "requests": requests,
            "duration_s": duration, "concurrency": concurrency, "results": rows, "samples": raw}


COLUMNS = [("model", "model"), ("concurrency", "conc."), ("requests", "req."), ("error_rate", "errors"),
           ("overloaded", "429/503"),
           ("mean_prompt_tokens", "prompt tok"),
           ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("replica_ttft_ms_p50", "in replica p50 ms"),
           ("engine_ttft_ms_p50", "of it engine p50 ms"), ("before_replica_ms_p50", "before replica p50 ms"),
           ("replica_mean_batch", "mean decode batch"),
           ("replica_steps_per_s", "decode steps/s"),
           ("tpot_ms_p50", "TPOT p50 ms"),
           ("tpot_ms_p99", "TPOT p99 ms"), ("latency_ms_p50", "latency p50 ms"), ("latency_ms_p99", "latency p99 ms"),
           ("output_tok_s", "output tok/s"), ("resident_bytes", "resident MiB"), ("load_seconds", "load s")]


def render_table(report: dict) -> str:
    def cell(row, key):
        value = row.get(key)
        if key == "resident_bytes":
            return "-" if value is None else f"{value / 2**20:.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |" for row in report["results"]]
    return "\n".join(lines)


def write_report(report: dict, folder: Path) -> list[Path]:
    """bench.json, bench.md and bench.png (TTFT, TPOT and tokens/s per model and concurrency) into
    folder; returns the files written."""
    header = (f"# Bench: {report['url']}\n\n{report.get('when', '')}; prompt ~{report['prompt_tokens_asked']} tokens, "
              f"{report['output_tokens']} output tokens (ignore_eos), greedy.\n\n")
    return write_report_files(folder, "bench", report, header + render_table(report) + "\n", plot)


def plot(report: dict, path: Path) -> None:
    plot_by_concurrency(report, path, "model", str, [("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "TPOT p50 (ms)"),
                                                     ("output_tok_s", "output tokens/s")])


def plot_by_concurrency(report: dict, path: Path, series: str, label, panels: list[tuple[str, str]]) -> None:
    """One panel per (figure, title) of `panels` over the concurrency levels, one line per value of
    the rows' `series` field (named by label(value))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for value in dict.fromkeys(row[series] for row in report["results"]):
        rows = [row for row in report["results"] if row[series] == value]
        for axis, (key, _) in zip(axes, panels):
            axis.plot([row["concurrency"] for row in rows], [row[key] or 0 for row in rows], marker="o", label=label(value))
    for axis, (_, title) in zip(axes, panels):
        axis.set_title(title)
        axis.set_xlabel("concurrent requests")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
