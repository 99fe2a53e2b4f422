"""Shared pieces of the benchmarks: environment record, problems, implementations.

Every implementation is driven through the same optimizer-side step so that their
times compare: gradients are synthetic tensors assigned to ``.grad`` (no model), so
what is timed is the optimizer's own work.

* ``sassha-<backend>``: this project, official protocol (``perturb_weights``,
  ``unperturb``, ``step``). On refresh steps the second gradient carries a graph
  (the gradient of ``sum(c * x^2) / 2``), so the Hessian-vector product is a real,
  cheap autograd pass and the probes and ``|z*Hz|`` EMA run as they do in training.
* ``official-style``: ``official_style.py``, SASSHA written the way the official code
  is (per-tensor loop; its training loop builds the graph on every step).
* ``adamw-foreach``, ``adamw-fused``: ``torch.optim.AdamW``, for scale.
* ``compiled-eager``: ``torch.compile`` of a plain eager non-refresh SASSHA step.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from official_style import OfficialStyleSASSHA  # noqa: E402
from sassha_fused import SASSHA, available_backends  # noqa: E402

LAZY_NEVER = 10**9  # lazy_hessian that makes every step after the first a non-refresh step


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info(device: torch.device) -> Dict[str, str]:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = info["cpu"]
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Problem:
    params: List[torch.nn.Parameter]
    g1: List[torch.Tensor]
    g2: List[torch.Tensor]
    curvature: List[torch.Tensor]


def make_problem(numel: int, n_tensors: int, device: torch.device, dtype=torch.float32, seed: int = 0) -> Problem:
    """``numel`` parameters in ``n_tensors`` tensors of (nearly) equal size."""
    gen = torch.Generator().manual_seed(seed)
    base, extra = divmod(numel, n_tensors)
    sizes = [base + (1 if i < extra else 0) for i in range(n_tensors)]

    def rand(n, scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device=device, dtype=dtype)

    params = [torch.nn.Parameter(rand(n, 0.5)) for n in sizes]
    return Problem(params, [rand(n) for n in sizes], [rand(n) for n in sizes], [rand(n).abs_() + 0.1 for n in sizes])


def _graph_grads(problem: Problem) -> List[torch.Tensor]:
    # d/dx sum(c x^2 / 2) = c * x, with a graph: its HVP is c * z.
    with torch.enable_grad():
        return [c * p for c, p in zip(problem.curvature, problem.params)]


class Impl:
    """One implementation's optimizer-side step on a Problem."""

    name = "impl"

    def __init__(self, problem: Problem, refresh: bool):
        self.problem = problem
        self.refresh = refresh

    def step(self) -> None:
        raise NotImplementedError


class SasshaImpl(Impl):
    def __init__(self, problem: Problem, refresh: bool, backend: str):
        super().__init__(problem, refresh)
        self.name = f"sassha-{backend}"
        self.opt = SASSHA(problem.params, lr=1e-3, rho=0.05, weight_decay=1e-4,
                          lazy_hessian=1 if refresh else LAZY_NEVER, backend=backend,
                          nonfinite="ignore")
        self.step()  # the first step always refreshes; state exists from here on

    def step(self) -> None:
        pb = self.problem
        for p, g in zip(pb.params, pb.g1):
            p.grad = g
        self.opt.perturb_weights(zero_grad=True)
        grads = _graph_grads(pb) if self.opt.hessian_due else pb.g2
        for p, g in zip(pb.params, grads):
            p.grad = g
        self.opt.unperturb()
        self.opt.step()


class OfficialStyleImpl(Impl):
    name = "official-style"

    def __init__(self, problem: Problem, refresh: bool):
        super().__init__(problem, refresh)
        self.opt = OfficialStyleSASSHA(problem.params, lr=1e-3, rho=0.05, weight_decay=1e-4,
                                       lazy_hessian=1 if refresh else LAZY_NEVER)
        self.step()

    def step(self) -> None:
        pb = self.problem
        for p, g in zip(pb.params, pb.g1):
            p.grad = g
        self.opt.perturb_weights(zero_grad=True)
        # The official loop builds the double-backward graph on every step.
        for p, g in zip(pb.params, _graph_grads(pb)):
            p.grad = g
        self.opt.unperturb()
        self.opt.step()


class AdamWImpl(Impl):
    def __init__(self, problem: Problem, refresh: bool, mode: str):
        super().__init__(problem, refresh)
        self.name = f"adamw-{mode}"
        self.opt = torch.optim.AdamW(problem.params, lr=1e-3, weight_decay=1e-4, **{mode: True})
        self.step()

    def step(self) -> None:
        for p, g in zip(self.problem.params, self.problem.g1):
            p.grad = g
        self.opt.step()


