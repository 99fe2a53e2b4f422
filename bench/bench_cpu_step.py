"""CPU optimizer-side step time: SASSHA backends vs official-style code vs AdamW.

A non-refresh SASSHA step through the official protocol, optimizer side only:
``perturb_weights`` (global grad norm + perturbation), ``unperturb``, ``step``,
with synthetic gradients assigned to ``.grad`` (no model forward/backward). The
same parameter shapes are stepped by ``torch.optim.AdamW(fused=True)`` and
``AdamW(foreach=True)`` for scale. Where training runs a forward and a backward
pass, this benchmark writes a 64 MiB buffer (untimed), so every optimizer call
finds its arrays evicted from the caches as it would in training
(``--flush-mib 0``: steps back to back, which lets the smaller working set of
AdamW keep part of its arrays in the 32 MiB L3 from one step to the next).
The implementations take turns in rounds; ratios are medians of per-round ratios.
A second table times each C++ pass against one AdamW step, call by call; a third
times each call of a whole C++ step (perturb_weights, unperturb, step) against one
AdamW step, at full size and at 1600 params (the host work).

    .venv/bin/python bench/bench_cpu_step.py [--numel 10000000] [--tensors 100] [--rounds 10] [--reps 5] [--flush-mib 64]

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

from common import PASS_BYTES, cpu_model, make_problem, pass_calls  # noqa: E402
from official_style import OfficialStyleSASSHA  # noqa: E402
from sassha_fused import SASSHA, available_backends  # noqa: E402

# Bytes per fp32 element a non-refresh step moves, as each implementation is
# written (reads + writes of its passes; temporaries count).
# SASSHA: norm reads g (4); perturb reads x, g, writes backup, x (16); the restore
# of unperturb() reads backup, writes x (8; fused into the update with
# defer_unperturb); the finite check reads g~ (4; none with nonfinite='ignore'; in
# one process unperturb() reads it in the restore's sweep, the C++ backend in one op);
# the update reads x_t, g~, m, D, writes x, m (24). The eager and foreach backends
# run the same phases in more passes; they are counted as the fused design.
# Official-style: (1.0 * g) 8, its norm 4, e_w = g * scale 8, p += e_w 12,
# p -= e_w 12, p.hess.abs() 8, .clone() 8, p *= decay 8, m *= beta1 8, m += g 12,
# D ** p 8, / c2 8, + eps 8, p.addcdiv_ 16 (128).
# AdamW: reads p, g, m, v, writes p, m, v (28).
BYTES_OFFICIAL_STYLE = 128
READ_REFERENCE = "torch sum of one fp32 tensor (read-only reference)"
BYTES_ADAMW = 28


def sassha_bytes(defer_unperturb: bool = False, nonfinite: str = "skip") -> int:
    return 4 + 16 + (0 if defer_unperturb else 8) + (0 if nonfinite == "ignore" else 4) + 24


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


def sassha_step(opt, params, g1, g2, between) -> float:
    """One step through the official protocol; returns the seconds spent in the optimizer.

    ``between()`` runs, untimed, where the training loop's two forward/backward
    passes would run (the gradients are assigned there too).
    """
    for p, g in zip(params, g1):
        p.grad = g
    between()
    t0 = time.perf_counter()
    opt.perturb_weights(zero_grad=True)
    t1 = time.perf_counter()
    for p, g in zip(params, g2):
        p.grad = g
    between()
    t2 = time.perf_counter()
    opt.unperturb()
    opt.step()
    return t1 - t0 + time.perf_counter() - t2


def adamw_step(opt, params, g, between) -> float:
    for p, grad in zip(params, g):
        p.grad = grad
    between()
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


class CacheFlush:
    """Stands in for the forward/backward passes between optimizer calls: it writes
    a buffer larger than the last-level cache, so the optimizer finds none of its
    arrays cached, as in training."""

    def __init__(self, mib: int) -> None:
        self.buf = torch.empty(mib * 2**20 // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buf.fill_(1.0)


def interleaved_times(fns: dict, rounds: int, reps: int, warmup: int) -> dict:
    """Per implementation, ``rounds`` lists of ``reps`` step times (each fn returns its time).

    The implementations take turns, a round of ``reps`` steps each, so a slow phase
    of a shared machine hits all of them alike; per-round ratios then compare
    implementations measured a few milliseconds apart.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append([fn() for _ in range(reps)])
    return out


def round_ratio(a: list, b: list) -> float:
    """Median over rounds of median(a's round) / median(b's round)."""
    return statistics.median(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))


