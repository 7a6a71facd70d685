#!/usr/bin/env python3
"""gemlite A16W4 (asymmetric, group 128) against torch tinygemm (_weight_int4pack_mm) for the Llama-3-8B
decode shapes, on CUDA: speed (CUDA graphs, no L2 reuse), error against fp64, graph and compile
compatibility. Modes: main | kcache | autotune | fp32atomic | fp32atomic_kcache | tg4 | tg2 (tinygemm
inner K tiles). MOCK=1 runs the harness on the CPU. Needs gemlite (pip wheel; not a project
dependency: it lost to tinygemm at batch 1, see results/2026-11-23-h100-serve.md). JSON to $OUT."""
import os, sys, json, time, traceback, statistics

MODE = sys.argv[1] if len(sys.argv) > 1 else "main"
MOCK = os.environ.get("MOCK") == "1"
OUT = os.environ.get("OUT") or "/tmp/probe-out"
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
DEADLINE = float(os.environ.get("PROBE_DEADLINE", "220"))

import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = "cpu" if MOCK else "cuda"
G = 128
NL = {"main": 32, "kcache": 32, "autotune": 16, "fp32atomic": 32, "fp32atomic_kcache": 32, "tg4": 32, "tg2": 32}[MODE]
USE_GL = not MODE.startswith("tg")
TILES = {"tg4": 4, "tg2": 2}.get(MODE, 8)
if MOCK:
    NL = 2
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
MS = {"main": [1, 8], "kcache": [1], "autotune": [1, 8], "fp32atomic": [1, 8], "fp32atomic_kcache": [1],
      "tg4": [1, 8], "tg2": [1, 8]}[MODE]
