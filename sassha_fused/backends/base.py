"""The interface every backend implements, and the data it receives.

The optimizer (``functional.py``) runs autograd and the step's control flow; a
backend computes the numeric phases over one ``Bucket`` (the tensors of a step that
it runs on one device):

    sq_norm   -> squared norm of a list of tensors (gradients, momentum, params)
    perturb   -> backup = x;  x += scale * direction, scale computed on the device
    probes    -> the Rademacher vectors z of ``sassha_fused.probes`` (a shard's element
                 i draws the probe of element ``element_offset + i`` of the whole tensor)
    fd_move   -> x = base + sign * delta * z   (finite-difference Hessian-vector products)
    fd_fold   -> acc (+)= coefficient / delta * z * (g - baseline)
    update    -> momentum EMA, |z * Hz| EMA on refresh steps, bias-corrected power,
                 eps, decoupled weight decay, parameter write (or restore)

The eager reference (``backends/eager.py``) states the algorithm once; every other
backend computes the same thing faster and is tested against it. Per-step values
reach a backend as a few scalars and small device tensors (the group table, the
per-tensor update scalars, the finite-difference step), never as per-tensor Python
work, so a backend's host cost need not grow with the number of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..encoding import decode_momentum

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Bucket",
    "BucketColumns",
    "GroupCol",
    "GroupTable",
    "UpdateCol",
    "RefreshMode",
    "RefreshInput",
    "ProbeKeys",
    "math_dtype",
]


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why and what to do."""


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype optimizer state is kept and computed in: fp32 for 16-bit params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class GroupCol:
    """Columns of the group table: one row per param group, rebuilt each step.

    The same layout is spelled out in ``csrc/sassha_math.h`` (``GroupCol``) and
    ``triton_kernels/sassha.py`` (``G_*``); ``tests/test_layouts.py`` checks that
    they agree.
    """

    LR = 0
    BETA1 = 1
    BETA2 = 2
    WEIGHT_DECAY = 3
    EPS = 4
    RHO = 5
    PERTURB_EPS = 6
    COUNT = 7


class GroupTable:
    """The step's hyper-parameters, one row per param group (layout: ``GroupCol``).

    Built from ``param_groups`` each step (a loop over groups, not tensors).
    ``tensor(device)`` is the float64 table on a device: uploaded from pinned memory
    without waiting, or, ``on_device`` (capturable runs), assembled there by device
    ops, so a CUDA graph can capture it (a tensor ``lr`` is then read at replay). No
    pinned memory is allocated while a stream captures (some PyTorch builds cannot):
    the upload raises there, asking for ``capturable=True``.
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
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "sassha_fused: a CUDA graph is capturing the optimizer's step, which uploads its group table "
                        "through pinned memory unless the optimizer was built with capturable=True (the table is "
                        "then assembled on the device); pass capturable=True to capture its steps")
                t = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
            self._on[device] = t
        return t


class UpdateCol:
    """Columns of the per-tensor update-scalar table (``functional.update_scalars``).

    Computed on the device, once per step and bucket, from the group table and each
    parameter's own step count; every backend's update reads them instead of
    deriving them (``csrc/sassha_math.h`` ``UpdateCol``, ``triton_kernels`` ``U_*``).
    """

    NEG_STEP = 0  # -lr / (1 - beta1^t)
    DECAY = 1  # 1 - lr * weight_decay
    BETA1 = 2
    ONE_MINUS_BETA1 = 3
    BETA2 = 4
    ONE_MINUS_BETA2 = 5
    C2 = 6  # (1 - beta2^t)^p after a refresh at this step, else the stored value
    EPS = 7
    LIVE = 8  # 1: update; 0: restore x_t, leave state (skipped step, or no refresh yet)
    COUNT = 9


class RefreshMode:
    """How the update gets the Hutchinson sample mean h on a refresh step."""

    NONE = 0  # not a refresh step: D and c2 are kept
    AUTOGRAD = 1  # ys[s] = H z_s:  h = (1/S) sum_s z_s * ys[s]
    FD_DIRECT = 2  # S = 1, forward differences: ys[0] = grad f(x~ + delta z):  h = z * (ys[0] - g~) / delta
    PRECOMPUTED = 3  # ys[0] = h, folded by fd_fold over the passes
    # In both finite-difference modes |h| is taken as at least the differences'
    # resolution, h_floor * |g~| (RefreshInput.fd): an estimate below it cannot be told
    # from the rounding of the two gradients, and a zero would leave only eps to
    # divide the step by.


@dataclass(frozen=True)
class ProbeKeys:
    """The counters of one refresh's probes, up to the parameter (see ``probes.py``).

    ``prefixes[s]`` is the key chain of (seed, refresh, sample s); a parameter's key
    is ``probes.param_key(prefix, param_index)``, computed by the kernels.
    """

    prefixes: tuple  # one uint32 per sample

    @property
    def n_samples(self) -> int:
        return len(self.prefixes)


@dataclass
class RefreshInput:
    """What the update reads on a refresh step.

    ``ys[s][j]``: per sample ``s`` and tensor ``j`` of the bucket (``None``: zero
    contribution, a parameter absent from the second-order graph or the FD pass).
    ``fd``: the finite-difference scalars, a float32 ``[2]`` tensor on the bucket's
    device: ``delta`` (the step) and ``h_floor`` (the gradients' relative precision
    over ``delta``, see ``RefreshMode``); finite-difference modes only.
    """

    mode: int
    ys: List[List[Optional[Tensor]]]
    keys: ProbeKeys
    fd: Optional[Tensor] = None


@dataclass(frozen=True)
class BucketColumns:
    """The bucket's index lists as long tensors on its device (``plans.bucket_columns``)."""

    group_index: Tensor  # row of the group table, per param
    param_index: Tensor  # position in the optimizer's parameter order (the counter banks)
    positions: Tensor  # index in the plan's participants (data-parallel participation)


