"""GPTQModel's Marlin int4 kernel, compiled once per cluster: the serving decoder's fastest 4-bit
matmul on an NVIDIA GPU (compute capability 8.0+, bf16 activations), and the kernel the eval stage's
GPTQ rows run through GPTQModel.

Against torch's own int4 kernel (tinygemm) it decodes much faster at batch 8, as fast at batch 1,
and needs no second copy of the weights for prompts, since Marlin is a GEMM fast at any number of
rows (figures in benchmarks/results/ and the README). GPTQModel
ships Marlin as CUDA sources and compiles them on first use (nvcc needed). This module compiles the
same sources itself rather than through `gptqmodel.utils.marlin`: importing `gptqmodel` sets
process-wide allocator and device-order variables and loads its whole quantization stack, which a
serving replica does not want. The sources come from the installed `gptqmodel_ext` package (the
`gptq` extra), so the kernel is the version GPTQModel itself runs.

Each precision's build registers the very ops GPTQModel's own Marlin extension of that precision
registers (same sources, same torch.ops namespace), and GPTQModel uses ops that are already registered
instead of compiling its own: so loading the fp16 build before a GPTQ model is loaded through
transformers (whose GPTQ layers compute in fp16) spares the eval stage GPTQModel's compile too.

Only symmetric 4-bit GPTQ (zero point 8, the fuse stage's setting) maps onto Marlin's uint4b8 type;
other layouts stay on tinygemm (serve/weights.py decides).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The activation precisions Marlin is built for: bf16 for the serving decoder, fp16 for GPTQModel's
# layers as transformers builds them (the eval stage).
PRECISIONS = ("bf16", "fp16")


def _extension_name(precision: str) -> str:
    return f"qlora_ray_marlin_{precision}"


def _ops_namespace(precision: str) -> str:
    return f"gptqmodel_marlin_{precision}"  # what the sources register (TORCH_LIBRARY in marlin_torch_<precision>.cpp)


def scalar_type_id(*, exponent: int, mantissa: int, signed: bool, bias: int, finite_values_only: bool,
                   nan_repr: int) -> int:
    """The int64 the kernel takes for a weight type: vLLM's ScalarType::id() bit layout (8 exponent
    bits, 8 mantissa, 1 sign, 32 bias, 1 finite-only, 8 NaN representation), which GPTQModel keeps."""
    value, offset = 0, 0
    for member, width in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32),
                          (int(finite_values_only), 1), (nan_repr, 8)):
        value |= (member & ((1 << width) - 1)) << offset
        offset += width
    return value


# Unsigned 4-bit values with an implicit bias of 8: symmetric GPTQ's w = (q - 8) * scale.
UINT4B8 = scalar_type_id(exponent=0, mantissa=4, signed=False, bias=8, finite_values_only=False, nan_repr=1)


class MarlinUnavailable(RuntimeError):
    """Why the kernel cannot be used here (no CUDA, old GPU, no nvcc, no gptqmodel sources)."""


def _sources_folder() -> Path:
    spec = importlib.util.find_spec("gptqmodel_ext")
    if spec is None or not spec.submodule_search_locations:
        raise MarlinUnavailable("the gptqmodel package (the 'gptq' extra) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "marlin"
    if not (folder / "generate_kernels.py").exists():
        raise MarlinUnavailable(f"{folder} holds no Marlin sources")
    return folder


def _source_files(source: Path) -> list[Path]:
    """The Marlin sources as GPTQModel's package installed them (its RECORD lists them). GPTQModel's own
    JIT writes generated kernels beside them on first use; those are not sources, and must change
    neither the digest nor what is compiled here. Without a RECORD (an editable install), every file."""
    from importlib import metadata

    try:
        listed = {source.parent.parent / str(f) for f in metadata.files("gptqmodel") or []}
    except metadata.PackageNotFoundError:
        listed = set()
    return sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (not listed or p in listed))


def _sources_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for path in _source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def fingerprint(sources_digest: str, precision: str = "bf16") -> str:
    """What a build of the kernel depends on: its precision, its sources, torch and its CUDA, and the
    GPU architecture (torch compiles for the visible device's). Names the build here and in the store."""
    major, minor = torch.cuda.get_device_capability()
    facts = {"extension": _extension_name(precision), "sources": sources_digest, "torch": torch.__version__,
             "cuda": torch.version.cuda, "arch": f"sm_{major}{minor}"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


# Where builds are shared between replicas, nodes and starts (share_builds_through); None: local only.
_shared_store = None


def share_builds_through(store) -> None:
    """Keep the compiled kernel in `store` (store.kernel_key("marlin", fingerprint)): a replica or an
    eval task on another node, or a later start on a fresh machine, loads it in seconds instead of
    compiling it for minutes. One process compiles and publishes it while those that need it meanwhile
    wait for it (build_claim.py). Whoever can write that key can run native code on the processes
    that load it: the store must be trusted as the code is (serve.share_compiled_kernels: false
    turns this off)."""
    global _shared_store
    _shared_store = store


def prepare(store, *, share: bool, precision: str = "bf16") -> str | None:
    """Load the kernel of `precision` in this process (a replica's start, an eval task's first GPTQ
    row), through the store's build if `share`, compiling and sharing it if the store has none. None
    if it is loaded, else why not (GPTQ then runs on another kernel)."""
    if share:
        share_builds_through(store)
    return unavailable_reason(precision)


def _load_shared(key: str, library_name: str) -> bool:
    """Load the build the store holds at key, if any. True if it is loaded."""
    from qlora_ray.errors import UserError

    try:
        if not _shared_store.is_complete(key):
            return False
        started = time.monotonic()
        with _shared_store.local_copy(key) as folder:
            torch.ops.load_library(str(folder / library_name))
    except (UserError, OSError, RuntimeError) as error:
        log.warning("Marlin kernel: the shared build at %s cannot be loaded (%s); compiling it here",
                    _shared_store.url(key), error)
        return False
    log.info("Marlin kernel: loaded the shared build from %s in %.1f s", _shared_store.url(key), time.monotonic() - started)
    return True


def _publish_shared(key: str, library: Path, facts: dict) -> None:
    from qlora_ray.errors import UserError
    from qlora_ray.local_disk import scratch_dir

    try:
        with scratch_dir("marlin-share") as folder:
            shutil.copy2(library, folder / library.name)
            _shared_store.publish(key, folder, kind="kernel", inputs=facts, keep_existing=True)
        log.info("Marlin kernel: shared the build through %s", _shared_store.url(key))
    except UserError as error:  # the replica serves either way; the next start compiles again
        log.warning("Marlin kernel: the build could not be shared through the store (%s)", error)


@functools.cache
def ops(precision: str = "bf16"):
    """torch.ops.gptqmodel_marlin_<precision>, loaded on first call: the shared build from the store
    (see share_builds_through) or this machine's own, else compiled (minutes: torch keeps the build
    in TORCH_EXTENSIONS_DIR). Raises MarlinUnavailable with the reason."""
    if precision not in PRECISIONS:
        raise ValueError(f"Marlin precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not torch.cuda.is_available():
        raise MarlinUnavailable("no CUDA device")
    if torch.cuda.get_device_capability() < (8, 0):
        raise MarlinUnavailable("Marlin needs compute capability 8.0 or newer")
    namespace = getattr(torch.ops, _ops_namespace(precision))
    if hasattr(namespace, f"gptq_marlin_gemm_{precision}"):
        return namespace  # GPTQModel itself loaded it in this process
    source = _sources_folder()
    digest = _sources_digest(source)
    name, build_id = _extension_name(precision), fingerprint(digest, precision)
    build = _extensions_root() / f"{name}-{build_id}"
    library = build / f"{name}.so"

    def compile_here() -> None:
        _compile(source, _extensions_root() / f"qlora_ray_marlin-sources-{digest}", build, precision)

    if library.exists():
        torch.ops.load_library(str(library))
    elif _shared_store is None:
        compile_here()
    else:
        _load_or_build_shared(build_id, library, compile_here, what=f"the {precision} Marlin kernel",
                              facts={"sources": digest, "torch": torch.__version__, "cuda": torch.version.cuda,
                                     "device": torch.cuda.get_device_name()})
    return namespace


def _load_or_build_shared(build_id: str, library: Path, compile_here, *, what: str, facts: dict) -> None:
    """Load the store's build, else compile it here and share it: one process of the cluster compiles
    (the one holding the build's claim), and the others that need it meanwhile wait for its build
    instead of compiling the same kernel beside it."""
    from qlora_ray import build_claim
    from qlora_ray.store import kernel_claim_key, kernel_key

    key = kernel_key("marlin", build_id)
    if _load_shared(key, library.name):
        return
    with build_claim.one_builder(_shared_store, key, kernel_claim_key("marlin", build_id), what=what) as building:
        if building:
            compile_here()
            _publish_shared(key, library, facts)
            return
    if not _load_shared(key, library.name):
        compile_here()


def _compile(source: Path, folder: Path, build: Path, precision: str) -> None:
    """Generate the kernel instantiations from `source` into `folder`, then compile and load the
    `precision` ones, building in `build`."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    nvcc = CUDA_HOME and shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin"))
    if not nvcc:
        raise MarlinUnavailable("nvcc not found (set CUDA_HOME): Marlin is compiled on first use")
    if not folder.exists():
        # generate_kernels.py writes the kernel instantiations next to itself; the installed package
        # may be read-only, so it runs in a copy.
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        for path in _source_files(source):
            (staging / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / path.relative_to(source))
        generated = subprocess.run([sys.executable, "generate_kernels.py"], cwd=staging, capture_output=True, text=True)
        if generated.returncode:
            raise MarlinUnavailable(f"generate_kernels.py failed: {(generated.stderr or generated.stdout)[-400:]}")
        try:
            staging.rename(folder)
        except OSError:  # another process published it first
            shutil.rmtree(staging, ignore_errors=True)
    sources = [folder / f"marlin_torch_{precision}.cpp", folder / f"gptq_marlin_{precision}.cu",
               folder / "gptq_marlin_repack.cu", folder / "awq_marlin_repack.cu",
               *sorted(folder.glob(f"kernel_{precision}_*.cu"))]
    log.info("compiling GPTQModel's Marlin int4 kernel, %s (once per machine or store: a few minutes)", precision)
    started = time.monotonic()
    flags = ["-O3", "-std=c++17", "-DENABLE_BF16"]
    cuda_flags = [*flags, "--threads", "4", "-diag-suppress=179,39,177"]
    if _nvcc_version(nvcc) >= (12, 8):
        # Since CUDA 12.8 a __global__ template instantiated in one file (kernel_bf16_*.cu) is a
        # hidden symbol that the dispatcher in another cannot link against, unless told otherwise.
        cuda_flags.insert(0, "-static-global-template-stub=false")
    build.mkdir(parents=True, exist_ok=True)
    try:
        load(_extension_name(precision), [str(s) for s in sources], extra_include_paths=[str(folder)], extra_cflags=flags,
             extra_cuda_cflags=cuda_flags, build_directory=str(build), is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as error:  # a compiler or linker error: torch has printed its output
        raise MarlinUnavailable(f"compiling it failed: {str(error)[-400:]}") from error
    log.info("Marlin kernel compiled in %.0f s", time.monotonic() - started)


@functools.cache
def unavailable_reason(precision: str = "bf16") -> str | None:
    """None if the kernel of `precision` is loaded (compiling it on first call), else why not, logged
    once: served GPTQ weights then run on torch's tinygemm kernel, and GPTQModel compiles its own."""
    try:
        ops(precision)
    except MarlinUnavailable as error:
        log.warning("The %s Marlin kernel is unavailable (%s): served GPTQ int4 weights use torch's tinygemm "
                    "kernel, and GPTQModel compiles its own", precision, error)
        return str(error)
    return None


def _nvcc_version(nvcc: str) -> tuple[int, int]:
    """(major, minor) from `nvcc --version` ("... release 13.0, V13.0.88")."""
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    if not match:
        raise MarlinUnavailable(f"cannot read nvcc's version from: {output.strip()[-200:]}")
    return int(match.group(1)), int(match.group(2))


@functools.cache
def _workspace(device_index: int) -> torch.Tensor:
    """The kernel's per-device lock array (one int per thread block, at least 128): it resets the
    locks itself, so one zeroed array serves every call, CUDA graphs included."""
    blocks = max(torch.cuda.get_device_properties(device_index).multi_processor_count, 128)
    return torch.zeros(blocks, dtype=torch.int, device=f"cuda:{device_index}")


# A custom op, so that torch.compile traces through the matmul (with the fake below) instead of
# breaking the compiled layer in two around an unknown call. The kernel's lock workspace is internal
# scratch it leaves as it found it, hence no declared mutation.
@torch.library.custom_op("qlora_ray::marlin_int4_mm", mutates_args=())
def marlin_int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   perm: torch.Tensor, size_n: int) -> torch.Tensor:
    """x [M, K] bf16 @ the Marlin-packed int4 weight -> [M, size_n] bf16. g_idx/perm are empty
    unless the weight is act-order."""
    act_order = g_idx.numel() > 0
    return ops().gptq_marlin_gemm_bf16(
        x, None, qweight, None, scales, None, None, g_idx if act_order else None, perm if act_order else None,
        _workspace(x.device.index or 0), UINT4B8, x.shape[0], size_n, x.shape[1],
        is_k_full=True, use_atomic_add=False, use_fp32_reduce=True, is_zp_float=False)


@marlin_int4_mm.register_fake
def _(x, qweight, scales, g_idx, perm, size_n):
    return x.new_empty(x.shape[0], size_n)


def _scale_permutation(group_size: int, in_features: int) -> list[int]:
    """The column order Marlin reads scales in (vLLM's get_scale_perms): per-group scales in blocks of
    64 columns; one scale per column (group_size covering all of `in`) in blocks of 32."""
    if group_size < in_features:
        return [i + 8 * j for i in range(8) for j in range(8)]
    return [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]


def fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether Marlin's tiles cover this weight (64 x 128 either way round; groups of whole tiles)."""
    tiled = (out_features % 64 == 0 and in_features % 128 == 0) or (out_features % 128 == 0 and in_features % 64 == 0)
    return tiled and group_size in (32, 64, 128, in_features) and in_features % group_size == 0


def act_order(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether GPTQ's input columns are in activation order, not in consecutive groups."""
    return not torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // group_size)


def repack(qweight: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, group_size: int):
    """Symmetric GPTQ (qweight [in/8, out] int32, scales [groups, out], g_idx [in]), on the GPU,
    as Marlin's (qweight, scales bf16, g_idx, perm): g_idx/perm are empty tensors unless the columns
    are in activation order, where Marlin reads them sorted by group."""
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    device = qweight.device
    empty = torch.empty(0, dtype=torch.int, device=device)
    if not act_order(g_idx, group_size):
        sorted_g_idx, perm = empty, empty
    else:
        perm = torch.argsort(g_idx.long()).to(torch.int)
        sorted_g_idx = g_idx.to(torch.int)[perm.long()].contiguous()
    packed = ops().gptq_marlin_repack(qweight.contiguous(), perm, in_features, out_features, 4)
    order = torch.tensor(_scale_permutation(group_size, in_features), device=device)
    permuted = scales.to(torch.bfloat16).reshape(-1, len(order)).index_select(1, order).reshape(-1, out_features)
    return packed, permuted.contiguous(), sorted_g_idx, perm
