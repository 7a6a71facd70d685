"""The model deployment: a replica holds several tenants' models (serve/residency.py decides which)
and streams their generations, each model's requests batched continuously (serve/batcher.py).

The gateway sends each request with its catalog entry, so a replica never reads the catalog. Serve's
model multiplexing is used only to tell Serve's router which models a replica has served, so that a
model's requests go where it is likely resident; which models stay resident is decided here.
"""

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass

from ray import serve

from qlora_ray.hardware import preferred_device
from qlora_ray.library_output import route_library_output
from qlora_ray.serve.bench import percentile
from qlora_ray.serve.catalog import ModelEntry
from qlora_ray.serve.loading import LoadedModel
from qlora_ray.serve.residency import ResidentModels, TenantLoadsExceeded
from qlora_ray.serve.switching import ModelSwitcher
from qlora_ray.spec import JobSpec, parse_size
from qlora_ray.store import Store

log = logging.getLogger(__name__)
# A scheduler step takes milliseconds; one running this long means the device is wedged.
STALLED_STEP_SECONDS = 120.0
# Requests whose first-token spans a replica keeps for the resident route.
FIRST_TOKEN_SPANS_KEPT = 4096
# How long a thread that wants the GIL waits before the holder must give it up, while a model loads
# (CPython's default is 5 ms). The step loop gives up the GIL at every CUDA call of a step and must
# win it back each time: beside a load's thread (compiling, capturing, copying: busy Python) each of
# those waits can last the whole interval, and the other models' steps crawl. Only during loads: in
# steady serving, the shorter interval cost Serve's path throughput on the development machine
# (benchmarks/results/2026-12-03-cpu-gil-switch-interval.md).
LOADING_GIL_SWITCH_INTERVAL_S = 0.0002


@dataclass(frozen=True)
class FirstTokenSpans:
    """Where a request's time to its first token went, in seconds.

    Inside the replica: waiting for its model (a load, when it was not resident), tokenizing its
    prompt, handing its start event to Serve's stream, and from its place in the scheduler's queue
    to its first token back on the event loop (the engine's prefill and the batcher's hand-over).
    `arrived`: the host's wall clock, to select a time window.

    On its way to the replica, from the wall-clock times the gateway sends along (None where
    unknown): from the client's send (its X-Request-Start header) to the gateway's handler
    (the connection, Serve's proxy, the gateway's event loop), in the gateway's handler (body, keys,
    validation), and from there to the replica's handler (Serve's router, Ray's call, the replica's
    event loop). Across nodes, their clocks' skew adds in."""

    model: str
    arrived: float
    model_wait: float
    tokenize: float
    start_event: float
    engine: float
    to_gateway: float | None = None
    in_gateway: float | None = None
    to_replica: float | None = None

    @property
    def in_replica(self) -> float:
        return self.model_wait + self.tokenize + self.start_event + self.engine

    @property
    def before_replica(self) -> float | None:
        """From the client's send to the replica's handler: the three spans above, when all are known."""
        parts = (self.to_gateway, self.in_gateway, self.to_replica)
        return None if None in parts else sum(parts)

    @staticmethod
    def on_the_way(timing: dict | None, arrived: float) -> dict:
        """The spans before the replica, from the gateway's timing (gateway._timing) and the wall-clock
        time the request reached the replica's handler."""
        timing = timing or {}
        sent, received, forwarded = (timing.get(name) for name in ("sent", "received", "forwarded"))
        return {"to_gateway": received - sent if sent is not None and received is not None else None,
                "in_gateway": forwarded - received if received is not None and forwarded is not None else None,
                "to_replica": arrived - forwarded if forwarded is not None else None}


SPAN_NAMES = ("to_gateway", "in_gateway", "to_replica", "before_replica", "model_wait", "tokenize", "start_event",
              "engine", "in_replica")


def summarize_first_token_spans(spans: list[FirstTokenSpans]) -> dict:
    """p50 and p99 in ms of each span (and of their sums), over the given requests that know it."""
    summary: dict = {"requests": len(spans)}
    for name in SPAN_NAMES:
        values = [value for value in (getattr(span, name) for span in spans) if value is not None]
        for q in (50, 99):
            value = percentile(values, q)
            summary[f"{name}_ms_p{q}"] = None if value is None else round(value * 1000, 2)
    return summary


def _memory_budget(spec: JobSpec, device: str) -> int | None:
    """Bytes the replica's models may hold: serve.resident_memory, else on a GPU its share of the
    device (serve.resources.num_gpus of it) less room for activations and the allocator."""
    if spec.serve.resident_memory:
        return parse_size(spec.serve.resident_memory)
    if device != "cuda":
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    return int(0.85 * total * min(1.0, spec.serve.resources.num_gpus or 1.0))