@dataclass(eq=False)
class Bucket:
    """The tensors of a step that one backend runs on one device; lists are parallel.

    Built once per parameter set and storage by ``plans.py`` and cached; its device
    index columns (``columns``) are built there too, on first use
    (``plans.bucket_columns``). The bucket's own backend may keep what it derives from
    it (kernel groups, pointer tables, alignment) in ``backend_cache``, which no one
    else reads or writes; both are dropped when the bucket is rebuilt.
    """

    backend: "Backend"
    device: torch.device
    params: List[Tensor]
    param_index: List[int]  # position in the optimizer's parameter order (the probes' counter)
    group_index: List[int]  # row of the group table
    backups: List[Tensor]  # where x_t is kept while the params hold a perturbed point
    positions: List[int] = field(default_factory=list)  # index of each param in the plan's participants
    # global row-major index of each param's first element in the probes (FSDP2
    # shards); empty means 0 for every param
    element_offset: List[int] = field(default_factory=list)
    # the optimizer state, encoded as ``state_bits`` says (``sassha_fused.encoding``):
    # 32: m and D in math_dtype(param.dtype); 16: bfloat16; 8: int8 / uint8 codes, param-shaped,
    # with one float32 scale per group of 32 elements in the ``*_scales`` lists (empty otherwise)
    state_bits: int = 32
    exp_avgs: List[Tensor] = field(default_factory=list)  # m
    exp_hessian_diags: List[Tensor] = field(default_factory=list)  # D
    exp_avg_scales: List[Tensor] = field(default_factory=list)
    exp_hessian_diag_scales: List[Tensor] = field(default_factory=list)
    # master_weight_bits: per param, the int8 (24) / int16 (32) ``master_correction`` of a
    # bfloat16 param (the update computes on ``encoding.join_master(x_t, correction)`` and
    # writes both halves), None for a param without one; empty when the option is off
    master_corrections: List[Optional[Tensor]] = field(default_factory=list)
    columns: Optional["BucketColumns"] = None
    backend_cache: Dict[Any, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.params)

    def offsets(self) -> List[int]:
        """``element_offset`` with one entry per param (zeros when it is empty)."""
        if not self.element_offset:
            return [0] * len(self.params)
        if len(self.element_offset) != len(self.params):
            raise ValueError(f"Bucket.element_offset has {len(self.element_offset)} entries for "
                             f"{len(self.params)} params; give one per param or none (all 0)")
        return list(self.element_offset)

    @property
    def has_state(self) -> bool:
        return bool(self.exp_avgs) or not self.params

    def momentum(self) -> List[Tensor]:
        """m of every param as float tensors: the state itself at ``state_bits=32``, else decoded copies."""
        if self.state_bits == 32:
            return self.exp_avgs
        if self.state_bits == 8:
            return [decode_momentum(c, s).to(math_dtype(p.dtype))
                    for c, s, p in zip(self.exp_avgs, self.exp_avg_scales, self.params)]
        return [m.to(math_dtype(p.dtype)) for m, p in zip(self.exp_avgs, self.params)]


