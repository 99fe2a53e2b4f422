"""The finite check read in unperturb()'s restore, against reading it at step(): whole steps.

A non-refresh SASSHA step through the official protocol (``bench_cpu_step.sassha_step``,
caches flushed where forward/backward would run), C++ backend at defaults, twice: as
shipped (``unperturb()`` restores and reads the perturbed gradients' squares in one op;
``step()`` takes that check) and with the restore alone (``step()`` reads the gradients
again, as before issue 21's item 7), with ``AdamW(fused=True)`` for scale. The three take
turns in rounds; ratios are medians of per-round ratios.

    .venv/bin/python bench/restore_check_ab.py [--numel 10000000] [--tensors 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from bench_cpu_step import (CacheFlush, adamw_step, first_refresh_step, interleaved_times,  # noqa: E402
                            make_tensors, round_ratio, sassha_step)
from sassha_fused import SASSHA  # noqa: E402


def _restore_only(self, plan):
    """unperturb()'s restore without the check (step() reads the gradients itself)."""
    with torch.no_grad():
        self._restore(plan)
    return None


def measure(numel: int, n_tensors: int, rounds: int, reps: int = 5, flush_mib: int = 64) -> dict:
    flush = CacheFlush(flush_mib)
    fns = {}
    for name in ("check in the restore", "check at step()"):
        params, g1, g2 = make_tensors(numel, n_tensors, 0)
        opt = SASSHA(params, backend="cpp", lr=1e-4, lazy_hessian=10**6)  # timed steps do not refresh
        first_refresh_step(opt, params)
        if name == "check at step()":
            opt._restore_and_check = types.MethodType(_restore_only, opt)
        fns[name] = lambda opt=opt, params=params, g1=g1, g2=g2: sassha_step(opt, params, g1, g2, flush)
    params, g1, _ = make_tensors(numel, n_tensors, 1)
    adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fns["AdamW(fused=True)"] = lambda: adamw_step(adamw, params, g1, flush)
    times = interleaved_times(fns, rounds=rounds, reps=reps, warmup=3)
    out = {name: statistics.median(x for r in ts for x in r) * 1e3 for name, ts in times.items()}
    out["restore / step() ratio"] = round_ratio(times["check in the restore"], times["check at step()"])
    out["restore / AdamW"] = round_ratio(times["check in the restore"], times["AdamW(fused=True)"])
    out["step() / AdamW"] = round_ratio(times["check at step()"], times["AdamW(fused=True)"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    for name, value in measure(args.numel, args.tensors, args.rounds).items():
        print(f"{name}: {value:.3f}" + (" ms (median step)" if "/" not in name else ""))


if __name__ == "__main__":
    main()
