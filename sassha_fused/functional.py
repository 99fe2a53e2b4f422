r"""The step of SASSHA and M-SASSHA over a ``StepPlan``, once for both classes.

The optimizer classes validate, keep state and drive the closure and the official
protocol; the numbers of a step are computed here, phase by phase, each phase one
backend call per bucket:

    norm -> perturb -> Hessian-vector products (``hvp.py``) -> average / check
         -> update -> commit

M-SASSHA differs only in where x_t lives (``unperturbed_param`` state instead of a
step-local backup) and in re-perturbing after the update; both are the callers'.

No phase reads a device value on the host. The non-finite check is a device flag
that the update reads per tensor (``UpdateCol.LIVE``); ``SkipMonitor`` brings the
flag to the host asynchronously and reports skipped steps when it has arrived.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._defaults import GROUP_KEYS
from .backends import Bucket, GroupCol, RefreshInput
from .plans import Counters, StepPlan, dense

__all__ = [
    "GroupTable",
    "SkipMonitor",
    "global_sq_norm",
    "perturb",
    "all_finite",
    "update_scalars",
    "update",
]


class GroupTable:
    """The step's hyper-parameters, one row per param group (layout: ``GroupCol``).

    Built from ``param_groups`` each step (a loop over groups, not tensors).
    ``tensor(device)`` is the float64 table on a device: uploaded from pinned memory
    without waiting, or, ``on_device`` (capturable runs), assembled there by device
    ops, so a CUDA graph can capture it (a tensor ``lr`` is then read at replay).
    ``rows`` are the host values (the eager reference reads them).
    """

    __slots__ = ("values", "on_device", "_on", "_rows")

    def __init__(self, param_groups: Sequence[Dict[str, Any]], on_device: bool = False) -> None:
        self.values = [(g["lr"], g["betas"][0], g["betas"][1], g["weight_decay"], g["eps"], g["rho"],
                        g["perturb_eps"]) for g in param_groups]
        self.on_device = on_device
        self._on: Dict[torch.device, Tensor] = {}
        self._rows: Optional[List[Tuple[float, ...]]] = None

    @property
    def rows(self) -> List[Tuple[float, ...]]:
        if self._rows is None:
            self._rows = [tuple(float(v) for v in row) for row in self.values]
        return self._rows

    def tensor(self, device: torch.device) -> Tensor:
        t = self._on.get(device)
        if t is None:
            if self.on_device:
                t = torch.stack([torch.stack([
                    v.to(device, torch.float64).reshape(()) if isinstance(v, Tensor)
                    else torch.full((), float(v), dtype=torch.float64, device=device) for v in row])
                    for row in self.values])
            else:
                host = torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.values), GroupCol.COUNT)
                t = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
            self._on[device] = t
        return t


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
    for b in plan.buckets:
        b.backend.perturb(b, dense(sources_of(b)), sq.to(b.device), sign, adaptive, groups)
    return sq


def all_finite(plan: StepPlan, refresh: Optional[Sequence[RefreshInput]]) -> Tensor:
    """A 0-dim bool device tensor: the step's gradients and refresh inputs are all finite.

    The backends' fused squared norm over each list, then ``isfinite``; a sum of
    squares that overflows (|g| beyond ~1e19 in fp32) counts as non-finite as well.
    """
    total = global_sq_norm(plan, plan.grads, reduce=False)
    n_lists = 0 if refresh is None else len(refresh[0].ys)
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
    gidx = b.cache.get("group_index")
    if gidx is None:
        gidx = b.cache["group_index"] = torch.tensor(b.group_index, dtype=torch.long).to(device)
    g = groups.tensor(device).index_select(0, gidx)
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


def update(plan: StepPlan, x_t_of: Callable[[Bucket], List[Tensor]], groups: GroupTable, power: float,
           refresh: Optional[List[RefreshInput]], counters: Counters, ok: Optional[Tensor],
           present: Optional[Sequence[Optional[Tensor]]] = None) -> None:
    """The update of every bucket, then its commit of step counts and ``c2``."""
    for i, b in enumerate(plan.buckets):
        if not b.params:
            continue
        steps, c2_old = counters.gather(b)
        table, c2, live = update_scalars(b, groups, power, refresh is not None, steps, c2_old, ok,
                                         None if present is None else present[i])
        b.backend.update(b, x_t_of(b), dense(plan.grads(b)), table, power, None if refresh is None else refresh[i])
        counters.commit(b, live, c2 if refresh is not None else None)


# ------------------------------------------------------------------------ skipped steps
class SkipMonitor:
    """Brings the steps' finite flags to the host without stalling, and reports skips.

    On a GPU each flag is copied to pinned memory behind an event; ``poll`` reads
    the flags whose copy has completed (``wait=True``: all of them). On the CPU a
    flag is there at once. A skipped step warns (``nonfinite="skip"``), and
    ``max_consecutive`` skips in a row raise ``FloatingPointError``.
    """

    def __init__(self, owner: str, max_consecutive: Optional[int], on_device: bool = False) -> None:
        self.owner = owner
        self.max_consecutive = max_consecutive
        self.on_device = on_device
        self.skipped = 0  # found on the host so far
        self.consecutive = 0
        self._pending: Deque[Tuple[int, Tensor, Any]] = deque()
        self._device_count: Optional[Tensor] = None  # on_device: skipped steps counted where they happen

    def record(self, ok: Tensor, step: int) -> None:
        if self.on_device:  # capturable: no host copy, no event; counted on the device
            count = self._device_count
            self._device_count = (~ok).to(torch.int64) if count is None else count.add_((~ok).to(torch.int64))
            return
        if ok.device.type == "cuda":
            host = torch.empty((), dtype=ok.dtype, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, ok, None))

    def total(self) -> int:
        """Skipped steps so far; reads the device count (a synchronisation) in capturable runs."""
        self.poll(wait=True, warn=False)
        return self.skipped + (0 if self._device_count is None else int(self._device_count))

    def poll(self, wait: bool = False, warn: bool = True) -> List[int]:
        """Steps found skipped among the flags that have arrived (all, with ``wait``)."""
        found = []
        while self._pending:
            step, host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.popleft()
            if bool(host):  # a host (CPU or pinned) copy: no device synchronisation
                self.consecutive = 0
                continue
            self.skipped += 1
            self.consecutive += 1
            found.append(step)
            if warn:
                warnings.warn(
                    f"{self.owner}: step {step} skipped: the perturbed gradients or the Hessian estimate "
                    "contain NaN or Inf. Parameters and optimizer state are unchanged.",
                    RuntimeWarning, stacklevel=4,
                )
            if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
                self._pending.clear()
                raise FloatingPointError(
                    f"{self.owner}: {self.consecutive} consecutive steps were skipped for NaN/Inf gradients "
                    f"or Hessian estimates (the last at step {step}): the run is stuck. Lower the learning "
                    "rate, check the loss and the data, or raise max_consecutive_skips."
                )
        return found
