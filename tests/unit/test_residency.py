"""The resident models of a replica (serve/residency.py), driven with fake models: fair shares of the
room between tenants, eviction only of idle models and with their memory freed, loads bounded per
tenant, a byte budget, and failed loads."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
import torch

from qlora_ray.serve.catalog import ModelEntry
from qlora_ray.serve.residency import Holding, ResidentModels, TenantLoadsExceeded, choose_victim


def entry(model_id: str, size: int = 0) -> ModelEntry:
    tenant, variant = model_id.split("/")
    return ModelEntry(model_id, tenant, variant, f"runs/j/fused/{model_id}", size)


class Loads:
    """A fake loader that counts loads and releases; each load takes `seconds`."""

    def __init__(self, seconds: float = 0.0, fail: set[str] = frozenset()):
        self.seconds, self.fail = seconds, set(fail)
        self.loaded: list[str] = []
        self.released: list[str] = []

    async def load(self, model: ModelEntry):
        await asyncio.sleep(self.seconds)
        if model.id in self.fail:
            raise OSError(f"{model.id}: damaged")
        self.loaded.append(model.id)
        return model

    def release(self, model: ModelEntry) -> None:
        self.released.append(model.id)


async def ask(models: ResidentModels, model_id: str, hold: float = 0.0) -> None:
    async with models.use(entry(model_id)):
        await asyncio.sleep(hold)


def test_a_tenant_cycling_through_its_own_models_never_evicts_another_tenants():
    async def scenario():
        loads = Loads()
        models = ResidentModels(loads.load, loads.release, max_models=2)
        await ask(models, "b/bf16")
        for _ in range(3):
            for model_id in ("a/bf16", "a/nf4", "a/gptq-int4", "b/bf16"):
                await ask(models, model_id)
        return loads

    loads = asyncio.run(scenario())
    assert loads.loaded.count("b/bf16") == 1
    assert "b/bf16" not in loads.released
    assert loads.loaded.count("a/bf16") == 3  # a's three models took turns in a's one slot


def test_a_tenant_below_its_share_takes_room_from_one_above_it():
    async def scenario():
        loads = Loads()
        models = ResidentModels(loads.load, loads.release, max_models=3)
        for model_id in ("a/x", "a/y", "b/x", "c/x"):
            await ask(models, model_id)
        return loads, models

    loads, models = asyncio.run(scenario())
    assert loads.released == ["a/x"]  # a held two of three slots; b's one slot is its share
    assert sorted(models.resident_ids()) == ["a/y", "b/x", "c/x"]


def test_choose_victim_shares_room_by_bytes_too():
    holdings = [Holding("a/big", "a", 1.0, False, 0.7), Holding("b/small", "b", 0.0, False, 0.2)]
    assert choose_victim(holdings, "c") == "a/big"  # a is over its third; b's older model is within its share
    assert choose_victim(holdings, "b") == "a/big"
    assert choose_victim(holdings, "a") == "a/big"
    busy = [Holding("a/big", "a", 1.0, True, 0.7), Holding("b/small", "b", 0.0, False, 0.2)]
    assert choose_victim(busy, "a") is None  # a holds its share and its model is busy: a waits
    assert choose_victim(busy, "c") == "b/small"


def test_eviction_waits_for_requests_in_flight():
    async def scenario():
        loads = Loads()
        models = ResidentModels(loads.load, loads.release, max_models=1)
        events = []

        async def long_request():
            async with models.use(entry("a/bf16")):
                events.append("a started")
                await asyncio.sleep(0.3)
                events.append("a finished")

        async def other_tenant():
            await asyncio.sleep(0.05)
            async with models.use(entry("b/bf16")):
                events.append("b started")

        await asyncio.gather(long_request(), other_tenant())
        return events, loads

    events, loads = asyncio.run(scenario())
    assert events == ["a started", "a finished", "b started"]
    assert loads.released == ["a/bf16"]


class FakeEngine:
    continuous, device, stop_ids, context, max_batch = True, torch.device("cpu"), set(), 64, 2

    def __init__(self):
        self.weights = torch.ones(1 << 20)

    def prefill(self, slots, chunks, starts):
        return torch.zeros(len(chunks), 8)

    def decode(self, slots, tokens):
        return torch.zeros(len(tokens), 8)

    def release(self, slot):
        pass


def test_an_evicted_model_is_really_freed():
    from qlora_ray.serve.loading import LoadedModel
    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.spec import ServeSpec

    engines = []

    async def load(model: ModelEntry):
        engine = FakeEngine()
        engines.append(weakref.ref(engine))
        return LoadedModel(model, engine, None, engine.weights.nbytes, 0.0, ServeSpec(max_batch=2))

    async def scenario():
        models = ResidentModels(load, LoadedModel.close, max_models=1)
        async with models.use(entry("a/bf16")) as model:
            async for _ in model.batcher.tokens([1, 2, 3], SamplingParams(max_new_tokens=4)):
                pass  # the batcher's worker thread ran, and holds the engine while it runs
        await ask(models, "b/bf16")
        return models

    models = asyncio.run(scenario())
    gc.collect()
    assert engines[0]() is None, "the evicted engine is still referenced"
    assert engines[1]() is not None and models.resident_ids() == ["b/bf16"]


def test_loads_are_bounded_per_tenant_and_one_models_requests_share_its_load():
    async def scenario():
        loads = Loads(seconds=0.2)
        models = ResidentModels(loads.load, loads.release, max_models=4)
        first = asyncio.create_task(ask(models, "a/bf16"))
        same = asyncio.create_task(ask(models, "a/bf16"))
        other_tenant = asyncio.create_task(ask(models, "b/bf16"))
        await asyncio.sleep(0.05)
        with pytest.raises(TenantLoadsExceeded, match="tenant 'a' already has 1 model load"):
            await ask(models, "a/nf4")
        await asyncio.gather(first, same, other_tenant)
        await ask(models, "a/nf4")  # its load is done: a may load another
        return loads

    loads = asyncio.run(scenario())
    assert loads.loaded == ["a/bf16", "b/bf16", "a/nf4"]


def test_a_byte_budget_evicts_until_the_new_model_fits():
    async def scenario():
        loads = Loads()
        models = ResidentModels(loads.load, loads.release, max_models=10, memory_budget=100)
        for model_id, size in (("a/x", 40), ("b/x", 40), ("a/y", 50)):
            async with models.use(entry(model_id, size)):
                pass
        return loads, models

    loads, models = asyncio.run(scenario())
    assert loads.released == ["a/x"]
    assert sorted(models.resident_ids()) == ["a/y", "b/x"]


def test_a_failed_load_fails_its_waiting_requests_and_the_next_request_loads_again():
    async def scenario():
        loads = Loads(seconds=0.1, fail={"a/bf16"})
        models = ResidentModels(loads.load, loads.release, max_models=2)
        results = await asyncio.gather(ask(models, "a/bf16"), ask(models, "a/bf16"), return_exceptions=True)
        loads.fail.clear()
        await ask(models, "a/bf16")
        return results, loads, models

    results, loads, models = asyncio.run(scenario())
    assert all(isinstance(r, OSError) and "damaged" in str(r) for r in results)
    assert loads.loaded == ["a/bf16"] and models.resident_ids() == ["a/bf16"]


def test_a_client_gone_during_a_load_does_not_cancel_it():
    async def scenario():
        loads = Loads(seconds=0.2)
        models = ResidentModels(loads.load, loads.release, max_models=2)
        task = asyncio.create_task(ask(models, "a/bf16"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.3)
        await ask(models, "a/bf16")
        return loads

    assert asyncio.run(scenario()).loaded == ["a/bf16"]


class WedgedEngine(FakeEngine):
    def decode(self, slots, tokens):
        time.sleep(1.0)  # a device that stopped answering
        return super().decode(slots, tokens)


def test_the_health_check_fails_a_replica_whose_generation_step_hangs(monkeypatch, caplog):
    from qlora_ray.serve import replica
    from qlora_ray.serve.loading import LoadedModel
    from qlora_ray.serve.sampling import SamplingParams
    from qlora_ray.spec import ServeSpec

    monkeypatch.setattr(replica, "STALLED_STEP_SECONDS", 0.3)
    server = replica.ModelServer.func_or_class.__new__(replica.ModelServer.func_or_class)
    server.device = "cpu"

    async def load(model: ModelEntry):
        return LoadedModel(model, WedgedEngine(), None, 0, 0.0, ServeSpec(max_batch=2))

    async def scenario():
        server.models = ResidentModels(load, LoadedModel.close, max_models=1)
        async with server.models.use(entry("a/bf16")) as model:
            server.check_health()  # idle: healthy
            tokens = model.batcher.tokens([1, 2], SamplingParams(max_new_tokens=3))
            await tokens.__anext__()  # the prefill's token; the first decode step now hangs for 1 s
            await asyncio.sleep(0.6)
            with pytest.raises(RuntimeError, match="a/bf16: one generation step has run for"):
                server.check_health()
            await tokens.aclose()

    asyncio.run(scenario())
    assert "the step loop is at" in caplog.text and "in decode" in caplog.text  # where it hangs, logged


def test_a_load_hands_the_gil_over_sooner_and_restores_the_interval_after():
    """While a model loads beside the steps of others, the step loop wins the GIL back sooner; the
    process's interval is restored after the load, whether it succeeded or failed."""
    import sys

    from qlora_ray.serve import replica

    server = replica.ModelServer.func_or_class.__new__(replica.ModelServer.func_or_class)
    default = sys.getswitchinterval()
    server._load_entry = lambda entry: sys.getswitchinterval()
    during = server._load_beside_the_steps(entry("a/bf16"))  # CPython keeps it in whole microseconds
    assert during == pytest.approx(replica.LOADING_GIL_SWITCH_INTERVAL_S) and during < default
    assert sys.getswitchinterval() == default

    def failing(entry):
        raise RuntimeError("no such model")

    server._load_entry = failing
    with pytest.raises(RuntimeError, match="no such model"):
        server._load_beside_the_steps(entry("a/bf16"))
    assert sys.getswitchinterval() == default
