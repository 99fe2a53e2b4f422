"""The plain per-tensor reference: SASSHA's single source of truth.

Every line here is the algorithm of SPEC section 1, one tensor at a time, in the
simplest torch ops. Other backends are faster ways to compute the same thing and
are tested against this one; keep it obvious rather than fast.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..probes import probe_key, rademacher
from .base import Backend, GroupTensors, ProbeSpec, math_dtype

__all__ = ["EagerBackend", "norm_accumulator_dtype"]


def norm_accumulator_dtype(groups: Sequence[GroupTensors]) -> torch.dtype:
    """fp64 when any param is fp64, else fp32: the dtype global norms sum in."""
    f64 = torch.float64
    return f64 if any(p.dtype is f64 for g in groups for p in g.params) else torch.float32


def first_device(groups: Sequence[GroupTensors]) -> torch.device:
    for g in groups:
        if g.params:
            return g.params[0].device
    return torch.device("cpu")


def sources(group: GroupTensors, source: str) -> List[Tensor]:
    if source == "grads":
        return group.grads
    if source == "exp_avgs":
        return group.exp_avgs
    raise ValueError(f"unknown norm source {source!r}")


def perturb_scale(group: GroupTensors, sq_norm: Tensor, sign: float) -> Tensor:
    """``sign * rho / (sqrt(sq_norm) + perturb_eps)`` as a 0-dim device tensor."""
    return sign * group.rho / (sq_norm.sqrt() + group.perturb_eps)


def probe(group: GroupTensors, j: int, spec: ProbeSpec, sample: int, dtype: torch.dtype) -> Tensor:
    """The Rademacher probe of param ``j`` of ``group`` for ``sample``."""
    p = group.params[j]
    key = probe_key(spec.seed, spec.refresh, sample, group.param_indices[j])
    return rademacher(p.numel(), key, dtype=dtype, device=p.device).view(p.shape)


class EagerBackend(Backend):
    """Per-tensor torch ops: the reference."""

    name = "eager"

    def sq_norm(self, groups: Sequence[GroupTensors], source: str, adaptive: bool) -> Tensor:
        acc = norm_accumulator_dtype(groups)
        device = first_device(groups)
        total = torch.zeros((), dtype=acc, device=device)
        for g in groups:
            for x, v in zip(g.params, sources(g, source)):
                v = v.to(acc)
                if adaptive:
                    v = x.to(acc).abs() * v
                total += (v * v).sum().to(device)
        return total

    def perturb(
        self,
        groups: Sequence[GroupTensors],
        sq_norm: Tensor,
        source: str,
        sign: float,
        adaptive: bool,
    ) -> None:
        for g in groups:
            for j, (x, v) in enumerate(zip(g.params, sources(g, source))):
                mdt = math_dtype(x.dtype)
                scale = perturb_scale(g, sq_norm.to(x.device), sign).to(mdt)
                g.backups[j].copy_(x)
                x0 = x.to(mdt)
                e = v.to(mdt) * scale
                if adaptive:
                    e = e * (x0 * x0)
                x.copy_(x0 + e)

    def probes(self, groups: Sequence[GroupTensors], spec: ProbeSpec, sample: int) -> List[List[Tensor]]:
        return [[probe(g, j, spec, sample, gr.dtype) for j, gr in enumerate(g.grads)] for g in groups]

    def update(
        self,
        groups: Sequence[GroupTensors],
        hvps: Optional[Sequence[Sequence[Sequence[Optional[Tensor]]]]],
        spec: Optional[ProbeSpec],
    ) -> None:
        for gi, g in enumerate(groups):
            for j, x in enumerate(g.params):
                mdt = math_dtype(x.dtype)
                m, d = g.exp_avgs[j], g.exp_hessian_diags[j]
                # m_t = beta1 m_{t-1} + (1 - beta1) g~_t
                m.mul_(g.beta1).add_(g.grads[j].to(mdt), alpha=1 - g.beta1)
                if hvps is not None:
                    # h_t = (1/S) sum_s z_s * (H z_s);  D_t = beta2 D + (1 - beta2) |h_t|
                    h = torch.zeros_like(d)
                    for s, hz in enumerate(hvps[gi]):
                        if hz[j] is not None:
                            h += probe(g, j, spec, s, mdt) * hz[j].to(mdt)
                    h /= spec.n_samples
                    d.mul_(g.beta2).add_(h.abs(), alpha=1 - g.beta2)
                # x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (D_t^p / c2 + eps)
                denom = d.pow(g.hessian_power).div_(g.bias_correction2[j]).add_(g.eps)
                step_size = g.lr / (1 - g.beta1 ** g.steps[j])
                x_new = g.backups[j].to(mdt).mul(1 - g.lr * g.weight_decay)
                x_new.addcdiv_(m, denom, value=-step_size)
                x.copy_(x_new)
