r"""The step of SASSHA and M-SASSHA over a ``StepPlan``, once for both classes.

The optimizer classes validate, keep state and drive the closure and the official
protocol; the numbers of a step are computed here, phase by phase, each phase one
backend call per bucket:

    norm -> perturb -> Hessian-vector products (``hvp.py``) -> average / check
         -> update -> commit

M-SASSHA differs only in where x_t lives (``unperturbed_param`` state instead of a
step-local backup) and in re-perturbing after the update; both are the callers'.

No phase reads a device value on the host. The non-finite check is a device flag
that the update reads per tensor (``UpdateCol.LIVE``); the optimizer's
``SkipMonitor`` brings the flag to the host asynchronously and reports skipped
steps when it has arrived.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._defaults import GROUP_KEYS
from .backends import Bucket, GroupCol, GroupTable, RefreshInput, RefreshMode
from .plans import Counters, StepPlan, attach_state, bucket_columns, dense

__all__ = [
    "GroupTable",
    "global_sq_norm",
    "perturb",
    "all_finite",
    "restore",
    "update_scalars",
    "update",
    "finish_step",
    "PartialUpdate",
]




assert GroupCol.COUNT == len(GROUP_KEYS) + 1  # betas is two columns


# ------------------------------------------------------------------ norms, perturbation
def global_sq_norm(plan: StepPlan, sources_of: Callable[[Bucket], List[Tensor]], adaptive: bool = False,
                   reduce: bool = True) -> Tensor:
    """One squared norm over every bucket, on the first bucket's device (no host sync).

    Under FSDP2 each rank sums its shards and ``reduce`` makes the sum global (one
    scalar all-reduce over the mesh); ``reduce=False`` leaves the local part.
    """
    total: Optional[Tensor] = None
    for b in plan.buckets:
        part = b.backend.sq_norm(b, dense(sources_of(b)), adaptive, plan.acc_dtype)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        total = torch.zeros((), dtype=plan.acc_dtype, device=_reduction_device(plan))
    return plan.reduce_sum(total) if reduce else total


def _reduction_device(plan: StepPlan) -> torch.device:
    """Where a rank without buckets keeps its (zero) part of a global sum."""
    if plan.shards is not None and plan.participants:
        return plan.participants[0].device
    return torch.device("cpu")


def perturb(plan: StepPlan, sources_of: Callable[[Bucket], List[Tensor]], sign: float, adaptive: bool,
            groups: GroupTable) -> Tensor:
    """``backup = x; x += sign * rho * w * v / (||w v|| + perturb_eps)`` with one global norm."""
    sq = global_sq_norm(plan, sources_of, adaptive)
    done: List[Bucket] = []
    try:
        for b in plan.buckets:
            b.backend.perturb(b, dense(sources_of(b)), sq.to(b.device), sign, adaptive, groups)
            done.append(b)
    except BaseException:  # the buckets already moved go back: nothing of a failed perturbation stays
        for b in done:
            if b.params:
                torch._foreach_copy_(b.params, b.backups)
        raise
    return sq


def restore(plan: StepPlan, check: bool = False) -> Optional[Tensor]:
    """The params of ``plan`` back to x_t from the backups, bit for bit; with ``check``, also
    this rank's sum of squares of the gradients, read in the same sweep (``all_finite``'s
    ``grads_sq_norm``)."""
    total: Optional[Tensor] = None
    for b in plan.buckets:
        if b.params:
            part = b.backend.restore(b, dense(plan.grads(b)) if check else None, plan.acc_dtype)
            if part is not None:
                total = part if total is None else total + part.to(total.device)
    if check and total is None:
        total = torch.zeros((), dtype=plan.acc_dtype, device=_reduction_device(plan))
    return total


def all_finite(plan: StepPlan, refresh: Optional[Sequence[RefreshInput]],
               grads_sq_norm: Optional[Tensor] = None) -> Tensor:
    """A 0-dim bool device tensor: the step's gradients and refresh inputs are all finite.

    The backends' fused squared norm over each list, then ``isfinite``; a sum of
    squares that overflows (|g| beyond ~1e19 in fp32) counts as non-finite as well.
    ``grads_sq_norm``: this rank's sum for the gradients, read already (``restore``).
    """
    total = global_sq_norm(plan, plan.grads, reduce=False) if grads_sq_norm is None else grads_sq_norm
    n_lists = len(refresh[0].ys) if refresh else 0  # (a plan without buckets has an empty refresh)
    for s in range(n_lists):
        # an absent entry (None) is checked as the gradient, which is checked anyway
        total = total + global_sq_norm(plan, lambda b: [g if y is None else y for g, y in
                                                        zip(plan.grads(b), refresh[plan.buckets.index(b)].ys[s])],
                                       reduce=False)
    # FSDP2: NaN/Inf in any shard skips the step on every rank (one scalar all-reduce)
    return torch.isfinite(plan.reduce_sum(total))


# ---------------------------------------------------------------------------- update
def update_scalars(b: Bucket, groups: GroupTable, power: float, refresh: bool, steps: Tensor, c2_old: Tensor,
                   ok: Optional[Tensor] = None, present: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The per-tensor scalars of the update, on the bucket's device (layout ``UpdateCol``).

    With :math:`t` the param's step count after this step,
    ``NEG_STEP`` :math:`= -\eta / (1 - \beta_1^t)`, ``DECAY`` :math:`= 1 - \eta\lambda`,
    ``C2`` :math:`= (1 - \beta_2^t)^p` on refresh steps (else the stored value), and
    ``LIVE`` is 1 where the param is updated: the step's inputs are finite (``ok``),
    the param takes part on some rank (``present``), and it has had a Hessian
    refresh (``c2 > 0``) or gets one now. ``steps`` and ``c2_old`` are the bucket's
    counters before the step (``Counters.gather``). Float64 here; backends cast to
    their math dtype. Returns ``(table, c2_new, live)`` for ``Counters.commit``.
    """
    device = b.device
    g = groups.tensor(device).index_select(0, (b.columns or bucket_columns(b)).group_index)
    lr, beta1, beta2 = g[:, GroupCol.LR], g[:, GroupCol.BETA1], g[:, GroupCol.BETA2]
    t = steps.to(torch.float64) + 1
    if refresh:
        c2 = (1 - torch.pow(beta2, t)) ** power
        live = torch.ones_like(c2)
    else:
        c2 = c2_old
        live = (c2_old > 0).to(torch.float64)
    if ok is not None:
        live = live * ok.to(device, torch.float64)
    if present is not None:
        live = live * present.to(device, torch.float64)
    table = torch.stack([
        -lr / (1 - torch.pow(beta1, t)),
        1 - lr * g[:, GroupCol.WEIGHT_DECAY],
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        c2,
        g[:, GroupCol.EPS],
        live,
    ], dim=1)
    return table, c2, live


