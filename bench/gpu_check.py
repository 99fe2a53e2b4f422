"""The GPU check in one call: build, tests, bandwidth, step time, syncs, end-to-end.

    bench/gpu_check.sh            # on an H100/H200, at most 5 minutes, results to $OUT or bench/results/gpu-check/
    bench/gpu_check.sh --dry      # the same stages at toy sizes on the CPU (Triton interpreted), for CI

Stages run one after another, each in its own process under a time budget; a stage
that runs out of time is stopped and recorded as cut (with what it measured until
then), never dropped. The whole run stays inside ``--budget`` seconds (default 300).

    build     the C++/CUDA extension, just in time, for the device's architecture; the
              fp-fusion settings the kernels compile with; the hot loops' loads and
              stores in the device's machine code (cuobjdump -sass: LDG/STG.E.128)
    tests     the sync and capture tests first, then the CUDA and Triton tests and the
              sm_90 PTX/ptxas checks with the machine's triton (pytest, per-test
              timeout, in the stages' environment: the build stage's extension is reused)
    passes    copy bandwidth, and each fused pass's GB/s at >= 50M params, fp32 and bf16
              (timed with CUDA events around each call); last, Triton's fp32 update
              passes again without the register cap (maxnreg), for the cap's trade
    steps     the optimizer-side step against AdamW(fused=True): 10M and 100M params in
              100 tensors, and 1000 small tensors
    syncs     host synchronisations per step (torch.cuda.set_sync_debug_mode("error")) per
              backend and HVP method (the tests stage also replays a CUDA-graph-captured
              step against eager steps, capturable=True)
    e2e       whole training steps of a GPT-2-small-shaped model and a ResNet-18: AdamW,
              SAM, the official code's way (written-out attention, a double-backward graph
              every step), SASSHA with autograd and finite-difference HVPs, and SASSHA
              with finite differences on torch.compile + fused attention; peak memory

Writes ``gpu_check.json`` (every record names the device, versions and date),
``gpu_check.md`` (the tables), ``build.log`` and ``tests.log``: four files.

Versions. The lent machine has torch 2.11 (CUDA 13) and triton 3.6; this project
pins torch 2.13 and triton 3.9 on the CPU. Checked here on 2026-12-02: the Triton
kernels pass the Triton tests under triton 3.6's interpreter too (with numpy < 2.4:
3.6's interpreter converts loop bounds with ``int(ndarray)``, which numpy 2.4
refuses; it also widens float kernel arguments to fp64, so the one product that met
``div_rn`` that way is cast to fp32). torch 2.11 itself could not be tried (only a
2.13 wheel is at hand): the build and tests stages are where an incompatibility
would show; the extension is built just in time against the installed torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

# name -> budget in seconds (real run, 300 in all: twice in 15 minutes of device time
# with the machine's start); the dry run scales them to its budget
STAGES = {"build": 75, "tests": 85, "passes": 35, "steps": 30, "syncs": 20, "e2e": 55}


# ------------------------------------------------------------------ records
class Recorder:
    """Appends one JSON record per line, so a stage stopped mid-way keeps what it measured."""

    def __init__(self, path: str, stage: str) -> None:
        self.path, self.stage = path, stage

    def __call__(self, **record) -> None:
        record = {"stage": self.stage, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(json.dumps(record, default=str), flush=True)


def environment() -> Dict[str, str]:
    import torch

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "cuda": str(torch.version.cuda)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable ({exc})"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        from common import cpu_model

        env["device"] = f"CPU: {cpu_model()}"
    return env


# --------------------------------------------------------------------- stages
def stage_build(rec: Recorder, dry: bool, out: str) -> None:
    t0 = time.perf_counter()
    from sassha_fused import _build, available_backends

    build = _build.load_extension(verbose=not dry)
    rec(item="extension", ok=build.ok, how=build.how, with_cuda=build.with_cuda, error=build.error,
        notes=build.notes, seconds=time.perf_counter() - t0)
    for name, status in available_backends().items():
        rec(item="backend", backend=name, available=status.available, reason=status.reason)
    rec(item="fp_fusion", **fp_fusion(_build))
    machine_code(rec, build)


def fp_fusion(_build) -> Dict:
    """Whether the kernels are compiled with multiply-adds fused (one rounding for a * b + c).

    Fused, the fused kernels' momentum and EMA round differently from eager's separate
    multiply and add (within the parity tests' tolerances, not bitwise); the tests
    stage's parity tests run with exactly these settings.
    """
    out: Dict = {"nvcc_fmad": "--fmad=false" not in _build.NVCC_FLAGS, "nvcc_flags": " ".join(_build.NVCC_FLAGS)}
    try:
        import triton

        language = triton.knobs.language
        out["triton_enable_fp_fusion"] = (not language.force_disable_fp_fusion) and bool(language.default_fp_fusion)
        out["TRITON_DEFAULT_FP_FUSION"] = os.environ.get("TRITON_DEFAULT_FP_FUSION", "unset (triton's default)")
    except Exception as exc:  # noqa: BLE001  (a triton without these knobs: fusion on, its old default)
        out["triton_enable_fp_fusion"] = f"unknown ({type(exc).__name__}: {exc})"
    return out


def _cuobjdump() -> Optional[str]:
    import shutil

    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("cuobjdump")


def sass_accesses(path: str, tool: str) -> Dict[str, Dict[str, int]]:
    """{function: {"LDG.128", "STG.128", "LDG", "STG"}} counted in ``cuobjdump -sass`` of a cubin or library."""
    import re

    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=120, check=True).stdout
    out: Dict[str, Dict[str, int]] = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        short = re.findall(r"[a-z][a-z_]*_kernel(?:I\w*)?", name)  # the last: past the file's own name
        counts = {}
        for op in ("LDG", "STG"):
            counts[op] = len(re.findall(rf"\b{op}\.E\b[.\w]*", chunk))
            counts[f"{op}.128"] = len(re.findall(rf"\b{op}\.E(?:\.[A-Z0-9_]+)*\.128\b", chunk))
        out[short[-1] if short else name] = counts
    return out


def machine_code(rec: Recorder, build) -> None:
    """The hot loops' loads and stores in the device's machine code (SASS): 128-bit (LDG/STG.E.128).

    Triton: a few aligned variants compiled for sm_90 by the installed triton (the
    GPU machine's version), as tests/test_triton_compile.py compiles them. CUDA: the
    extension just built, when it has CUDA kernels.
    """
    tool = _cuobjdump()
    if tool is None:
        rec(item="machine_code", checked=False, reason="no cuobjdump (triton's or the CUDA toolkit's)")
        return
    import tempfile

    sys.path.insert(0, os.path.join(REPO, "tests"))
    try:
        import test_triton_compile as tc

        by_id = {vid: (kernel, v) for vid, kernel, v in tc.VARIANTS}
        for vid in ("update-X=float32-MODE=0-N_SAMPLES=1-POWER_MODE=0-ALIGNED=True-n=3",
                    "update-X=bfloat16-MODE=1-N_SAMPLES=2-POWER_MODE=0-ALIGNED=True-n=1",
                    "perturb-X=bfloat16-V=bfloat16-ADAPTIVE=False-ALIGNED=True",
                    "sq_norm_partials-X=float32-V=float32-ADAPTIVE=False-ALIGNED=True"):
            _, log, cubin = tc._compile(*by_id[vid])
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(cubin)
                f.flush()
                counts = next(iter(sass_accesses(f.name, tool).values()))
            rec(item="machine_code", backend="triton", variant=vid, **counts,
                wide=counts["LDG.128"] > 0, ptxas=[ln.strip() for ln in log.splitlines() if "Used" in ln or "spill" in ln])
    except Exception as exc:  # noqa: BLE001
        rec(item="machine_code", backend="triton", checked=False, reason=f"{type(exc).__name__}: {exc}")
    if build.ok and build.with_cuda and build.library and os.path.isfile(build.library):
        for name, counts in sass_accesses(build.library, tool).items():
            rec(item="machine_code", backend="cuda", kernel=name, **counts,
                wide="sum_partials" in name or counts["LDG.128"] + counts["STG.128"] > 0)
    else:
        rec(item="machine_code", backend="cuda", checked=False,
            reason="no CUDA kernels in this build" if build.ok else f"no extension: {build.error}")


def record_pass(rec: Recorder, fn: Callable, device, dry: bool, bw: float, nbytes: int, numel: int, **fields) -> None:
    """Time one pass (CUDA events on a GPU); record its GB/s over ``nbytes`` per element and its share of copy's."""
    from common import summarize, time_it

    ms = summarize(time_it(fn, device, reps=3 if dry else 20, warmup=1 if dry else 3))["median_ms"]
    gbps = nbytes * numel / (ms / 1e3) / 1e9
    rec(item="pass", **fields, numel=numel, median_ms=ms, GBps=gbps, of_copy=gbps / bw)


def stage_passes(rec: Recorder, dry: bool, out: str) -> None:
    import torch

    from common import copy_bandwidth_gbps, pass_bytes, pass_calls
    from sassha_fused import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    numel = 10**5 if dry else 64 * 10**6
    bw = copy_bandwidth_gbps(device, numel if dry else 1 << 28)
    rec(item="copy", GBps=bw)
    status = available_backends()
    backends = [b for b in (("triton", "cuda") if device.type == "cuda" else ("cpp", "foreach")) if status[b].available]
    for dtype in (torch.float32, torch.bfloat16):
        for backend in backends:
            dt = str(dtype).replace("torch.", "")
            calls = pass_calls(backend, device, numel, 100, dtype)
            for name, fn in calls.items():
                record_pass(rec, fn, device, dry, bw, pass_bytes(name, dtype), numel, backend=backend, dtype=dt,
                            pass_=name)
            del calls
            # the update with 8-bit state: fewer bytes, the same pass
            calls = pass_calls(backend, device, numel, 100, dtype, state_bits=8)
            for name, fn in calls.items():
                if name.startswith("update"):
                    record_pass(rec, fn, device, dry, bw, pass_bytes(name, dtype, 8), numel, backend=backend,
                                dtype=dt, pass_=f"{name}, state_bits=8")
            del calls
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if status["triton"].available:  # last: the first rows a cut stage would lose
        time_update_without_register_cap(rec, device, 4096 if dry else numel, bw, dry)


def time_update_without_register_cap(rec: Recorder, device, numel: int, bw: float, dry: bool) -> None:
    """Triton's fp32 update passes launched without ``maxnreg``, for the cap's trade.

    Every launch caps registers at 128 (``triton_backend.LAUNCH_OPTIONS``); left to
    itself ptxas takes fewer in some update variants (more programs per SM) and spills
    a little in others (bench/NOTES-triton.md). Rows ``"<pass>, without maxnreg"``
    stand beside the capped ones of the same stage.
    """
    import torch

    from common import pass_bytes, pass_calls
    from sassha_fused.backends import triton_backend as tb

    capped = tb.LAUNCH_OPTIONS
    tb.LAUNCH_OPTIONS = {a: {k: v for k, v in o.items() if k != "maxnreg"} for a, o in capped.items()}
    try:
        calls = pass_calls("triton", device, numel, 2 if dry else 100, torch.float32)
        for name in ("update", "update+refresh (autograd)"):
            record_pass(rec, calls[name], device, dry, bw, pass_bytes(name, torch.float32), numel, backend="triton",
                        dtype="float32", pass_=f"{name}, without maxnreg")
    finally:
        tb.LAUNCH_OPTIONS = capped


def stage_steps(rec: Recorder, dry: bool, out: str) -> None:
    import torch

    from common import AdamWImpl, SasshaImpl, make_problem, summarize, time_it
    from sassha_fused import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = available_backends()
    backends = [b for b in (("triton", "cuda", "foreach") if device.type == "cuda" else ("cpp", "foreach"))
                if status[b].available]
    shapes = [(10**4, 100), (64 * 10, 1000)] if dry else [(10**7, 100), (10**8, 100), (64 * 1000, 1000)]
    for numel, tensors in shapes:
        row = {}
        impls: Dict[str, Callable] = {f"sassha-{b}": (lambda pb, b=b: SasshaImpl(pb, False, b)) for b in backends}
        impls["adamw-fused"] = lambda pb: AdamWImpl(pb, False, "fused")
        for name, make in impls.items():
            impl = make(make_problem(numel, tensors, device))
            row[name] = summarize(time_it(impl.step, device, reps=3 if dry else 20, warmup=1 if dry else 3))["median_ms"]
            del impl
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for name, ms in row.items():
            rec(item="step", numel=numel, tensors=tensors, impl=name, median_ms=ms,
                over_adamw_fused=ms / row["adamw-fused"])


def stage_syncs(rec: Recorder, dry: bool, out: str) -> None:
    import torch

    from common import make_problem
    from sassha_fused import SASSHA, available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = available_backends()
    backends = [b for b in (("triton", "cuda", "foreach") if device.type == "cuda" else ("foreach",))
                if status[b].available]
    for backend in backends:
        for hvp in ("autograd", "finite_difference"):
            pb = make_problem(10**4 if dry else 10**6, 50, device)
            opt = SASSHA(pb.params, lr=1e-3, lazy_hessian=2, backend=backend, hvp=hvp)

            def loss():
                return sum((c * p * p).sum() for c, p in zip(pb.curvature, pb.params))

            def step():
                loss().backward()
                opt.perturb_weights()
                loss().backward(create_graph=opt.hessian_due)
                for _ in opt.hvp_passes():
                    loss().backward()
                opt.unperturb()
                opt.step()
                opt.zero_grad()

            for _ in range(3):
                step()
            error = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(4):  # two refresh steps, two plain ones
                    step()
            except RuntimeError as exc:
                error = str(exc).splitlines()[0]
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            rec(item="syncs", backend=backend, hvp=hvp, sync_free=error is None, error=error,
                checked=device.type == "cuda")


def stage_e2e(rec: Recorder, dry: bool, out: str) -> None:
    import torch

    from report import run_one
    from sassha_fused import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = available_backends()
    fused = next(b for b in (("triton", "cuda", "foreach") if device.type == "cuda" else ("cpp", "foreach"))
                 if status[b].available)
    configs = ["adamw", "sam", "official-style", f"sassha:{fused}", f"sassha-fd:{fused}"]
    runs = [(model, opt_name) for model in ("gpt2-small", "resnet18-cifar") for opt_name in configs]
    if not dry:  # compiling comes last: it takes the longest, and a cut should cost it alone
        runs += [(model, f"sassha-fd-compiled-sdpa:{fused}") for model in ("gpt2-small", "resnet18-cifar")]
    for model, opt_name in runs:
        t0 = time.perf_counter()
        try:
            r = run_one(model, opt_name, device, steps=2 if dry else 10, quick=dry)
            rec(item="e2e", model=model, optimizer=opt_name, params=r["params"], median_ms=r["median_ms"],
                mean_ms=r["mean_ms"], peak_MiB=r["peak_MiB"], seconds=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            rec(item="e2e", model=model, optimizer=opt_name, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _gpu_doc_pages() -> str:
    """`` or <page>`` for each documentation page with a GPU block (tests/test_docs.py runs a
    page's blocks in order, so selecting the page runs its setup blocks too)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    try:
        import test_docs

        pages = sorted({os.path.splitext(os.path.basename(b.page))[0] for b in test_docs.gpu_blocks()})
    finally:
        sys.path.pop(0)
    return "".join(f" or {page}" for page in pages)


def run_tests(out: str, dry: bool, budget: float, env: Dict[str, str]) -> Dict:
    """pytest of the GPU-relevant tests, in the stages' environment (the build stage's
    extension is found, not rebuilt); per-test results parsed from the verbose log."""
    # the sync and capture tests first: a cut stage still has their outcome
    if dry:
        args = ["tests/test_sync_free.py", "-k", "foreach and autograd"]
    else:
        args = ["tests/test_sync_free.py", "tests/test_triton_backend.py", "tests/test_triton_compact_state.py",
                "tests/test_cuda_sources.py",
                "tests/test_hvp.py", "tests/test_faults.py", "tests/test_properties.py",
                "tests/test_triton_compile.py",  # the PTX/ptxas checks with the machine's triton
                "tests/test_timm.py",  # timm imports on the GPU machine's torch stack (it skips on CPU CI)
                "tests/test_docs.py",  # the documentation pages with blocks marked <!-- gpu -->
                "-k", "triton or cuda or sync or capt or every_backend or timm" + _gpu_doc_pages()]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args]
    try:
        import pytest_timeout  # noqa: F401

        cmd += ["--timeout", "90"]
    except ImportError:
        pass
    log = os.path.join(out, "tests.log")
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget)
            cut, code = False, proc.returncode
        except subprocess.TimeoutExpired:
            cut, code = True, None
    counts: Dict[str, int] = {}
    failed: List[str] = []
    key_tests: Dict[str, str] = {}  # the capture and sync tests, by id
    with open(log) as f:
        for line in f:
            for word in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL"):
                if f" {word}" in line and "::" in line:
                    counts[word.lower()] = counts.get(word.lower(), 0) + 1
                    test_id = line.split(" ")[0]
                    if word in ("FAILED", "ERROR"):
                        failed.append(test_id)
                    if "captured" in test_id or "synchronise" in test_id:
                        key_tests[test_id.split("::")[-1]] = word
    return {"stage": "tests", "item": "pytest", "cut": cut, "returncode": code, "counts": counts, "failed": failed,
            "key_tests": key_tests, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------- driver
def summary_markdown(env: Dict, records: List[Dict]) -> str:
    lines = [f"# GPU check, {env['date']}", "",
             f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"Python {env['python']}", ""]
    lines += ["| stage | status | seconds |", "|---|---|---:|"]
    for r in records:
        if r.get("item") == "stage":
            lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} |")
    by = lambda item: [r for r in records if r.get("item") == item]  # noqa: E731
    for r in by("pytest"):
        lines += ["", f"Tests: {r['counts']}" + (" (cut at the budget)" if r["cut"] else ""),
                  *(f"- failed: {name}" for name in r["failed"][:30])]
    copy = by("copy")
    if copy:
        bw = copy[0]["GBps"]
        lines += ["", f"## Passes (copy bandwidth {bw:.0f} GB/s)", "",
                  "| backend | dtype | pass | ms | GB/s | of copy |", "|---|---|---|---:|---:|---:|"]
        for r in by("pass"):
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['pass_']} | {r['median_ms']:.3f} | {r['GBps']:.0f} "
                         f"| {100 * r['of_copy']:.0f}% |")
    if by("step"):
        lines += ["", "## Optimizer-side non-refresh step", "",
                  "| params | tensors | implementation | ms | / AdamW(fused) |", "|---:|---:|---|---:|---:|"]
        for r in by("step"):
            lines.append(f"| {r['numel']:,} | {r['tensors']} | {r['impl']} | {r['median_ms']:.3f} | "
                         f"{r['over_adamw_fused']:.2f}x |")
    if by("syncs") or any(r.get("key_tests") for r in by("pytest")):
        lines += ["", "## Synchronisation and capture", ""]
        for r in by("syncs"):
            status = "no sync" if r["sync_free"] else f"sync: {r['error']}"
            lines.append(f"- {r['backend']}, {r['hvp']}: {status}" + ("" if r["checked"] else " (not checked: no GPU)"))
        for r in by("pytest"):
            lines += [f"- test {name}: {outcome}" for name, outcome in r.get("key_tests", {}).items()]
    if by("e2e"):
        lines += ["", "## End to end (k = 10, one refresh among the timed steps)", "",
                  "Peak memory: the CUDA allocator's peak per configuration (on the CPU, the process's so far).", "",
                  "| model | optimizer | ms / step (mean) | / SAM | / official-style | peak MiB |",
                  "|---|---|---:|---:|---:|---:|"]
        for model in dict.fromkeys(r["model"] for r in by("e2e")):
            rows = {r["optimizer"]: r for r in by("e2e") if r["model"] == model}
            for name, r in rows.items():
                if "error" in r:
                    lines.append(f"| {model} | {name} | failed: {r['error']} | | | |")
                    continue
                rel = {b: (f"{r['mean_ms'] / rows[b]['mean_ms']:.2f}x" if "mean_ms" in rows.get(b, {}) else "-")
                       for b in ("sam", "official-style")}
                lines.append(f"| {model} | {name} | {r['mean_ms']:.1f} | {rel['sam']} | {rel['official-style']} | "
                             f"{r['peak_MiB']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="toy sizes on the CPU (Triton interpreted): the CI smoke run")
    ap.add_argument("--out", default=None, help="where the files go (default: $OUT, else bench/results/gpu-check)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 300, dry 200)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child process: run one stage
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", "gpu-check")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "records.jsonl.tmp")

    if args.stage:
        rec = Recorder(jsonl, args.stage)
        try:
            globals()[f"stage_{args.stage}"](rec, args.dry, out)
        except Exception as exc:  # noqa: BLE001
            rec(item="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
            return 1
        return 0

    env = environment()
    budget = args.budget or (200.0 if args.dry else float(sum(STAGES.values())))
    scale = budget / sum(STAGES.values())
    deadline = time.perf_counter() + budget
    if os.path.exists(jsonl):
        os.remove(jsonl)
    records: List[Dict] = []
    child_env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.dry:  # the dry run uses the build the test suite uses
        child_env.setdefault("SASSHA_FUSED_BUILD_DIR", "/tmp/sassha-build")
        child_env.setdefault("TORCH_CUDA_ARCH_LIST", env.get("capability", "9.0"))
    if args.dry or "device" in env and env["device"].startswith("CPU"):
        child_env["TRITON_INTERPRET"] = "1"
    for name in args.stages:
        left = deadline - time.perf_counter()
        stage_budget = min(STAGES[name] * scale, left) if name != args.stages[-1] else left
        start = time.perf_counter()
        if stage_budget < 5:
            records.append({"stage": name, "item": "stage", "status": "cut: no time left", "seconds": 0.0})
            continue
        if name == "tests":
            r = run_tests(out, args.dry, stage_budget, child_env)
            records.append(r)
            status = "cut" if r["cut"] else ("ok" if r["returncode"] == 0 else f"failed ({r['returncode']})")
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--out", out] + (["--dry"] if args.dry
                                                                                                 else [])
            log = open(os.path.join(out, "build.log"), "a") if name == "build" else subprocess.DEVNULL
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=child_env, timeout=stage_budget, stdout=log,
                                      stderr=subprocess.STDOUT if name == "build" else None)
                status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"cut at its budget of {stage_budget:.0f} s"
            finally:
                if log is not subprocess.DEVNULL:
                    log.close()
        records.append({"stage": name, "item": "stage", "status": status, "seconds": time.perf_counter() - start})
        print(f"[gpu_check] {name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            records += [json.loads(line) for line in f if line.strip()]
        os.remove(jsonl)
    for r in records:
        r.update({k: env[k] for k in ("device", "date", "torch", "triton")})
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"env": env, "dry": args.dry, "budget_s": budget, "records": records}, f, indent=1, default=str)
    md = summary_markdown(env, records)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    failed = [r for r in records if r.get("item") == "stage" and r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
