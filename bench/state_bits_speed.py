"""The C++ step's time by state_bits: 10M fp32 params in 100 tensors, non-refresh steps, official protocol.

Interleaved rounds (state_bits 32 / 16 / 8 take turns), a 64 MiB cache flush between optimizer
calls (as bench/bench_cpu_step.py does); then the update pass alone (``common.pass_calls``).

    python bench/state_bits_speed.py [rounds]
"""
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from bench_cpu_step import CacheFlush, first_refresh_step, make_tensors, sassha_step  # noqa: E402
from common import pass_calls, summarize, time_it  # noqa: E402
from sassha_fused import SASSHA  # noqa: E402

numel, n_tensors, rounds, reps = 10_000_000, 100, int(sys.argv[1]) if len(sys.argv) > 1 else 8, 5
flush = CacheFlush(64)
fns = {}
for sb in (32, 16, 8):
    params, g1, g2 = make_tensors(numel, n_tensors, seed=0)
    opt = SASSHA(params, backend="cpp", lr=1e-4, lazy_hessian=10**9, state_bits=sb, nonfinite="ignore")
    first_refresh_step(opt, params)
    fns[sb] = (lambda opt=opt, params=params, g1=g1, g2=g2: sassha_step(opt, params, g1, g2, flush))
for fn in fns.values():
    for _ in range(3): fn()
times = {sb: [] for sb in fns}
for _ in range(rounds):
    for sb, fn in fns.items():
        times[sb].append(statistics.median(fn() for _ in range(reps)))
print(f"torch threads {torch.get_num_threads()}; whole optimizer step (perturb_weights + unperturb + step), ms:")
for sb, ts in times.items():
    ratio = statistics.median(a / b for a, b in zip(ts, times[32]))
    print(f"  state_bits={sb:2d}: median {statistics.median(ts)*1e3:7.2f} ms  (min {min(ts)*1e3:7.2f})  ratio to 32: {ratio:.3f}")

print("update pass alone (10M params, 100 tensors), ms:")
for name in ("update", "update+refresh (autograd)"):
    for sb in (32, 16, 8):
        fn = pass_calls("cpp", torch.device("cpu"), numel, n_tensors, torch.float32, state_bits=sb)[name]
        s = summarize(time_it(fn, torch.device("cpu"), reps=15, warmup=3))
        print(f"  {name}, state_bits={sb:2d}: median {s['median_ms']:7.2f} ms")
