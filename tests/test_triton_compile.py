"""Every Triton kernel compiles for an H200 (sm_90), checked on a machine without a GPU.

Without a GPU the other tests run the kernels under Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), which never runs the compiler's front
end: a kernel the compiler rejects (a global that is not ``tl.constexpr``, a type
error in a branch the interpreter took differently, ...) passes there and fails at
its first launch on a GPU. Here every kernel of ``triton_kernels/sassha.py``, in each
constexpr variant ``backends/triton_backend.py`` launches, goes through
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin (ptxas ships in
the triton wheel): the front end, the TTIR/TTGIR/LLVM passes and ptxas all run.

* The arguments of each compile are built like the backend's launch call (same
  positional order, tensor dtypes, Python ``int``/``float`` scalars, keyword
  constexprs, ``num_warps``) and turned into a signature, constexprs, specialisation
  attributes and options by Triton's own binder, the code ``JITFunction.run`` uses
  at a launch; so a launch's ``int`` that equals 1 becomes a constexpr here too.
* Under ``TRITON_INTERPRET=1`` ``triton.jit`` makes interpreted functions, which
  ``triton.compile`` cannot take, and the variable is read when triton is first
  imported: the compiles run in subprocesses started without it (this file run as a
  script, ``--worker``), sharing the variants between the machine's CPUs, with a
  fresh Triton cache (a cached kernel would not be compiled again).
* Variants (``_variants``): the product of each kernel's constexprs over the values
  the backend passes (param dtype fp32/bf16/fp16, v dtype param or fp32, ADAPTIVE,
  ALIGNED, HAS_BASE/HAS_SAVE as hvp.py pairs them, HAS_BASELINE, FIRST, the refresh
  MODE with its N_SAMPLES), except ``update_kernel``'s POWER_MODE, taken pairwise
  (see there); ``update_kernel`` also on compact state (STATE_BITS 16 and 8, every
  refresh mode) and, for bf16 params, with master weights (MASTER_BITS 24 / 32 over
  every STATE_BITS, a plain and a refresh step). About 210 compiles, 2-3 minutes of a
  2-CPU machine.
* The machine code of each compile is checked too (Triton's own ``ptxas -v`` report,
  and the PTX): every variant stays at or under 128 registers without spills, and an
  aligned variant moves every array of a full tile in 16-byte accesses
  (``ld/st.global.v4.b32``), counted exactly from the arrays the tile reads and
  writes (``full_tile_vectors``). 8-bit codes and int8 corrections are 8 bytes a
  thread (8 elements at 8 warps): each moves in one 8-byte access
  (``ld/st.global.v2.b32``, counted the same way) and adds no 16-byte one; bf16 state
  and int16 corrections add one 16-byte vector each.
* ``run.sh test`` runs this file twice: with the triton it installs, and with the GPU
  machines' (3.6, installed apart and put first on PYTHONPATH; the workers inherit it).
  The two allocate registers differently: 3.6 took up to 179 where 3.9 took 128, in the
  masked last tile of the refresh updates, which ``update_kernel`` now does in parts
  (bench/NOTES-triton.md).
* Skipped only when triton cannot be imported or its CUDA backend or ptxas is
  missing (the skip says which); with ``SASSHA_EXPECT_TRITON`` set that fails instead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ("cuda", 90, 32)  # H200: compute capability 9.0, 32 threads per warp
WORKER_TIMEOUT_S = 600

F32, BF16, F16 = "float32", "bfloat16", "float16"
PARAM_DTYPES = (F32, BF16, F16)  # triton_backend._KERNEL_DTYPES
# RefreshMode of backends/base.py (checked against it in the worker)
MODE_NONE, MODE_AUTOGRAD, MODE_FD_DIRECT, MODE_PRECOMPUTED = 0, 1, 2, 3
# POWER_SQRT, POWER_ONE, POWER_GENERAL of triton_kernels/sassha.py, with the
# hessian_power that selects each in TritonBackend.update
POWERS = {0: 0.5, 1: 1.0, 2: 0.75}
# state_bits other than 32 (sassha_fused.encoding.STATE_BITS) and master_weight_bits (bf16 params)
COMPACT_STATE_BITS = (16, 8)
MASTER_WEIGHT_BITS = (24, 32)


# ------------------------------------------------------------------- variants
def _sources(x: str):
    """dtypes of a norm's or a perturbation's v: the gradient (the param's dtype) or exp_avg (fp32)."""
    return (x,) if x == F32 else (x, F32)


def _variants():
    """(id, kernel, variant) of every compile: each kernel with the constexprs its launches take."""
    out = []

    def add(kernel, **v):
        vid = "-".join([kernel.replace("_kernel", "")] + [f"{k}={v[k]}" for k in v])
        out.append((vid, kernel, v))

    for xi, x in enumerate(PARAM_DTYPES):
        for v_dtype, adaptive, aligned in itertools.product(_sources(x), (False, True), (True, False)):
            # TritonBackend.sq_norm: v = grads, exp_avgs or the params themselves
            add("sq_norm_partials_kernel", X=x, V=v_dtype, ADAPTIVE=adaptive, ALIGNED=aligned)
            # TritonBackend.perturb: v = grads (SASSHA) or exp_avgs (M-SASSHA)
            add("perturb_kernel", X=x, V=v_dtype, ADAPTIVE=adaptive, ALIGNED=aligned)
        for ai, aligned in enumerate((True, False)):
            add("probes_kernel", X=x, ALIGNED=aligned)
            # hvp.FiniteDifferences._move: (base, save) = (None, None) with one pass,
            # (None, saved) on the first of several, (saved, None) after; never both
            for has_base, has_save in ((False, False), (False, True), (True, False)):
                add("fd_move_kernel", X=x, HAS_BASE=has_base, HAS_SAVE=has_save, ALIGNED=aligned)
            for has_baseline, first in itertools.product((True, False), (True, False)):
                add("fd_fold_kernel", X=x, HAS_BASELINE=has_baseline, FIRST=first, ALIGNED=aligned)
            # update: every refresh mode (MODE, N_SAMPLES) with every dtype and alignment.
            # N_SAMPLES is the probes of an AUTOGRAD refresh (n_samples), 1 in the other modes;
            # n the tensors of the kernel group (y's row stride; a constexpr when it is 1).
            # POWER_MODE only picks D**p in _new_param, on fp32 values whatever the other
            # constexprs: all three with MODE_NONE, and each refresh mode with the three
            # across the dtypes (pairwise, not the full product, which doubles the runtime).
            for power_mode in POWERS:
                add("update_kernel", X=x, MODE=MODE_NONE, N_SAMPLES=1, POWER_MODE=power_mode, ALIGNED=aligned, n=3)
            for mi, (mode, n_samples) in enumerate(((MODE_AUTOGRAD, 1), (MODE_AUTOGRAD, 2), (MODE_FD_DIRECT, 1),
                                                    (MODE_PRECOMPUTED, 1))):
                add("update_kernel", X=x, MODE=mode, N_SAMPLES=n_samples, POWER_MODE=(xi + ai + mi) % 3,
                    ALIGNED=aligned, n=3)
            # a group of one tensor: n == 1 is a constexpr, which y's rows s > 0 are offset by
            add("update_kernel", X=x, MODE=MODE_AUTOGRAD, N_SAMPLES=2, POWER_MODE=0, ALIGNED=aligned, n=1)
            # compact state (state_bits 16: bf16, 8: int8/uint8 codes and group scales): every
            # refresh mode, POWER_MODE pairwise as above
            for si, state_bits in enumerate(COMPACT_STATE_BITS):
                for mi, (mode, n_samples) in enumerate(((MODE_NONE, 1), (MODE_AUTOGRAD, 2), (MODE_FD_DIRECT, 1),
                                                        (MODE_PRECOMPUTED, 1))):
                    add("update_kernel", X=x, MODE=mode, N_SAMPLES=n_samples, POWER_MODE=(xi + ai + mi + si) % 3,
                        ALIGNED=aligned, n=3, STATE_BITS=state_bits)
            if x == BF16:
                # master weights (bf16 params): with each state format, a plain and a refresh step
                for mw, state_bits, (mode, n_samples) in itertools.product(
                        MASTER_WEIGHT_BITS, (32,) + COMPACT_STATE_BITS, ((MODE_NONE, 1), (MODE_AUTOGRAD, 2))):
                    add("update_kernel", X=x, MODE=mode, N_SAMPLES=n_samples, POWER_MODE=0, ALIGNED=aligned, n=3,
                        STATE_BITS=state_bits, MASTER_BITS=mw)
    add("sum_partials_kernel", n=100_000)  # a round of 25 programs
    add("sum_partials_kernel", n=25)  # the last round
    return out


VARIANTS = _variants()


# --------------------------------------------------------------------- worker
def _launch(kernel: str, v: dict):
    """(args, kwargs) of the launch of ``kernel`` in variant ``v``, as TritonBackend makes it."""
    import torch

    from sassha_fused.backends import triton_backend as tb

    k = tb._kernels  # sassha_fused.triton_kernels.sassha, as the backend imported it
    dt = {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16}
    tensors, programs = 3, 5

    def col():  # a pointer or index column, ``c[lo:]`` of an int64 [n] tensor
        return torch.zeros(tensors, dtype=torch.int64)

    def f32(*shape):
        return torch.zeros(shape, dtype=torch.float32)

    blocks = torch.zeros((programs, 2), dtype=torch.int64)
    common = dict(BLOCK=tb.BLOCK, **tb.LAUNCH_OPTIONS[v.get("ALIGNED", True)])
    if kernel == "sum_partials_kernel":  # TritonBackend._sum_partials: a round of many programs, and the last
        n = v["n"]
        out = f32() if tb.reduce_programs(n) == 1 else f32(tb.reduce_programs(n))
        return (f32(n), n, out), dict(BLOCK=tb.REDUCE_BLOCK, ITERS=tb.REDUCE_ITERS, num_warps=4,
                                     **tb.REGISTER_CAP)
    x = tb._tl_dtype(dt[v["X"]])
    if kernel == "sq_norm_partials_kernel":
        return (blocks, col(), col(), col(), f32(programs), 0), dict(
            V_DTYPE=tb._tl_dtype(dt[v["V"]]), X_DTYPE=x, ADAPTIVE=v["ADAPTIVE"], ALIGNED=v["ALIGNED"], **common)
    if kernel == "perturb_kernel":
        return (blocks, col(), col(), col(), col(), col(), f32(2, 8), f32(), 1.0), dict(
            X_DTYPE=x, V_DTYPE=tb._tl_dtype(dt[v["V"]]), ADAPTIVE=v["ADAPTIVE"], ALIGNED=v["ALIGNED"], **common)
    prefix = tb._i32(0x9E3779B9)  # do_not_specialize: any int32 compiles the same
    if kernel == "probes_kernel":
        return (blocks, col(), col(), col(), col(), prefix), dict(Z_DTYPE=x, ALIGNED=v["ALIGNED"], **common)
    fd = f32(2)  # [delta, h_floor]; delta is a 0-dim view of it
    if kernel == "fd_move_kernel":
        return (blocks, col(), col(), col(), col(), col(), col(), prefix, fd[0], -1.0), dict(
            X_DTYPE=x, HAS_BASE=v["HAS_BASE"], HAS_SAVE=v["HAS_SAVE"], ALIGNED=v["ALIGNED"], **common)
    if kernel == "fd_fold_kernel":
        return (blocks, col(), col(), col(), col(), col(), col(), prefix, fd[0], 0.5), dict(
            X_DTYPE=x, HAS_BASELINE=v["HAS_BASELINE"], FIRST=v["FIRST"], ALIGNED=v["ALIGNED"], **common)
    if kernel == "update_kernel":
        n = v["n"]
        y = torch.zeros((v["N_SAMPLES"], n), dtype=torch.int64)
        power_mode = {k.POWER_SQRT.value: 0.5, k.POWER_ONE.value: 1.0, k.POWER_GENERAL.value: 0.75}
        assert power_mode[v["POWER_MODE"]] == POWERS[v["POWER_MODE"]]
        prefixes = torch.zeros(v["N_SAMPLES"], dtype=torch.int64)
        cols = [torch.zeros(n, dtype=torch.int64) for _ in range(12)]
        state_bits = v.get("STATE_BITS", 32)
        s_dtype = {32: k.tl.float32, 16: k.tl.bfloat16, 8: k.tl.int8}[state_bits]
        return (blocks, *cols[:8], y, *cols[8:11], prefixes, y.stride(0), f32(n, k.U_COUNT.value),
                float(POWERS[v["POWER_MODE"]]), fd), dict(
            X_DTYPE=x, S_DTYPE=s_dtype, STATE_BITS=state_bits, MASTER_BITS=v.get("MASTER_BITS", 0), MODE=v["MODE"],
            N_SAMPLES=y.shape[0], POWER_MODE=v["POWER_MODE"], ALIGNED=v["ALIGNED"], **common)
    raise KeyError(kernel)


def _compile(kernel_name: str, v: dict):
    """Bind the launch's arguments as JITFunction.run does, compile for TARGET: (PTX, ptxas log, cubin)."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from sassha_fused.backends import triton_backend as tb

    if tb._IMPORT_ERROR is not None:
        raise tb._IMPORT_ERROR
    kernel = getattr(tb._kernels, kernel_name)
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    args, kwargs = _launch(kernel_name, v)
    kwargs["debug"] = kernel.debug or triton.knobs.runtime.debug
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    # ptxas runs with -v inside triton.compile; its report is printed when asked for
    nvidia = getattr(triton.knobs, "nvidia", None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), _knob(nvidia, "dump_ptxas_log", True):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")
    log = printed.getvalue()
    if "Used" not in log:  # a triton without the knob: run its ptxas again on the PTX, as make_cubin does
        log = _ptxas_log(compiled.asm["ptx"], options)
    return compiled.asm["ptx"], log, compiled.asm["cubin"]


@contextlib.contextmanager
def _knob(obj, name, value):
    if obj is None or not hasattr(obj, name):
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _ptxas_log(ptx: str, options) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(TARGET[1]).path, "-lineinfo", "-v", *([] if options.enable_fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(TARGET[1])}", src, "-o", os.path.join(tmp, "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


# a 16-byte global access: four 32-bit words (fp32, or eight packed 16-bit values), or two 64-bit ones
_WIDE = {op: re.compile(rf"\b{op}\.global(?:\.[a-z0-9]+)*?(?:\.v4\.[bfsu]32|\.v2\.[bfsu]64)\b")
         for op in ("ld", "st")}
# an 8-byte vector access: two 32-bit words (eight packed 8-bit codes)
_HALF = {op: re.compile(rf"\b{op}\.global(?:\.[a-z0-9]+)*?\.v2\.[bfsu]32\b") for op in ("ld", "st")}


def _machine_code(ptx: str, log: str) -> dict:
    """What the kernel does on the GPU: its 16-byte global accesses (PTX) and ``ptxas -v``'s report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"ld16": len(_WIDE["ld"].findall(ptx)), "st16": len(_WIDE["st"].findall(ptx)),
            "ld8": len(_HALF["ld"].findall(ptx)), "st8": len(_HALF["st"].findall(ptx)),
            "registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills) if spills else None,
            "ptxas": log.strip()[-2000:]}


