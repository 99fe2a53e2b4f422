"""The interface every backend implements, and the data it receives.

A step of SASSHA is split into four numeric phases (SPEC section 5); the optimizer
class runs autograd (both backward passes and the Hessian-vector products) and calls
a backend for everything else:

    sq_norm   -> global squared norm of the gradients (or of the momentum)
    perturb   -> backup = x;  x += scale * direction, scale computed on the device
    probes    -> the Rademacher vectors z of ``sassha_fused.probes``
    update    -> restore, momentum EMA, |mean z*Hz| EMA, bias-corrected power, eps,
                 decoupled weight decay, parameter write

The eager reference (``backends/eager.py``) states the algorithm once; every other
backend computes the same thing faster and is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Backend", "BackendUnavailable", "GroupTensors", "ProbeSpec", "math_dtype"]


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why and what to do."""


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype optimizer state is kept and computed in: fp32 for 16-bit params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class GroupTensors:
    """The tensors of one param group that take part in a step, with its scalars.

    Lists are parallel: entry ``j`` of each describes the same parameter. All
    tensors of one ``GroupTensors`` live on one device; dtypes may differ.
    """

    params: List[Tensor]
    grads: List[Tensor]  # gradient at the perturbed point (g~), detached
    exp_avgs: List[Tensor]  # momentum m, in math_dtype(param.dtype)
    exp_hessian_diags: List[Tensor]  # EMA D of |h|, in math_dtype(param.dtype)
    # the unperturbed point x_t the update starts from, param dtype: a copy made by
    # ``perturb`` while the param holds x_t + e_t, or the param itself when it is
    # not perturbed (the update then reads and writes the same tensor).
    backups: List[Tensor]
    steps: List[int]  # per-parameter step count t, already incremented
    bias_correction2: List[float]  # c2 = (1 - beta2^t_refresh)^p, already updated
    param_indices: List[int]  # position in the optimizer's parameter order (probes)
    lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-4
    rho: float = 0.0
    perturb_eps: float = 1e-12
    hessian_power: float = 0.5
    extras: dict = field(default_factory=dict)  # room for backend caches

    def __len__(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class ProbeSpec:
    """The counters of the probes of one Hessian refresh (see ``probes.py``)."""

    seed: int
    refresh: int
    n_samples: int


class Backend:
    """Base class: a named set of the four phases.

    Subclasses override every phase. ``supports`` answers whether a (device, dtype)
    can run here and, if not, why.
    """

    name: str = "base"

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run tensors of this device and dtype, else why not."""
        return None

    # ---- phase 1 -----------------------------------------------------------
    def sq_norm(self, groups: Sequence[GroupTensors], source: str, adaptive: bool) -> Tensor:
        """Sum over all tensors of all groups of ``||w * v||^2`` as a 0-dim tensor.

        ``source`` is ``"grads"`` or ``"exp_avgs"``; ``w`` is ``|x|`` when
        ``adaptive`` else 1. Accumulates in fp32 (fp64 if any tensor is fp64), on
        the device, without a host synchronisation.
        """
        raise NotImplementedError

    # ---- phase 2 -----------------------------------------------------------
    def perturb(
        self,
        groups: Sequence[GroupTensors],
        sq_norm: Tensor,
        source: str,
        sign: float,
        adaptive: bool,
    ) -> None:
        """``backup = x; x = x + sign * rho/(sqrt(sq_norm) + perturb_eps) * w * v``.

        ``rho`` and ``perturb_eps`` are the group's; ``v`` is ``source`` (see
        ``sq_norm``); ``w = x**2`` when ``adaptive`` else 1. Math in fp32 for 16-bit
        params, one rounding to the param dtype.
        """
        raise NotImplementedError

    # ---- phase 3 -----------------------------------------------------------
    def probes(self, groups: Sequence[GroupTensors], spec: ProbeSpec, sample: int) -> List[List[Tensor]]:
        """``z`` of sample ``sample`` for every param, shaped and typed like its grad."""
        raise NotImplementedError

    # ---- phase 4 -----------------------------------------------------------
    def update(
        self,
        groups: Sequence[GroupTensors],
        hvps: Optional[Sequence[Sequence[Sequence[Optional[Tensor]]]]],
        spec: Optional[ProbeSpec],
    ) -> None:
        """The SASSHA update of every param, in place, starting from ``backups``.

        ``hvps[g][s][j]`` is ``H z_s`` for param ``j`` of group ``g`` (None: the
        param is absent from the second-order graph, ``Hz = 0``); ``hvps is None``
        on steps that do not refresh the Hessian, ``spec`` gives the probes'
        counters on those that do. Reading ``backups`` fuses the restore of the
        perturbed point into the update.
        """
        raise NotImplementedError
