"""Step plans: the tensors of a step, bucketed once per parameter set and storage.

A plan answers, for the list of parameters taking part in a step, which backend runs
each one (fallback routing happens here, once), and holds the parallel lists every
phase needs: params, backups, optimizer state, probe counters and group rows.
Plans are cached on the identity of the participating parameters and checked
against their ``data_ptr()``s each step; a change of storage rebuilds the plan (and
drops the backends' tables cached in it). So per step the host does a constant
amount of Python work per bucket, whatever the number of tensors: lists of the
gradients are the only thing gathered per tensor, at C speed.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from itertools import repeat
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import Backend, Bucket, BucketColumns, get_backend, math_dtype
from .distributed import ShardGroup, element_offset, local
from .encoding import new_encoded_state

__all__ = ["StepPlan", "PlanCache", "Counters", "attach_state", "bucket_columns", "new_state", "dense", "count_present"]

_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_EAGER: Optional[Backend] = None


def _eager() -> Backend:
    global _EAGER
    if _EAGER is None:
        _EAGER = get_backend("eager")
    return _EAGER


def count_present(items: Sequence[Optional[Tensor]]) -> int:
    """How many entries are not None, at C speed (``list.count(None)`` would call Tensor.__eq__)."""
    return sum(map(operator.is_not, items, repeat(None)))


def dense(tensors: List[Tensor]) -> List[Tensor]:
    """The tensors themselves when all are contiguous (checked at C speed), else contiguous copies."""
    if all(map(_is_contiguous, tensors)):
        return tensors
    return [t.contiguous() for t in tensors]


@dataclass(eq=False)
class StepPlan:
    """The participants of a step in buckets, with what the step's phases share."""

    participants: List[Tensor]
    buckets: List[Bucket]
    ptrs: Tuple[int, ...]  # the participants' data_ptr()s the plan was built for
    acc_dtype: torch.dtype  # global norms sum in fp64 when any param is fp64, else fp32
    numel: int  # elements of all participants (the finite-difference step's scale)
    has_16bit: bool  # some participant is bf16/fp16
    all_fp64: bool
    # (bucket, position) of the largest float32 participants: their gradients tell
    # whether the forward ran in 16-bit arithmetic (autocast), for fd_eps="auto".
    fingerprint: List[Tuple[int, int]] = field(default_factory=list)
    has_state: bool = False
    # FSDP2: the mesh's group (global sums of local parts), and per bucket (by id)
    # the DTensor parameters whose local shards the bucket's params are
    shards: Optional[ShardGroup] = None
    owners: Dict[int, List[Tensor]] = field(default_factory=dict)

    def grads(self, bucket: Bucket) -> List[Tensor]:
        """The gradients the kernels read (local shards under FSDP2), in bucket order."""
        if self.shards is None:
            return [p.grad for p in bucket.params]
        return [None if p.grad is None else local(p.grad) for p in self.owners[id(bucket)]]

    def params_of(self, bucket: Bucket) -> List[Tensor]:
        """The parameters themselves (whose ``.grad`` is set and cleared), in bucket order."""
        return bucket.params if self.shards is None else self.owners[id(bucket)]

    def reduce_sum(self, t: Tensor) -> Tensor:
        """A per-rank partial sum made global (FSDP2: one all-reduce over the mesh)."""
        return t if self.shards is None else self.shards.sum_(t)


