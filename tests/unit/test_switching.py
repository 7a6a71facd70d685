"""Model switches without a rebuild (serve/switching.py) on tiny random Llamas (fp32, CPU): an engine
that takes over another model's weights generates exactly what that model generates alone, through
the host tier and from the store; what cannot be copied safely is never copied."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from qlora_ray.serve.catalog import ModelEntry
from qlora_ray.serve.engine import StaticEngine
from qlora_ray.serve.scheduler import generate
from qlora_ray.serve.switching import (
    HostImage,
    HostTier,
    ModelSwitcher,
    copy_weights,
    host_bytes,
    host_copy,
    signature,
    weight_tensors,
)
from qlora_ray.serve.weights import build_decoder
from qlora_ray.shapes import byte_tokenizer, shape_config
from qlora_ray.spec import load_spec
from qlora_ray.store import Store, fused_key
from tests.unit.test_engine import PROMPTS, alone, columns, greedy


def tiny_model(seed: int, **config_changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = shape_config("tiny")
    for name, value in config_changes.items():
        setattr(config, name, value)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # the engines here know no stop token either
    return model


def decoder_of(model):
    return build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cpu"), dtype=torch.float32)


def answers(engine) -> list[list[int]]:
    return columns(list(generate(engine, PROMPTS, [greedy()] * len(PROMPTS))))


def test_an_engine_given_another_models_weights_generates_as_that_model_alone():
    first, second = tiny_model(0), tiny_model(1)
    engine = StaticEngine(decoder_of(first), set(), context=64, max_batch=4)
    first_answers = answers(engine)
    assert first_answers == [alone(first, p) for p in PROMPTS]
    kept = host_copy(weight_tensors(engine.decoder))  # the first model's image, before it is overwritten

    other = decoder_of(second)
    assert signature(engine.decoder, weight_tensors(engine.decoder)) == signature(other, weight_tensors(other))
    copy_weights(weight_tensors(engine.decoder), weight_tensors(other))
    engine.serve_another(set())
    assert answers(engine) == [alone(second, p) for p in PROMPTS] != first_answers

    copy_weights(weight_tensors(engine.decoder), kept)  # and back, from host memory
    engine.serve_another(set())
    assert answers(engine) == first_answers


@pytest.mark.parametrize("change", [{"intermediate_size": 96}, {"rms_norm_eps": 1e-6}, {"rope_theta": 5000.0}])
def test_models_that_compute_differently_have_different_signatures(change):
    base, other = decoder_of(tiny_model(0)), decoder_of(tiny_model(0, **change))
    assert signature(base, weight_tensors(base)) != signature(other, weight_tensors(other))


def test_weights_with_state_beside_them_are_never_copied():
    class QuantizedWeight(torch.nn.Parameter):  # as bitsandbytes' Params4bit: a tensor plus its quant state
        pass

    decoder = decoder_of(tiny_model(0))
    decoder.norm.weight = QuantizedWeight(decoder.norm.weight.data, requires_grad=False)
    assert weight_tensors(decoder) is None
    with pytest.raises(ValueError, match="do not match"):
        copy_weights({"a": torch.zeros(2)}, {"b": torch.zeros(2)})


def test_the_host_tier_keeps_the_most_recently_used_within_its_budget():
    def image(values: int) -> HostImage:
        tensors = {"w": torch.zeros(values)}
        return HostImage("sig", tensors, host_bytes(tensors, pinned=False), None, set(), 0)

    tier = HostTier(budget_bytes=3 * 400)
    for name in ("a", "b", "c"):
        tier.put(name, image(100))  # 400 bytes each
    assert tier.get("a") is not None  # a is now the most recent
    tier.put("d", image(100))
    assert tier.ids() == ["c", "a", "d"]
    assert not tier.fits(1201) and tier.fits(1200) and not HostTier(0).fits(1)


@pytest.fixture
def published(tmp_path):
    """Three tiny models' folders in a store, as the fuse stage publishes them, and a job spec."""
    store = Store(str(tmp_path / "store"))
    models = {}
    for seed, tenant in enumerate(("acme", "globex", "initech")):
        model = tiny_model(seed)
        folder = tmp_path / tenant
        model.save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        store.publish(fused_key("t", tenant, "bf16.original"), folder, kind="fused", inputs={})
        models[tenant] = model
    job = {"name": "t", "store": store.uri, "base": {"name": "b", "source": "shape:tiny"},
           "tenants": [{"id": t, "train_data": str(tmp_path / "unused.jsonl")} for t in models],
           "serve": {"context": 64, "max_batch": 4, "host_memory": "64MB"}}
    (tmp_path / "unused.jsonl").write_text("")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return store, load_spec(tmp_path / "job.yaml"), models


def entry(store, tenant: str) -> ModelEntry:
    from qlora_ray.manifest import manifest_digest

    key = fused_key("t", tenant, "bf16.original")
    return ModelEntry(f"{tenant}/bf16.original", tenant, "bf16.original", key, size_bytes=1,
                      version=manifest_digest(store.read_manifest(key)))


