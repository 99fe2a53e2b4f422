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

from ..encoding import (decode_hessian, decode_momentum, encode_hessian, encode_momentum, hessian_root, join_master,
                        split_master)
from ..probes import param_key, rademacher
from .base import Backend, Bucket, GroupCol, GroupTable, ProbeKeys, RefreshInput, RefreshMode, UpdateCol, math_dtype

__all__ = ["EagerBackend", "probe", "hessian_sample_mean", "hessian_magnitude", "read_state", "write_state",
           "read_x_t", "write_param"]


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


def read_state(b: Bucket, j: int, mdt: torch.dtype) -> "tuple[Tensor, Tensor]":
    """m and D of param ``j`` in the math dtype, decoded from ``b.state_bits``'s encoding."""
    if b.state_bits == 8:
        return (decode_momentum(b.exp_avgs[j], b.exp_avg_scales[j]).to(mdt),
                decode_hessian(b.exp_hessian_diags[j], b.exp_hessian_diag_scales[j]).to(mdt))
    return b.exp_avgs[j].to(mdt), b.exp_hessian_diags[j].to(mdt)


def preconditioner(b: Bucket, j: int, d: Tensor, power: float, c2: Tensor, refreshed: bool) -> Tensor:
    """D^p / c2 of param ``j``, D in the math dtype. With 8-bit state, the default power 0.5 and no
    refresh this step it comes straight from the codes, one product per element: ``hessian_root``
    with the group scales divided by c2 (encoding.py)."""
    if b.state_bits == 8 and power == 0.5 and not refreshed:
        scales = b.exp_hessian_diag_scales[j] / c2.to(torch.float32)
        return hessian_root(b.exp_hessian_diags[j], scales).to(d.dtype)
    return d.pow(power) / c2


def write_state(b: Bucket, j: int, m_new: Tensor, d_new: Optional[Tensor], live: Tensor) -> None:
    """Store m (and D, when given) of param ``j`` in its encoding where ``live``; else keep them."""
    if b.state_bits == 8:
        pairs = [(encode_momentum(m_new), b.exp_avgs[j], b.exp_avg_scales[j])]
        if d_new is not None:
            pairs.append((encode_hessian(d_new), b.exp_hessian_diags[j], b.exp_hessian_diag_scales[j]))
        for (codes, scales), codes_out, scales_out in pairs:
            codes_out.copy_(torch.where(live, codes.view_as(codes_out), codes_out))
            scales_out.copy_(torch.where(live, scales.view_as(scales_out), scales_out))
        return
    for new, out in ((m_new, b.exp_avgs[j]), (d_new, b.exp_hessian_diags[j])):
        if new is not None:  # (16 bits: one rounding to bfloat16, nearest even)
            out.copy_(torch.where(live, new.to(out.dtype), out))


def read_x_t(b: Bucket, j: int, x_t: Tensor, mdt: torch.dtype) -> Tensor:
    """The point the update starts from: the master weight when the param has a correction."""
    correction = b.master_corrections[j] if b.master_corrections else None
    return x_t.to(mdt) if correction is None else join_master(x_t, correction).to(mdt)


def write_param(b: Bucket, j: int, x_new: Tensor, x_t: Tensor, live: Tensor) -> None:
    """Param ``j`` takes ``x_new`` (both halves of a master weight) where ``live``, else goes back to x_t."""
    x = b.params[j]
    correction = b.master_corrections[j] if b.master_corrections else None
    if correction is None:
        x.copy_(torch.where(live, x_new.to(x.dtype), x_t))
        return
    high, low = split_master(x_new, 24 if correction.dtype == torch.int8 else 32)
    x.copy_(torch.where(live, high.view_as(x), x_t))
    correction.copy_(torch.where(live, low.view_as(correction), correction))


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
            m, d = read_state(b, j, mdt)
            g = grads[j].to(mdt)
            live = s[UpdateCol.LIVE] > 0
            # m_t = beta1 m_{t-1} + (1 - beta1) g~_t
            m_new = m * s[UpdateCol.BETA1] + g * s[UpdateCol.ONE_MINUS_BETA1]
            d_new = d
            if refresh is not None:
                # D_t = beta2 D_{t-1} + (1 - beta2) |h_t|
                h = hessian_magnitude(hessian_sample_mean(b, j, grads[j], refresh, mdt), grads[j], refresh, mdt)
                d_new = d * s[UpdateCol.BETA2] + h * s[UpdateCol.ONE_MINUS_BETA2]
            # x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (D_t^p / c2 + eps)
            denom = preconditioner(b, j, d_new, power, s[UpdateCol.C2], refresh is not None) + s[UpdateCol.EPS]
            x_new = read_x_t(b, j, x_t[j], mdt) * s[UpdateCol.DECAY] + s[UpdateCol.NEG_STEP] * (m_new / denom)
            # a param that is not live goes back to x_t and keeps its state
            write_param(b, j, x_new, x_t[j], live)
            write_state(b, j, m_new, d_new if refresh is not None else None, live)