REPEAT = 3  # per-shape graph: NL distinct weights x REPEAT
res = {"mode": MODE, "mock": MOCK, "NL": NL, "errors": {}}


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def save():
    with open(os.path.join(OUT, f"{MODE}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def left():
    return DEADLINE - (time.time() - T0)


def record_error(key, e):
    tb = traceback.format_exc()
    res["errors"][key] = tb[-4000:]
    log("ERROR", key, repr(e))
    print(tb[-2500:], flush=True)
    save()


def record_chosen_configs(error_key):
    """The Triton config gemlite's autotuner chose for each kernel and shape, into res."""
    try:
        cfgs = {}
        for kname, kls in gemlite.core.GEMLITE_TRITON_MAPPING.items():
            for kern in kls.kernel:
                for key, cfg in getattr(kern, "cache", {}).items():
                    cfgs[f"{kname}:{key[:3]}"] = str(cfg)
        res["gemlite_chosen_configs"] = cfgs
    except Exception as e:
        record_error(error_key, e)


def sync():
    if not MOCK:
        torch.cuda.synchronize()


def nbytes(M, K, N):
    # int4 weights + bf16 scale and zero per group + bf16 activations in + bf16 out
    return N * K // 2 + (K // G) * N * 4 + M * K * 2 + M * N * 2


def rel(a, b):
    a = a.double(); b = b.double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- environment
info = {"torch": torch.__version__}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa
    info["triton"] = repr(e)
if not MOCK:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, sms=p.multi_processor_count, mem_GB=round(p.total_memory / 1e9, 1),
                l2_MB=round(getattr(p, "L2_cache_size", 0) / 1e6, 1), cc=f"{p.major}.{p.minor}")
res["env"] = info
log("env", info)
if not MOCK and MODE == "main":
    try:  # device-to-device copy ceiling, bytes read + written
        a = torch.empty(2**30, dtype=torch.uint8, device=DEV); b = torch.empty_like(a); a.fill_(1)
        for _ in range(3): b.copy_(a)
        sync(); ts = []
        for _ in range(10):
            e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
            e0.record(); b.copy_(a); e1.record(); e1.synchronize(); ts.append(e0.elapsed_time(e1))
        res["copy_GBps_read_plus_write"] = round(2 * 2**30 / (statistics.median(ts) * 1e-3) / 1e9, 1)
        del a, b
        log("copy GB/s", res["copy_GBps_read_plus_write"])
    except Exception as e:
        record_error("copy", e)

# ---------------------------------------------------------------- gemlite import
GemLiteLinearTriton = DType = gemlite = None
if not MOCK:
    try:
        t = time.time()
        import gemlite
        from gemlite.core import GemLiteLinearTriton, DType
        res["gemlite_version"] = gemlite.__version__
        res["gemlite_import_s"] = round(time.time() - t, 2)
        res["gemlite_default_config"] = getattr(gemlite.core, "selected_tag", None)
        if MODE in ("kcache", "fp32atomic_kcache"):
            gemlite.set_kernel_caching(True)
        if MODE.startswith("fp32atomic"):
            gemlite.set_native_atomic_bfp16(False)  # split-K partial sums added in fp32, then cast to bf16
        if MODE == "autotune":
            gemlite.reset_config()  # drop bundled h100.json configs: autotune from scratch ('fast' set)
        log("gemlite", gemlite.__version__, "config", res["gemlite_default_config"])
    except Exception as e:
        record_error("gemlite_import", e)
        raise
save()


# ---------------------------------------------------------------- quantized weights
def make_quant(K, N, seed):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, device=DEV, dtype=torch.uint8)
    s = (torch.rand((N, K // G), generator=g, device=DEV) * 0.01 + 0.002).to(torch.bfloat16)
    z = torch.randint(4, 12, (N, K // G), generator=g, device=DEV).to(torch.bfloat16)  # GPTQ-style integer zeros
    return q, s, z


def dequant(q, s, z):  # fp32 [N, K]: w = (q - z) * s
    N, K = q.shape
    qg = q.view(N, K // G, G).float()
    return ((qg - z.float()[..., None]) * s.float()[..., None]).reshape(N, K)


def tg_make(q, s, z):
    if MOCK:
        return (dequant(q, s, z).to(torch.bfloat16), None)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()  # [N, K/2], even k in the high nibble
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, TILES)
    sf = s.float()
    # tinygemm: w = (q - 8) * scale + zero  ->  zero = (8 - z) * s ; layout [K/G, N, 2]
    sz = torch.stack([sf, (8 - z.float()) * sf], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return (packed, sz)


def tg_mm(x, w):
    if MOCK:
        return x @ w[0].t()
    return torch.ops.aten._weight_int4pack_mm(x, w[0], G, w[1])


class MockGL(nn.Module):
    def __init__(self, q, s, z):
        super().__init__()
        self.W = dequant(q, s, z).to(torch.bfloat16)

    def forward(self, x):
        return x @ self.W.t()


def gl_make(q, s, z):
    N, K = q.shape
    if MOCK:
        return MockGL(q, s, z)
    lin = GemLiteLinearTriton(W_nbits=4, group_size=G, in_features=K, out_features=N,
                              input_dtype=DType.BF16, output_dtype=DType.BF16)
    lin.pack(q, s, z, bias=None)  # fma_mode=True (default): W = q*s + (-z*s)
    return lin


def pack_int32_cols(q):  # engine's packed_columns layout: [K/8, N] int32, k = 8r+i at bits 4i
    v = q.t().to(torch.int32).reshape(-1, 8, q.shape[0])
    v = v << torch.arange(0, 32, 4, dtype=torch.int32, device=q.device).view(1, 8, 1)
    out = v[:, 0].clone()
    for i in range(1, 8):
        out |= v[:, i]
    return out


def seed_of(si, l):
    return 1000 * si + l + 7


TG = {n: [] for n, _, _ in SHAPES}
GL = {n: [] for n, _, _ in SHAPES}
build = {"tinygemm_s": 0.0, "gemlite_s": 0.0}
try:
    for si, (name, K, N) in enumerate(SHAPES):
        for l in range(NL):
            q, s, z = make_quant(K, N, seed_of(si, l))
            sync(); t = time.time()
            TG[name].append(tg_make(q, s, z))
            sync(); t1 = time.time()
            GL[name].append(gl_make(q, s, z) if USE_GL else None)
            sync(); t2 = time.time()
            build["tinygemm_s"] += t1 - t
            build["gemlite_s"] += t2 - t1
            if l == 0 and not MOCK and USE_GL:
                lin = GL[name][0]
                w = lin.W_q.data
                res.setdefault("gemlite_layout", {})[name] = {
                    "W_q": [str(w.dtype), list(w.shape), list(w.stride())],
                    "scales": [str(lin.scales.dtype), list(lin.scales.shape)],
                    "zeros": [str(lin.zeros.dtype), list(lin.zeros.shape)],
                    "W_group_mode": lin.W_group_mode, "elements_per_sample": lin.elements_per_sample,
                    "same_as_engine_packed_columns": bool(w.element_size() == 4 and
                                                          torch.equal(w.view(torch.int32), pack_int32_cols(q))),
                }
            del q, s, z
    build = {k: round(v, 2) for k, v in build.items()}
    res["build_s_all_layers"] = build
    if not MOCK:
        res["gpu_mem_alloc_GB_after_build"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    log("built", NL, "layers/shape", build)
except Exception as e:
    record_error("build", e)
    raise
save()

# ---------------------------------------------------------------- warm-up (JIT / autotune)
warm = {}
WARMED = set()  # (name, M) pairs whose gemlite kernel is compiled/tuned
for M in MS:
    for name, K, N in SHAPES:
        if MODE == "autotune" and left() < (100 if M > 1 else 30):
            log("skip warm-up (deadline)", name, M); continue
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        d = {}
        for impl in (("tinygemm", "gemlite") if USE_GL else ("tinygemm",)):
            try:
                f = (lambda: tg_mm(x, TG[name][0])) if impl == "tinygemm" else (lambda: GL[name][0](x))
                sync(); t = time.time(); f(); sync(); d[impl + "_first_s"] = round(time.time() - t, 3)
                t = time.time(); f(); sync(); d[impl + "_second_ms"] = round((time.time() - t) * 1e3, 3)
                if impl == "gemlite":
                    WARMED.add((name, M))
            except Exception as e:
                record_error(f"warmup_{impl}_{name}_M{M}", e)
        warm[f"{name}_M{M}"] = d
        log("warm", name, M, d)
        save()
res["warmup"] = warm
if not MOCK:
    record_chosen_configs("configs")
save()

# ---------------------------------------------------------------- correctness
corr = {}
for si, (name, K, N) in enumerate(SHAPES):
    for l in (0, NL - 1):
        q, s, z = make_quant(K, N, seed_of(si, l))
        W = dequant(q, s, z)
        for M in MS:
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            ref = x.double() @ W.double().t()
            d = {"dense_bf16": rel(x @ W.to(torch.bfloat16).t(), ref)}
            try:
                d["tinygemm"] = rel(tg_mm(x, TG[name][l]), ref)
            except Exception as e:
                record_error(f"corr_tg_{name}", e)
            if USE_GL:
              try:
                if (name, M) not in WARMED:
                    raise RuntimeError("gemlite not warmed for this shape")
                y = GL[name][l](x).clone()
                d["gemlite"] = rel(y, ref)
                d["gemlite_nan"] = bool(torch.isnan(y).any())
                y2 = GL[name][l](x)
                d["gemlite_run_to_run"] = rel(y2, y)
              except Exception as e:
                record_error(f"corr_gl_{name}", e)
            corr[f"{name}_L{l}_M{M}"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}
        del q, s, z, W
res["rel_err_vs_fp64_ref"] = corr
log("correctness", json.dumps(corr)[:1500])
save()


# ---------------------------------------------------------------- timing helpers
def bench_graph(calls, reps=25, rounds=2):
    """Median ms per replay of a CUDA graph holding `calls` in order, for `rounds` rounds."""
    if MOCK:
        t = time.time()
        outs = [f() for f in calls]
        return [(time.time() - t) * 1e3] * rounds, outs
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(s)
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [f() for f in calls]
    for _ in range(3):
        g.replay()
    sync()
    meds = []
    for _ in range(rounds):
        ts = []
        for _ in range(reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record(); g.replay(); e1.record(); e1.synchronize()
            ts.append(e0.elapsed_time(e1))
        meds.append(statistics.median(ts))
    bench_graph.last_graph = g
    return meds, outs


def mm_call(impl, name, l, x):
    if impl == "tinygemm":
        w = TG[name][l]
        return lambda: tg_mm(x, w)
    lin = GL[name][l]
    return lambda: lin(x)


# ---------------------------------------------------------------- per-shape timing
pershape = {}
for name, K, N in SHAPES:
    for M in MS:
        if left() < 40:
            log("skip per-shape (deadline)", name, M); continue
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        for impl in ("tinygemm", "gemlite"):
            if impl == "gemlite" and (name, M) not in WARMED:
                continue
            try:
                calls = [mm_call(impl, name, l, x) for _ in range(REPEAT) for l in range(NL)]
                meds, outs = bench_graph(calls)
                us = [m * 1e3 / len(calls) for m in meds]
                pershape[f"{name}_M{M}_{impl}"] = {"us": [round(u, 2) for u in us],
                                                   "GBps": round(nbytes(M, K, N) / (min(us) * 1e-6) / 1e9, 1)}
                # the graph's last output is layer NL-1: compare with eager
                last = outs[-1].clone()
                pershape[f"{name}_M{M}_{impl}"]["graph_vs_eager_rel"] = round(rel(last, calls[-1]()), 6)
                bench_graph.last_graph = None
                del outs
            except Exception as e:
                record_error(f"pershape_{impl}_{name}_M{M}", e)
        log("pershape", name, M, {k: v for k, v in pershape.items() if k.startswith(f"{name}_M{M}_")})
        save()
res["per_shape"] = pershape
save()

# ---------------------------------------------------------------- whole 32-layer stack
stack = {}
for M in MS:
    if left() < 30:
        log("skip stack (deadline)", M); continue
    xs = {K: torch.randn(M, K, device=DEV, dtype=torch.bfloat16) for K in (4096, 14336)}
    tot_bytes = NL * sum(nbytes(M, K, N) for _, K, N in SHAPES)
    for impl in ("tinygemm", "gemlite"):
        if impl == "gemlite" and not all((n, M) in WARMED for n, _, _ in SHAPES):
            continue
        try:
            calls = [mm_call(impl, name, l, xs[K]) for l in range(NL) for name, K, N in SHAPES]
            meds, outs = bench_graph(calls)
            last = outs[-1].clone()
            d = {"total_us": [round(m * 1e3, 1) for m in meds], "per_layer_us": round(min(meds) * 1e3 / NL, 2),
                 "GBps": round(tot_bytes / (min(meds) * 1e-3) / 1e9, 1), "layers": NL,
                 "MB_moved": round(tot_bytes / 1e6, 1)}
            # graph output of the last layer's down projection vs the fp64 reference
            q, s, z = make_quant(14336, 4096, seed_of(3, NL - 1))
            ref = xs[14336].double() @ dequant(q, s, z).double().t()
            d["graph_last_down_rel_err_vs_ref"] = round(rel(last, ref), 6)
            del q, s, z, ref, outs
            bench_graph.last_graph = None
            stack[f"M{M}_{impl}"] = d
        except Exception as e:
            record_error(f"stack_{impl}_M{M}", e)
    if f"M{M}_tinygemm" in stack and f"M{M}_gemlite" in stack:
        a, b = min(stack[f"M{M}_tinygemm"]["total_us"]), min(stack[f"M{M}_gemlite"]["total_us"])
        stack[f"M{M}_gemlite_speedup_vs_tinygemm"] = round(a / b, 3)
    log("stack", M, {k: v for k, v in stack.items() if k.startswith(f"M{M}")})
    save()
res["stack"] = stack
save()

# ---------------------------------------------------------------- autotune extras: forced GEMV kernel at M=1
if MODE == "autotune" and not MOCK:
    extra = {}
    for name, K, N in SHAPES:
        if left() < 35:
            break
        try:
            x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
            lin0 = GL[name][0]
            sync(); t = time.time(); y = lin0.forward_manual(x, matmul_type="GEMV"); sync()
            d = {"autotune_s": round(time.time() - t, 2)}
            q, s, z = make_quant(K, N, seed_of([n for n, _, _ in SHAPES].index(name), 0))
            d["rel_err"] = round(rel(y, x.double() @ dequant(q, s, z).double().t()), 6)
            del q, s, z
            calls = [(lambda lin=GL[name][l]: lin.forward_manual(x, matmul_type="GEMV")) for _ in range(REPEAT) for l in range(NL)]
            meds, outs = bench_graph(calls)
            us = [m * 1e3 / len(calls) for m in meds]
            d.update(us=[round(u, 2) for u in us], GBps=round(nbytes(1, K, N) / (min(us) * 1e-6) / 1e9, 1))
            bench_graph.last_graph = None
            extra[f"{name}_M1_GEMV"] = d
            log("GEMV forced", name, d)
        except Exception as e:
            record_error(f"gemv_forced_{name}", e)
    res["forced_GEMV_M1"] = extra
    record_chosen_configs("configs2")
    save()


# ---------------------------------------------------------------- torch.compile + CUDA graph compatibility
class MLP(nn.Module):
    def __init__(self, gu, dn):
        super().__init__()
        self.gu, self.dn = gu, dn

    def forward(self, x):
        h = self.gu(x)
        g, u = h.chunk(2, dim=-1)
        return self.dn(F.silu(g) * u) + x


if MODE == "main" and not MOCK:
    comp = {}
    mlp = MLP(GL["gate_up"][0], GL["down"][0])
    for dyn in (False, True):
        if left() < 45:
            log("skip compile (deadline)", dyn); break
        tag = f"dynamic={dyn}"
        try:
            cm = torch.compile(mlp, fullgraph=True, dynamic=dyn)
            for M in MS:
                x = torch.randn(M, 4096, device=DEV, dtype=torch.bfloat16)
                ye = mlp(x)
                sync(); t = time.time(); yc = cm(x); sync()
                d = {"compile_s": round(time.time() - t, 2), "compiled_vs_eager_rel": round(rel(yc, ye), 6)}
                try:
                    meds, outs = bench_graph([lambda: cm(x)] * 4, reps=10, rounds=1)
                    d["graph_of_compiled_vs_eager_rel"] = round(rel(outs[-1], ye), 6)
                    d["graph_of_compiled_ok"] = True
                    bench_graph.last_graph = None
                except Exception as e:
                    d["graph_of_compiled_ok"] = False
                    record_error(f"compile_graph_{tag}_M{M}", e)
                comp[f"{tag}_M{M}"] = d
                log("compile", tag, M, d)
        except Exception as e:
            comp[tag] = "FAILED: " + repr(e)[:500]
            record_error(f"compile_{tag}", e)
        save()
    res["compile"] = comp
    save()

# ---------------------------------------------------------------- summary
log("SUMMARY", MODE, res.get("env"), "gemlite", res.get("gemlite_version"))
for k, v in res.get("per_shape", {}).items():
    print(f"  {k:28s} us={v['us']} GB/s={v['GBps']}")
for k, v in res.get("stack", {}).items():
    print(f"  stack {k}: {v}")
if res.get("compile"):
    print("  compile:", json.dumps(res["compile"]))
print("  errors:", list(res["errors"].keys()))
res["elapsed_s"] = round(time.time() - T0, 1)
save()
