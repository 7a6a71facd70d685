"""One tenant's training run against the store: stage inputs, resume, train, checkpoint, publish.

Runs inside a Ray task (launch.py) but needs no Ray itself. Everything it reads and writes goes
through the store, so a retry on another node picks up exactly where the last attempt left off:
the newest complete checkpoint is resumed, and a complete adapter is never trained again.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Callable

from qlora_ray import staged_data
from qlora_ray.data import read_rows
from qlora_ray.errors import StoreError
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.spec import JobSpec, TenantSpec
from qlora_ray.staged_data import EVAL_FILE, TRAIN_FILE, write_rows
from qlora_ray.store import Store, adapter_key, base_key, checkpoint_key, data_key
from qlora_ray.train.finetune import finetune
from qlora_ray.train.status import StatusWriter, now_iso, read_status
from qlora_ray.work_orders import TrainOrder

# A running tenant says where it is on its first logged step, then at most this often, and at its last.
PROGRESS_EVERY_S = 30.0


def stage_data(spec: JobSpec, tenant: TenantSpec, store: Store) -> dict:
    """Validate a tenant's data and publish it as runs/<job>/data/<tenant> (the rows training reads).

    Workers on any node read the data from the store, not from the driver's disk. Unchanged data
    is not published again. Raises DataError for a bad file. Returns the data artifact's manifest.
    """
    train = read_rows(tenant.train_data, spec.storage_options)
    evaluation = read_rows(tenant.eval_data, spec.storage_options) if tenant.eval_data else None
    inputs = {
        "train_uri": tenant.train_data,
        "train_sha256": train.sha256,
        "eval_uri": tenant.eval_data,
        "eval_sha256": evaluation.sha256 if evaluation else None,
    }
    key = data_key(spec.name, tenant.id)
    if store.is_complete(key):
        manifest = store.read_manifest(key)
        if manifest["inputs"] == inputs:
            return manifest
        store.delete(key)  # the tenant's data changed since it was staged
    with scratch_dir("data") as folder:
        write_rows(folder / TRAIN_FILE, train.rows)
        if evaluation:
            write_rows(folder / EVAL_FILE, evaluation.rows)
        metrics = {"train_rows": len(train.rows), "eval_rows": len(evaluation.rows) if evaluation else 0,
                   "format": train.format}
        return store.publish(key, folder, kind="data", inputs=inputs, metrics=metrics, keep_existing=True)


def training_fingerprint(tenant: TenantSpec, data_inputs: dict) -> str:
    """sha256 of what decides an adapter: the tenant's training settings and its data's checksums.

    A checkpoint is resumed, and a finished adapter trusted, only under the same fingerprint.
    """
    payload = {"training": tenant.training.model_dump(mode="json"),
               "train_sha256": data_inputs.get("train_sha256"), "eval_sha256": data_inputs.get("eval_sha256")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train_tenant(order: TrainOrder, *, say: Callable[[str], None] | None = None, where: dict | None = None) -> dict:
    """Train (or resume) one tenant's adapter and publish it. Returns the adapter's manifest. `say`
    gets a progress line now and then (PROGRESS_EVERY_S): lines rather than a bar, which a log file
    or a CI log shows as well as a terminal."""
    tenant_id = order.tenant.id
    store = order.store.open()
    key = adapter_key(order.job, tenant_id)
    if store.is_complete(key):
        return store.read_manifest(key)
    status = StatusWriter(store, order.job, tenant_id)
    previous = read_status(store, order.job, tenant_id) or {}
    status.state("running", attempt=previous.get("attempt", 0) + 1, started_at=now_iso(), started_ts=time.time(),
                 finished_ts=None, step=0, loss=None,
                 tokens_per_second=None, error=None, **(where or {}))
    try:
        manifest = _train_and_publish(order, store, status, say, where or {})
    except BaseException as exc:
        status.state("failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    _delete_checkpoints(store, order.job, tenant_id)
    status.state("done", finished_ts=time.time(), step=manifest["metrics"]["steps"], loss=manifest["metrics"]["final_loss"],
                 tokens_per_second=manifest["metrics"]["tokens_per_second"])
    return manifest


def _train_and_publish(order: TrainOrder, store: Store, status: StatusWriter, say: Callable[[str], None] | None,
                       where: dict) -> dict:
    """Train, then publish the adapter; `where` (the Ray node and GPUs it ran on) goes into its metrics."""
    job, tenant = order.job, order.tenant
    key = adapter_key(job, tenant.id)
    with scratch_dir(f"train-{tenant.id}") as work, store.local_copy(base_key(order.base)) as base_dir:
        base_manifest = store.read_manifest(base_key(order.base))
        data_manifest = store.fetch(data_key(job, tenant.id), work / "data")
        train_rows = staged_data.read_rows(work / "data" / TRAIN_FILE)
        eval_rows = staged_data.read_rows(work / "data" / EVAL_FILE) if (work / "data" / EVAL_FILE).exists() else None
        fingerprint = training_fingerprint(tenant, data_manifest["inputs"])
        resume = _fetch_latest_checkpoint(store, job, tenant.id, work / "checkpoints", fingerprint)

        said_at = -PROGRESS_EVERY_S

        def on_progress(update: dict) -> None:
            nonlocal said_at
            status.progress(**update)
            last = update["step"] >= update["max_steps"]
            if say is not None and (time.monotonic() - said_at >= PROGRESS_EVERY_S or last):
                said_at = time.monotonic()
                loss = "" if update["loss"] is None else f", loss {update['loss']:.4f}"
                say(f"train {tenant.id}: step {update['step']}/{update['max_steps']}{loss}, "
                    f"{update['tokens_per_second']:.0f} tok/s")

        def on_checkpoint(step: int, folder: Path) -> None:
            _publish_checkpoint(store, job, tenant.id, step, folder, fingerprint)

        try:
            result = finetune(tenant.training, base_dir, train_rows, eval_rows, work, resume_from=resume,
                              on_progress=on_progress, on_checkpoint=on_checkpoint,
                              base_model_name=store.url(base_key(order.base)))
        except pickle.UnpicklingError as exc:  # torch's weights-only loader refused a checkpoint's state file
            if resume is None:
                raise
            where = store.url(checkpoint_key(job, tenant.id, int(resume.name.removeprefix("checkpoint-"))))
            raise StoreError(f"{where}: a trainer state file holds more than tensors, so it was not loaded "
                             f"({str(exc).splitlines()[0][:200]}); delete {store.url(checkpoint_key(job, tenant.id))} "
                             "to train this tenant from the start") from None
        inputs = {
            "job": job,
            "tenant": tenant.id,
            "spec_sha256": order.spec_sha256,
            "training_fingerprint": fingerprint,
            "training": tenant.training.model_dump(mode="json"),
            "scorer": tenant.scorer,
            "base": {"key": base_key(order.base), "manifest_sha256": manifest_digest(base_manifest),
                     "source_sha256": base_manifest["inputs"].get("source_sha256")},
            "data": {"key": data_key(job, tenant.id), "manifest_sha256": manifest_digest(data_manifest),
                     **data_manifest["inputs"]},
        }
        # Another attempt of this tenant (a retry racing one cut off from the cluster, or another run of
        # the job) may have published first: then that adapter is kept.
        return store.publish(key, result.adapter_dir, kind="adapter", inputs=inputs, metrics={**result.metrics, **where},
                             keep_existing=True)


def _publish_checkpoint(store: Store, job: str, tenant: str, step: int, folder: Path, fingerprint: str) -> None:
    """Publish a trainer checkpoint as checkpoints/<tenant>/step-N, then drop the older ones."""
    key = checkpoint_key(job, tenant, step)
    store.publish(key, folder, kind="checkpoint", inputs={"step": step, "training_fingerprint": fingerprint},
                  keep_existing=True)
    for name in store.list_complete(checkpoint_key(job, tenant)):
        if name != key.rsplit("/", 1)[-1]:
            store.delete(f"{checkpoint_key(job, tenant)}/{name}")


def _fetch_latest_checkpoint(store: Store, job: str, tenant: str, into: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint of this tenant's current settings and data; others are removed."""
    steps = sorted(store.list_complete(checkpoint_key(job, tenant)))
    if not steps:
        return None
    manifest = store.read_manifest(f"{checkpoint_key(job, tenant)}/{steps[-1]}")
    if manifest["inputs"].get("training_fingerprint") != fingerprint:
        _delete_checkpoints(store, job, tenant)  # settings or data changed since: start over
        return None
    step = int(steps[-1].removeprefix("step-"))
    local = into / f"checkpoint-{step}"  # the name transformers' Trainer expects
    store.fetch(checkpoint_key(job, tenant, step), local)
    return local


def _delete_checkpoints(store: Store, job: str, tenant: str) -> None:
    store.delete(checkpoint_key(job, tenant))