class PartialUpdate(RuntimeError):
    """The update failed after some of its buckets (``written``) were written (see ``update``)."""

    def __init__(self, written: List[Bucket], message: str) -> None:
        super().__init__(message)
        self.written = written


def update(plan: StepPlan, x_t_of: Callable[[Bucket], List[Tensor]], groups: GroupTable, power: float,
           refresh: Optional[List[RefreshInput]], counters: Counters, ok: Optional[Tensor],
           present: Optional[Sequence[Optional[Tensor]]] = None) -> None:
    """The update of every bucket, then the commit of step counts and ``c2``.

    Every bucket's scalars are computed before the first write, and the counters
    are committed after the last, so a failure before the kernels run changes nothing.
    """
    scalars = []
    for i, b in enumerate(plan.buckets):
        if b.params:
            steps, c2_old = counters.gather(b)
            scalars.append((i, b, update_scalars(b, groups, power, refresh is not None, steps, c2_old, ok,
                                                 None if present is None else present[i])))
    for k, (i, b, (table, _, _)) in enumerate(scalars):
        try:
            b.backend.update(b, x_t_of(b), dense(plan.grads(b)), table, power,
                             None if refresh is None else refresh[i])
        except Exception as exc:
            if k == 0:
                raise  # nothing written yet
            raise PartialUpdate([w for _, w, _ in scalars[:k]],
                f"the update failed in bucket {k + 1} of {len(scalars)} ({b.backend.name} on {b.device}: "
                f"{type(exc).__name__}: {exc}) after the buckets before it were written: their parameters and "
                "optimizer state hold this step and the others do not, and putting them back would take a copy "
                "of the whole state. Load the last checkpoint (model and optimizer) to go on.") from exc
    for _, b, (_, c2, live) in scalars:
        counters.commit(b, live, c2 if refresh is not None else None)


def finish_step(plan: StepPlan, x_t_of: Callable[[Bucket], List[Tensor]], groups: GroupTable, power: float,
                refresh: Optional[List[RefreshInput]], counters: Counters, state_of: Callable[[Tensor], dict], *,
                inv_scale: Optional[Tensor] = None,
                average: Optional[Callable[[StepPlan, Optional[List[RefreshInput]]], List[Tensor]]] = None,
                check: bool = True, grads_sq_norm: Optional[Tensor] = None) -> Optional[Tensor]:
    """The step after its passes, in order: unscale -> average -> check -> update -> commit.

    ``inv_scale``: 1 / a GradScaler's scale, for Hessian-vector products taken by
    autograd from the scaled loss. ``average``: data-parallel averaging of the update's
    inputs (returns who takes part, per bucket). ``check``: the finite flag, returned
    (a 0-dim bool device tensor; the update left a non-finite step's params and state alone);
    ``grads_sq_norm``: the gradients' part of it, read already by ``restore`` (not used with
    ``average``, which changes them).
    """
    if refresh and refresh[0].mode == RefreshMode.AUTOGRAD and inv_scale is not None:
        hz = [y for r in refresh for ys in r.ys for y in ys if y is not None]
        if hz:
            torch._foreach_mul_(hz, inv_scale.to(hz[0].dtype))
    present = average(plan, refresh) if average is not None else None
    early = grads_sq_norm if average is None else None
    ok = all_finite(plan, refresh, early) if check and plan.participants else None
    attach_state(plan, state_of)  # creates missing state, once per plan
    update(plan, x_t_of, groups, power, refresh, counters, ok, present)
    return ok