class Backend:
    """Base class: a named set of the phases.

    ``supports`` answers whether a (device, dtype) can run here and, if not, why;
    ``accepts`` whether a tensor's layout can be addressed (the plan hands the
    others to the eager reference).
    """

    name: str = "base"

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run tensors of this device and dtype, else why not."""
        return None

    def accepts(self, tensor: Tensor) -> bool:
        """Whether the kernels can address this tensor (default: contiguous ones)."""
        return tensor.is_contiguous()

    def sq_norm(self, b: Bucket, sources: Sequence[Tensor], adaptive: bool, acc_dtype: torch.dtype) -> Tensor:
        """Sum over the bucket of ``||w * v||^2`` as a 0-dim ``acc_dtype`` tensor on ``b.device``.

        ``sources[j]`` is ``v`` for param ``j`` (a gradient, the momentum, the
        params themselves); ``w = |x|`` when ``adaptive`` else 1. No host
        synchronisation.
        """
        raise NotImplementedError

    def restore(self, b: Bucket, check: Optional[Sequence[Tensor]], acc_dtype: torch.dtype) -> Optional[Tensor]:
        """``x = backup`` (bit for bit); with ``check``, also ``sum ||v||^2`` over those tensors,
        as ``sq_norm`` gives it (the step's finite check, read in the same sweep where a backend
        fuses them)."""
        torch._foreach_copy_(b.params, b.backups)
        return None if check is None else self.sq_norm(b, check, False, acc_dtype)

    def perturb(self, b: Bucket, sources: Sequence[Tensor], sq_norm: Tensor, sign: float, adaptive: bool,
                groups: "GroupTable") -> None:
        """``backup = x; x = x + sign * rho/(sqrt(sq_norm) + perturb_eps) * w * v``.

        ``rho`` and ``perturb_eps`` come from row ``b.group_index[j]`` of the group
        table ``groups`` (float64, host or device; see ``GroupCol``); ``w = x**2``
        when ``adaptive`` else 1. Math in fp32 for 16-bit params, one rounding to
        the param dtype.
        """
        raise NotImplementedError

    def probes(self, b: Bucket, keys: ProbeKeys, sample: int) -> List[Tensor]:
        """``z`` of sample ``sample`` for every param, shaped and typed like the param."""
        raise NotImplementedError

    def fd_move(self, b: Bucket, delta: Tensor, keys: ProbeKeys, sample: int, sign: float,
                base: Optional[Sequence[Tensor]], save: Optional[Sequence[Tensor]]) -> None:
        """``save = x`` (if given); ``x = (base or x) + sign * delta * z_sample``.

        One rounding to the param dtype; ``delta`` is a 0-dim float32 device tensor.
        """
        raise NotImplementedError

    def fd_fold(self, b: Bucket, acc: Sequence[Tensor], grads: Sequence[Tensor], baseline: Optional[Sequence[Tensor]],
                delta: Tensor, keys: ProbeKeys, sample: int, coefficient: float, first: bool) -> None:
        """``acc = (0 if first else acc) + coefficient / delta * z_sample * (g - baseline)``.

        In the math dtype of the param; ``acc[j]`` may be ``grads[j]`` itself
        (the first fold overwrites the pass's gradient in place).
        """
        raise NotImplementedError

    def update(self, b: Bucket, x_t: Sequence[Tensor], grads: Sequence[Tensor], scalars: Tensor, power: float,
               refresh: Optional[RefreshInput]) -> None:
        """The SASSHA update of every param of ``b``, in place.

        ``x_t[j]`` holds the point the update starts from (a backup, or the param
        itself); ``scalars`` is the ``[len(b), UpdateCol.COUNT]`` table of
        ``functional.update_scalars`` (the param's math dtype); ``power`` the
        step's ``hessian_power``. Where ``LIVE`` is 0 the param is set to ``x_t``
        and its state is not written. On refresh steps (``refresh`` given) ``D``
        takes the EMA of ``|h|``; step counts and ``c2`` are committed by the caller.

        The state is read and written in its encoding (``b.state_bits``, see
        ``Bucket`` and ``sassha_fused.encoding``): decoded, computed on in the math
        dtype, encoded again in the same pass; D is written on refresh steps only.
        A param with a master correction (``b.master_corrections[j]``) starts from
        ``join_master(x_t[j], correction)`` and writes both halves of the result.
        """
        raise NotImplementedError
