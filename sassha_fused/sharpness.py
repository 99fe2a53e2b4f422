r"""Sharpness of a model's loss at its current parameters (the metrics of the SASSHA paper, section 3).

::

    from sassha_fused import sharpness
    report = sharpness.measure(model, loss_fn, batches)     # batches: a re-iterable of (inputs, targets)
    print(report)   # loss 0.31, lambda_max 41.3 (res 8e-05, 23 it), trace 912 ± 31, dL_worst 0.0216, ...

The objective is :math:`L(x) = \frac1B \sum_b \ell(\text{model}(u_b), y_b)` over the ``B``
batches (a mean of per-batch losses: give batches of equal size, e.g. ``drop_last=True``) (averaged over the ranks of ``process_group`` when ``torch.distributed`` is
initialised), with the model in eval mode. Reported:

* ``lambda_max``: the eigenvalue of largest magnitude of the Hessian :math:`H = \nabla^2 L`
  (the top eigenvalue at a minimum), by power iteration on Hessian-vector products,
  stopped when it changes by less than ``tol`` (relative) or after ``max_iter``
  products; ``lambda_max_residual`` is :math:`\lVert Hv - \lambda v\rVert / |\lambda|`.
* ``trace``: :math:`\operatorname{tr} H` by Hutchinson's estimator with ``n_samples``
  Rademacher probes, :math:`\frac1S\sum_s z_s^\top H z_s`, and its standard error.
* ``delta_worst``: :math:`L(x + \rho\, g/\lVert g\rVert) - L(x)`, :math:`g = \nabla L(x)`
  (the first-order worst case within radius :math:`\rho`, as SAM's ascent step).
* ``delta_avg``: the mean over ``n_samples`` Gaussian directions :math:`z` of
  :math:`L(x + \rho\, z/\lVert z\rVert) - L(x)`, and its standard error.

Hessian-vector products are taken by double backward (``hvp="autograd"``) or by central
finite differences of gradients (``"finite_difference"``: no second-order graph, so
fused attention, ``torch.compile`` and reentrant checkpointing work); ``"auto"`` takes
autograd where the model allows it. The model's parameters are bitwise unchanged
afterwards and its train/eval mode is restored. The directions are drawn from ``seed``
on the CPU, so every rank and device draws the same ones and every rank gets the same
report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import is_distributed, is_sharded
from .hvp import FD_EPS, cannot_differentiate_twice

__all__ = ["SharpnessReport", "measure"]

HVP_METHODS = ("auto", "autograd", "finite_difference")


@dataclass(frozen=True)
class SharpnessReport:
    """The sharpness metrics of one model at one point (see ``sassha_fused.sharpness``)."""

    loss: float  # L(x)
    lambda_max: float
    lambda_max_residual: float  # ||H v - lambda v|| / |lambda| at the last iterate
    lambda_max_iterations: int
    trace: float
    trace_stderr: float
    delta_worst: float
    delta_avg: float
    delta_avg_stderr: float
    rho: float
    n_samples: int
    hvp_method: str

    def __str__(self) -> str:
        return (f"loss {self.loss:.6g}, lambda_max {self.lambda_max:.6g} (res {self.lambda_max_residual:.1g}, "
                f"{self.lambda_max_iterations} it), trace {self.trace:.6g} ± {self.trace_stderr:.2g}, "
                f"dL_worst {self.delta_worst:.6g}, dL_avg {self.delta_avg:.3g} ± {self.delta_avg_stderr:.2g} "
                f"(rho {self.rho:g}, {self.n_samples} samples, {self.hvp_method} HVPs)")


class _Objective:
    """L, its gradient and Hessian-vector products over the batches (and ranks)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Iterable,
                 params: List[Tensor], process_group: Optional[Any]) -> None:
        self.model, self.loss_fn, self.batches, self.params = model, loss_fn, batches, params
        self.group = process_group
        self.distributed = is_distributed(process_group)  # the objective is the mean over the ranks

    def _batch_losses(self):
        n = 0
        for inputs, targets in self.batches:
            n += 1
            yield self.loss_fn(self.model(inputs), targets)
        if n == 0:
            raise ValueError("batches: no (inputs, targets) pair; pass a re-iterable such as a list or a DataLoader")

    def _average(self, tensors: List[Tensor], n_batches: int) -> List[Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors]) / n_batches
        if self.distributed:
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
        return [part.view_as(t) for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]

    @torch.no_grad()
    def loss(self) -> float:
        total, n = 0.0, 0
        for loss in self._batch_losses():
            total, n = total + loss.detach().double(), n + 1
        return float(self._average([torch.as_tensor(total).reshape(1)], n)[0])

    def grad(self) -> List[Tensor]:
        acc: Optional[List[Tensor]] = None
        n = 0
        with torch.enable_grad():  # the forward runs in _batch_losses: a caller's no_grad() must not reach it
            for loss in self._batch_losses():
                g = torch.autograd.grad(loss, self.params, allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, self.params)]
                acc = g if acc is None else [a + b for a, b in zip(acc, g)]
                n += 1
        return self._average(acc, n)

    def hvp_autograd(self, v: Sequence[Tensor]) -> List[Tensor]:
        acc: Optional[List[Tensor]] = None
        n = 0
        with torch.enable_grad():
            for loss in self._batch_losses():
                g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                live = [(i, gi) for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
                if not live:
                    raise RuntimeError("the loss's gradient carries no second-order graph "
                                       "(does not require grad and does not have a grad_fn)")
                hv = torch.autograd.grad([gi for _, gi in live], self.params, [v[i] for i, _ in live],
                                         allow_unused=True)
                hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)]
                acc = hv if acc is None else [a + b for a, b in zip(acc, hv)]
                n += 1
        return self._average(acc, n)

    def hvp_finite_difference(self, v: Sequence[Tensor]) -> List[Tensor]:
        """``(grad L(x + d v) - grad L(x - d v)) / (2 d)``; the params come back bitwise."""
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params) or _autocast_on():
            bits = 16  # 16-bit arithmetic: the larger step of hvp.FD_EPS (errors of several %)
        else:
            bits = 64 if all(p.dtype == torch.float64 for p in self.params) else 32
        x_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.params))
        v_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v))
        delta = FD_EPS[("central", bits)] * (1 + x_norm) / max(v_norm, 1e-30)
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                torch._foreach_add_(self.params, list(v), alpha=delta)
            _params_changed()
            plus = self.grad()
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)
                torch._foreach_add_(self.params, list(v), alpha=-delta)
            _params_changed()
            minus = self.grad()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)
            _params_changed()
        return [(a - b) / (2 * delta) for a, b in zip(plus, minus)]

    @torch.no_grad()
    def loss_at(self, direction: Sequence[Tensor], scale: float, saved: Sequence[Tensor]) -> float:
        """L(x + scale * direction), then back to x bitwise."""
        try:
            torch._foreach_add_(self.params, list(direction), alpha=scale)
            _params_changed()
            return self.loss()
        finally:
            torch._foreach_copy_(self.params, list(saved))
            _params_changed()


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _params_changed() -> None:
    """Parameters moved in place: under autocast, drop the cached low-precision copies
    (they are keyed on the parameter and would hide the move from the next forward)."""
    torch.clear_autocast_cache()


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _draw(params: Sequence[Tensor], gen: torch.Generator, kind: str) -> List[Tensor]:
    """A direction like the params, drawn on the CPU (the same on every rank and device)."""
    out = []
    for p in params:
        if kind == "rademacher":
            t = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype) * 2 - 1
        else:
            t = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        out.append(t.to(p.device))
    return out