def test_switches_reuse_an_evicted_models_engine_and_the_host_tier(published):
    """As a replica that holds one model switches between three: after the first load, each model
    takes over the engine of the one it replaces, from the store the first time and from host
    memory after that, and answers as it does alone."""
    store, spec, models = published
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=64 * 2**20)
    first_engine, seen, first_load_phases = None, [], {}
    for tenant in ("acme", "globex", "initech", "acme", "globex"):
        loaded = switcher.load(entry(store, tenant))
        first_engine = first_engine or loaded.engine
        assert loaded.engine is first_engine  # one engine, built and warmed once
        assert answers(loaded.engine) == [alone(models[tenant], p) for p in PROMPTS]
        seen.append(loaded.loaded_from)
        first_load_phases = first_load_phases if seen[1:] else loaded.load_phases
        switcher.release(loaded)
    assert seen == ["the store", "the store, into a spare engine", "the store, into a spare engine",
                    "host memory, into a spare engine", "host memory, into a spare engine"]
    assert switcher.host_models() == ["initech/bf16.original", "acme/bf16.original", "globex/bf16.original"]
    assert "host copy" in first_load_phases


def test_without_a_spare_engine_or_host_room_a_model_loads_from_the_store(published):
    store, spec, models = published
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=0)
    acme = switcher.load(entry(store, "acme"))
    globex = switcher.load(entry(store, "globex"))  # acme still resident: no spare to take
    assert (acme.loaded_from, globex.loaded_from) == ("the store", "the store")
    assert acme.engine is not globex.engine and switcher.host_models() == []
    switcher.release(acme)
    again = switcher.load(entry(store, "acme"))  # not in host memory: from the store, into acme's old engine
    assert again.loaded_from == "the store, into a spare engine"
    assert answers(again.engine) == [alone(models["acme"], p) for p in PROMPTS]
    # Each load's parts are timed (no host copy: the host tier has no room).
    assert set(acme.load_phases) == {"read", "engine (compile and capture)"}
    assert set(again.load_phases) == {"read", "copy into the spare"}
    assert all(seconds >= 0 for seconds in again.load_phases.values())
    assert sum(acme.load_phases.values()) <= acme.load_seconds


def test_a_spare_engine_no_load_can_take_is_freed_by_the_next_load(published, tmp_path):
    import gc
    import weakref

    store, spec, _ = published
    other = tiny_model(7, intermediate_size=96)  # another shape: it cannot take acme's engine
    folder = tmp_path / "umbrella"
    other.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    store.publish(fused_key("t", "umbrella", "bf16.original"), folder, kind="fused", inputs={})
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=0)
    acme = switcher.load(entry(store, "acme"))
    spare = weakref.ref(acme.engine)
    switcher.release(acme)
    del acme
    loaded = switcher.load(entry(store, "umbrella"))
    gc.collect()
    assert spare() is None, "the spare engine is still referenced"
    assert loaded.loaded_from == "the store" and switcher.spares.resident_bytes() == 0
    assert answers(loaded.engine) == [alone(other, p) for p in PROMPTS]


def test_a_model_fused_again_is_loaded_again_not_served_from_host_memory(published, tmp_path):
    store, spec, _ = published
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=64 * 2**20)
    switcher.release(switcher.load(entry(store, "acme")))
    switcher.release(switcher.load(entry(store, "globex")))
    refused = tiny_model(11)  # acme's model, fused again
    folder = tmp_path / "acme-again"
    refused.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    store.replace(fused_key("t", "acme", "bf16.original"), folder, kind="fused", inputs={})
    again = switcher.load(entry(store, "acme"))
    assert again.loaded_from == "the store, into a spare engine"
    assert answers(again.engine) == [alone(refused, p) for p in PROMPTS]


def test_a_failed_load_lets_the_spares_go(published):
    import dataclasses

    store, spec, _ = published
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=0)
    switcher.release(switcher.load(entry(store, "acme")))
    assert switcher.spares.resident_bytes() > 0
    missing = dataclasses.replace(entry(store, "globex"), key=fused_key("t", "nobody", "bf16.original"))
    with pytest.raises(Exception):
        switcher.load(missing)
    assert switcher.spares.resident_bytes() == 0


def test_the_residency_settles_the_spares_no_load_took(published):
    """Room by bytes, with the artifact's size too low an estimate: the second model loads beside
    the first, which the check after the load then evicts. Its engine is let go at once, not kept
    for a load that may never come."""
    import asyncio
    import weakref

    from qlora_ray.serve.residency import ResidentModels

    store, spec, _ = published
    switcher = ModelSwitcher(spec, store, "cpu", host_budget_bytes=0)
    one_model = switcher.load(entry(store, "acme")).resident_bytes
    switcher.settle()
    engines = []

    async def scenario():
        async def load(model):
            loaded = await asyncio.to_thread(switcher.load, model)
            engines.append(weakref.ref(loaded.engine))
            return loaded

        models = ResidentModels(load, switcher.release, max_models=2, memory_budget=int(1.5 * one_model),
                                settle=switcher.settle)
        for tenant in ("acme", "globex"):
            async with models.use(entry(store, tenant)) as model:
                assert model.entry.tenant == tenant
        return models

    models = asyncio.run(scenario())
    import gc

    gc.collect()
    assert models.resident_ids() == ["globex/bf16.original"] and switcher.spares.resident_bytes() == 0
    assert engines[0]() is None, "the evicted engine is still referenced"


def test_tied_weights_get_one_host_copy():
    weight = torch.randn(8, 4)
    tensors = {"embed": weight, "lm_head": weight, "norm": torch.ones(4)}
    copies = host_copy(tensors)
    assert copies["embed"] is copies["lm_head"] and torch.equal(copies["embed"], weight)
    assert host_bytes(copies, pinned=False) == host_bytes(tensors, pinned=False) == (8 * 4 + 4) * 4
