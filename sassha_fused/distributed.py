"""Data-parallel averaging in a few flat buckets (SPEC section 6).

Each rank perturbs along its own first-pass gradient; the perturbed gradients and
the Hessian-vector products are then averaged over the process group. Because every
rank draws the same probes ``z`` (counter-based), averaging ``H z`` averages the
Hutchinson estimate ``z * H z``, and ``|.|`` is applied after averaging, in the update.

Tensors are packed into flat buffers per (device, dtype), at most ``bucket_bytes``
each, so the number of collectives depends on the total size, not on the number of
tensors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BucketedAverager", "is_distributed", "reject_sharded_params", "sync_participation"]

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


def is_distributed(process_group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def reject_sharded_params(params: Sequence[Tensor]) -> None:
    """FSDP2 (``fully_shard``) parameters are DTensors; say why they are not supported."""
    for p in params:
        if type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor") or hasattr(p, "device_mesh"):
            raise NotImplementedError(
                "sassha_fused does not support FSDP2 (fully_shard) / DTensor parameters: "
                "SASSHA's Hessian-vector product needs a double backward through the "
                "unsharded parameters, which FSDP frees after each pass. Train with "
                "DistributedDataParallel instead: run both passes under model.no_sync() "
                "and let the optimizer average the perturbed gradients and Hessian "
                "estimates (see the README)."
            )


def sync_participation(params: Sequence[Tensor], process_group: Optional[object] = None) -> int:
    """Give every rank the same set of parameters with a gradient; returns 1 (collective).

    A parameter that received a gradient on any rank takes part everywhere: where it
    has none, its gradient is zero (as DDP treats unused parameters). Without this,
    ranks would bucket different tensor lists and their collectives would not match.
    """
    if not params:
        return 0
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mask = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=process_group)
    for p, present in zip(params, mask.tolist()):
        if present and p.grad is None:
            p.grad = torch.zeros_like(p)
    return 1


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
            if t.numel() > 0:
                groups[(t.device, t.dtype)].append(t)
        for (device, dtype), ts in groups.items():
            limit = max(1, self.bucket_bytes // ts[0].element_size())
            bucket: List[Tensor] = []
            size = 0
            for t in ts:
                if bucket and size + t.numel() > limit:
                    self._reduce(bucket, world)
                    bucket, size = [], 0
                bucket.append(t)
                size += t.numel()
            if bucket:
                self._reduce(bucket, world)

    def _reduce(self, bucket: List[Tensor], world: int) -> None:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat.div_(world)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        self.collectives += 1
