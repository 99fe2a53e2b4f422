"""Data-parallel averaging in a few flat buckets (SPEC section 6).

Each rank perturbs along its own first-pass gradient; the perturbed gradients and
the Hessian-vector products (or finite-difference gradients) are then averaged over
the process group. Because every rank draws the same probes ``z`` (counter-based),
averaging ``H z`` averages the Hutchinson estimate ``z * H z``, and ``|.|`` is
applied after averaging, in the update.

Tensors are packed into flat buffers per (device, dtype), at most ``bucket_bytes``
each, so the number of collectives depends on the total size, not on the number of
tensors. Which parameters take part is decided without a host read: every rank
steps every trainable parameter (a missing gradient counts as zero) and a device
mask, reduced with MAX, tells the update which ones had a gradient on some rank.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import accumulate
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .backends.base import RefreshMode

__all__ = ["BucketedAverager", "average_step_inputs", "is_distributed", "participation", "reject_sharded_params"]

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


def is_distributed(process_group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def reject_sharded_params(params: Sequence[Tensor]) -> None:
    """FSDP2 (``fully_shard``) parameters are DTensors; say why they are not supported."""
    for p in params:
        if type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor") or hasattr(p, "device_mesh"):
            raise NotImplementedError(
                "sassha_fused does not support FSDP2 (fully_shard) / DTensor parameters yet. "
                "Train with DistributedDataParallel instead: run both passes under "
                "model.no_sync() and let the optimizer average the perturbed gradients and "
                "Hessian estimates (see the README)."
            )


def _comm_device(process_group: Optional[object]) -> torch.device:
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def participation(params: Sequence[Tensor], process_group: Optional[object] = None) -> Tensor:
    """Which ``params`` have a gradient on some rank: a float mask on the device (one collective).

    Gives every param without a local gradient a zero one, so all ranks step (and
    average) the same tensors; the update leaves a param whose mask is 0 alone.
    """
    device = _comm_device(process_group)
    local = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    mask = local.to(device, non_blocking=True) if device.type == "cuda" else local
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=process_group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return mask


class BucketedAverager:
    """Averages lists of tensors across a process group in flat buckets."""

    def __init__(self, process_group: Optional[object] = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.process_group = process_group
        self.bucket_bytes = bucket_bytes
        self.collectives = 0  # collectives issued by the last average() call

    def average(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over the group, in place."""
        self.collectives = 0
        world = dist.get_world_size(self.process_group)
        groups: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = defaultdict(list)
        for t in tensors:
            groups[(t.device, t.dtype)].append(t)
        for (device, dtype), ts in groups.items():
            limit = max(1, self.bucket_bytes // ts[0].element_size())
            ends = list(accumulate(map(Tensor.numel, ts)))
            start, first = 0, 0
            for k, end in enumerate(ends):
                if end - start > limit and k > first:
                    self._reduce(ts[first:k], world)
                    start, first = ends[k - 1], k
            self._reduce(ts[first:], world)

    def _reduce(self, bucket: List[Tensor], world: int) -> None:
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat.div_(world)
        torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))
        self.collectives += 1


def average_step_inputs(plan, refresh, mask: Tensor, averager: BucketedAverager) -> List[Tensor]:
    """Average a step's gradients and refresh inputs over the group; returns each bucket's slice of ``mask``.

    Every rank reduces the same list of tensors: an absent refresh input (a param
    missing from a second-order graph or an FD pass) counts as zero.
    """
    present = []
    for b in plan.buckets:
        idx = b.cache.get("positions")
        if idx is None:
            idx = b.cache["positions"] = torch.tensor(b.positions, dtype=torch.long).to(mask.device)
        present.append(mask.index_select(0, idx))
    tensors = [g for b in plan.buckets for g in plan.grads(b)]
    if refresh is not None:
        for bi, b in enumerate(plan.buckets):
            grads = plan.grads(b)
            direct = refresh[bi].mode == RefreshMode.FD_DIRECT  # y - g~ is the estimate
            for ys in refresh[bi].ys:
                for j, y in enumerate(ys):
                    if y is None:  # no estimate: y = g~ (a zero difference) or a zero product
                        ys[j] = grads[j].clone() if direct else torch.zeros_like(grads[j])
                tensors += ys
    averager.average(tensors)
    return present
