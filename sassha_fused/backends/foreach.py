"""``torch._foreach_*`` backend: the fast pure-PyTorch path.

Same math as ``eager.py``, but each elementwise operation is one multi-tensor call
per (param group, dtype). 16-bit params are lifted to fp32 lists for the math and
written back once. This is the baseline the fused kernels have to beat.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Backend, GroupTensors, ProbeSpec, math_dtype
from .eager import EagerBackend, first_device, norm_accumulator_dtype, perturb_scale, probe, sources

__all__ = ["ForeachBackend"]


def _by_dtype(group: GroupTensors) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for j, p in enumerate(group.params):
        if p.numel() > 0:
            buckets[(p.device, p.dtype)].append(j)
    return buckets


def _lift(tensors: List[Tensor], mdt: torch.dtype) -> List[Tensor]:
    # Views when already in the math dtype, fp32 copies for 16-bit tensors.
    return [t if t.dtype == mdt else t.to(mdt) for t in tensors]


class ForeachBackend(Backend):
    """Multi-tensor torch ops, one call per (group, device, dtype)."""

    name = "foreach"

    def sq_norm(self, groups: Sequence[GroupTensors], source: str, adaptive: bool) -> Tensor:
        acc = norm_accumulator_dtype(groups)
        device = first_device(groups)
        total = torch.zeros((), dtype=acc, device=device)
        for g in groups:
            src = sources(g, source)
            for (dev, dt), idx in _by_dtype(g).items():
                v = _lift([src[j] for j in idx], acc)
                if adaptive:
                    v = torch._foreach_mul(_lift([g.params[j] for j in idx], acc), v)
                    torch._foreach_abs_(v)
                norms = torch._foreach_norm(v)
                total += torch.stack(norms).square().sum().to(device)
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
            src = sources(g, source)
            for (dev, dt), idx in _by_dtype(g).items():
                mdt = math_dtype(dt)
                xs = [g.params[j] for j in idx]
                torch._foreach_copy_([g.backups[j] for j in idx], xs)
                scale = perturb_scale(g, sq_norm.to(dev), sign).to(mdt)
                if dev.type == "cpu" and mdt == dt and not adaptive:
                    # No temporary list on the CPU: a fresh list of buffers is first-touched
                    # on every step there, which costs more than the arithmetic. Reading the
                    # scale on the host is no synchronisation on the CPU. ATen's vectorised
                    # add with alpha uses a fused multiply-add, so x + e can differ from the
                    # eager reference in the last bit (the restore is exact all the same:
                    # it copies the backup taken above).
                    torch._foreach_add_(xs, [src[j] for j in idx], alpha=float(scale))
                    continue
                e = torch._foreach_mul(_lift([src[j] for j in idx], mdt), scale)
                x32 = _lift(xs, mdt)
                if adaptive:
                    torch._foreach_mul_(e, torch._foreach_mul(x32, x32))
                if mdt == dt:
                    torch._foreach_add_(xs, e)
                else:
                    torch._foreach_copy_(xs, torch._foreach_add(x32, e))

    def probes(self, groups: Sequence[GroupTensors], spec: ProbeSpec, sample: int) -> List[List[Tensor]]:
        # Probe generation is integer hashing with no foreach form; share the reference's.
        return EagerBackend().probes(groups, spec, sample)

    def update(
        self,
        groups: Sequence[GroupTensors],
        hvps: Optional[Sequence[Sequence[Sequence[Optional[Tensor]]]]],
        spec: Optional[ProbeSpec],
    ) -> None:
        for gi, g in enumerate(groups):
            for (dev, dt), idx in _by_dtype(g).items():
                mdt = math_dtype(dt)
                ms = [g.exp_avgs[j] for j in idx]
                ds = [g.exp_hessian_diags[j] for j in idx]
                torch._foreach_mul_(ms, g.beta1)
                torch._foreach_add_(ms, _lift([g.grads[j] for j in idx], mdt), alpha=1 - g.beta1)
                if hvps is not None:
                    h = [torch.zeros_like(d) for d in ds]
                    for s, hz in enumerate(hvps[gi]):
                        live = [k for k, j in enumerate(idx) if hz[j] is not None]
                        if live:
                            zs = [probe(g, idx[k], spec, s, mdt) for k in live]
                            torch._foreach_addcmul_([h[k] for k in live], zs, _lift([hz[idx[k]] for k in live], mdt))
                    torch._foreach_div_(h, float(spec.n_samples))
                    torch._foreach_abs_(h)
                    torch._foreach_mul_(ds, g.beta2)
                    torch._foreach_add_(ds, h, alpha=1 - g.beta2)
                denom = torch._foreach_pow(ds, g.hessian_power)
                torch._foreach_div_(denom, [g.bias_correction2[j] for j in idx])
                torch._foreach_add_(denom, g.eps)
                neg_step = [-g.lr / (1 - g.beta1 ** g.steps[j]) for j in idx]
                xs = [g.params[j] for j in idx]
                bs = [g.backups[j] for j in idx]
                if mdt == dt:  # in place: no x_new list (the same operations, the same bits)
                    if any(b is not x for b, x in zip(bs, xs)):
                        torch._foreach_copy_(xs, bs)
                    if g.weight_decay:
                        torch._foreach_mul_(xs, 1 - g.lr * g.weight_decay)
                    torch._foreach_addcdiv_(xs, ms, denom, neg_step)
                else:
                    x_new = torch._foreach_mul(_lift(bs, mdt), 1 - g.lr * g.weight_decay)
                    torch._foreach_addcdiv_(x_new, ms, denom, neg_step)
                    torch._foreach_copy_(xs, x_new)
