"""The C++ (CPU) and CUDA backends: one call into the extension per phase.

Each phase flattens the tensors of all param groups (and all dtypes) of one device
into lists and makes one call to a ``torch.ops.sassha_fused`` operator
(``csrc/sassha_ops.cpp``): the CPU kernels parallelise over a flat list of chunks
of all tensors, the CUDA kernels launch one block per chunk. Per-tensor
hyper-parameters travel as flat float lists, so nothing is recompiled when the
learning rate changes.

Tensors the kernels cannot take (non-contiguous ones: the probes address elements
in logical row-major order) are handed to the eager reference, which computes the
same thing.

``load(name)`` is the registry's entry point (``backends/__init__.py``): it finds or
builds the extension (``sassha_fused/_build.py``) and raises ``BackendUnavailable``
with the reason, the compiler's message included, when it cannot.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _build
from ..probes import probe_key
from .base import Backend, BackendUnavailable, GroupTensors, ProbeSpec
from .eager import EagerBackend, first_device, norm_accumulator_dtype, sources

__all__ = ["CppBackend", "CudaBackend", "load"]

_EAGER = EagerBackend()


def _subgroup(g: GroupTensors, idx: Sequence[int]) -> GroupTensors:
    """The tensors ``idx`` of ``g`` as a GroupTensors with the same scalars."""

    def pick(xs: list) -> list:
        return [xs[j] for j in idx] if xs else []

    return GroupTensors(
        params=pick(g.params), grads=pick(g.grads), exp_avgs=pick(g.exp_avgs),
        exp_hessian_diags=pick(g.exp_hessian_diags), backups=pick(g.backups), steps=pick(g.steps),
        bias_correction2=pick(g.bias_correction2), param_indices=pick(g.param_indices),
        lr=g.lr, beta1=g.beta1, beta2=g.beta2, weight_decay=g.weight_decay, eps=g.eps, rho=g.rho,
        perturb_eps=g.perturb_eps, hessian_power=g.hessian_power,
    )


_is_contiguous = Tensor.is_contiguous


def _split(g: GroupTensors, *extra: Sequence[Optional[Tensor]]) -> Tuple[List[int], List[int]]:
    """Indices the kernels take (every tensor of the param contiguous) and the rest."""
    lists = [t for t in (g.params, g.grads, g.exp_avgs, g.exp_hessian_diags, g.backups, *extra) if t]
    # The common case, every tensor contiguous, checked at C speed (map over the
    # lists); lists with None entries (HVPs of params absent from the graph) and
    # non-contiguous tensors take the per-tensor loop below.
    try:
        if all(all(map(_is_contiguous, ts)) for ts in lists):
            return list(range(len(g.params))), []
    except TypeError:  # a None entry
        pass
    fast, slow = [], []
    for j in range(len(g.params)):  # a plain loop: this runs for every tensor of every phase
        for ts in lists:
            t = ts[j]
            if t is not None and not t.is_contiguous():
                slow.append(j)
                break
        else:
            fast.append(j)
    return fast, slow


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

    # ---- phase 1 -----------------------------------------------------------
    def sq_norm(self, groups: Sequence[GroupTensors], source: str, adaptive: bool) -> Tensor:
        acc = norm_accumulator_dtype(groups)
        device = first_device(groups)
        vs: List[Tensor] = []
        xs: List[Tensor] = []
        slow: List[GroupTensors] = []
        for g in groups:
            src = sources(g, source)
            fast, rest = _split(g, src)
            vs += [src[j] for j in fast]
            xs += [g.params[j] for j in fast]
            if rest:
                slow.append(_subgroup(g, rest))
        total = self._ops.sq_norm(vs, xs, adaptive, acc == torch.float64) if xs else torch.zeros((), dtype=acc, device=device)
        if slow:
            total = total + _EAGER.sq_norm(slow, source, adaptive).to(device, acc)
        return total

    # ---- phase 2 -----------------------------------------------------------
    def perturb(
        self, groups: Sequence[GroupTensors], sq_norm: Tensor, source: str, sign: float, adaptive: bool
    ) -> None:
        xs: List[Tensor] = []
        vs: List[Tensor] = []
        bs: List[Tensor] = []
        sign_rho: List[float] = []
        peps: List[float] = []
        slow: List[GroupTensors] = []
        for g in groups:
            src = sources(g, source)
            fast, rest = _split(g, src)
            if rest:
                slow.append(_subgroup(g, rest))
                xs += [g.params[j] for j in fast]
                vs += [src[j] for j in fast]
                bs += [g.backups[j] for j in fast]
            else:
                xs += g.params
                vs += src
                bs += g.backups
            sign_rho += [sign * g.rho] * len(fast)
            peps += [g.perturb_eps] * len(fast)
        if xs:
            self._ops.perturb(xs, vs, bs, sq_norm.to(xs[0].device), sign_rho, peps, adaptive)
        if slow:
            _EAGER.perturb(slow, sq_norm, source, sign, adaptive)

    # ---- phase 3 -----------------------------------------------------------
    def probes(self, groups: Sequence[GroupTensors], spec: ProbeSpec, sample: int) -> List[List[Tensor]]:
        out = [[torch.empty(p.shape, dtype=gr.dtype, device=p.device) for p, gr in zip(g.params, g.grads)]
               for g in groups]
        flat: List[Tensor] = []
        keys: List[int] = []
        for g, zs in zip(groups, out):
            for j, z in enumerate(zs):
                flat.append(z)
                keys.extend(probe_key(spec.seed, spec.refresh, sample, g.param_indices[j]))
        if flat:
            self._ops.probes(flat, keys)
        return out

    # ---- phase 4 -----------------------------------------------------------
    def update(
        self,
        groups: Sequence[GroupTensors],
        hvps: Optional[Sequence[Sequence[Sequence[Optional[Tensor]]]]],
        spec: Optional[ProbeSpec],
    ) -> None:
        refresh = hvps is not None
        n_samples = spec.n_samples if refresh else 0
        xs: List[Tensor] = []
        gs: List[Tensor] = []
        ms: List[Tensor] = []
        ds: List[Tensor] = []
        bs: List[Tensor] = []
        scalars: List[float] = []
        hz: List[List[Optional[Tensor]]] = [[] for _ in range(n_samples)]
        keys: List[List[int]] = [[] for _ in range(n_samples)]
        slow: List[Tuple[GroupTensors, Optional[List[List[Optional[Tensor]]]]]] = []
        for gi, g in enumerate(groups):
            per_sample = list(hvps[gi]) if refresh else []
            fast, rest = _split(g, *per_sample)
            for ts, out in ((g.params, xs), (g.grads, gs), (g.exp_avgs, ms), (g.exp_hessian_diags, ds),
                            (g.backups, bs), *zip(per_sample, hz)):
                out += ts if not rest else [ts[j] for j in fast]
            common = (g.beta1, g.beta2, g.lr, g.weight_decay, g.eps, g.hessian_power)
            for j in fast:
                scalars += (*common, 1 - g.beta1 ** g.steps[j], g.bias_correction2[j])
            for s in range(n_samples):
                for j in fast:
                    keys[s].extend(probe_key(spec.seed, spec.refresh, s, g.param_indices[j]))
            if rest:
                sub_hvps = [[per_sample[s][j] for j in rest] for s in range(n_samples)] if refresh else None
                slow.append((_subgroup(g, rest), sub_hvps))
        if xs:
            flat_hz = [h for s in range(n_samples) for h in hz[s]]
            flat_keys = [k for s in range(n_samples) for k in keys[s]]
            self._ops.update(xs, gs, ms, ds, bs, flat_hz, flat_keys, scalars, n_samples, refresh)
        for sub, sub_hvps in slow:
            _EAGER.update([sub], [sub_hvps] if refresh else None, spec)


class CudaBackend(CppBackend):
    """Fused multi-tensor CUDA kernels of the extension, for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)


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
        raise BackendUnavailable(build.error or "the C++ extension is unavailable")
    if name == "cuda":
        if not build.with_cuda:
            notes = "; ".join(build.notes) or "it was compiled without CUDA sources"
            raise BackendUnavailable(f"the extension has no CUDA kernels: {notes}")
        return CudaBackend(build)
    return CppBackend(build)
