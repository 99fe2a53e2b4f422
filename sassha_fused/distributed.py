"""Data-parallel training: DDP-style averaging in flat buckets, and FSDP2 shards (SPEC section 6).

Replicated parameters (the optimizer averages). Each rank perturbs along its own
first-pass gradient; the perturbed gradients and the Hessian-vector products (or
finite-difference gradients) are then averaged over the process group. Because every
rank draws the same probes ``z`` (counter-based), averaging ``H z`` averages the
Hutchinson estimate ``z * H z``, and ``|.|`` is applied after averaging, in the
update. Tensors are packed into flat buffers per (device, dtype), at most
``bucket_bytes`` each, so the number of collectives depends on the total size, not
on the number of tensors. Which parameters take part is decided without a host read:
every rank steps every trainable parameter (a missing gradient counts as zero) and a
device mask, reduced with MAX, tells the update which ones had a gradient on some
rank. With ``no_sync=model.no_sync`` DDP's reducer does this averaging instead and
none of it runs.

FSDP2 parameters (``fully_shard``: DTensors sharded on dim 0 over a 1-D mesh). FSDP
averages the gradient of every pass, so the perturbation follows the averaged
gradient. The kernels run on each rank's local shard (``local``), the optimizer
state is sharded like its parameter, and the probes are keyed by the global element
index (``element_offset``), so a sharded run draws the probes of an unsharded one.
Global quantities are sums of local parts, one scalar all-reduce each
(``ShardGroup``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from itertools import accumulate
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .backends.base import RefreshMode

__all__ = [
    "BucketedAverager",
    "ShardGroup",
    "average_step_inputs",
    "copy_",
    "element_offset",
    "is_distributed",
    "is_sharded",
    "local",
    "participation",
    "shard_group_of",
]

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


def is_distributed(process_group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


@functools.lru_cache(maxsize=None)
def _dtensor_type():  # looked up once: local() runs per gradient per step under FSDP2
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without DTensor
        return None
    return DTensor


def is_sharded(t: Optional[Tensor]) -> bool:
    """True for a DTensor (an FSDP2 ``fully_shard`` parameter, its gradient or state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels address: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if is_sharded(t) else t


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i] = src[i]`` for params or their state, shard by shard under FSDP2 (one foreach op)."""
    if dst:
        torch._foreach_copy_([local(t) for t in dst], [local(t) for t in src])


def _is_fsdp1(p: Tensor) -> bool:
    return type(p).__name__ == "FlatParameter" or bool(getattr(p, "_fsdp_flattened", False))


class ShardGroup:
    """The process group of an FSDP2 mesh: global sums over sharded tensors.

    Every rank holds a disjoint shard of every parameter, so a global quantity (the
    gradient norm, the finite check, the finite-difference step's norm) is the sum
    of the ranks' local parts: one scalar all-reduce each. ``collectives`` counts
    them (the optimizer resets it at each step).
    """

    def __init__(self, group: Any, device_type: str = "cpu") -> None:
        self.group = group
        self.device_type = device_type  # the mesh's: where its collectives run (NCCL: CUDA)
        self.collectives = 0

    def sum_(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def max_(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def _all_reduce(self, t: Tensor, op: Any) -> Tensor:
        if t.device.type == self.device_type:
            dist.all_reduce(t, op=op, group=self.group)
        else:  # shards offloaded to the CPU of a CUDA mesh (CPUOffloadPolicy)
            on_mesh = t.to(self.device_type)
            dist.all_reduce(on_mesh, op=op, group=self.group)
            t.copy_(on_mesh)
        self.collectives += 1
        return t


def shard_group_of(params: Sequence[Tensor]) -> Optional[ShardGroup]:
    """FSDP2: the group of the one 1-D mesh every parameter is sharded over (dim 0); None
    when no parameter is a DTensor. Layouts this package cannot step raise an error
    that says what to do; nothing has been changed when they do.
    """
    params = list(params)
    if any(_is_fsdp1(p) for p in params):
        raise NotImplementedError(
            "sassha_fused does not support FullyShardedDataParallel (FSDP1): its flat parameters hide "
            "the parameters' shapes and the probes' element indices. Shard the model with FSDP2 instead: "
            "torch.distributed.fsdp.fully_shard(submodule) for each block, then fully_shard(model), and "
            "construct the optimizer after that (see the README's FSDP2 section).")
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"params: {len(sharded)} parameters are FSDP2 DTensors and {len(params) - len(sharded)} are plain "
            "tensors. An unsharded parameter of an FSDP2 model is not averaged by FSDP, so its replicas would "
            "drift apart: apply fully_shard to the root module as well (fully_shard(model) after the "
            "submodules), or give the plain parameters their own optimizer.")
    from torch.distributed.tensor import Shard

    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"params: a DTensor parameter is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                "sassha_fused steps FSDP2 parameters sharded on dim 0 over a 1-D mesh (fully_shard with its "
                "default mesh). Hybrid sharding and tensor parallelism are not supported.")
        if p.device_mesh != mesh:
            raise NotImplementedError(
                "params: the DTensor parameters live on different device meshes; sassha_fused needs one "
                "mesh for all of them (fully_shard every module with the same mesh).")
    return ShardGroup(mesh.get_group(), mesh.device_type)


def element_offset(p: Tensor) -> int:
    """Row-major index, in the whole parameter, of the first element of this rank's shard."""
    if not is_sharded(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    stride, total = 1, 0
    for size, off in zip(reversed(p.shape), reversed(offset)):
        total += off * stride
        stride *= size
    return total


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
    from .plans import bucket_columns  # (plans imports this module)

    present = []
    for b in plan.buckets:
        idx = bucket_columns(b).positions.to(mask.device)
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
