"""Host work per optimizer step: Python-level calls made by the package, vs the number of tensors.

A non-refresh SASSHA step through the official protocol (``perturb_weights``,
``unperturb``, ``step``) with synthetic gradients of 64 elements per tensor, at 10
and at 1000 tensors, after a warm-up that builds the step plans. Counted with
cProfile: calls of functions defined in ``sassha_fused``, plus calls of builtins
(``torch`` ops, ``data_ptr``, ...) made from them. The goal (issue "one step path")
is at most 1.25x as many at 1000 tensors as at 10.

Triton runs under its interpreter here, so its kernels are replaced by stubs that
return at once (``--stub-launches``, the default without a GPU): what is counted is
the host side, which is the same code on a GPU.

    python bench/host_calls.py                    # cpp and triton, 10 and 1000 tensors
    python bench/host_calls.py --backends cpp --tensors 10 100 1000
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sassha_fused import SASSHA, available_backends  # noqa: E402

PACKAGE = os.path.join(os.path.dirname(HERE), "sassha_fused")


def package_calls(fn: Callable[[], None]) -> int:
    """Python-level calls made by the package while ``fn`` runs."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    total = 0
    for func, (_, ncalls, _, _, callers) in pstats.Stats(prof).stats.items():
        if func[0].startswith(PACKAGE):
            total += ncalls
        else:
            total += sum(c[1] for caller, c in callers.items() if caller[0].startswith(PACKAGE))
    return total


class _Stub:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_launches() -> None:
    from sassha_fused.triton_kernels import sassha as kernels

    for name in dir(kernels):
        if name.endswith("_kernel"):
            setattr(kernels, name, _Stub())


def step_calls(backend: str, n_tensors: int, steps: int = 5, numel: int = 64) -> float:
    """Package calls per non-refresh step, official protocol, synthetic gradients."""
    device = torch.device("cuda" if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available())
                          else "cpu")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen).to(device)) for _ in range(n_tensors)]
    g1 = [torch.randn(numel, generator=gen).to(device) for _ in params]
    g2 = [torch.randn(numel, generator=gen).to(device) for _ in params]
    opt = SASSHA(params, lr=1e-3, lazy_hessian=10**9, backend=backend, hvp="finite_difference")

    def one_step():
        for p, g in zip(params, g1):
            p.grad = g
        opt.perturb_weights(zero_grad=False)
        for p, g in zip(params, g2):
            p.grad = g
        for _ in opt.hvp_passes():  # the first step refreshes: one finite-difference pass
            for p, g in zip(params, g1):
                p.grad = g
        opt.unperturb()
        opt.step()

    for _ in range(3):  # warm-up: plans, tables, the first (refresh) step
        one_step()

    def run():
        for _ in range(steps):
            one_step()

    return package_calls(run) / steps


def measure(backends: List[str], tensors: List[int]) -> Dict[str, Dict[int, float]]:
    return {b: {n: step_calls(b, n) for n in tensors} for b in backends}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["cpp", "triton"])
    ap.add_argument("--tensors", nargs="+", type=int, default=[10, 1000])
    ap.add_argument("--no-stub-launches", action="store_true", help="run the interpreted Triton kernels too")
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    args = ap.parse_args()
    status = available_backends()
    backends = [b for b in args.backends if status[b].available]
    if "triton" in backends and not torch.cuda.is_available() and not args.no_stub_launches:
        stub_triton_launches()
    counts = measure(backends, args.tensors)
    lo, hi = min(args.tensors), max(args.tensors)
    print(f"| backend | {' | '.join(f'{n} tensors' for n in args.tensors)} | {hi} / {lo} |")
    print(f"|---|{'---:|' * len(args.tensors)}---:|")
    for b, row in counts.items():
        print(f"| {b} | {' | '.join(f'{row[n]:.0f}' for n in args.tensors)} | {row[hi] / row[lo]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"counts": counts, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
