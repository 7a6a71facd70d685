"""The Ray Serve application: an OpenAI-compatible gateway over model deployments.

    client ──HTTP──▶ Gateway (serve/gateway.py: keys, limits, validation, OpenAI shapes, SSE)
                        ├─▶ ModelServer "fused"     <tenant>/<scheme>.<merge base>   (fused folders)
                        └─▶ ModelServer "unmerged"  <tenant>/unmerged                (base + adapter, peft)

Model ids name a tenant's artifact (serve/catalog.py). Each ModelServer replica (serve/replica.py)
holds several tenants' models, loaded from the store on demand (serve/loading.py) within its room
and evicted fairly (serve/residency.py); Serve's router sends a model's requests to the replica
that served it. Requests to one model are generated together, joining and leaving the batch between
decode steps (continuous batching: serve/scheduler.py, run by serve/batcher.py).

Overload is answered, not queued without bound: a replica takes serve.max_ongoing_requests, the
gateway's handle queues serve.max_queued_requests more per deployment (Ray Serve's own limits), and
beyond them Serve raises BackPressureError, which the gateway answers 429 with Retry-After. A replica
lost with its node is answered 503 with Retry-After while Serve starts another.

`qlora-ray serve JOB` runs it; `serve run serve/demo.yaml` builds it from `build_app`.
"""

from __future__ import annotations

from ray.serve.config import BackpressureConfig

from qlora_ray.cluster import node_request
from qlora_ray.serve.catalog import UNMERGED
from qlora_ray.serve.gateway import Gateway
from qlora_ray.serve.replica import ModelServer
from qlora_ray.spec import JobSpec

GATEWAY_SPARE_REQUESTS = 32  # /health, /v1/models and the like, on top of what the models can hold


def _backpressure(spec: JobSpec) -> BackpressureConfig:
    """How Serve answers beyond a queue's bound: 429, which OpenAI's clients retry after Retry-After
    (a 503 would read as the server being down)."""
    return BackpressureConfig(status_code=429, retry_after_s=spec.serve.retry_after_s)


def _max_ongoing(spec: JobSpec) -> int:
    """Requests a model replica takes at once: by default a batch generating and the next gathering."""
    return spec.serve.max_ongoing_requests or 2 * spec.serve.max_batch


def model_options(spec: JobSpec, name: str) -> dict:
    """Serve options of a model deployment."""
    options = {"name": name, "ray_actor_options": node_request(spec.serve.resources),
               "max_ongoing_requests": _max_ongoing(spec), "max_queued_requests": spec.serve.max_queued_requests,
               "backpressure_config": _backpressure(spec)}
    if spec.serve.max_replicas:
        options["autoscaling_config"] = {"min_replicas": spec.serve.num_replicas, "max_replicas": spec.serve.max_replicas,
                                         "target_ongoing_requests": spec.serve.target_ongoing_requests}
    else:
        options["num_replicas"] = spec.serve.num_replicas
    return options


def gateway_options(spec: JobSpec) -> dict:
    """The gateway only awaits the models, so each gateway replica takes every request the models'
    replicas and queues can hold, and room for the cheap routes: the models' bound is the one that
    answers overload, in OpenAI's shape. Serve's proxy queues as many again for it, then answers the
    same 429 itself, in plain text. (Serve counts a request as queued until it is assigned, so a
    queue bound as tight as the models' would turn away bursts the gateway has room for.)"""
    replicas = spec.serve.max_replicas or spec.serve.num_replicas
    deployments = 2 if spec.serve.unmerged_baseline else 1
    held = deployments * (replicas * _max_ongoing(spec) + spec.serve.max_queued_requests) + GATEWAY_SPARE_REQUESTS
    return {"num_replicas": spec.serve.gateway_replicas, "max_ongoing_requests": held, "max_queued_requests": held,
            "backpressure_config": _backpressure(spec)}


def build_application(spec: JobSpec, extra_keys: dict[str, str] | None = None, loader=None):
    """The bound Serve application for a job. extra_keys (key -> tenant) are accepted besides the
    store's keys: the bench uses them for its own run without writing keys to the store. loader:
    see ModelServer."""
    fused = ModelServer.options(**model_options(spec, "fused")).bind(spec, loader)
    unmerged = ModelServer.options(**model_options(spec, UNMERGED)).bind(spec, loader) if spec.serve.unmerged_baseline else None
    return Gateway.options(**gateway_options(spec)).bind(spec, fused, unmerged, extra_keys)


def build_app(args: dict):
    """`serve run` entry point: args {job: path to the job file}."""
    from qlora_ray.spec import load_spec

    if "job" not in args:
        raise ValueError("serve config: args.job (the job file) is required")
    return build_application(load_spec(args["job"]))
