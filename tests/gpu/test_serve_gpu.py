"""The serving engine's CUDA paths: GPTQ weights repacked for GPTQModel's Marlin kernel, or for
torch's int4 kernel (decode) and dequantized by the compiled kernel (prompts), and decode steps
replayed from CUDA graphs.

Skipped without a CUDA GPU (CI has none); run on the lent H100 with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_ray.serve.decoder import DEQUANTIZE_ABOVE_ROWS, MarlinInt4Linear
from qlora_ray.serve.engine import FIRST_SPAN, StaticEngine
from qlora_ray.serve.sampling import SamplingParams
from qlora_ray.serve.scheduler import generate
from qlora_ray.serve.weights import build_decoder, gptq_dequantize, gptq_to_marlin, gptq_to_tinygemm, pack_int32
from qlora_ray.shapes import shape_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_gptq(out_features: int, in_features: int, group_size: int, act_order: bool, seed: int,
                symmetric: bool = False):
    """A GPTQ v1 linear with random 4-bit values, zero points (8 if symmetric) and scales
    (qweight, qzeros, scales, g_idx)."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=generator)
    zero_points = torch.randint(1, 16, (groups, out_features), generator=generator)
    if symmetric:
        zero_points.fill_(8)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).half()
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return pack_int32(q, 0), pack_int32(zero_points - 1, 1), scales, g_idx.int()


def one_input_parts(act_order: bool, symmetric: bool = False) -> list:
    """Two GPTQ projections of one input; in activation order, both in one column order, as GPTQ
    leaves the linears of one input (they share a Hessian)."""
    first, second = (random_gptq(256, 512, 128, act_order, seed, symmetric) for seed in range(2))
    return [first, (*second[:3], first[3])]


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_linear_matches_the_dequantized_weight_for_prompts_and_decode_steps(act_order):
    parts = one_input_parts(act_order)
    linear = gptq_to_tinygemm(parts, 128, torch.device("cuda"))
    assert linear is not None
    weight = torch.cat([gptq_dequantize(*part) for part in parts]).cuda()
    for rows in (1, DEQUANTIZE_ABOVE_ROWS + 31):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ weight.t()
        got = linear(x).float()
        error = (got - expected).norm() / expected.norm()
        assert error < 1e-2, (rows, error.item())
    if act_order:  # two column orders cannot share one input
        assert gptq_to_tinygemm([random_gptq(256, 512, 128, True, seed) for seed in range(2)], 128,
                                torch.device("cuda")) is None


@pytest.mark.parametrize("act_order", [False, True])
def test_marlin_linear_matches_the_dequantized_weight(act_order):
    """Symmetric GPTQ (the fuse stage's) on Marlin: two projections fused into one matmul; in
    activation order, their one column order read sorted by group; one row to a long prompt."""
    parts = one_input_parts(act_order, symmetric=True)
    linear = gptq_to_marlin(parts, 128, torch.device("cuda"))
    assert isinstance(linear, MarlinInt4Linear)
    weight = torch.cat([gptq_dequantize(*part) for part in parts]).cuda()
    for rows in (1, 8, 300):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ weight.t()
        error = (linear(x).float() - expected).norm() / expected.norm()
        assert error < 1e-2, (rows, error.item())
    assert gptq_to_marlin([random_gptq(256, 512, 128, False, 0)], 128, torch.device("cuda")) is None  # zero points vary
    if act_order:
        assert gptq_to_marlin([random_gptq(256, 512, 128, True, seed, symmetric=True) for seed in range(2)], 128,
                              torch.device("cuda")) is None