def full_tile_vectors(kernel: str, v: dict, width: int = 16):
    """(loads, stores) of ``width``-byte vectors one thread makes on an aligned full tile, from the arrays it moves.

    Each thread holds BLOCK / (32 * num_warps) elements of every array: 8 at 8 warps,
    two vectors of fp32, one of a 16-bit type. Every array the tile reads or writes
    must move in such vectors, so the counts are exact: one array left scalar (or
    split into 8-byte halves) changes them. An array of 8 bytes a thread (8-bit codes,
    int8 master corrections) moves in one 8-byte vector (``width`` 8) instead.
    """
    from sassha_fused.backends import triton_backend as tb

    per_thread = tb.BLOCK // (32 * tb.num_warps(True))
    size = {F32: 4, BF16: 2, F16: 2, "int8": 1, "int16": 2}

    def vectors(dtypes):
        if width == 16:
            return sum(per_thread * size[d] // 16 for d in dtypes)
        return sum(per_thread * size[d] % 16 // width for d in dtypes)

    x = v.get("X")
    if kernel == "sq_norm_partials_kernel":
        reads, writes = [v["V"]] + [x] * v["ADAPTIVE"], []
    elif kernel == "perturb_kernel":
        reads, writes = [x, v["V"]], [x, x]  # x and v; backup and x
    elif kernel == "probes_kernel":
        reads, writes = [], [x]
    elif kernel == "fd_move_kernel":
        # x is read when it is saved or moved from (without a base); the base when given
        reads = [x] * (v["HAS_SAVE"] or not v["HAS_BASE"]) + [x] * v["HAS_BASE"]
        writes = [x] + [x] * v["HAS_SAVE"]
    elif kernel == "fd_fold_kernel":
        reads, writes = [x] + [x] * v["HAS_BASELINE"] + [x] * (not v["FIRST"]), [x]
    elif kernel == "update_kernel":
        refresh = v["MODE"] != MODE_NONE
        # m and D in their encoding: 8-bit codes are 8 bytes a thread (a 16-byte vector holds 16),
        # so they and the group scales add no 16-byte access; a master correction is int8 / int16
        state = {32: F32, 16: BF16, 8: "int8"}[v.get("STATE_BITS", 32)]
        master = {0: [], 24: ["int8"], 32: ["int16"]}[v.get("MASTER_BITS", 0)]
        # x_t, g~, m, d (and y per sample), the correction; x, m (and d), the correction;
        # then the restore of a param that is not live
        reads = [x, x, state, state] + [x] * (v["N_SAMPLES"] if refresh else 0) + master + [x]
        writes = [x, state] + [state] * refresh + master + [x]
    else:
        return None
    return vectors(reads), vectors(writes)


def _worker(ids, out_path: str) -> None:
    """Compile the variants ``ids``; write {id: null or the error} to ``out_path``."""
    import triton

    from sassha_fused.backends import triton_backend as tb
    from sassha_fused.backends.base import RefreshMode

    # the constants the variants were written with are still the backend's
    assert (RefreshMode.NONE, RefreshMode.AUTOGRAD, RefreshMode.FD_DIRECT, RefreshMode.PRECOMPUTED) == (
        MODE_NONE, MODE_AUTOGRAD, MODE_FD_DIRECT, MODE_PRECOMPUTED)
    assert tuple(str(d).removeprefix("torch.") for d in tb._KERNEL_DTYPES) == PARAM_DTYPES
    by_id = {vid: (kernel, v) for vid, kernel, v in VARIANTS}
    results = {"": {"triton": f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})",
                    "version": triton.__version__}}
    for vid in ids:
        t0 = time.perf_counter()
        try:
            ptx, log, _ = _compile(*by_id[vid])
            results[vid] = {"error": None, **_machine_code(ptx, log)}
        except Exception:
            results[vid] = {"error": traceback.format_exc(limit=-8)}
        results[vid]["seconds"] = round(time.perf_counter() - t0, 3)
        with open(out_path, "w") as f:  # after each: a crash still reports what went before
            json.dump(results, f)