def _eager_perturb(params, g1, backups, rho):
    """A plain eager SASSHA perturbation: global norm, backup, climb."""
    sq = torch.stack([(g * g).sum() for g in g1]).sum()
    scale = rho / (sq.sqrt() + 1e-12)
    for p, g, b in zip(params, g1, backups):
        b.copy_(p)
        p.add_(g * scale)


def _eager_update(params, g2, backups, ms, ds, lr, beta1, wd, eps, step_size, c2):
    """A plain eager non-refresh SASSHA update from the restored point."""
    for p, g, b, m, d in zip(params, g2, backups, ms, ds):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        denom = d.sqrt() / c2 + eps
        p.copy_(b * (1 - lr * wd) - step_size * m / denom)


class CompiledEagerImpl(Impl):
    """torch.compile of the eager non-refresh step, compiled as its two phases.

    Perturbation and update are separate compiled functions because in training a
    forward and backward pass run between them: compiled as one, the perturbed
    parameters would be a dead store that the compiler removes.
    """

    name = "compiled-eager"
    max_tensors = 100  # compile time grows with the number of tensors

    def __init__(self, problem: Problem, refresh: bool):
        if refresh:
            raise NotImplementedError("compiled-eager covers the non-refresh step only")
        if len(problem.params) > self.max_tensors:
            raise NotImplementedError(f"compiled-eager is benchmarked up to {self.max_tensors} tensors")
        super().__init__(problem, refresh)
        self.data = [p.detach() for p in problem.params]
        self.backups = [torch.empty_like(p) for p in self.data]
        self.ms = [torch.zeros_like(p) for p in self.data]
        self.ds = [torch.rand_like(p) + 0.1 for p in self.data]
        self.perturb = torch.compile(_eager_perturb)
        self.update = torch.compile(_eager_update)
        self.step()

    def step(self) -> None:
        with torch.no_grad():
            self.perturb(self.data, self.problem.g1, self.backups, 0.05)
            self.update(self.data, self.problem.g2, self.backups, self.ms, self.ds,
                        1e-3, 0.9, 1e-4, 1e-4, 1e-3 / 0.1, 0.5)


def sassha_backends(device: torch.device) -> List[str]:
    """Backends that can run on ``device`` (the Triton interpreter is not a speed path)."""
    status = available_backends()
    names = ["eager", "foreach"]
    if device.type == "cpu" and status["cpp"].available:
        names.append("cpp")
    if device.type == "cuda":
        names += [n for n in ("triton", "cuda") if status[n].available]
    return names


def implementations(device: torch.device) -> Dict[str, Callable[[Problem, bool], Impl]]:
    impls: Dict[str, Callable[[Problem, bool], Impl]] = {
        f"sassha-{b}": (lambda pb, r, b=b: SasshaImpl(pb, r, b)) for b in sassha_backends(device)
    }
    impls["official-style"] = OfficialStyleImpl
    impls["adamw-foreach"] = lambda pb, r: AdamWImpl(pb, r, "foreach")
    impls["adamw-fused"] = lambda pb, r: AdamWImpl(pb, r, "fused")
    impls["compiled-eager"] = CompiledEagerImpl
    return impls


