"""Bandwidth of each fused Triton pass of SASSHA, and the optimizer-side step vs AdamW.

Needs a CUDA GPU (exits with a message otherwise). For each pass the script counts
the minimal bytes it must move (every array read once, every written array written
once), times the pass, and reports GB/s and that as a fraction of the device's
measured copy bandwidth (a torch copy of a buffer far larger than L2). It then times
the optimizer-side work of a SASSHA step (norm + perturb + update, plus the probes on
a Hessian-refresh step) against ``torch.optim.AdamW(fused=True).step()`` on the same
parameters, and the ``foreach`` backend for reference.

    python bench/triton_passes.py                   # 64M params, fp32 and bf16
    python bench/triton_passes.py --params 1e8 --dtype bf16 --reps 50

Timing: warm-up first (JIT compile, allocator), then per repetition
``synchronize; t0; fn(); synchronize; t1`` (wall clock, so host-side table work is
counted), reported as median with the 10th-90th percentile spread. A markdown table
goes to stdout, JSON with device, versions and date to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout without installing


def _fail(msg: str) -> None:
    print(f"bench/triton_passes.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _timeit(fn: Callable[[], object], reps: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_s": statistics.median(times), "p10_s": q(0.1), "p90_s": q(0.9), "min_s": times[0], "reps": reps}


def _sizes(total: int) -> List[int]:
    """A transformer-like mix: big matrices, medium matrices, many small vectors."""
    sizes: List[int] = []
    hidden = 2048
    while sum(sizes) < total:
        sizes += [hidden * hidden * 3, hidden * hidden, hidden * hidden * 4, hidden * 4 * hidden]  # qkv, o, mlp
        sizes += [hidden, hidden, 4 * hidden, hidden, hidden, 3 * hidden]  # norms and biases
    return sizes


def _copy_bandwidth(reps: int, warmup: int) -> Dict[str, float]:
    n = 1 << 28  # 1 GiB of fp32 per buffer: far beyond any L2
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), reps, warmup)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": 2 * n * 4, "GBps": 2 * n * 4 / t["median_s"] / 1e9, **t}


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        _fail("needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fail("TRITON_INTERPRET=1 is set: that runs the kernels in the slow CPU interpreter. Unset it.")
    try:
        import triton
        from sassha_fused.backends import GroupTensors, ProbeSpec
        from sassha_fused.backends.foreach import ForeachBackend
        from sassha_fused.backends.triton_backend import TritonBackend
    except Exception as exc:  # noqa: BLE001
        _fail(f"cannot import the Triton backend: {type(exc).__name__}: {exc}")

    dev = torch.device("cuda")
    torch.manual_seed(0)
    copy = _copy_bandwidth(args.reps, args.warmup)
    peak = copy["GBps"]
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "copy_bandwidth": copy,
        "runs": [],
    }
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    rows: List[str] = []
    for dtype in dtypes:
        sizes = _sizes(int(float(args.params)))
        n = sum(sizes)
        xb = torch.tensor([], dtype=dtype).element_size()  # param / grad / Hz bytes
        sb = 4  # fp32 state bytes
        params = [torch.randn(s, device=dev, dtype=dtype) * 0.1 for s in sizes]
        grads = [torch.randn_like(p) * 1e-2 for p in params]
        hz = [torch.randn_like(p) * 1e-2 for p in params]
        m = [torch.zeros(s, device=dev, dtype=torch.float32) for s in sizes]
        d = [torch.full((s,), 1e-3, device=dev, dtype=torch.float32) for s in sizes]
        backups = [torch.empty_like(p) for p in params]

        def group(bk=backups) -> "GroupTensors":
            return GroupTensors(
                params=params, grads=grads, exp_avgs=m, exp_hessian_diags=d, backups=bk,
                steps=[100] * len(params), bias_correction2=[0.3] * len(params),
                param_indices=list(range(len(params))), lr=1e-3, weight_decay=0.1, rho=0.05,
            )

        spec = ProbeSpec(seed=0, refresh=3, n_samples=1)
        tri = TritonBackend()
        fe = ForeachBackend()
        g_pert, g_upd = group(), group(params)  # update reading x_t from the param itself
        sq = tri.sq_norm([g_pert], "grads", False)

        # minimal bytes: every array read once, every written array written once.
        # perturb: read x, g; write backup, x.  update: read x_t, g, m, D (+ Hz); write x, m (+ D).
        passes = {
            "sq_norm (grads)": (lambda: tri.sq_norm([g_pert], "grads", False), n * xb),
            "perturb": (lambda: tri.perturb([g_pert], sq, "grads", 1.0, False), n * (2 * xb + 2 * xb)),
            "probes (1 sample)": (lambda: tri.probes([g_pert], spec, 0), n * xb),
            "update (plain step)": (lambda: tri.update([g_upd], None, None), n * (2 * xb + 2 * sb + xb + sb)),
            "update (refresh, S=1)": (lambda: tri.update([g_pert], [[hz]], spec), n * (3 * xb + 2 * sb + xb + 2 * sb)),
        }
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        run_rec = {"dtype": name, "params": n, "tensors": len(sizes), "passes": {}, "steps": {}}
        for label, (fn, nbytes) in passes.items():
            before = tri.launches
            fn()
            launches = tri.launches - before
            t = _timeit(fn, args.reps, args.warmup)
            gbps = nbytes / t["median_s"] / 1e9
            run_rec["passes"][label] = {"bytes": nbytes, "GBps": gbps, "of_copy": gbps / peak, "launches": launches, **t}
            rows.append(
                f"| {name} | {label} | {nbytes / 1e9:.3f} | {t['median_s'] * 1e3:.3f} "
                f"({t['p10_s'] * 1e3:.3f}-{t['p90_s'] * 1e3:.3f}) | {gbps:.0f} | {100 * gbps / peak:.0f}% | {launches} |"
            )

        # optimizer-side step: everything but the autograd passes
        def sassha_plain(be=tri):
            s = be.sq_norm([g_pert], "grads", False)
            be.perturb([g_pert], s, "grads", 1.0, False)
            be.update([g_pert], None, None)

        def sassha_refresh(be=tri):
            s = be.sq_norm([g_pert], "grads", False)
            be.perturb([g_pert], s, "grads", 1.0, False)
            be.probes([g_pert], spec, 0)
            be.update([g_pert], [[hz]], spec)

        adam_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(adam_params, grads):
            p.grad = g.clone()
        adamw = torch.optim.AdamW(adam_params, lr=1e-3, weight_decay=0.1, fused=True)
        steps = {
            "AdamW(fused=True).step": lambda: adamw.step(),
            "SASSHA triton, plain step": sassha_plain,
            "SASSHA triton, refresh step": sassha_refresh,
            "SASSHA foreach, plain step": lambda: sassha_plain(fe),
            "SASSHA foreach, refresh step": lambda: sassha_refresh(fe),
        }
        adam_t = None
        for label, fn in steps.items():
            t = _timeit(fn, max(5, args.reps // 2) if "foreach" in label else args.reps, args.warmup)
            adam_t = adam_t or t["median_s"]
            run_rec["steps"][label] = {**t, "vs_adamw": t["median_s"] / adam_t}
            rows.append(
                f"| {name} | {label} | - | {t['median_s'] * 1e3:.3f} "
                f"({t['p10_s'] * 1e3:.3f}-{t['p90_s'] * 1e3:.3f}) | - | {t['median_s'] / adam_t:.2f}x AdamW | - |"
            )
        results["runs"].append(run_rec)
        del params, grads, hz, m, d, backups, adam_params, adamw, g_pert, g_upd
        torch.cuda.empty_cache()

    print(f"\n{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}")
    print(f"copy bandwidth (torch copy_ of 1 GiB): {peak:.0f} GB/s\n")
    print("| dtype | pass | GB moved | ms median (p10-p90) | GB/s | of copy | launches |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(HERE, "results", f"triton_passes-{stamp}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="64e6", help="total parameters (>= 5e7 for meaningful numbers)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