def _host_budget(spec: JobSpec, device: str) -> int:
    """Bytes of host memory the replica keeps models' weights in: serve.host_memory, else on a GPU a
    quarter of the node's memory (its cgroup's limit where lower), shared among its GPUs by the
    replica's share of them; none on a CPU."""
    if spec.serve.host_memory is not None:
        return spec.serve.host_memory_bytes
    if device != "cuda":
        return 0
    import psutil

    memory = min(psutil.virtual_memory().total, _cgroup_memory_limit() or psutil.virtual_memory().total)
    return int(memory / 4 * (spec.serve.resources.num_gpus or 1.0) / _node_gpus())


def _node_gpus() -> float:
    """The GPUs of this replica's node, as Ray counts them (its own process sees only its share)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    gpus = next((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    return max(gpus, 1.0)


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = open(path).read().strip()
        except OSError:
            continue
        if value.isdigit():
            return int(value)
    return None


@serve.deployment
class ModelServer:
    """`loader(spec, store, entry, device)` builds a LoadedModel for a catalog entry, freed by its
    close(): tests inject fake engines here, as Ray Serve LLM injects its engine class. By default
    a ModelSwitcher loads (loading.load_model's models, through its host tier and spare engines)."""

    def __init__(self, spec: JobSpec, loader=None):
        started = time.perf_counter()
        route_library_output(worker=True)
        self.spec = spec
        self.store = Store(self.spec.store, self.spec.storage_options)
        self.device = preferred_device()
        if self.device == "cuda":
            from qlora_ray import marlin

            # The Marlin int4 kernel is compiled on a machine's first use (minutes) unless the store
            # holds a build: here, while the replica starts, rather than inside the first request.
            marlin.prepare(self.store, share=self.spec.serve.share_compiled_kernels)
        self.switcher, settle = None, None
        memory_budget = _memory_budget(spec, self.device)
        if loader is None:
            self.switcher = ModelSwitcher(spec, self.store, self.device, _host_budget(spec, self.device), memory_budget)
            self._load_entry, release, settle = self.switcher.load, self.switcher.release, self.switcher.settle
        else:
            self._load_entry, release = (lambda entry: loader(spec, self.store, entry, self.device)), LoadedModel.close
        self.models = ResidentModels(self._load, release, max_models=spec.serve.max_resident_models,
                                     memory_budget=memory_budget, loads_per_tenant=spec.serve.loads_per_tenant,
                                     settle=settle)

        async def note_model(model_id: str) -> str:  # what Serve's router learns; nothing is loaded here
            return model_id

        self._route = serve.multiplexed(max_num_models_per_replica=spec.serve.max_resident_models)(note_model)
        self.first_token_spans: deque[FirstTokenSpans] = deque(maxlen=FIRST_TOKEN_SPANS_KEPT)
        self.start_seconds = time.perf_counter() - started
        log.info("model replica ready in %.1f s (before its first model load)", self.start_seconds)

    async def _load(self, entry: ModelEntry) -> LoadedModel:
        return await asyncio.to_thread(self._load_beside_the_steps, entry)

    def _load_beside_the_steps(self, entry: ModelEntry) -> LoadedModel:
        """The load, with the GIL handed over sooner meanwhile (LOADING_GIL_SWITCH_INTERVAL_S). Loads
        run one at a time (residency.ResidentModels), so the process's interval is set and restored
        by one of them at a time."""
        default = sys.getswitchinterval()
        sys.setswitchinterval(LOADING_GIL_SWITCH_INTERVAL_S)
        try:
            return self._load_entry(entry)
        finally:
            sys.setswitchinterval(default)

    @contextlib.asynccontextmanager
    async def _using(self, entry: dict):
        """(the model, the seconds this request waited for it to load: None when it was resident)."""
        entry = ModelEntry(**entry)
        await self._route(entry.id)
        arrived, resident = time.perf_counter(), self.models.is_resident(entry.id)
        async with self.models.use(entry) as model:
            yield model, None if resident else time.perf_counter() - arrived

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose generation is wedged, or whose GPU is gone, is replaced."""
        for model in self.models.models():
            stalled = model.batcher.stalled_for() if model.batcher else 0.0
            if stalled > STALLED_STEP_SECONDS:
                log.error("a generation step has run for %.0f s; the step loop is at:\n%s", stalled,
                          model.batcher.step_stack())
                raise RuntimeError(f"{model.entry.id}: one generation step has run for {stalled:.0f} s")
        if self.device == "cuda":
            import torch

            torch.cuda.mem_get_info()  # raises once the device's context is lost

    async def resident(self, entry: dict, since: float | None = None) -> dict:
        """The model's facts on this replica, loading it if needed; `first_token`: where the time to
        the first token of this model's requests on this replica that arrived after `since` (wall
        clock; default: all it keeps) went; `mean_batch` and `decode_steps_per_s`: the mean rows of its
        decode steps since then, and their rate from the first to the last (tokens/s is their product:
        which of the two falls short of the engine's says whether the batch was not full or the steps
        were slow)."""
        async with self._using(entry) as (model, _):
            steps = tuple(model.batcher.batch_sizes)  # one copy: the step loop appends meanwhile
            recent = [(when, rows) for when, rows in steps if since is None or when >= since]
            sizes = [rows for _, rows in recent]
            elapsed = recent[-1][0] - recent[0][0] if recent else 0.0
            spans = [span for span in self.first_token_spans
                     if span.model == model.entry.id and (since is None or span.arrived >= since)]
            return {"model": model.entry.id, "resident_bytes": model.resident_bytes, "engine": model.engine_name,
                    "device": self.device, "load_seconds": round(model.load_seconds, 2),
                    "loaded_from": model.loaded_from,
                    "load_phases": {name: round(seconds, 2) for name, seconds in model.load_phases.items()},
                    "host_models": self.switcher.host_models() if self.switcher else [],
                    "replica_start_seconds": round(self.start_seconds, 2),
                    "resident_models": self.models.resident_ids(),
                    "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
                    "decode_steps_per_s": round((len(recent) - 1) / elapsed, 1) if elapsed > 0 else None,
                    "first_token": summarize_first_token_spans(spans)}

    async def generate(self, payload: dict):
        """Events: {"type": "start", "prompt_tokens"} | {"type": "error", "status", "message"}, then
        {"type": "text", "text"} per step..., then {"type": "end", "finish_reason", "completion_tokens"}.
        The start event's load_seconds: how long the request waited for its model to load (a model
        switch), None when the model was resident; its loaded_from: where that load took the weights
        from (host memory or the store)."""
        arrived = (time.time(), time.perf_counter())
        try:
            async with self._using(payload["entry"]) as (model, load_seconds):
                async for event in self._generate(model, payload, load_seconds, arrived):
                    yield event
        except TenantLoadsExceeded as exc:
            yield {"type": "error", "status": 429, "retry_after": self.spec.serve.retry_after_s,
                   "message": f"{exc}; retry after {self.spec.serve.retry_after_s} s"}

    async def _generate(self, model: LoadedModel, payload: dict, load_seconds: float | None,
                        arrived: tuple[float, float]):
        from qlora_ray.serve.sampling import SamplingParams
        from qlora_ray.serve.text import TextStream

        model_ready = time.perf_counter()
        tokenizer = model.tokenizer
        if isinstance(payload.get("prompt"), list):
            ids = list(payload["prompt"])
            if any(not 0 <= token < len(tokenizer) for token in ids):
                yield {"type": "error", "status": 400, "message": f"prompt: token ids must be in [0, {len(tokenizer)})"}
                return
        else:  # on a thread: a long prompt would hold up every stream of this replica's event loop
            try:
                ids = await asyncio.to_thread(_prompt_ids, tokenizer, payload)
            except Exception as exc:  # noqa: BLE001 - a template's own error (jinja raises its own types)
                yield {"type": "error", "status": 400,
                       "message": f"messages: the model's chat template refused them ({type(exc).__name__}: {exc})"}
                return
        context = model.engine.context
        limit = payload["max_tokens"] or min(self.spec.serve.max_tokens, context - len(ids))
        if not ids or limit < 1 or len(ids) + limit > context:
            yield {"type": "error", "status": 400,
                   "message": f"the prompt is {len(ids)} tokens and max_tokens {limit}: together at most {context}"}
            return
        params = SamplingParams(max_new_tokens=limit, temperature=payload["temperature"], top_p=payload["top_p"],
                                ignore_eos=payload["ignore_eos"])
        tokenized = time.perf_counter()
        yield {"type": "start", "prompt_tokens": len(ids), "load_seconds": load_seconds,
               "loaded_from": None if load_seconds is None else model.loaded_from}
        stream = TextStream(tokenizer, payload["stop"])
        produced, finish = 0, "length"
        queued = time.perf_counter()
        async with contextlib.aclosing(model.batcher.tokens(ids, params)) as batches:
            async for tokens in batches:
                if not produced:
                    self.first_token_spans.append(FirstTokenSpans(
                        model.entry.id, arrived[0], model_wait=model_ready - arrived[1], tokenize=tokenized - model_ready,
                        start_event=queued - tokenized, engine=time.perf_counter() - queued,
                        **FirstTokenSpans.on_the_way(payload.get("timing"), arrived[0])))
                # One event per batch of tokens, its text possibly empty (held back: part of a
                # character or maybe of a stop string): one per token while the stream keeps up with
                # the engine, several when it falls behind, so each hop carries more.
                text = []
                for token in tokens:
                    produced += 1
                    text.append(stream.add(token))
                    if stream.stopped or (token in model.engine.stop_ids and not params.ignore_eos):
                        finish = "stop"
                        break
                yield {"type": "text", "text": "".join(text)}
                if finish == "stop":
                    break
        tail = stream.finish()
        if tail:
            yield {"type": "text", "text": tail}
        yield {"type": "end", "finish_reason": finish, "completion_tokens": produced}


def _prompt_ids(tokenizer, payload: dict) -> list[int]:
    """A request's prompt as token ids: its messages through the chat template, or its text."""
    if "messages" in payload:
        ids = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(payload["prompt"], add_special_tokens=False)["input_ids"]
