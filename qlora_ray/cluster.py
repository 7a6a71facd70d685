"""Ray plumbing the stages' drivers share: joining (or starting) the cluster, a task's options from
the job file's resources, refusing a store Ray's workers cannot reach, collecting tasks as they
finish, and a Ray error as the one line a user acts on.

The stages own what is particular to them (which tasks, in which order, what an outcome is); how a
stage talks to Ray is here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from qlora_ray.errors import StoreError, UserError
from qlora_ray.spec import Resources
from qlora_ray.store import Store


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # A new local instance (not any cluster left running on this machine); no dashboard: ~1 GB saved.
    # Ray's notices about the instance it starts ("Started a local Ray instance", token
    # authentication) say nothing a user acts on here; its errors still show.
    with serve_throughput_defaults():
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.ERROR)


# Ray Serve's own throughput settings (user code and router on the replica's event loop, gRPC
# between deployments, direct ingress), read by each Serve process as it starts: on a cluster, from
# `ray start`'s environment; on the local instance init_ray starts, from here. Every stream's events
# and every request cross the gateway's event loop, and these settings take Serve's own hops off it:
# at high concurrency that loop, not the engine, set the pace (README, "Serve's settings"). With
# direct ingress, a stopping gateway replica first stays open 30 s for load balancers in front of
# it to let it go; a local instance has none but Serve's own proxy beside it, and Ctrl-C on
# `qlora-ray serve` would hang that long: 5 s.
SERVE_THROUGHPUT_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


@contextlib.contextmanager
def serve_throughput_defaults():
    """SERVE_THROUGHPUT_DEFAULTS in the process's environment where it does not set them, for the
    processes of a Ray instance started meanwhile; restored after, so the driver's later code and
    later instances see the environment as it was."""
    added = {name: value for name, value in SERVE_THROUGHPUT_DEFAULTS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def joined_existing_cluster() -> bool:
    """Whether the driver joined a cluster (RAY_ADDRESS), which may scale up, rather than started one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def refuse_process_local_store(store: Store, job_store: str, stage: str) -> None:
    """A memory:// store lives in the driver's process; Ray's workers are other processes."""
    if "memory" in store.fs.protocol:
        raise UserError(f"store {job_store}: a memory:// store lives in one process, and Ray's workers are "
                        f"others; use a folder or s3:// for {stage}")


def node_request(resources: Resources) -> dict:
    """What a task, actor or Serve replica asks of a node, in Ray's option names."""
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "resources": dict(resources.custom)}


def task_options(resources: Resources, *, name: str, max_retries: int) -> dict:
    """Options of one stage task: what it asks of a node, and its retries. A task that failed on the
    store is worth another try; one that failed on bad data or a bug is not."""
    return {
        **node_request(resources),
        "max_retries": max_retries,
        "retry_exceptions": [StoreError],
        "name": name,
    }


def largest_node_resources() -> dict[str, float]:
    """The most of each resource that one live node of the cluster has."""
    largest: dict[str, float] = {}
    for node in live_node_resources():
        for resource, amount in node.items():
            largest[resource] = max(largest.get(resource, 0.0), amount)
    return largest


def ray_resource_names(resources: Resources) -> dict[str, float]:
    """What a task, actor or replica asks of a node, by the names Ray counts a node's resources under."""
    return {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}


def describe_request(wanted: dict[str, float]) -> str:
    """What ray_resource_names asks, for a message: 'CPU 2, GPU 0.5' (the zero amounts left out)."""
    return ", ".join(f"{name} {amount:g}" for name, amount in wanted.items() if amount > 0)


def copies_that_fit(nodes: list[dict[str, float]], wanted: dict[str, float]) -> int:
    """How many actors asking `wanted` (Ray's resource names) the nodes can hold at once, each on one
    node: Serve's replicas are such actors."""
    asked = {name: amount for name, amount in wanted.items() if amount > 0}
    if not asked:
        return 2**31
    return sum(min(int(node.get(name, 0.0) // amount) for name, amount in asked.items()) for node in nodes)


def live_node_resources() -> list[dict[str, float]]:
    """Each live node's resources."""
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def as_completed(refs: dict, /) -> Iterator[tuple[object, object]]:
    """(the label given for a task, its ObjectRef) in the order the tasks finish; `ray.get` on the
    ref then returns its result or raises its error."""
    import ray

    pending = dict(refs)
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ready), ready


def error_text(exc: BaseException) -> str:
    """A Ray error as one line: a UserError raised in the task as it was written, anything else the
    task raised with its type, and a worker or node that died (retries spent) by Ray's first line."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        return str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"[:2000]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
