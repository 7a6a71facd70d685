"""The fuse actor: a thin Ray layer between the store and the local functions of fuse/shards.py and gptq.py.

Base shards come through Store.local_copy: a folder store's are read in place, any other store's are
fetched once into the node's cache, which the node's workers share; either way each is verified
against the base's manifest. Adapters are kept in the actor's scratch folder for its lifetime.
Outputs go straight into their artifact versions in the store (Store.put_part); the driver seals
each version once all its parts are in. If an actor dies, Ray restarts it (maybe on another node)
and re-runs its unfinished unit there, which uploads the same parts again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from pathlib import Path

from qlora_ray.adapter_files import ADAPTER_WEIGHTS, read_adapter_config
from qlora_ray.bases import INDEX_NAME
from qlora_ray.errors import AdapterError, UserError
from qlora_ray.fuse.gptq_bulk import quantize_config, quantize_layer_in_place
from qlora_ray.fuse.gptq_stream import WALK_DTYPE, StageClock, StreamTenant, quantize_tenants_layerwise, walk_memory
from qlora_ray.fuse.hessians import (SiteHessian, capture_hessians, decoder_layers, padded_batches, read_hessians,
                                     write_hessians)
from qlora_ray.fuse.math import LoraDelta, adapter_deltas, fuse_weight
from qlora_ray.fuse.plan import HessianUnit, StreamUnit
from qlora_ray.fuse.quant import roundtrip_4bit
from qlora_ray.fuse.shards import GPTQ, ShardTarget, checkpoint_copy, fuse_shard, load_shard
from qlora_ray.hardware import compute_dtype, peak_memory_bytes, preferred_device
from qlora_ray.library_output import route_library_output, say
from qlora_ray.local_disk import scratch_dir
from qlora_ray.spec import FusedVariant
from qlora_ray.staged_data import TRAIN_FILE, fetch_rows
from qlora_ray.store import Draft, adapter_key, base_key, fused_key, hessian_key
from qlora_ray.work_orders import GptqOrder

# How often a walk of bulk GPTQ with per-tenant Hessians says which layer it is at.
PROGRESS_EVERY_S = 30


def load_adapter_deltas(adapter_dir: Path, device: str = "cpu") -> dict[str, LoraDelta]:
    """A PEFT adapter folder's LoRA deltas; device 'meta' reads only the shapes (for validation).
    AdapterError for a config or weights file that cannot be read (truncated, forged, not JSON)."""
    import torch
    from safetensors import SafetensorError, safe_open

    config = read_adapter_config(adapter_dir)
    try:
        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as handle:
            if device == "meta":
                state = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
            else:
                state = {k: handle.get_tensor(k).to(device) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{ADAPTER_WEIGHTS}: not a readable safetensors file ({exc})") from None
    return adapter_deltas(state, config)


def start_unit() -> float:
    """Mark the start of a unit: the GPU peak worker_facts reports is then this unit's own (a worker
    that captured a Hessian set would otherwise report that peak for every shard after it). Returns
    the start time."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def worker_facts() -> dict:
    """This worker's peak GPU memory in the unit (on a GPU worker; see start_unit), its process's peak
    resident memory so far, and the Ray node and GPUs it runs on (a cluster's operators check that
    fusing landed where it was meant to)."""
    import ray
    import torch

    peak = {"worker_peak_rss_bytes": peak_memory_bytes("cpu"), "worker_node_id": ray.get_runtime_context().get_node_id(),
            "worker_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    if torch.cuda.is_available():
        peak["worker_peak_gpu_bytes"] = peak_memory_bytes("cuda")
    return peak


def release_gpu_cache() -> None:
    """Hand the memory a unit freed back to the GPU: the pool's workers may share one, and what one
    worker's allocator keeps cached the others cannot use."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FuseWorker:
    """Runs fuse units: a Hessian set for bulk GPTQ, one base shard for many targets, or one tenant's
    whole-model GPTQ quantization."""

    def __init__(self, order: GptqOrder, quantized: frozenset[str], threads: int, gpu_share: float = 0.0):
        """`gpu_share`: the GPUs Ray gave this worker (fuse.resources.num_gpus); a walk of bulk GPTQ
        sizes its batches to that share of its GPU (0: to fixed budgets)."""
        import torch

        route_library_output(worker=True)
        torch.set_num_threads(max(1, threads))
        self.order = order
        self.store = order.store.open()
        self.quantized = quantized
        self.gpu_share = gpu_share
        self.device = preferred_device()
        self._scratch = contextlib.ExitStack()
        self.cache = self._scratch.enter_context(scratch_dir("fuse-worker"))
        self._deltas: dict[str, dict[str, LoraDelta]] = {}

    def device_name(self) -> str:
        return self.device

    def close(self) -> None:
        """Remove this worker's scratch folder (the driver calls it before ending the actor; a worker
        that died has its folder removed by the next process of the node that makes one)."""
        self._scratch.close()

    def _base(self, files: list[str]):
        """A context: a local folder holding these verified files of the base."""
        return self.store.local_copy(base_key(self.order.base), files)

    def _tenant_deltas(self, tenant: str) -> dict[str, LoraDelta]:
        if tenant not in self._deltas:
            folder = self.cache / "adapters" / tenant
            self.store.fetch(adapter_key(self.order.job, tenant), folder)
            self._deltas[tenant] = load_adapter_deltas(folder, self.device)
        return self._deltas[tenant]

    def capture_hessians(self, unit: HessianUnit) -> dict:
        """Capture one Hessian set on its merge base from its tenants' calibration rows (the rows the
        per-tenant path would calibrate on), and publish it in place of any older set. Returns its manifest."""
        from transformers import AutoTokenizer

        from qlora_ray.fuse.gptq import CALIBRATION_BATCH, calibration_batch, calibration_texts

        started = start_unit()
        work = self.cache / "hessians" / unit.pool
        try:
            files = list(self.store.read_manifest(base_key(self.order.base))["files"])
            with self._base(files) as base_dir:
                tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
                model = self._load_merge_base(base_dir, unit, compute_dtype(self.device))[0]  # its start tensors: not needed
                weight_map = json.loads((base_dir / INDEX_NAME).read_text())["weight_map"]
            rows = []
            for tenant in unit.calibration:
                staged = fetch_rows(self.store, self.order.job, tenant, TRAIN_FILE, work / "data" / tenant)
                texts = calibration_texts(staged, tokenizer, self.order.gptq.calibration_samples)
                rows += [row["input_ids"] for row in calibration_batch(texts, tokenizer)]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            loaded = time.perf_counter()
            quantize = (functools.partial(quantize_layer_in_place, config=quantize_config(self.order.gptq))
                        if self.order.gptq.sequential else None)
            hessians = capture_hessians(model, padded_batches(rows, CALIBRATION_BATCH, pad, self.device), self.quantized,
                                        quantize)
            del model
            captured = time.perf_counter()
            out = work / "out"
            out.mkdir(parents=True)
            sites, weights = len(hessians.sums), len(hessians.weight_sites)
            written = write_hessians(hessians, weight_map, out)
            del hessians
            release_gpu_cache()
            metrics = {"seconds": round(time.perf_counter() - started, 2), "load_seconds": round(loaded - started, 2),
                       "capture_seconds": round(captured - loaded, 2), "write_seconds": round(time.perf_counter() - captured, 2),
                       "calibration_rows": len(rows), "calibration_tokens": sum(map(len, rows)),
                       "sites": sites, "weights": weights,
                       "size_bytes": sum(written.values()), **worker_facts()}
            return self.store.replace(hessian_key(self.order.job, unit.pool), out, kind="hessians",
                                      inputs=unit.inputs, metrics=metrics)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _load_merge_base(self, base_dir: Path, target: ShardTarget | HessianUnit, dtype):
        """(the base model on this worker's device, computing in `dtype`, weight name -> the merge base's
        tensor of each quantized weight in the dtype the base stores: the original's, or its NF4 round
        trip as fuse_shard makes it)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
        model.to(self.device).eval()
        start = {}
        for name, parameter in model.named_parameters():
            if name in self.quantized:
                if target.merge_base == "nf4-dequantized":
                    parameter.data = roundtrip_4bit(parameter.data, target.trained_format)
                start[name] = parameter.data
        model.to(dtype)
        return model, start

    def fuse_gptq_stream(self, unit: StreamUnit) -> dict:
        """GPTQ-quantize a group of tenants against their own Hessians in one walk over the merge base
        (fuse/gptq_stream.py), uploading each base shard's file of every tenant's artifact as soon as
        the walk has quantized the shard's weights. A tenant whose calibration rows or adapter cannot be
        read fails alone, before the walk."""
        import torch
        from transformers import AutoTokenizer

        from qlora_ray.fuse.gptq import CALIBRATION_BATCH, calibration_rows, calibration_texts

        started = start_unit()
        clock = StageClock(torch.device(self.device))
        work = self.cache / "stream"
        names = {t.tenant: f"{t.tenant}/{FusedVariant(GPTQ, t.merge_base).name}" for t in unit.targets}
        failed: dict[str, str] = {}
        calibration: dict[str, dict] = {}
        parts: dict[str, dict] = {name: {} for name in names.values()}
        try:
            files = list(self.store.read_manifest(base_key(self.order.base))["files"])
            with self._base(files) as base_dir:
                tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                tenants = []
                for target in unit.targets:
                    try:
                        staged = fetch_rows(self.store, self.order.job, target.tenant, TRAIN_FILE, work / "data" / target.tenant)
                        texts = calibration_texts(staged, tokenizer, self.order.gptq.calibration_samples)
                        rows = [row["input_ids"] for row in calibration_rows(texts, tokenizer)]
                        calibration[names[target.tenant]] = {"calibration_rows": len(rows),
                                                             "calibration_tokens": sum(map(len, rows))}
                        tenants.append(StreamTenant(target.tenant, self._tenant_deltas(target.tenant),
                                                    list(padded_batches(rows, CALIBRATION_BATCH, pad, self.device))))
                    except UserError as exc:
                        failed[names[target.tenant]] = str(exc)
                if tenants:
                    self._walk_and_write(unit, tenants, names, base_dir, parts, work / "out", clock, started)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            release_gpu_cache()
        for name in failed:
            parts.pop(name)
        return {"parts": parts, "failed": failed, "calibration": calibration, "seconds": round(time.perf_counter() - started, 3),
                "stage_seconds": {stage: round(seconds, 3) for stage, seconds in clock.seconds.items()}, **worker_facts()}

    def _walk_and_write(self, unit: StreamUnit, tenants: list[StreamTenant], names: dict[str, str], base_dir: Path,
                        parts: dict[str, dict], out: Path, clock: StageClock, started: float) -> None:
        """The walk of fuse_gptq_stream over the base in base_dir, its shard files written beside it."""
        with clock("load"):
            model, start = self._load_merge_base(base_dir, unit.targets[0], WALK_DTYPE)
        layers = len(decoder_layers(model))
        said = [time.perf_counter()]
        writer = _StreamWriter(self, unit, tenants, names, base_dir, parts, out)

        def on_layer(index: int, packed: dict, seconds: dict) -> None:
            writer.add(packed, seconds)
            writer.write_ready()
            if time.perf_counter() - said[0] >= PROGRESS_EVERY_S or index + 1 == layers:
                said[0] = time.perf_counter()
                say(f"fuse: {unit.name}: layer {index + 1}/{layers} [{said[0] - started:.0f} s]")

        memory = self._walk_memory()
        try:
            writer.write_ready()
            quantize_tenants_layerwise(model, start, tenants, quantize_config(self.order.gptq), self.order.gptq.bits,
                                       sequential=self.order.gptq.sequential,
                                       park="cpu" if self.device == "cuda" else None, on_layer=on_layer, clock=clock,
                                       memory=memory)
            del model, start
            with clock("waiting for the writes"):
                writer.finish()
        finally:
            writer.close()
        clock.seconds["writing, beside the walk"] = writer.busy_seconds
        say(f"fuse: {unit.name}: done in {time.perf_counter() - started:.0f} s: {clock.summary()}")

    def _walk_memory(self) -> int | None:
        """What a walk may hold on this worker's GPU beside the model it loaded (None: on a CPU, or
        with no share of the GPU claimed, the walk's fixed budgets)."""
        import torch

        if self.device != "cuda" or self.gpu_share <= 0:
            return None
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        memory = walk_memory(total, self.gpu_share, torch.cuda.memory_allocated())
        say(f"fuse: bulk GPTQ walk: {memory / 2**30:.1f} GiB of the GPU for layer inputs and batches "
            f"(num_gpus {self.gpu_share:g} of a {total / 2**30:.0f} GiB GPU, less the model and a reserve)")
        return memory

    def _shard_hessians(self, shard_file: str, targets: list[ShardTarget]) -> dict[str, dict[str, SiteHessian]]:
        """pool -> weight -> Hessian, for this shard's weights, of every Hessian set its bulk-GPTQ targets read."""
        hessians = {}
        for pool in sorted({t.hessian_pool for t in targets if GPTQ in t.schemes}):
            key = hessian_key(self.order.job, pool)
            if shard_file not in self.store.read_manifest(key)["files"]:
                hessians[pool] = {}  # a shard with no quantized weight
                continue
            with self.store.local_copy(key, [shard_file]) as folder:
                hessians[pool] = read_hessians(folder / shard_file, self.device)
        return hessians

    def fuse_shard(self, shard_file: str, targets: list[ShardTarget], drafts: dict[str, Draft]) -> dict:
        """Merge one base shard for every target and upload each output as a part of its artifact's
        version (drafts: "<tenant>/<variant>" -> the version the driver began)."""
        started = start_unit()
        with self._base([shard_file]) as folder:
            base = load_shard(folder / shard_file, self.device)
        deltas = {target.tenant: self._tenant_deltas(target.tenant) for target in targets}
        hessians = self._shard_hessians(shard_file, targets)
        out_dir = self.cache / "out" / shard_file
        parts = {}

        def upload(tenant: str, variant: str, output) -> None:
            described = self.store.put_part(drafts[f"{tenant}/{variant}"], shard_file, output.path)
            output.path.unlink()
            parts[f"{tenant}/{variant}"] = {**described, "tensors": list(output.tensors),
                                            "tensor_bytes": output.tensor_bytes, "seconds": output.seconds}

        try:
            fuse_shard(base, targets, deltas, self.quantized, out_dir, shard_file, on_output=upload,
                       hessians=hessians, gptq=self.order.gptq)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        del base, hessians
        release_gpu_cache()
        return {"shard": shard_file, "parts": parts, "seconds": round(time.perf_counter() - started, 3), **worker_facts()}

    def fuse_gptq(self, target: ShardTarget, inputs: dict) -> dict:
        """Merge all shards for one tenant locally, GPTQ-quantize on its training rows, publish. Returns the manifest."""
        from transformers import AutoTokenizer

        from qlora_ray.fuse.gptq import calibration_texts, gptq_quantize

        started = start_unit()
        variant = FusedVariant("gptq-int4", target.merge_base).name
        key = fused_key(self.order.job, target.tenant, variant)
        work = self.cache / "gptq" / target.tenant / variant
        try:
            merged = self._merge_locally(target, work / "merged")
            merge_seconds = round(time.perf_counter() - started, 2)
            rows = fetch_rows(self.store, self.order.job, target.tenant, TRAIN_FILE, work / "data")
            texts = calibration_texts(rows, AutoTokenizer.from_pretrained(str(merged)), self.order.gptq.calibration_samples)
            metrics = gptq_quantize(merged, work / "out", texts, self.order.gptq, device=self.device)
            metrics.update(seconds=round(time.perf_counter() - started, 2), merge_seconds=merge_seconds, **worker_facts())
            metrics["worker_node_ids"] = [metrics.pop("worker_node_id")]  # as a shard-wise artifact lists them
            metrics["worker_gpu_ids"] = sorted(metrics["worker_gpu_ids"])
            metrics["size_bytes"] = sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file())
            # Another run of this job may have published it first: then that one is kept.
            return self.store.publish(key, work / "out", kind="fused", inputs=inputs, metrics=metrics, keep_existing=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _merge_locally(self, target: ShardTarget, out: Path) -> Path:
        """A complete 16-bit HF folder of one tenant merged into one merge base, built shard by shard."""
        files = list(self.store.read_manifest(base_key(self.order.base))["files"])
        bf16 = ShardTarget(target.tenant, target.merge_base, ("bf16",), target.trained_format, target.output_format)
        deltas = {target.tenant: self._tenant_deltas(target.tenant)}
        with self._base(files) as base_dir:
            for shard_file in sorted(f for f in files if f.endswith(".safetensors")):
                base = load_shard(base_dir / shard_file, self.device)
                (output,) = fuse_shard(base, [bf16], deltas, self.quantized, out / "parts", shard_file).values()
                output.path.rename(out / shard_file)
                del base
            shutil.rmtree(out / "parts")
            for rel in files:  # config, tokenizer, chat template, index: as the base's
                if not rel.endswith(".safetensors"):
                    shutil.copy2(base_dir / rel, out / rel)
        return out


class _StreamWriter:
    """Assembles and uploads each tenant's file of a base shard once the walk has quantized every
    weight of the shard: its packed tensors, and the shard's other tensors merged and kept in 16 bits
    as fuse_shard's gptq-int4 keeps them.

    The files are written by one thread beside the walk: saving, hashing and uploading a tenant's
    shard file is CPU and network work, which the GPU need not wait for. The walk hands over only
    what is ready; the thread owns it from there."""

    def __init__(self, worker: FuseWorker, unit: StreamUnit, tenants: list[StreamTenant], names: dict[str, str],
                 base_dir: Path, parts: dict[str, dict], out: Path):
        from concurrent.futures import ThreadPoolExecutor

        weight_map = json.loads((base_dir / INDEX_NAME).read_text())["weight_map"]
        self.shards: dict[str, set[str]] = {}
        for name, shard_file in weight_map.items():
            self.shards.setdefault(shard_file, set()).update({name} & worker.quantized)
        self.worker, self.unit, self.tenants, self.names = worker, unit, tenants, names
        self.base_dir, self.parts, self.out = base_dir, parts, out
        self.packed: dict[str, dict] = {t.name: {} for t in tenants}
        self.seconds = {t.name: 0.0 for t in tenants}
        self.done: set[str] = set()
        self.written: set[str] = set()
        self.busy_seconds = 0.0  # the thread's time writing
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-writer")
        self._writes: list = []

    def add(self, packed: dict[str, dict], seconds: dict[str, float]) -> None:
        for tenant, tensors in packed.items():
            self.packed[tenant].update(tensors)
            self.seconds[tenant] += seconds[tenant]
            self.done.update(f"{key.rsplit('.', 1)[0]}.weight" for key in tensors)

    def write_ready(self) -> None:
        """Hand every shard whose weights are all quantized to the thread; raise what a write raised."""
        for shard_file, weights in sorted(self.shards.items()):
            if shard_file in self.written or not weights <= self.done:
                continue
            prefixes = {weight.removesuffix("weight") for weight in weights}
            packed = {tenant: {key: tensors.pop(key) for key in [k for k in tensors if k.rsplit(".", 1)[0] + "." in prefixes]}
                      for tenant, tensors in self.packed.items()}
            seconds, self.seconds = self.seconds, {t.name: 0.0 for t in self.tenants}
            self._writes.append(self._thread.submit(self._write_shard, shard_file, packed, seconds))
            self.written.add(shard_file)
        for write in [w for w in self._writes if w.done()]:
            write.result()
            self._writes.remove(write)

    def _write_shard(self, shard_file: str, packed: dict[str, dict], seconds: dict[str, float]) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        began_shard = time.perf_counter()
        with safe_open(str(self.base_dir / shard_file), framework="pt", device=self.worker.device) as handle:
            base = {name: handle.get_tensor(name) for name in handle.keys() if name not in self.worker.quantized}
        for tenant in self.tenants:
            began = time.perf_counter()
            deltas = tenant.deltas
            tensors = {name: checkpoint_copy(fuse_weight(tensor, deltas[name]) if name in deltas else tensor)
                       for name, tensor in base.items()}
            tensors.update(packed.pop(tenant.name))
            path = self.out / tenant.name / shard_file
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata={"format": "pt"})
            name = self.names[tenant.name]
            described = self.worker.store.put_part(self.unit.drafts[name], shard_file, path)
            path.unlink()
            spent = seconds[tenant.name] + time.perf_counter() - began
            self.parts[name][shard_file] = {**described, "tensors": sorted(tensors), "seconds": round(spent, 3),
                                            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
            del tensors
        self.busy_seconds += time.perf_counter() - began_shard

    def finish(self) -> None:
        """Wait for every write (raising the first that failed), and check every shard was written."""
        for write in self._writes:
            write.result()
        self._writes.clear()
        missing = sorted(set(self.shards) - self.written)
        if missing:
            raise ValueError(f"the walk left base shard(s) {missing[:3]} with weights it did not quantize")

    def close(self) -> None:
        """Stop the thread: writes not begun are dropped, one under way ends first (before the caller
        removes the folder it writes in)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
