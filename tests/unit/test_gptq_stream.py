"""Bulk GPTQ's walk with per-tenant Hessians against the same steps taken one by one: each tenant's
merged model captured whole, each weight solved alone."""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_ray.fuse.gptq_bulk import pack_gptq, quantize_config, solve_stacked
from qlora_ray.fuse.gptq_stream import StageClock, StreamTenant, quantize_tenants_layerwise
from qlora_ray.fuse.hessians import capture_hessians, padded_batches
from qlora_ray.fuse.math import LoraDelta, fuse_weight
from qlora_ray.spec import GptqSpec
from tests.unit.test_gptq_bulk import LINEARS, _tiny_llama

pytest.importorskip("gptqmodel")

EMBEDDINGS = "model.embed_tokens.weight"
NAMES = frozenset(f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in LINEARS)
SPEC = GptqSpec(group_size=16)
ROWS = {"acme": [[1, 5, 9, 3, 4], [7, 8], [2, 3, 4, 5, 6, 7, 8, 9, 10]], "globex": [[11, 12, 13], [40, 41, 42, 43, 44, 45]]}


def deltas(model: torch.nn.Module, seed: int) -> dict[str, LoraDelta]:
    """A rank-2 LoRA on every quantized weight and on the embeddings, large enough to change what GPTQ sees."""
    generator = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    found = {name: LoraDelta(name, torch.randn(2, weights[name].shape[1], generator=generator) * 0.3,
                             torch.randn(weights[name].shape[0], 2, generator=generator) * 0.3, 1.0)
             for name in sorted(NAMES)}  # sorted: the draws must not follow the process's string hashing
    vocab, width = weights[EMBEDDINGS].shape
    found[EMBEDDINGS] = LoraDelta(EMBEDDINGS, torch.randn(2, vocab, generator=generator),
                                  torch.randn(width, 2, generator=generator), 1.0, embedding=True)
    return found


