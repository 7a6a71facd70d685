"""Where a token's time goes on its way through Ray Serve, measured with an engine of known speed.

The same scheduler and an engine whose steps take a set time (none by default; each token the next
letter), reached three ways:
- `batcher`: the Batcher alone in this process: the scheduler, its worker thread and the asyncio
  bridge;
- `handle`: a ModelServer replica through a Serve handle: its streaming call, the replica's event
  loop, tokenization and detokenization (TextStream);
- `http`: the whole path a client takes: Serve's HTTP proxy, the gateway (keys, validation, SSE
  framing) and the handle.
At each concurrency, tokens per second per stream and in all, and for each way the time to the
first token of a request alone; the difference between two ways is what the one adds. With steps of no time these are the path's ceilings: on a GPU, a path whose
ceiling is near the engine's own rate takes a large share of it. `--step-ms` gives each decode step
a GPU's time (waiting without the GIL, as a CUDA sync does; about 3 ms for the 8B gptq-int4 at batch
8 on the H200), so the handle and HTTP rows say how much of the engine's rate a client keeps. The
handle and HTTP paths run once per `--stream-intervals` value (serve.stream_interval_ms), in the same
run, for the comparison.

    python benchmarks/serve_path.py --out OUT_DIR [--concurrency 1,8,32,64] [--tokens 256] [--step-ms 3]
        [--stream-intervals 0,50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import string
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "acme/bf16.original"
STEP_SECONDS = 0.0  # --step-ms; a module value so the replica (this module pickled by value) has it


class LetterEngine:
    """Each token the next letter after the last one; no step takes any time."""

    continuous, device, stop_ids, context = True, torch.device("cpu"), set(), 8192

    def __init__(self, max_batch: int, step_seconds: float = 0.0):
        from qlora_ray.shapes import byte_tokenizer

        self.max_batch, self.step_seconds = max_batch, step_seconds
        self.letters = byte_tokenizer()(string.ascii_lowercase, add_special_tokens=False)["input_ids"]
        self.table = torch.full((259, 259), -1e4)  # logits after each token
        for token in range(259):
            following = (self.letters.index(token) + 1) % 26 if token in self.letters else 0
            self.table[token, self.letters[following]] = 1e4

    def prefill(self, slots, chunks, starts):
        return self.table[torch.tensor([chunk[-1] for chunk in chunks])]

    def decode(self, slots, tokens):
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return self.table[tokens]

    def release(self, slot):
        pass


def letter_loader(spec, store, entry, device):
    from qlora_ray.serve.loading import LoadedModel
    from qlora_ray.shapes import byte_tokenizer

    return LoadedModel(entry, LetterEngine(spec.serve.max_batch, STEP_SECONDS), byte_tokenizer(), 0, 0.0, spec.serve)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rates(times: list[tuple[float, float]], tokens: int) -> dict:
    """From each request's (seconds to its first token, seconds to its end)."""
    durations = [total for _, total in times]
    return {"per_stream_tok_s": round(tokens / (sum(durations) / len(durations)), 1),
            "total_tok_s": round(tokens * len(durations) / max(durations), 1),
            "first_token_ms": round(1000 * statistics.median(first for first, _ in times), 2)}


async def first_token(path, repeats: int = 20) -> float:
    """The median time to the first token of a request alone (2 tokens asked), one after another."""
    return round(statistics.median([(await path(1, 2))["first_token_ms"] for _ in range(repeats)]), 2)


async def through_batcher(concurrency: int, tokens: int, max_batch: int, step_seconds: float) -> dict:
    from qlora_ray.serve.batcher import Batcher
    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.shapes import byte_tokenizer

    batcher = Batcher(LetterEngine(max_batch, step_seconds), max_batch=max_batch)
    prompt = byte_tokenizer()("a", add_special_tokens=False)["input_ids"]

    async def one() -> tuple[float, float]:
        started, first = time.perf_counter(), None
        async with contextlib.aclosing(batcher.tokens(prompt, SamplingParams(max_new_tokens=tokens, temperature=0))) as s:
            async for _ in s:
                first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    return rates(await asyncio.gather(*(one() for _ in range(concurrency))), tokens)


async def through_handle(handle, entry: dict, concurrency: int, tokens: int) -> dict:
    async def one() -> tuple[float, float]:
        started, first = time.perf_counter(), None
        payload = {"entry": entry, "prompt": "a", "max_tokens": tokens, "temperature": 0, "top_p": 1.0,
                   "stop": [], "ignore_eos": True}
        async for event in handle.options(stream=True, multiplexed_model_id=MODEL).generate.remote(payload):
            if event["type"] == "text":
                first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    return rates(await asyncio.gather(*(one() for _ in range(concurrency))), tokens)