def pass_ratios(numel: int, n_tensors: int, calls: int) -> dict:
    """Each C++ pass's time over one AdamW(fused=True) step's, measured call by call.

    The passes and the AdamW step take turns one call at a time, each on its own
    arrays, so every call finds the caches holding another call's data (as in a
    training step) and the machine's drift hits all of them alike. The ratio of a
    pass that moves its bytes as efficiently as AdamW does equals its byte ratio
    (bytes / 28).
    """
    fns = pass_calls("cpp", torch.device("cpu"), numel, n_tensors)
    adamw_params = [p.detach().clone() for p in make_problem(numel, n_tensors, torch.device("cpu"), seed=1).params]
    for p, grad in zip(adamw_params, make_problem(numel, n_tensors, torch.device("cpu"), seed=2).g1):
        p.grad = grad
    adamw = torch.optim.AdamW(adamw_params, lr=1e-4, fused=True)
    fns["AdamW(fused=True) step"] = adamw.step
    # what a read-only pass can do here: torch's own sum over the same bytes as sq_norm reads
    fns[READ_REFERENCE] = torch.randn(n_tensors * (numel // n_tensors)).sum
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = times["AdamW(fused=True) step"]
    return {
        name: {
            "median_ms": statistics.median(ts) * 1e3,
            "time_over_adamw": statistics.median(a / r for a, r in zip(ts, ref)),
            "byte_ratio": PASS_BYTES[name] / 28 if name in PASS_BYTES else 4 / 28 if name == READ_REFERENCE else 1.0,
        }
        for name, ts in times.items()
    }


def phase_ratios(numel: int, n_tensors: int, steps: int, flush_mib: int) -> dict:
    """Each call of a whole non-refresh step (C++ backend, defaults) over one AdamW(fused=True) step.

    The step runs through the official protocol as in the main table (the flush where
    forward/backward would run) and each of its three calls is timed apart, one AdamW
    step after each SASSHA step. At a tiny ``numel`` the times are the calls' host work.
    """
    between = CacheFlush(flush_mib) if flush_mib > 0 else (lambda: None)
    params, g1, g2 = make_tensors(numel, n_tensors, 0)
    opt = SASSHA(params, backend="cpp", lr=1e-4, lazy_hessian=10**6)
    first_refresh_step(opt, params)
    adamw_params, adamw_g, _ = make_tensors(numel, n_tensors, 1)
    adamw = torch.optim.AdamW(adamw_params, lr=1e-4, fused=True)
    times = {"perturb_weights()": [], "unperturb()": [], "step()": [], "AdamW(fused=True) step": []}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)

    for i in range(steps + 3):
        for p, g in zip(params, g1):
            p.grad = g
        between()
        timed("perturb_weights()", lambda: opt.perturb_weights(zero_grad=True))
        for p, g in zip(params, g2):
            p.grad = g
        between()
        timed("unperturb()", opt.unperturb)
        timed("step()", opt.step)
        times["AdamW(fused=True) step"].append(adamw_step(adamw, adamw_params, adamw_g, between))
        if i < 3:  # warm-up
            for ts in times.values():
                ts.clear()
    ref = times["AdamW(fused=True) step"]
    return {name: {"median_ms": statistics.median(ts) * 1e3,
                   "time_over_adamw": statistics.median(a / r for a, r in zip(ts, ref))}
            for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10, help="turns each implementation takes")
    ap.add_argument("--reps", type=int, default=5, help="steps per implementation and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="subset of implementations to run")
    ap.add_argument("--flush-mib", type=int, default=64,
                    help="MiB written between optimizer calls to evict the caches, standing in for the "
                         "forward/backward passes of training (0: steps run back to back)")
    ap.add_argument("--pass-calls", type=int, default=40,
                    help="calls of each C++ pass in the per-pass comparison with AdamW (0: skip it)")
    ap.add_argument("--phase-steps", type=int, default=40,
                    help="whole C++ steps whose calls are timed apart, at --numel and at 1600 params "
                         "(host work), against AdamW(fused=True) (0: skip it)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    lr, k = 1e-4, 10**6  # lazy_hessian = 10**6: every timed step is a non-refresh step
    def sassha(**kw):
        return ("sassha", sassha_bytes(kw.get("defer_unperturb", False), kw.get("nonfinite", "skip")),
                lambda ps: SASSHA(ps, lr=lr, lazy_hessian=k, **kw))

    # name: (protocol, bytes per element, constructor)
    impls = {
        "official-style eager": ("sassha", BYTES_OFFICIAL_STYLE,
                                 lambda ps: OfficialStyleSASSHA(ps, lr=lr, lazy_hessian=k)),
        "sassha eager": sassha(backend="eager"),
        "sassha foreach": sassha(backend="foreach"),
        "sassha cpp": sassha(backend="cpp"),
        "sassha cpp, nonfinite='ignore'": sassha(backend="cpp", nonfinite="ignore"),
        "sassha cpp, defer_unperturb": sassha(backend="cpp", defer_unperturb=True),
        "sassha cpp, defer_unperturb, nonfinite='ignore'": sassha(
            backend="cpp", defer_unperturb=True, nonfinite="ignore"),
        "AdamW(fused=True)": ("adamw", BYTES_ADAMW, lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)),
        "AdamW(foreach=True)": ("adamw", BYTES_ADAMW, lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True)),
    }
    if not available_backends()["cpp"]:
        print(f"cpp backend unavailable: {available_backends()['cpp'].reason}", file=sys.stderr)
        impls = {n: v for n, v in impls.items() if "cpp" not in n}
    if args.only:
        impls = {n: v for n, v in impls.items() if n in args.only}

    between = CacheFlush(args.flush_mib) if args.flush_mib > 0 else (lambda: None)
    fns, kinds, keep = {}, {}, []
    for name, (kind, nbytes, make) in impls.items():
        params, g1, g2 = make_tensors(args.numel, args.tensors, seed=0)
        opt = make(params)
        if kind == "sassha":
            first_refresh_step(opt, params)
            fns[name] = lambda opt=opt, params=params, g1=g1, g2=g2: sassha_step(opt, params, g1, g2, between)
        else:
            fns[name] = lambda opt=opt, params=params, g2=g2: adamw_step(opt, params, g2, between)
        kinds[name] = nbytes
        keep.append((opt, params, g1, g2))
    per_round = interleaved_times(fns, args.rounds, args.reps, args.warmup)
    numel = (args.numel // args.tensors) * args.tensors
    results = {}
    for name, rounds in per_round.items():
        times = [t for r in rounds for t in r]
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [med] * 3
        results[name] = {
            "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "gb_per_s": kinds[name] * numel / med / 1e9,
            "bytes_per_element": kinds[name],
            "rounds_ms": [[t * 1e3 for t in r] for r in rounds],
        }
        print(f"  {name}: {med * 1e3:.2f} ms", file=sys.stderr)
    official_name, fused_name = "official-style eager", "AdamW(fused=True)"
    for name, r in results.items():
        if official_name in per_round:
            r["official_over_this"] = round_ratio(per_round[official_name], per_round[name])
        if fused_name in per_round:
            r["this_over_adamw_fused"] = round_ratio(per_round[name], per_round[fused_name])

    meta = {
        "device": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "numel": args.numel, "tensors": args.tensors, "rounds": args.rounds, "reps": args.reps,
        "warmup": args.warmup, "flush_mib": args.flush_mib,
        "step": "non-refresh SASSHA step, official protocol, optimizer side only "
                "(perturb_weights + unperturb + step); AdamW: step; gradient assignment and the "
                "cache flush standing in for forward/backward are not timed",
    }
    print(f"\n{meta['numel'] / 1e6:g}M fp32 params in {meta['tensors']} tensors; {meta['device']}; "
          f"torch {meta['torch']}; {meta['date']}; {args.rounds} rounds x {args.reps} steps, interleaved; "
          + (f"caches flushed ({args.flush_mib} MiB written) where forward/backward would run\n"
             if args.flush_mib > 0 else "steps back to back, no cache flush\n"))
    print("| implementation | median ms | IQR ms | min-max ms | speed-up over official-style | "
          "time / AdamW(fused) | GB/s (design bytes) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        vs_off = f"{r['official_over_this']:.2f}x" if "official_over_this" in r else "-"
        vs_fused = f"{r['this_over_adamw_fused']:.2f}x" if "this_over_adamw_fused" in r else "-"
        print(f"| {name} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
              f"{r['min_ms']:.2f}-{r['max_ms']:.2f} | {vs_off} | {vs_fused} | {r['gb_per_s']:.1f} |")
    print("\nRatios: median over rounds of the per-round median ratio (robust to the machine's drift).")
    passes = {}
    if args.pass_calls and available_backends()["cpp"]:
        passes = pass_ratios(args.numel, args.tensors, args.pass_calls)
        print("\nPer pass, each call interleaved with one AdamW(fused=True) step "
              f"({args.pass_calls} calls each):\n")
        print("| pass | median ms | time / AdamW step | byte ratio (bytes / 28) |")
        print("|---|---:|---:|---:|")
        for name, r in passes.items():
            print(f"| {name} | {r['median_ms']:.2f} | {r['time_over_adamw']:.2f} | {r['byte_ratio']:.2f} |")
    phases = {}
    if args.phase_steps and available_backends()["cpp"]:
        sizes = {"full": args.numel, "host work (1600 params)": 1600}
        phases = {label: phase_ratios(n, args.tensors, args.phase_steps, args.flush_mib if label == "full" else 0)
                  for label, n in sizes.items()}
        print(f"\nA whole C++ step, call by call, one AdamW(fused=True) step after each ({args.phase_steps} steps; "
              f"at 1600 params in {args.tensors} tensors, back to back: the host work):\n")
        print("| call | " + " | ".join(f"{label}: ms | / AdamW" for label in phases) + " |")
        print("|---|" + "---:|---:|" * len(phases))
        for name in phases["full"]:
            print(f"| {name} | " + " | ".join(f"{ph[name]['median_ms']:.2f} | {ph[name]['time_over_adamw']:.2f}"
                                             for ph in phases.values()) + " |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cpu_step_{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "passes": passes, "phases": phases}, f, indent=1)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
