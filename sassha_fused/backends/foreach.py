"""``torch._foreach_*`` backend: the fast pure-PyTorch path.

Same math as ``eager.py``, but each elementwise operation is one multi-tensor call
per dtype of the bucket. 16-bit params are lifted to fp32 lists for the math and
written back once. Per-tensor scalars (``functional.update_scalars``) enter as
lists of 0-dim device tensors, so nothing is read on the host; whether a param is
updated at all (``LIVE``) is a ``torch.where`` per tensor, the one per-tensor call
of a step. Probe generation is integer hashing with no foreach form: probes and the
finite-difference moves share the reference's code.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .base import Backend, Bucket, GroupCol, GroupTable, ProbeKeys, RefreshInput, UpdateCol, math_dtype
from .eager import (EagerBackend, hessian_magnitude, hessian_sample_mean, preconditioner, read_state, read_x_t,
                    write_param, write_state)

__all__ = ["ForeachBackend"]

_EAGER = EagerBackend()


def _by_dtype(b: Bucket) -> Dict[torch.dtype, List[int]]:
    """Indices of the bucket's non-empty params by dtype (cached on the bucket)."""
    cached = b.backend_cache.get("foreach_by_dtype")
    if cached is None:
        cached = defaultdict(list)
        for j, p in enumerate(b.params):
            if p.numel() > 0:
                cached[p.dtype].append(j)
        cached = b.backend_cache["foreach_by_dtype"] = dict(cached)
    return cached


def _index(b: Bucket, what: str, dt: torch.dtype, values: List[int]) -> Tensor:
    """A cached device index tensor of the bucket."""
    key = ("foreach_index", what, dt)
    t = b.backend_cache.get(key)
    if t is None:
        t = b.backend_cache[key] = torch.tensor(values, dtype=torch.long).to(b.device)
    return t


def _lift(tensors: List[Tensor], mdt: torch.dtype) -> List[Tensor]:
    # the tensors themselves when already in the math dtype, fp32 copies for 16-bit ones
    return [t if t.dtype == mdt else t.to(mdt) for t in tensors]


def _pick(xs: Sequence, idx: List[int]) -> list:
    return [xs[j] for j in idx]