def copy_bandwidth_gbps(device: torch.device, numel: int) -> float:
    """Bytes read and written per second by ``dst.copy_(src)`` of ``numel`` fp32 elements (median)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = time_it(lambda: dst.copy_(src), device, reps=20)
    return 2 * 4 * numel / sorted(samples)[len(samples) // 2] / 1e9


def time_it(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 3) -> List[float]:
    """Seconds per call, ``reps`` samples after ``warmup`` calls, synchronised inside.

    On CUDA each sample is the time between two events recorded on the stream around
    the call (host clocks around ``synchronize()`` add the launch and wake-up latency,
    which understates GB/s of short passes); the gaps where the device waits for the
    host still count.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    out = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(samples: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), statistics.median(samples), max(samples)]
    return {"median_ms": 1e3 * statistics.median(samples), "mean_ms": 1e3 * statistics.mean(samples),
            "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "min_ms": 1e3 * min(samples), "reps": len(samples)}


# Arrays each pass must move once (read or written): (in the param dtype, in fp32 state).
PASS_ARRAYS = {
    "sq_norm": (1, 0),                    # read g
    "perturb": (4, 0),                    # read x, g; write backup, x
    "restore": (2, 0),                    # read backup; write x (unperturb() where it does not check)
    "restore + check": (3, 0),            # read backup, g~; write x (unperturb() reading the finite check)
    "probes": (1, 0),                     # write z (autograd HVPs only)
    "fd_move": (2, 0),                    # read x; write x (finite differences, refresh steps)
    "update": (3, 3),                     # read x_t, g~, m, D; write x, m
    "update+refresh (autograd)": (4, 4),  # read x_t, g~, m, D, Hz; write x, m, D
    "update+refresh (FD)": (4, 4),        # read x_t, g~, m, D, grad f(x~ + delta z); write x, m, D
}


#: bytes per element of each state array (m, D) per ``state_bits``: 8 bits add a float32 scale per 32
STATE_BYTES = {32: 4.0, 16: 2.0, 8: 1.0 + 4 / 32}


def pass_bytes(name: str, dtype: torch.dtype = torch.float32, state_bits: int = 32) -> float:
    """Minimal bytes per element a pass moves for params of ``dtype`` and state of ``state_bits``."""
    p, f = PASS_ARRAYS[name]
    return p * torch.empty((), dtype=dtype).element_size() + STATE_BYTES[state_bits] * f


PASS_BYTES = {name: pass_bytes(name) for name in PASS_ARRAYS}  # fp32 params


def pass_calls(backend_name: str, device: torch.device, numel: int, n_tensors: int,
               dtype: torch.dtype = torch.float32, state_bits: int = 32) -> Dict[str, Callable[[], None]]:
    """One call of each numeric pass of a step on ``numel`` params of ``dtype``, through the backend API,
    with the optimizer state encoded as ``state_bits`` says."""
    from sassha_fused import encoding
    from sassha_fused import functional as F
    from sassha_fused.backends import Bucket, ProbeKeys, RefreshInput, RefreshMode, get_backend

    backend = get_backend(backend_name)
    pb = make_problem(numel, n_tensors, device, dtype)
    xs = [p.detach() for p in pb.params]
    b = Bucket(backend=backend, device=device, params=xs, param_index=list(range(len(xs))),
               group_index=[0] * len(xs), backups=[torch.empty_like(x) for x in xs],
               positions=list(range(len(xs))), state_bits=state_bits)
    states = [encoding.encode_state(torch.zeros_like(x, dtype=torch.float32),
                                    torch.rand_like(x, dtype=torch.float32) + 0.1, state_bits, torch.float32)
              for x in xs]
    codes = "_codes" if state_bits == 8 else ""
    b.exp_avgs = [s["exp_avg" + codes] for s in states]
    b.exp_hessian_diags = [s["exp_hessian_diag" + codes] for s in states]
    if state_bits == 8:
        b.exp_avg_scales = [s["exp_avg_scales"] for s in states]
        b.exp_hessian_diag_scales = [s["exp_hessian_diag_scales"] for s in states]
    groups = F.GroupTable([dict(lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-4, rho=1e-6,
                                perturb_eps=1e-12)])
    keys = ProbeKeys((0x12345,))
    delta = torch.tensor(1e-3, device=device)
    sq = backend.sq_norm(b, pb.g1, False, torch.float32)
    steps = torch.full((len(xs),), 5.0, dtype=torch.float64, device=device)
    c2 = torch.full((len(xs),), 0.07, dtype=torch.float64, device=device)
    table, _, _ = F.update_scalars(b, groups, 0.5, False, steps, c2)
    refresh_table, _, _ = F.update_scalars(b, groups, 0.5, True, steps, c2)
    autograd = RefreshInput(RefreshMode.AUTOGRAD, [pb.g2], keys)
    fd = RefreshInput(RefreshMode.FD_DIRECT, [pb.curvature], keys, torch.stack([delta, torch.tensor(1e-7, device=device)]))
    return {
        "sq_norm": lambda: backend.sq_norm(b, pb.g1, False, torch.float32),
        "perturb": lambda: backend.perturb(b, pb.g1, sq, 1.0, False, groups),
        "restore": lambda: backend.restore(b, None, torch.float32),
        "restore + check": lambda: backend.restore(b, pb.g2, torch.float32),
        "probes": lambda: backend.probes(b, keys, 0),
        "fd_move": lambda: backend.fd_move(b, delta, keys, 0, 1.0, None, None),
        "update": lambda: backend.update(b, b.backups, pb.g2, table, 0.5, None),
        "update+refresh (autograd)": lambda: backend.update(b, b.backups, pb.g2, refresh_table, 0.5, autograd),
        "update+refresh (FD)": lambda: backend.update(b, b.backups, pb.g2, refresh_table, 0.5, fd),
    }
