"""The plain per-tensor reference: SASSHA's single source of truth.

Every line here is the algorithm of SPEC section 1, one tensor at a time, in the
simplest torch ops; the per-tensor scalars it reads (bias corrections, c2, whether
the param is updated at all) are computed once for every backend in
``functional.update_scalars``. Other backends are faster ways to compute the same
thing and are tested against this one; keep it obvious rather than fast.

Rounding, which the fused kernels follow: math in the param's math dtype (fp32 for
16-bit params, one rounding to the param dtype at the store); ``a * b + c * d`` as
two products and a sum (no fused multiply-add); the perturbation scale as
``(1 / (sqrt(n) + perturb_eps)) * (sign * rho)``, the finite-difference quotient as
``(y - g) * z / delta`` and a fold's term as ``(g - baseline) * z * coefficient / delta``
(the same roundings as the quotient when the coefficient is 1).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..probes import param_key, rademacher
from .base import Backend, Bucket, GroupCol, GroupTable, ProbeKeys, RefreshInput, RefreshMode, UpdateCol, math_dtype

__all__ = ["EagerBackend", "probe", "hessian_sample_mean", "hessian_magnitude"]


def probe(b: Bucket, j: int, keys: ProbeKeys, sample: int, dtype: torch.dtype) -> Tensor:
    """The Rademacher probe of param ``j`` of ``b`` for ``sample``, shaped like the param.

    A shard (``b.element_offset[j]``, FSDP2) draws its elements' probes in the whole
    tensor's stream: local element i is global element ``element_offset[j] + i``.
    """
    p = b.params[j]
    key = param_key(keys.prefixes[sample], b.param_index[j])
    offset = b.element_offset[j] if b.element_offset else 0
    return rademacher(p.numel(), key, offset=offset, dtype=dtype, device=p.device).view(p.shape)


def group_value(groups, b: Bucket, j: int, col: int) -> float:
    return groups.rows[b.group_index[j]][col]


def hessian_sample_mean(b: Bucket, j: int, g: Tensor, refresh: RefreshInput, mdt: torch.dtype) -> Tensor:
    """h for param ``j``: the sample mean of z * Hz, however Hz was obtained."""
    ys = [sample[j] for sample in refresh.ys]
    if refresh.mode == RefreshMode.AUTOGRAD:
        # h = (1/S) sum_s z_s * (H z_s)
        h = torch.zeros_like(g, dtype=mdt)
        for s, y in enumerate(ys):
            if y is not None:
                h += probe(b, j, refresh.keys, s, mdt) * y.to(mdt)
        return h / refresh.keys.n_samples
    y = ys[0]
    if y is None:  # absent from the second-order graph or an FD pass: Hz = 0
        return torch.zeros_like(g, dtype=mdt)
    if refresh.mode == RefreshMode.FD_DIRECT:
        # h = z * (grad f(x~ + delta z) - grad f(x~)) / delta
        return (y.to(mdt) - g.to(mdt)) * probe(b, j, refresh.keys, 0, mdt) / refresh.fd[0].to(mdt)
    return y.to(mdt)  # PRECOMPUTED: folded pass by pass


def hessian_magnitude(h: Tensor, g: Tensor, refresh: RefreshInput, mdt: torch.dtype) -> Tensor:
    """|h|, for finite differences at least their resolution h_floor * |g~| (see RefreshMode)."""
    if refresh.mode == RefreshMode.AUTOGRAD:
        return h.abs()
    return torch.maximum(h.abs(), refresh.fd[1].to(mdt) * g.to(mdt).abs())


class EagerBackend(Backend):
    """Per-tensor torch ops: the reference."""

    name = "eager"

    def accepts(self, tensor: Tensor) -> bool:
        return True  # any layout: probes index elements in logical order

    def sq_norm(self, b: Bucket, sources: Sequence[Tensor], adaptive: bool, acc_dtype: torch.dtype) -> Tensor:
        total = torch.zeros((), dtype=acc_dtype, device=b.device)
        for x, v in zip(b.params, sources):
            v = v.to(acc_dtype)
            if adaptive:
                v = x.to(acc_dtype).abs() * v
            total += (v * v).sum()
        return total

    def perturb(self, b: Bucket, sources: Sequence[Tensor], sq_norm: Tensor, sign: float, adaptive: bool,
                groups: GroupTable) -> None:
        for j, (x, v) in enumerate(zip(b.params, sources)):
            mdt = math_dtype(x.dtype)
            rho = group_value(groups, b, j, GroupCol.RHO)
            peps = group_value(groups, b, j, GroupCol.PERTURB_EPS)
            # sign * rho / (||v|| + perturb_eps), as (1 / denominator) * (sign * rho)
            scale = ((sq_norm.sqrt() + peps).reciprocal() * (sign * rho)).to(mdt)
            b.backups[j].copy_(x)
            x0 = x.to(mdt)
            e = v.to(mdt) * scale
            if adaptive:
                e = e * (x0 * x0)
            x.copy_(x0 + e)

    def probes(self, b: Bucket, keys: ProbeKeys, sample: int) -> List[Tensor]:
        return [probe(b, j, keys, sample, p.dtype) for j, p in enumerate(b.params)]

    def fd_move(self, b: Bucket, delta: Tensor, keys: ProbeKeys, sample: int, sign: float,
                base: Optional[Sequence[Tensor]], save: Optional[Sequence[Tensor]]) -> None:
        for j, x in enumerate(b.params):
            mdt = math_dtype(x.dtype)
            x0 = (x if base is None else base[j]).to(mdt)
            if save is not None:
                save[j].copy_(x)
            # x = x~ + sign * delta * z (sign * delta * z is exact: z = +-1)
            x.copy_(x0 + (sign * delta.to(mdt)) * probe(b, j, keys, sample, mdt))

    def fd_fold(self, b: Bucket, acc: Sequence[Tensor], grads: Sequence[Tensor], baseline: Optional[Sequence[Tensor]],
                delta: Tensor, keys: ProbeKeys, sample: int, coefficient: float, first: bool) -> None:
        for j, g in enumerate(grads):
            mdt = math_dtype(b.params[j].dtype)
            diff = g.to(mdt) if baseline is None else g.to(mdt) - baseline[j].to(mdt)
            # (g - baseline) * z * coefficient / delta; z = +-1 multiplies exactly
            term = diff * probe(b, j, keys, sample, mdt) * coefficient / delta.to(mdt)
            acc[j].copy_(term if first else acc[j].to(mdt) + term)

    def update(self, b: Bucket, x_t: Sequence[Tensor], grads: Sequence[Tensor], scalars: Tensor, power: float,
               refresh: Optional[RefreshInput]) -> None:
        for j, x in enumerate(b.params):
            mdt = math_dtype(x.dtype)
            s = scalars[j].to(mdt)
            m, d, g = b.exp_avgs[j], b.exp_hessian_diags[j], grads[j].to(mdt)
            live = s[UpdateCol.LIVE] > 0
            # m_t = beta1 m_{t-1} + (1 - beta1) g~_t
            m_new = m * s[UpdateCol.BETA1] + g * s[UpdateCol.ONE_MINUS_BETA1]
            d_new = d
            if refresh is not None:
                # D_t = beta2 D_{t-1} + (1 - beta2) |h_t|
                h = hessian_magnitude(hessian_sample_mean(b, j, grads[j], refresh, mdt), grads[j], refresh, mdt)
                d_new = d * s[UpdateCol.BETA2] + h * s[UpdateCol.ONE_MINUS_BETA2]
            # x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (D_t^p / c2 + eps)
            denom = d_new.pow(power) / s[UpdateCol.C2] + s[UpdateCol.EPS]
            x_new = x_t[j].to(mdt) * s[UpdateCol.DECAY] + s[UpdateCol.NEG_STEP] * (m_new / denom)
            # a param that is not live goes back to x_t and keeps its state
            x.copy_(torch.where(live, x_new.to(x.dtype), x_t[j]))
            m.copy_(torch.where(live, m_new, m))
            if refresh is not None:
                d.copy_(torch.where(live, d_new, d))