class ForeachBackend(Backend):
    """Multi-tensor torch ops, one call per (bucket, dtype)."""

    name = "foreach"

    def accepts(self, tensor: Tensor) -> bool:
        return True

    def sq_norm(self, b: Bucket, sources: Sequence[Tensor], adaptive: bool, acc_dtype: torch.dtype) -> Tensor:
        total = torch.zeros((), dtype=acc_dtype, device=b.device)
        for dt, idx in _by_dtype(b).items():
            v = _lift(_pick(sources, idx), acc_dtype)
            if adaptive:
                v = torch._foreach_mul(_lift(_pick(b.params, idx), acc_dtype), v)
                torch._foreach_abs_(v)
            total += torch.stack(torch._foreach_norm(v)).square().sum()
        return total

    def perturb(self, b: Bucket, sources: Sequence[Tensor], sq_norm: Tensor, sign: float, adaptive: bool,
                groups: GroupTable) -> None:
        # (1 / (||v|| + perturb_eps)) * (sign * rho) per group, in the norm's dtype as the reference
        table = groups.tensor(b.device).to(sq_norm.dtype)
        inv = (sq_norm.sqrt() + table[:, GroupCol.PERTURB_EPS]).reciprocal()
        scale_per_group = inv * (sign * groups.tensor(b.device)[:, GroupCol.RHO]).to(sq_norm.dtype)
        for dt, idx in _by_dtype(b).items():
            mdt = math_dtype(dt)
            xs = _pick(b.params, idx)
            torch._foreach_copy_(_pick(b.backups, idx), xs)
            scales = scale_per_group.index_select(0, _index(b, "groups", dt, _pick(b.group_index, idx)))
            scales = scales.to(mdt).unbind(0)
            e = torch._foreach_mul(_lift(_pick(sources, idx), mdt), scales)
            x32 = _lift(xs, mdt)
            if adaptive:
                torch._foreach_mul_(e, torch._foreach_mul(x32, x32))
            if mdt == dt:
                torch._foreach_add_(xs, e)
            else:
                torch._foreach_copy_(xs, torch._foreach_add(x32, e))

    def probes(self, b: Bucket, keys: ProbeKeys, sample: int) -> List[Tensor]:
        return _EAGER.probes(b, keys, sample)

    def fd_move(self, b, delta, keys, sample, sign, base, save) -> None:
        _EAGER.fd_move(b, delta, keys, sample, sign, base, save)

    def fd_fold(self, b, acc, grads, baseline, delta, keys, sample, coefficient, first) -> None:
        _EAGER.fd_fold(b, acc, grads, baseline, delta, keys, sample, coefficient, first)

    def update(self, b: Bucket, x_t: Sequence[Tensor], grads: Sequence[Tensor], scalars: Tensor, power: float,
               refresh: Optional[RefreshInput]) -> None:
        for dt, idx in _by_dtype(b).items():
            mdt = math_dtype(dt)
            rows = scalars.index_select(0, _index(b, "rows", dt, idx)).to(mdt)
            col = [c.unbind(0) for c in rows.unbind(1)]
            plain = b.state_bits == 32 and not b.master_corrections
            if plain:
                ms, ds = _pick(b.exp_avgs, idx), _pick(b.exp_hessian_diags, idx)
            else:  # compact state or master weights: decoded into float temporaries, encoded after
                ms, ds = (list(t) for t in zip(*[read_state(b, j, mdt) for j in idx]))
            gs = _lift(_pick(grads, idx), mdt)
            m_new = torch._foreach_mul(ms, col[UpdateCol.BETA1])
            torch._foreach_add_(m_new, torch._foreach_mul(gs, col[UpdateCol.ONE_MINUS_BETA1]))
            d_new = ds
            if refresh is not None:
                h = [hessian_magnitude(hessian_sample_mean(b, j, grads[j], refresh, mdt), grads[j], refresh, mdt)
                     for j in idx]
                d_new = torch._foreach_mul(ds, col[UpdateCol.BETA2])
                torch._foreach_add_(d_new, torch._foreach_mul(h, col[UpdateCol.ONE_MINUS_BETA2]))
            if b.state_bits == 8:  # straight from the codes where it can (eager.preconditioner)
                denom = [preconditioner(b, j, d_new[k], power, col[UpdateCol.C2][k], refresh is not None)
                         for k, j in enumerate(idx)]
            else:
                denom = torch._foreach_pow(d_new, power)
                torch._foreach_div_(denom, col[UpdateCol.C2])
            torch._foreach_add_(denom, col[UpdateCol.EPS])
            step = torch._foreach_div(m_new, denom)
            torch._foreach_mul_(step, col[UpdateCol.NEG_STEP])
            xts = _pick(x_t, idx)
            x0 = _lift(xts, mdt) if plain else [read_x_t(b, j, x_t[j], mdt) for j in idx]
            x_new = torch._foreach_mul(x0, col[UpdateCol.DECAY])
            torch._foreach_add_(x_new, step)
            xs = _pick(b.params, idx)
            live = (rows[:, UpdateCol.LIVE] > 0).unbind(0)
            if not plain:
                for k, j in enumerate(idx):
                    write_param(b, j, x_new[k], xts[k], live[k])
                    write_state(b, j, m_new[k], d_new[k] if refresh is not None else None, live[k])
                continue
            for k in range(len(idx)):  # a param that is not live goes back to x_t, state untouched
                xs[k].copy_(torch.where(live[k], x_new[k].to(dt), xts[k]))
                ms[k].copy_(torch.where(live[k], m_new[k], ms[k]))
                if refresh is not None:
                    ds[k].copy_(torch.where(live[k], d_new[k], ds[k]))