# ---------------------------------------------------------------------- tests
def _unavailable():
    """Why the compiles cannot run here, or None."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported: {type(exc).__name__}: {exc}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no CUDA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(TARGET[1])
        if not os.path.isfile(ptxas.path):
            return f"triton {triton.__version__}'s ptxas is not a file: {ptxas.path}"
    except Exception as exc:
        return f"triton {triton.__version__} cannot find ptxas: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def compiled(request):
    """{variant id: {"error", "seconds", "ld16", "st16", "registers", "spill_bytes", "ptxas"}} of the
    selected variants, from workers run once."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("SASSHA_EXPECT_TRITON"):  # run.sh's pass with a named triton: nothing to skip
            pytest.fail(f"SASSHA_EXPECT_TRITON={os.environ['SASSHA_EXPECT_TRITON']} but {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    here = os.path.realpath(__file__)
    selected = {item.callspec.params["vid"] for item in request.session.items
                if hasattr(item, "callspec") and os.path.realpath(str(item.fspath)) == here}
    # the variants of this session's tests (pytest -k ...), or all
    ids = [vid for vid, _, _ in VARIANTS if vid in selected] or [vid for vid, _, _ in VARIANTS]
    n_workers = max(1, min(cpus, 8, len(ids)))
    results, logs = {}, []
    with tempfile.TemporaryDirectory(prefix="sassha-triton-compile-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for w in range(n_workers):
            out = os.path.join(tmp, f"worker{w}.json")
            log = open(os.path.join(tmp, f"worker{w}.log"), "w+")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, *ids[w::n_workers]]
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out, log))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for proc, out, log in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if os.path.exists(out):
                with open(out) as f:
                    results.update(json.load(f))
            log.seek(0)
            logs.append(f"worker exit status {proc.returncode}:\n{log.read()[-4000:]}")
            log.close()
    for vid in ids:
        if vid not in results:
            results[vid] = {"error": "the worker for this variant stopped before reporting it\n" + "\n".join(logs)}
    results.setdefault("", {"triton": "triton (the workers did not say which)"})
    return results


