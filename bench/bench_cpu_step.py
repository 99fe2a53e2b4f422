"""CPU optimizer-side step time: SASSHA backends vs official-style code vs AdamW.

A non-refresh SASSHA step through the official protocol, optimizer side only:
``perturb_weights`` (global grad norm + perturbation), ``unperturb``, ``step``,
with synthetic gradients assigned to ``.grad`` (no model forward/backward). The
same parameter shapes are stepped by ``torch.optim.AdamW(fused=True)`` and
``AdamW(foreach=True)`` for scale.

    .venv/bin/python bench/bench_cpu_step.py [--numel 10000000] [--tensors 100] [--reps 30]

Prints a markdown table (median, spread, ratios, effective GB/s) and writes the
numbers with device, versions and date to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import cpu_model  # noqa: E402
from official_style import OfficialStyleSASSHA  # noqa: E402
from sassha_fused import SASSHA, available_backends  # noqa: E402

# Bytes per element a step must move, as each implementation is designed (fp32):
# SASSHA: norm reads g (4); perturb reads x, g, writes backup, x (16); unperturb
# reads backup, writes x (8); update reads x, g~, m, D, writes x, m (24).
# AdamW: reads p, g, m, v, writes p, m, v (28).
BYTES_PER_ELEMENT = {"sassha": 52, "adamw": 28}


def make_tensors(numel: int, n_tensors: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    per = numel // n_tensors
    params = [torch.nn.Parameter(torch.randn(per, generator=gen) * 0.5) for _ in range(n_tensors)]
    g1 = [torch.randn(per, generator=gen) for _ in range(n_tensors)]
    g2 = [torch.randn(per, generator=gen) for _ in range(n_tensors)]
    return params, g1, g2


def first_refresh_step(opt, params) -> None:
    """One real step with a Hessian refresh so every param has state; later steps are non-refresh."""
    def loss():
        return sum((p * p).sum() for p in params)

    if isinstance(opt, OfficialStyleSASSHA):
        loss().backward()
        opt.perturb_weights(zero_grad=True)
        loss().backward(create_graph=True)
        opt.unperturb()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
            p.hess = p.hess.detach()
    else:
        opt.step(loss)
        opt.zero_grad(set_to_none=True)


def sassha_step(opt, params, g1, g2) -> None:
    for p, g in zip(params, g1):
        p.grad = g
    opt.perturb_weights(zero_grad=True)
    for p, g in zip(params, g2):
        p.grad = g
    opt.unperturb()
    opt.step()


def adamw_step(opt, params, g1, g2) -> None:
    for p, g in zip(params, g2):
        p.grad = g
    opt.step()


def time_it(fn, reps: int, warmup: int):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="subset of implementations to run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    lr, k = 1e-4, 10**6  # lazy_hessian = 10**6: every timed step is a non-refresh step
    impls = {
        "official-style eager": ("sassha", lambda ps: OfficialStyleSASSHA(ps, lr=lr, lazy_hessian=k)),
        "sassha eager": ("sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="eager")),
        "sassha foreach": ("sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="foreach")),
        "sassha cpp": ("sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="cpp")),
        "sassha cpp, nonfinite='ignore'": (
            "sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="cpp", nonfinite="ignore")),
        "sassha cpp, defer_unperturb": (
            "sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="cpp", defer_unperturb=True)),
        "sassha cpp, defer_unperturb, nonfinite='ignore'": (
            "sassha", lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, backend="cpp", defer_unperturb=True,
                                        nonfinite="ignore")),
        "AdamW(fused=True)": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)),
        "AdamW(foreach=True)": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True)),
    }
    if not available_backends()["cpp"]:
        print(f"cpp backend unavailable: {available_backends()['cpp'].reason}", file=sys.stderr)
        impls = {n: v for n, v in impls.items() if "cpp" not in n}
    if args.only:
        impls = {n: v for n, v in impls.items() if n in args.only}

    results = {}
    for name, (kind, make) in impls.items():
        params, g1, g2 = make_tensors(args.numel, args.tensors, seed=0)
        opt = make(params)
        if kind == "sassha":
            first_refresh_step(opt, params)
            fn = lambda: sassha_step(opt, params, g1, g2)  # noqa: E731
        else:
            fn = lambda: adamw_step(opt, params, g1, g2)  # noqa: E731
        times = time_it(fn, args.reps, args.warmup)
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4)
        numel = (args.numel // args.tensors) * args.tensors
        results[name] = {
            "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "gb_per_s": BYTES_PER_ELEMENT[kind] * numel / med / 1e9,
            "bytes_per_element": BYTES_PER_ELEMENT[kind], "times_ms": [t * 1e3 for t in times],
        }
        print(f"  {name}: {med * 1e3:.2f} ms", file=sys.stderr)
        del opt, params, g1, g2

    meta = {
        "device": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "numel": args.numel, "tensors": args.tensors, "reps": args.reps, "warmup": args.warmup,
        "step": "non-refresh SASSHA step, official protocol, optimizer side only "
                "(perturb_weights + unperturb + step); AdamW: step",
    }
    official = results.get("official-style eager", {}).get("median_ms")
    fused = results.get("AdamW(fused=True)", {}).get("median_ms")
    print(f"\n{meta['numel'] / 1e6:g}M fp32 params in {meta['tensors']} tensors; {meta['device']}; "
          f"torch {meta['torch']}; {meta['date']}\n")
    print("| implementation | median ms | IQR ms | min-max ms | vs official-style | vs AdamW(fused) | GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        vs_off = f"{official / r['median_ms']:.2f}x faster" if official else "-"
        vs_fused = f"{r['median_ms'] / fused:.2f}x time" if fused else "-"
        print(f"| {name} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
              f"{r['min_ms']:.2f}-{r['max_ms']:.2f} | {vs_off} | {vs_fused} | {r['gb_per_s']:.1f} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cpu_step_{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