def measure(model: torch.nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Iterable,
            rho: float = 0.1, n_samples: int = 100, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
            hvp: str = "auto", process_group: Optional[Any] = None) -> SharpnessReport:
    """The sharpness metrics of ``model`` at its current parameters (module docstring).

    ``batches`` is re-iterated for every loss, gradient and Hessian-vector product
    (a list of ``(inputs, targets)`` or a DataLoader without shuffling); the
    trainable parameters (``requires_grad``) are the variables.
    """
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp: expected one of {', '.join(map(repr, HVP_METHODS))}, got {hvp!r}")
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise ValueError(f"rho: must be a number > 0, got {rho!r}")
    for name, value in (("n_samples", n_samples), ("max_iter", max_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol: must be a number >= 0, got {tol!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no parameter requires grad; there is nothing to measure")
    if any(is_sharded(p) for p in params):
        raise NotImplementedError("sharpness.measure takes replicated parameters; gather an FSDP2 model "
                                  "first (for example with torch.distributed.checkpoint's full state dict)")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("sharpness.measure takes gradients: call it outside torch.inference_mode()")
    objective = _Objective(model, loss_fn, batches, params, process_group)
    modes = [(m, m.training) for m in model.modules()]  # every submodule's own mode comes back
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        base = objective.loss()
        method = "finite_difference" if hvp == "finite_difference" else "autograd"
        gen = torch.Generator().manual_seed(seed)

        def hvp_of(v: List[Tensor]) -> List[Tensor]:
            nonlocal method
            if method == "autograd":
                try:
                    return objective.hvp_autograd(v)
                except RuntimeError as exc:
                    if hvp == "autograd" or not cannot_differentiate_twice(exc):
                        raise
                    method = "finite_difference"
            return objective.hvp_finite_difference(v)

        # lambda_max: power iteration
        v = _draw(params, gen, "gaussian")
        scale = _norm(v)
        v = [t / scale for t in v]
        lam, residual, iterations = 0.0, float("inf"), 0
        for iterations in range(1, max_iter + 1):
            hv = hvp_of(v)
            new = _dot(v, hv)
            residual = _norm([h - new * t for h, t in zip(hv, v)]) / max(abs(new), 1e-30)
            size = _norm(hv)
            done = iterations > 1 and abs(new - lam) <= tol * max(abs(new), 1e-30)
            lam = new
            if done or size == 0.0:
                break
            v = [h / size for h in hv]

        # trace: Hutchinson with Rademacher probes
        samples = [_dot(z, hvp_of(z)) for z in (_draw(params, gen, "rademacher") for _ in range(n_samples))]
        trace, trace_se = _mean_stderr(samples)

        # delta_worst along the gradient, delta_avg over Gaussian directions
        g = objective.grad()
        g_norm = _norm(g)
        worst = (objective.loss_at(g, rho / g_norm, saved) - base) if g_norm > 0 else 0.0
        deltas = []
        for _ in range(n_samples):
            z = _draw(params, gen, "gaussian")
            deltas.append(objective.loss_at(z, rho / _norm(z), saved) - base)
        avg, avg_se = _mean_stderr(deltas)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        _params_changed()
        for m, mode in modes:
            m.training = mode
    return SharpnessReport(loss=base, lambda_max=lam, lambda_max_residual=residual, lambda_max_iterations=iterations,
                           trace=trace, trace_stderr=trace_se, delta_worst=worst, delta_avg=avg,
                           delta_avg_stderr=avg_se, rho=float(rho), n_samples=n_samples, hvp_method=method)


def _mean_stderr(values: List[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in values) / (n - 1)
    return mean, math.sqrt(var / n)