async def through_http(url: str, concurrency: int, tokens: int) -> dict:
    import aiohttp

    async def one(session) -> tuple[float, float]:
        started, first = time.perf_counter(), None
        body = {"model": MODEL, "prompt": "a", "max_tokens": tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        async with session.post(f"{url}/completions", json=body, headers={"Authorization": "Bearer key-acme"}) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        return rates(await asyncio.gather(*(one(session) for _ in range(concurrency))), tokens)


def main() -> None:
    global STEP_SECONDS
    import ray
    from ray import serve

    from qlora_ray.serve.app import build_application
    from qlora_ray.serve.catalog import model_catalog
    from qlora_ray.spec import load_spec
    from qlora_ray.store import Store, fused_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=0.0, help="each decode step's time (default: none)")
    parser.add_argument("--stream-intervals", default="0,50", help="serve.stream_interval_ms values to compare")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    intervals = [float(ms) for ms in args.stream_intervals.split(",")]
    STEP_SECONDS = args.step_ms / 1000
    max_batch = max(levels)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(sys.argv), "tokens": args.tokens, "step_ms": args.step_ms, "batcher": {}}
    asyncio.run(through_batcher(1, 8, max_batch, STEP_SECONDS))  # not timed: first calls build what later ones reuse
    for level in levels:
        results["batcher"][level] = asyncio.run(through_batcher(level, args.tokens, max_batch, STEP_SECONDS))
    results["first_token_ms"] = {"batcher": asyncio.run(first_token(
        lambda level, tokens: through_batcher(level, tokens, max_batch, STEP_SECONDS)))}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(str(Path(tmp) / "store"))
        (Path(tmp) / "artifact").mkdir()
        (Path(tmp) / "artifact" / "config.json").write_text("{}")
        store.publish(fused_key("t", "acme", "bf16.original"), Path(tmp) / "artifact", kind="fused", inputs={})
        port = free_port()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for interval in intervals:
                job = {"name": "t", "store": store.uri, "base": {"name": "b", "source": "shape:tiny"},
                       "tenants": [{"id": "acme", "train_data": str(REPO / "jobs" / "data" / "dates" / "train.jsonl")}],
                       "serve": {"port": port, "max_batch": max_batch, "max_tokens": args.tokens, "context": 8192,
                                 "unmerged_baseline": False, "max_ongoing_requests": 2 * max_batch,
                                 "stream_interval_ms": interval}}
                (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(job))
                spec = load_spec(Path(tmp) / "job.yaml")
                serve.run(build_application(spec, {"key-acme": "acme"}, loader=letter_loader), name="t", route_prefix="/")
                model_server = serve.get_deployment_handle("fused", app_name="t")
                entry = asdict(model_catalog(spec, store)[MODEL])  # as the gateway sends it
                asyncio.run(through_handle(model_server, entry, 1, 8))  # loads the model; not timed
                asyncio.run(through_http(f"http://127.0.0.1:{port}/v1", 1, 8))
                handle_rows, http_rows = results[f"handle, {interval:g} ms"], results[f"http, {interval:g} ms"] = {}, {}
                for level in levels:
                    handle_rows[level] = asyncio.run(through_handle(model_server, entry, level, args.tokens))
                    http_rows[level] = asyncio.run(through_http(f"http://127.0.0.1:{port}/v1", level, args.tokens))
                results["first_token_ms"][f"handle, {interval:g} ms"] = asyncio.run(first_token(
                    lambda level, tokens: through_handle(model_server, entry, level, tokens)))
                results["first_token_ms"][f"http, {interval:g} ms"] = asyncio.run(first_token(
                    lambda level, tokens: through_http(f"http://127.0.0.1:{port}/v1", level, tokens)))
                serve.delete("t")
        finally:
            serve.shutdown()
            ray.shutdown()
    (args.out / "serve_path.json").write_text(json.dumps(results, indent=2))
    print(f"step {args.step_ms:g} ms, {args.tokens} tokens a request")
    print("| path | first token of a lone request, ms | " +
          " | ".join(f"conc. {level} per stream / all tok/s" for level in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    for path in [key for key in results if key.startswith(("batcher", "handle", "http"))]:
        cells = [f"{results[path][level]['per_stream_tok_s']} / {results[path][level]['total_tok_s']}" for level in levels]
        print(f"| {path} | {results['first_token_ms'][path]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