class PlanCache:
    """Builds and caches ``StepPlan``s for an optimizer.

    ``index_of`` / ``group_of`` map ``id(param)`` to its position and group;
    ``backup_of(param)`` gives the tensor that keeps x_t for it; ``backend_for(device,
    dtype)`` resolves the optimizer's ``backend=`` argument; ``state_bits_of(param)``
    the encoding of its state (a bucket holds one). (Passed per call: the cache holds
    no reference back to its optimizer.)
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._plans: "OrderedDict[Tuple[int, ...], StepPlan]" = OrderedDict()
        self.builds = 0  # plans built so far (tests and benchmarks read it)

    def clear(self) -> None:
        self._plans.clear()

    def get(
        self,
        participants: List[Tensor],
        index_of: Dict[int, int],
        group_of: Dict[int, int],
        backup_of: Callable[[Tensor], Tensor],
        backend_for: Callable[[torch.device, torch.dtype], Backend],
        shards: Optional[ShardGroup] = None,
        state_bits_of: Optional[Callable[[Tensor], int]] = None,
    ) -> StepPlan:
        key = tuple(map(id, participants))
        plan = self._plans.get(key)
        if plan is not None and _ptrs(participants, shards) == plan.ptrs:
            self._plans.move_to_end(key)
            return plan
        plan = self._build(participants, index_of, group_of, backup_of, backend_for, shards, state_bits_of)
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan

    def _build(self, participants, index_of, group_of, backup_of, backend_for, shards, state_bits_of) -> StepPlan:
        self.builds += 1
        by_key: Dict[Tuple[torch.device, int, int], Bucket] = {}
        owners: Dict[int, List[Tensor]] = {}
        for pos, p in enumerate(participants):
            lp = local(p) if shards is not None else p  # FSDP2: the kernels run on this rank's shard
            backend = backend_for(p.device, p.dtype)
            if not backend.accepts(lp):
                backend = _eager()  # a layout the kernels cannot address: the reference runs it
            key = (p.device, id(backend), 0 if state_bits_of is None else state_bits_of(p))
            b = by_key.get(key)
            if b is None:
                b = by_key[key] = Bucket(backend=backend, device=p.device, params=[], param_index=[],
                                         group_index=[], backups=[])
                owners[id(b)] = []
                if shards is not None:
                    b.element_offset = []
            b.positions.append(pos)
            b.params.append(lp)
            b.param_index.append(index_of[id(p)])
            b.group_index.append(group_of[id(p)])
            b.backups.append(local(backup_of(p)) if shards is not None else backup_of(p))
            if shards is not None:
                owners[id(b)].append(p)
                b.element_offset.append(element_offset(p))  # probes by global element index
        buckets = list(by_key.values())
        dtypes = {p.dtype for p in participants}
        sizes = [(p.numel(), bi, j) for bi, b in enumerate(buckets) for j, p in enumerate(b.params)
                 if p.dtype == torch.float32]
        sizes.sort(reverse=True)
        return StepPlan(
            participants=list(participants),
            buckets=buckets,
            ptrs=_ptrs(participants, shards),
            acc_dtype=torch.float64 if torch.float64 in dtypes else torch.float32,
            numel=sum(p.numel() for p in participants),
            has_16bit=bool(dtypes & {torch.bfloat16, torch.float16}),
            all_fp64=dtypes == {torch.float64},
            fingerprint=[(bi, j) for n, bi, j in sizes[:4] if n > 0],
            shards=shards,
            owners=owners if shards is not None else {},
        )


def _ptrs(participants: List[Tensor], shards: Optional[ShardGroup]) -> Tuple[int, ...]:
    """The storage a plan was built for: the params' (FSDP2: their local shards') data pointers."""
    if shards is None:
        return tuple(map(_data_ptr, participants))
    return tuple(local(p).data_ptr() for p in participants)


def bucket_columns(b: Bucket) -> BucketColumns:
    """The bucket's index columns on its device, built on first use and kept in the bucket."""
    if b.columns is None:
        def column(values: List[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long).to(b.device)

        b.columns = BucketColumns(column(b.group_index), column(b.param_index), column(b.positions))
    return b.columns


def attach_state(plan: StepPlan, state_of: Callable[[Tensor], dict]) -> None:
    """Fill the buckets' state lists (once per plan: state tensors are stable)."""
    if plan.has_state:
        return
    for b in plan.buckets:
        states = [state_of(p) for p in plan.params_of(b)]
        if "exp_avg_codes" in states[0] if states else False:
            b.state_bits = 8
            b.exp_avgs = [s["exp_avg_codes"] for s in states]
            b.exp_hessian_diags = [s["exp_hessian_diag_codes"] for s in states]
            b.exp_avg_scales = [s["exp_avg_scales"] for s in states]
            b.exp_hessian_diag_scales = [s["exp_hessian_diag_scales"] for s in states]
        else:
            b.exp_avgs = [s["exp_avg"] for s in states]
            b.exp_hessian_diags = [s["exp_hessian_diag"] for s in states]
            b.state_bits = 16 if b.exp_avgs and b.exp_avgs[0].dtype == torch.bfloat16 else 32
        if any("master_correction" in s for s in states):
            b.master_corrections = [s.get("master_correction") for s in states]
        if plan.shards is not None:  # FSDP2: state is sharded like its param; the kernels take the shards
            b.exp_avgs, b.exp_hessian_diags = list(map(local, b.exp_avgs)), list(map(local, b.exp_hessian_diags))
            b.exp_avg_scales = list(map(local, b.exp_avg_scales))
            b.exp_hessian_diag_scales = list(map(local, b.exp_hessian_diag_scales))
            b.master_corrections = [None if c is None else local(c) for c in b.master_corrections]
    plan.has_state = True


class Counters:
    """Every parameter's step count and ``c2``, one contiguous bank per device.

    ``state[p]["step"]`` (float32) and ``state[p]["bias_correction2"]`` (float64)
    are 0-dim views into the banks at the parameter's position, so a step reads
    and commits the counters of a whole bucket in one indexed op each, on the
    device, whatever the number of tensors.
    """

    def __init__(self) -> None:
        self.steps: Dict[torch.device, Tensor] = {}
        self.c2: Dict[torch.device, Tensor] = {}

    def views(self, device: torch.device, index: int, size: int, states: Callable[[], List[Tuple[int, dict]]]
              ) -> Tuple[Tensor, Tensor]:
        """The (step, c2) views of position ``index`` (banks grow to ``size``, re-pointing ``states``)."""
        bank = self.steps.get(device)
        if bank is None or bank.numel() <= index:
            n = max(size, index + 1)
            steps = torch.zeros(n, dtype=torch.float32, device=device)
            c2 = torch.zeros(n, dtype=torch.float64, device=device)
            if bank is not None:
                steps[:bank.numel()].copy_(bank)
                c2[:bank.numel()].copy_(self.c2[device])
            self.steps[device], self.c2[device] = steps, c2
            for i, state in states():  # the views of the old banks move to the new ones
                state["step"], state["bias_correction2"] = steps[i], c2[i]
        return self.steps[device][index], self.c2[device][index]

    def gather(self, b: Bucket) -> Tuple[Tensor, Tensor]:
        """The bucket's step counts (float64) and c2, in bucket order."""
        idx = (b.columns or bucket_columns(b)).param_index
        return self.steps[b.device].index_select(0, idx).to(torch.float64), self.c2[b.device].index_select(0, idx)

    def commit(self, b: Bucket, live: Tensor, c2: Optional[Tensor]) -> None:
        """Step counts advance where the update was live; a refresh stores its ``c2`` there."""
        idx = (b.columns or bucket_columns(b)).param_index
        self.steps[b.device].index_add_(0, idx, live.to(torch.float32))
        if c2 is not None:
            bank = self.c2[b.device]
            bank.index_copy_(0, idx, torch.where(live > 0, c2, bank.index_select(0, idx)))


def new_state(p: Tensor, step: Tensor, c2: Tensor, state_bits: int = 32,
              master_weight_bits: Optional[int] = None) -> dict:
    """Fresh optimizer state of a parameter (names as in the official code); counters are bank views.

    ``m`` and ``D`` in the encoding of ``state_bits``; a bfloat16 param under
    ``master_weight_bits`` also gets its (zero) ``master_correction``.
    """
    step.zero_()
    c2.zero_()  # 0 until the parameter's first Hessian refresh: the update skips it until then
    state = {"step": step, **new_encoded_state(p, state_bits, math_dtype(p.dtype)), "bias_correction2": c2}
    if master_weight_bits is not None and p.dtype == torch.bfloat16:
        state["master_correction"] = torch.zeros_like(p, dtype=torch.int8 if master_weight_bits == 24 else torch.int16,
                                                      memory_format=torch.contiguous_format)
    return state


def flat_numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)