@pytest.mark.parametrize("int4_kernel", ["marlin", "auto"])
def test_marlin_decoder_generates_what_the_dequantized_decoder_generates(int4_kernel):
    """A whole GPTQ model through compiled layers and CUDA graphs on Marlin, greedy, against the same
    weights dequantized to bf16 (transformers' reference path for the math). Under "auto" these small
    weights run their one-row calls (decode at batch 1) on tinygemm."""
    # Every projection on Marlin's tiles (tiny's 64-wide layers are not): 256 wide, head_dim 64.
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    gptq, dense = {}, {}
    for index, (name, value) in enumerate(state.items()):
        if name.endswith("proj.weight"):
            out_features, in_features = value.shape
            qweight, qzeros, scales, g_idx = random_gptq(out_features, in_features, 64, False, index, symmetric=True)
            prefix = name.removesuffix(".weight")
            gptq.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales,
                         f"{prefix}.g_idx": g_idx})
            dense[name] = gptq_dequantize(qweight, qzeros, scales, g_idx).to(torch.bfloat16)
        else:
            gptq[name] = dense[name] = value
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    marlin = build_decoder(config, gptq, quant, device=torch.device("cuda"), dtype=torch.bfloat16, int4_kernel=int4_kernel)
    linears = [m for m in marlin.modules() if isinstance(m, MarlinInt4Linear)]
    assert len(linears) == 8
    assert all((linear.one_row is not None) == (int4_kernel == "auto") for linear in linears)
    reference = build_decoder(config, dense, None, device=torch.device("cuda"), dtype=torch.bfloat16)
    prompts = [[5, 17, 99, 3, 42], [(7 * i) % 200 + 3 for i in range(40)]]
    # The prompt's logits (Marlin for 40 rows at once) against the dequantized weights' in bf16.
    tokens = torch.tensor([prompts[1]], device="cuda")
    positions = torch.arange(40, device="cuda")
    mask = (positions[None, :] <= positions[:, None])[None, None]
    rows = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        for decoder in (marlin, reference):
            decoder.reserve_cache(1, 64)
        got, expected = (decoder(tokens, positions[None], mask, rows=rows) for decoder in (marlin, reference))
    assert ((got - expected).norm() / expected.norm()).item() < 3e-2
    # Compiled layers and CUDA-graph decode steps on Marlin. Random 4-bit weights leave near-ties that
    # bf16 rounding in another order flips (seen at the third token), so only the prompt's token and
    # the first graph-replayed step are compared exactly.
    # Batch 1 too, where "auto" runs the one-row calls on tinygemm.
    compiled = StaticEngine(marlin, set(), context=256, max_batch=2)
    compiled.warm_up()
    eager = StaticEngine(reference, set(), context=256, max_batch=2, cuda_graphs=False)
    for batch in (prompts, prompts[1:]):
        params = [SamplingParams(max_new_tokens=8, temperature=0)] * len(batch)
        assert list(generate(compiled, batch, params))[:2] == list(generate(eager, batch, params))[:2]