MAX_REGISTERS = 128  # 65536 registers per SM: at least two 256-thread blocks at 128


def _ok(compiled, vid) -> dict:
    r = compiled[vid]
    if r["error"] is not None:
        pytest.fail(f"{vid} does not compile for sm_{TARGET[1]} with {compiled['']['triton']}:\n{r['error']}",
                    pytrace=False)
    return r


@pytest.mark.parametrize("vid", [vid for vid, _, _ in VARIANTS])
def test_kernel_compiles_for_sm90(compiled, vid):
    _ok(compiled, vid)


@pytest.mark.parametrize("vid", [vid for vid, _, _ in VARIANTS])
def test_registers_bounded_without_spills(compiled, vid):
    r = _ok(compiled, vid)
    assert r["registers"] is not None and r["spill_bytes"] is not None, f"no ptxas report:\n{r['ptxas']}"
    assert r["registers"] <= MAX_REGISTERS and r["spill_bytes"] == 0, (
        f"{vid}: {r['registers']} registers, {r['spill_bytes']} bytes spilled "
        f"({compiled['']['triton']}):\n{r['ptxas']}")


def test_compiled_with_the_expected_triton(compiled):
    """The workers compiled with ``SASSHA_EXPECT_TRITON`` where it is set (``run.sh test`` runs
    this file again with the GPU machines' triton first on PYTHONPATH), else with the triton
    this process imports."""
    import triton

    expected = os.environ.get("SASSHA_EXPECT_TRITON") or triton.__version__
    assert compiled[""].get("version") == expected, (
        f"the kernels were compiled by {compiled['']['triton']}, not triton {expected}")


ALIGNED_TILES = [(vid, kernel, v) for vid, kernel, v in VARIANTS if v.get("ALIGNED")]


@pytest.mark.parametrize("vid,kernel,v", ALIGNED_TILES, ids=[vid for vid, _, _ in ALIGNED_TILES])
def test_aligned_full_tiles_move_16_bytes_per_access(compiled, vid, kernel, v):
    r = _ok(compiled, vid)
    assert (r["ld16"], r["st16"]) == full_tile_vectors(kernel, v), (
        f"{vid}: {r['ld16']} 16-byte loads and {r['st16']} 16-byte stores in the PTX, "
        f"{full_tile_vectors(kernel, v)} expected ({compiled['']['triton']})")
    # arrays of 8 bytes a thread (8-bit codes, int8 corrections) in one 8-byte vector each, not byte by byte
    assert (r["ld8"], r["st8"]) == full_tile_vectors(kernel, v, width=8), (
        f"{vid}: {r['ld8']} 8-byte loads and {r['st8']} 8-byte stores in the PTX, "
        f"{full_tile_vectors(kernel, v, width=8)} expected ({compiled['']['triton']})")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    _worker(sys.argv[3:], sys.argv[2])