def walk(model: torch.nn.Module, tenants: dict[str, int], *, sequential: bool,
         park: str | None = None, memory: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    before = {name: p.data.clone() for name, p in model.named_parameters()}
    start = {name: tensor for name, tensor in before.items() if name in NAMES}
    walkers = [StreamTenant(name, deltas(model, seed), list(padded_batches(ROWS[name], 2, 0, "cpu")))
               for name, seed in tenants.items()]
    packed: dict[str, dict[str, torch.Tensor]] = {name: {} for name in tenants}
    layers = []

    def on_layer(index, tensors, seconds):
        layers.append(index)
        assert set(tensors) == set(seconds) == set(tenants)
        for name, part in tensors.items():
            packed[name].update(part)

    clock = StageClock(torch.device("cpu"))
    quantize_tenants_layerwise(model, start, walkers, quantize_config(SPEC), SPEC.bits, sequential=sequential,
                               park=park, on_layer=on_layer, clock=clock, memory=memory)
    assert layers == [0, 1]
    assert set(clock.seconds) == {"first inputs", "park", "merge", "hessians", "solve", "pack", "advance"}
    for name, parameter in model.named_parameters():  # the embeddings too, merged in for each tenant's catch
        assert torch.equal(parameter.data, before[name]), f"{name} was not put back"
    return packed


def test_without_sequential_each_weight_is_solved_against_its_merged_models_hessian():
    """The reference: the tenant's merged model (its embeddings too) captured in one forward, each
    weight solved alone."""
    model = _tiny_llama()
    ours = walk(model, {"acme": 0}, sequential=False)["acme"]

    merged = copy.deepcopy(model)
    for name, delta in deltas(model, 0).items():
        parameter = merged.get_parameter(name)
        parameter.data = fuse_weight(parameter.data, delta)
    hessians = capture_hessians(merged, padded_batches(ROWS["acme"], 2, 0, "cpu"), NAMES)
    config = quantize_config(SPEC)
    expected = set()
    for name in sorted(NAMES):
        site = hessians.weight_sites[name]
        (codes,) = solve_stacked([merged.get_parameter(name).data], hessians.normalized(site), hessians.tokens[site], config)
        for key, tensor in pack_gptq(name, codes, SPEC.bits).items():
            expected.add(key)
            if key.endswith(".scales"):
                torch.testing.assert_close(ours[key].float(), tensor.float(), rtol=1e-3, atol=1e-4)
            else:
                assert (ours[key] == tensor).float().mean() > 0.99, key
    assert sorted(ours) == sorted(expected)


@pytest.mark.parametrize("one_batch", [True, False])
def test_tenants_walked_together_get_what_each_gets_alone(one_batch, monkeypatch):
    """Together with their layer inputs parked between turns (on a GPU worker: on the CPU), alone
    without; solved in one batch, or each in a batch of its own (a batch too large for memory)."""
    if not one_batch:
        monkeypatch.setattr("qlora_ray.fuse.gptq_stream.BATCH_BYTES", 1)
    together = walk(_tiny_llama(), {"acme": 0, "globex": 1}, sequential=True, park="cpu")
    for name, seed in (("acme", 0), ("globex", 1)):
        alone = walk(_tiny_llama(), {name: seed}, sequential=True)[name]
        assert sorted(alone) == sorted(together[name])
        for key in alone:
            assert torch.equal(alone[key], together[name][key]), key
    assert not torch.equal(together["acme"]["model.layers.0.mlp.down_proj.qweight"],
                           together["globex"]["model.layers.0.mlp.down_proj.qweight"])


def test_sequential_changes_the_layers_after_the_first():
    plain = walk(_tiny_llama(), {"acme": 0}, sequential=False)["acme"]
    sequential = walk(_tiny_llama(), {"acme": 0}, sequential=True)["acme"]
    for part in ("qweight", "scales"):  # layer 0 reads the embeddings either way
        assert torch.equal(plain[f"model.layers.0.self_attn.q_proj.{part}"], sequential[f"model.layers.0.self_attn.q_proj.{part}"])
    assert not torch.equal(plain["model.layers.1.self_attn.q_proj.qweight"], sequential["model.layers.1.self_attn.q_proj.qweight"])


def test_weights_outside_the_decoder_layers_are_refused():
    model = _tiny_llama()
    start = {"lm_head.weight": model.lm_head.weight.data}
    with pytest.raises(ValueError, match="outside the decoder layers"):
        quantize_tenants_layerwise(model, start, [], quantize_config(SPEC), 4, on_layer=lambda *_: None)


def test_parked_layer_inputs_move_every_tensor_they_hold():
    """Hidden states, the positions' (cos, sin) pair, masks, the padding flags: all go where the input is parked."""
    from qlora_ray.fuse.hessians import catch_layer_inputs

    (entry,) = catch_layer_inputs(_tiny_llama(), padded_batches(ROWS["acme"], 3, 0, "cpu"))
    entry.to("meta")

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from tensors(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)

    found = list(tensors([entry.hidden, entry.args, entry.kwargs, entry.keep]))
    assert len(found) >= 4 and all(t.device.type == "meta" for t in found)
    assert isinstance(entry.kwargs["position_embeddings"], tuple)
    assert entry.nbytes == sum(t.numel() * t.element_size() for t in found)


def test_only_the_tenants_past_the_resident_budget_are_parked(monkeypatch):
    """The first tenant's inputs fit the budget and stay put; the second's go to the park and back each turn."""
    import qlora_ray.fuse.gptq_stream as stream
    from qlora_ray.fuse.hessians import catch_layer_inputs

    model = _tiny_llama()
    first = sum(e.nbytes for e in catch_layer_inputs(model, padded_batches(ROWS["acme"], 2, 0, "cpu")))
    monkeypatch.setattr(stream, "RESIDENT_INPUT_BYTES", first)
    moves = []
    real = stream._move
    monkeypatch.setattr(stream, "_move", lambda inputs, device: (moves.append((len(inputs), str(device))),
                                                                   real(inputs, device)))
    walk(model, {"acme": 0, "globex": 1}, sequential=True, park="cpu")
    acme, globex = len(ROWS["acme"]) // 2 + 1, len(ROWS["globex"]) // 2  # batches of 2 rows
    assert {count for count, device in moves if device != "None"} == {globex}
    # parked after the catch; then each of 2 layers brings it to the model's device (also the CPU
    # here) and parks it again, for the Hessian passes of its 4 sites (q/k/v, o, gate/up, down) and
    # for the advance
    assert moves.count((globex, "cpu")) == 1 + 2 * 2 * (4 + 1)
    assert moves.count((acme, "cpu")) == 0


@pytest.mark.parametrize(("memory", "batch", "parked"), [(0, 1, True), (2**40, 2, False)])
def test_the_walks_memory_sizes_its_batches_and_what_it_parks(memory, batch, parked, monkeypatch):
    """With no memory beside the model, each tenant is solved alone and every tenant's inputs are
    parked; with plenty, both tenants are solved in one batch and none waits on the park."""
    import qlora_ray.fuse.gptq_stream as stream

    sizes, moves = [], []
    real_solve, real_move = stream.solve_batched, stream._move
    monkeypatch.setattr(stream, "solve_batched", lambda weights, *rest: (sizes.append(len(weights)),
                                                                         real_solve(weights, *rest))[1])
    monkeypatch.setattr(stream, "_move", lambda inputs, device: (moves.append(device), real_move(inputs, device)))
    walk(_tiny_llama(), {"acme": 0, "globex": 1}, sequential=True, park="cpu", memory=memory)
    assert set(sizes) == {batch}
    assert any(device is not None for device in moves) == parked


def test_walk_memory_is_the_workers_share_less_a_reserve_and_what_it_holds():
    from qlora_ray.fuse.gptq_stream import walk_memory

    gib = 2**30
    assert walk_memory(160 * gib, 0.25, 16 * gib) == 40 * gib - 4 * gib - 16 * gib  # the reserve's floor
    assert walk_memory(160 * gib, 1.0, 16 * gib) == 160 * gib - 16 * gib - 16 * gib  # a tenth of the share
    assert walk_memory(160 * gib, 2.0, 16 * gib) == walk_memory(160 * gib, 1.0, 16 * gib)  # one device at most
    assert walk_memory(16 * gib, 0.5, 8 * gib) == 0


def test_a_tenants_share_of_a_batch_counts_its_copies_of_the_layer_and_its_largest_solve():
    from qlora_ray.fuse.gptq_stream import tenant_batch_bytes

    start = {"up": torch.empty(64, 16, dtype=torch.bfloat16), "down": torch.empty(16, 64, dtype=torch.bfloat16)}
    merged, quantized = 2 * (64 * 16 + 16 * 64), 4 * (64 * 16 + 16 * 64)  # the base's dtype; float32
    assert tenant_batch_bytes(start) == merged + quantized + 4 * 2 * (16 * 64 + 64 * 64)  # down: the larger Hessian


def test_a_layer_pass_ends_once_its_weights_have_read_their_inputs():
    """layer_sites finds the sites in the forward's order; a pass summing one site's Hessian stops at
    it (the MLP never runs for q/k/v) and sums what a pass of the whole layer sums."""
    from qlora_ray.fuse.hessians import catch_layer_inputs, decoder_layers, layer_hessians, layer_sites

    model = _tiny_llama()
    layer, prefix = decoder_layers(model)[0]
    inputs = catch_layer_inputs(model, padded_batches(ROWS["acme"], 2, 0, "cpu"))
    weights = frozenset(name for name in NAMES if name.startswith(prefix))
    sites = layer_sites(layer, prefix, weights, inputs[0])
    assert [[name.removeprefix(prefix) for name in site] for site in sites] == [
        ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"], ["self_attn.o_proj.weight"],
        ["mlp.gate_proj.weight", "mlp.up_proj.weight"], ["mlp.down_proj.weight"]]
    mlp_runs = []
    handle = layer.mlp.register_forward_pre_hook(lambda *_: mlp_runs.append(1))
    try:
        whole = layer_hessians(layer, prefix, weights, inputs)
        assert len(mlp_runs) == len(inputs)  # down_proj reads its input inside the MLP
        mlp_runs.clear()
        first = layer_hessians(layer, prefix, frozenset(sites[0]), inputs)
        assert not mlp_runs
    finally:
        handle.remove()
    site = whole.weight_sites[sites[0][0]]
    assert set(first.sums) == {site} and first.tokens[site] == whole.tokens[site]
    assert torch.equal(first.sums[site], whole.sums[site])
