"""The C++ (CPU) and CUDA backends: one call into the extension per phase and bucket.

Each phase hands the bucket's lists to one ``torch.ops.sassha_fused`` operator
(``csrc/sassha_ops.cpp``): the CPU kernels parallelise over a flat list of chunks
of all tensors (all dtypes of the bucket at once), the CUDA kernels launch one
block per chunk from tables they cache on the tensors' addresses. Per-step values
travel as the group table, the per-tensor update-scalar table and a few scalars,
so nothing is recompiled when the learning rate changes and the host's work does
not grow with the number of tensors beyond the op's C++ argument handling.

Every probe op takes the bucket's ``element_offset`` (a shard's place in its
unsharded tensor's probes, FSDP2) as is: an empty list means 0 for every tensor.

Tensors the kernels cannot take (non-contiguous ones: the probes address elements
in logical row-major order) are routed to the eager reference by the step plan
(``accepts``).

``load(name)`` is the registry's entry point (``backends/__init__.py``): it finds or
builds the extension (``sassha_fused/_build.py``) and raises ``BackendUnavailable``
with the reason, the compiler's message included, when it cannot.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _build
from .base import Backend, BackendUnavailable, Bucket, GroupTable, ProbeKeys, RefreshInput, RefreshMode

__all__ = ["CppBackend", "CudaBackend", "load"]


class CppBackend(Backend):
    """Fused multi-tensor kernels of the C++ extension, for CPU tensors."""

    name = "cpp"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def __init__(self, build: _build.ExtensionBuild) -> None:
        self.build = build
        self.description = (
            f"C++ extension ({build.how} build), multi-tensor kernels for "
            f"{self.device_type} {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}"
        )
        self._ops = torch.ops.sassha_fused

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if device.type != self.device_type:
            return f"the {self.name!r} backend runs {self.device_type} tensors only"
        if dtype not in self.dtypes:
            return f"the {self.name!r} backend has no {dtype} kernels; use 'foreach'"
        return None

    def sq_norm(self, b: Bucket, sources: Sequence[Tensor], adaptive: bool, acc_dtype: torch.dtype) -> Tensor:
        if not b.params:
            return torch.zeros((), dtype=acc_dtype, device=b.device)
        return self._ops.sq_norm(sources, b.params, adaptive, acc_dtype == torch.float64)

    def restore(self, b: Bucket, check: Optional[Sequence[Tensor]], acc_dtype: torch.dtype) -> Optional[Tensor]:
        if check is None or not b.params:
            return super().restore(b, check, acc_dtype)
        return self._ops.restore_sq_norm(b.params, b.backups, check, acc_dtype == torch.float64)

    def perturb(self, b: Bucket, sources: Sequence[Tensor], sq_norm: Tensor, sign: float, adaptive: bool,
                groups: GroupTable) -> None:
        self._ops.perturb(b.params, sources, b.backups, sq_norm, b.group_index, groups.tensor(b.device), sign, adaptive)

    def probes(self, b: Bucket, keys: ProbeKeys, sample: int) -> List[Tensor]:
        out = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in b.params]
        self._ops.probes(out, b.param_index, b.element_offset, keys.prefixes[sample])
        return out

    def fd_move(self, b: Bucket, delta: Tensor, keys: ProbeKeys, sample: int, sign: float,
                base: Optional[Sequence[Tensor]], save: Optional[Sequence[Tensor]]) -> None:
        self._ops.fd_move(b.params, base or [], save or [], delta, b.param_index, b.element_offset,
                          keys.prefixes[sample], sign)

    def fd_fold(self, b: Bucket, acc: Sequence[Tensor], grads: Sequence[Tensor], baseline: Optional[Sequence[Tensor]],
                delta: Tensor, keys: ProbeKeys, sample: int, coefficient: float, first: bool) -> None:
        self._ops.fd_fold(acc, grads, baseline or [], delta, b.param_index, b.element_offset, keys.prefixes[sample],
                          coefficient, first)

    def update(self, b: Bucket, x_t: Sequence[Tensor], grads: Sequence[Tensor], scalars: Tensor, power: float,
               refresh: Optional[RefreshInput]) -> None:
        # the state in its encoding (state_bits; scales only at 8) and the master corrections
        # ([] when the option is off, None for a param without one): decoded, computed on and
        # encoded again in the same pass
        state = (b.exp_avgs, b.exp_hessian_diags, b.exp_avg_scales, b.exp_hessian_diag_scales, b.master_corrections,
                 b.state_bits)
        if refresh is None:
            self._ops.update(b.params, x_t, grads, *state, scalars, power, 0, [], b.param_index, b.element_offset, [],
                             None)
            return
        ys = [y for sample in refresh.ys for y in sample]
        prefixes = list(refresh.keys.prefixes if refresh.mode == RefreshMode.AUTOGRAD else refresh.keys.prefixes[:1])
        self._ops.update(b.params, x_t, grads, *state, scalars, power, refresh.mode, ys, b.param_index,
                         b.element_offset, prefixes, refresh.fd)


class CudaBackend(CppBackend):
    """Fused multi-tensor CUDA kernels of the extension, for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    restore = Backend.restore  # (a copy and the sq_norm kernel: the fused op is CPU-only)


def load(name: str = "cpp", build: Optional[_build.ExtensionBuild] = None) -> Backend:
    """The ``"cpp"`` or ``"cuda"`` backend; raises BackendUnavailable saying why not.

    ``build``: an ``ExtensionBuild`` to use instead of the default one (tests pass
    the result of building other sources).
    """
    if name not in ("cpp", "cuda"):
        raise BackendUnavailable(f"cpp_backend provides 'cpp' and 'cuda', not {name!r}")
    if name == "cuda":
        if torch.version.cuda is None:
            raise BackendUnavailable(
                f"torch {torch.__version__} was built without CUDA; install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device is visible (torch.cuda.is_available() is False)")
    if build is None:
        build = _build.load_extension()
    if not build.ok:
        # Marked as a failed build (not a backend that does not apply here): "auto"
        # says so when it falls back (backends/__init__.py).
        exc = BackendUnavailable(build.error or "the C++ extension is unavailable")
        exc.build_cause = build.cause or "build"
        raise exc
    if name == "cuda":
        if not build.with_cuda:
            notes = "; ".join(build.notes) or "it was compiled without CUDA sources"
            raise BackendUnavailable(f"the extension has no CUDA kernels: {notes}")
        return CudaBackend(build)
    return CppBackend(build)