def test_cuda_graph_decode_generates_what_transformers_generates():
    """Warmed-up CUDA graphs, one per attention span, replayed as answers cross the spans' bounds."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config("tiny")).cuda().eval()
    model.generation_config.eos_token_id = None  # the engine is given no stop token either
    decoder = build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cuda"), dtype=torch.float32)
    engine = StaticEngine(decoder, set(), context=2 * FIRST_SPAN + 40, max_batch=2)
    assert engine.cuda_graphs
    engine.warm_up()
    assert sorted(engine._graphs) == [(bucket, span) for bucket in (1, 2) for span in engine.spans]
    prompts = [[5, 17, 99, 3, 42], [(7 * i) % 200 + 3 for i in range(FIRST_SPAN - 8)]]
    new_tokens = FIRST_SPAN + 20
    steps = list(generate(engine, prompts, [SamplingParams(max_new_tokens=new_tokens, temperature=0)] * 2))
    assert len(engine._graphs) == 2 * len(engine.spans)  # no capture after the warm-up
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert [step[row] for step in steps] == out[0, len(prompt):].tolist()


def test_a_model_captured_while_another_streams_leaves_both_answers_right():
    """A replica loads one model (compiling and capturing its graphs, on a thread of its own) while
    another model's answers are generated by the step loop, as a replica serving many tenants does:
    the captures wait for the steps, and no answer changes."""
    import asyncio
    import contextlib
    import threading

    from qlora_ray.serve.batcher import Batcher
    from qlora_ray.serve.step_loop import StepLoop

    def engine_of(seed: int, capturing=contextlib.nullcontext):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(shape_config("tiny")).cuda().eval()
        decoder = build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cuda"),
                                dtype=torch.float32)
        return StaticEngine(decoder, set(), context=256, max_batch=2, capturing=capturing)

    greedy = SamplingParams(max_new_tokens=200, temperature=0)
    prompt = [5, 17, 99, 3, 42]
    alone = {}
    for seed in (0, 1):
        engine = engine_of(seed)
        engine.warm_up()
        alone[seed] = [step[0] for step in generate(engine, [prompt], [greedy])]

    loop = StepLoop()
    serving = engine_of(0)
    serving.warm_up()
    batcher = Batcher(serving, 2, loop=loop)
    beside_an_answer = []  # per capture of the loading model: whether the other model had work then

    @contextlib.contextmanager
    def capturing():
        beside_an_answer.append(batcher.has_work())
        with loop.paused():
            yield

    loaded = {}

    def load():
        engine = engine_of(1, capturing)
        engine.warm_up()
        loaded["engine"] = engine

    async def main():
        loader = threading.Thread(target=load)
        answers = []
        while not answers or loader.is_alive():  # answers one after another until the load is over
            tokens = []
            async for part in batcher.tokens(prompt, greedy):
                tokens += part
                if not loader.is_alive() and not answers and len(tokens) == 5 and "engine" not in loaded:
                    loader.start()  # its captures come while this answer is generated
            answers.append(tokens)
        loader.join()
        return answers

    answers = asyncio.run(main())
    assert all(answer == alone[0] for answer in answers), len(answers)
    assert any(beside_an_answer), "no capture came while the other model was generating"
    assert [step[0] for step in generate(loaded["engine"], [prompt], [greedy])] == alone[1]
    batcher.close()


def test_a_step_hands_its_tokens_out_without_waiting_for_the_device():
    """Steady serving (rows decoding, one sampled at a temperature; two prompts joining together, one
    of them longer than a prefill chunk, and finishing): no step makes a call that waits for the
    device's queue (CUDA's sync debug mode raises on one), and a step returns its tokens while the
    decode step it launched is still running."""
    from qlora_ray.serve.scheduler import PREFILL_CHUNK, Scheduler, Sequence

    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config("tiny")).cuda().eval()
    decoder = build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cuda"),
                            dtype=torch.float32)
    engine = StaticEngine(decoder, set(), context=1024, max_batch=4)
    engine.warm_up()
    scheduler = Scheduler(engine)
    scheduler.add(Sequence([5, 17, 99, 3, 42], SamplingParams(max_new_tokens=100, temperature=0)))
    scheduler.add(Sequence([7, 8, 9], SamplingParams(max_new_tokens=100, temperature=0.8, top_p=0.9)))
    for _ in range(3):
        scheduler.step()
    # Added long first: the first round prefills the long prompt's first chunk with the short prompt
    # (the engine runs the shorter first and puts the logits back in order), and only the short one
    # is complete after it; a second round in the same step prefills the long one's last chunk.
    joining = [Sequence([(7 * i) % 200 + 3 for i in range(PREFILL_CHUNK + 88)], SamplingParams(max_new_tokens=3)),
               Sequence(list(range(3, 90)), SamplingParams(max_new_tokens=3, temperature=0.7))]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(8):
            if step == 2:
                for sequence in joining:
                    scheduler.add(sequence)
            assert scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(s.done and s.generated == 3 for s in joining)  # they joined, and left: their slots released

    decode = engine.decode

    def slow_decode(slots, tokens):
        torch.cuda._sleep(2_000_000_000)  # about a second of the device's clock, queued before the step
        return decode(slots, tokens)

    engine.decode = slow_decode
    scheduler.step()  # queues a slow decode step
    assert scheduler.step(), "the step gave no tokens"
    assert not torch.cuda.current_stream().query(), "the step waited for the decode step it launched"
    torch.cuda.synchronize()
