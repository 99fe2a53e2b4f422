"""Fused Triton backend: one multi-tensor launch per phase, per device and dtype.

The kernels are in ``triton_kernels/sassha.py`` (imported as
``sassha_fused.triton_kernels.sassha``); this module is the host side:

* **Grouping.** The tensors of all param groups of a call are bucketed by the
  dtypes of the arrays a kernel touches (device too). Empty tensors are skipped.
  A tensor the kernels cannot address (non-contiguous, unexpected state dtype) is
  handed to the eager reference, per tensor, so results stay correct.
* **Tables (apex ``multi_tensor_apply`` style).** A launch gets an int64 table of
  data pointers (one row per tensor, ``numel`` in the last column), a block map
  (program -> tensor slot, first element) and small per-tensor tables of runtime
  scalars (step size, c2, the group's hyper-parameters, probe keys). Pointer
  tables and block maps are cached on the ``data_ptr()``s / ``numel``s and
  rebuilt only when storage changes. A launch holds at most
  ``max_tensors_per_launch`` tensors and ``max_blocks_per_launch`` tiles; the rest
  is carried to a next launch (never reached by real models with the defaults).
* **Device.** Triton launches on the *current* CUDA device's current stream, not
  on the device of the pointers it is given, so every launch runs under
  ``torch.cuda.device(<the tensors' device>)``: params on ``cuda:1`` while
  ``cuda:0`` is current would otherwise be addressed from the wrong GPU.
* **No host synchronisation.** The global norm is reduced on the device in two
  deterministic stages (per-tile partials, then one fixed-order sum); the
  perturbation scale is computed in the kernel from that tensor. Tables go to the
  device from pinned memory with ``non_blocking=True``.

Launches per step for one dtype bucket: SASSHA 4 (+ S probe launches on a refresh
step), M-SASSHA the same (sq_norm 2, perturb 1, update 1, probes S). ``launches``
counts them, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..probes import probe_key
from .base import Backend, BackendUnavailable, GroupTensors, ProbeSpec, math_dtype
from .eager import EagerBackend, first_device, sources

__all__ = ["TritonBackend", "load"]

try:  # triton is optional: record why it cannot be used and say so on use
    import triton
    import triton.language as tl

    from sassha_fused.triton_kernels import sassha as _kernels

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = tl = _kernels = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc

_INTERPRET_HINT = "Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 to run them on the CPU (slowly) for testing"

# Elements per program. One size for every kernel, so one cached block map serves
# all phases of a step. 2048 elements over 8 warps is 8 per thread: 16-byte vector
# accesses for bf16 and 2 x 16 bytes for fp32, enough bytes in flight per SM for a
# bandwidth-bound pass without spilling the update kernel's ~10 live arrays.
BLOCK = 2048
NUM_WARPS = 8
# The final norm reduction: one program, fixed-order loop over the partials.
REDUCE_BLOCK = 1024
# Probe buffers: each z view starts on a multiple of this many elements.
_PROBE_ALIGN = 64

_LIST_FIELDS = ("params", "grads", "exp_avgs", "exp_hessian_diags", "backups", "steps", "bias_correction2", "param_indices")

Entry = Tuple[int, int]  # (group index, tensor index in the group)


def _interpreted() -> bool:
    """True when the kernels were created under TRITON_INTERPRET=1 (run on CPU tensors)."""
    if _kernels is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_kernels.update_kernel, InterpretedFunction)
    except Exception:  # pragma: no cover - layout of triton internals changed
        return os.environ.get("TRITON_INTERPRET") == "1"


def _on(device: torch.device):
    """Make ``device`` current around a launch (Triton launches on the current device and its stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _aligned(rows: Sequence[Sequence[int]]) -> bool:
    """Every data pointer of a launch (all columns but the trailing numel) is 16-byte aligned."""
    return all(ptr % 16 == 0 for row in rows for ptr in row[:-1])


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _subset(groups: Sequence[GroupTensors], entries: Sequence[Entry]) -> Tuple[List[GroupTensors], List[int], List[List[int]]]:
    """GroupTensors holding only ``entries`` (for the eager fallback), with their origins."""
    by_group: Dict[int, List[int]] = defaultdict(list)
    for gi, j in entries:
        by_group[gi].append(j)
    subs, gis, jss = [], [], []
    for gi, js in by_group.items():
        g = groups[gi]
        lists = {f: ([getattr(g, f)[j] for j in js] if getattr(g, f) else []) for f in _LIST_FIELDS}
        subs.append(dataclasses.replace(g, **lists))
        gis.append(gi)
        jss.append(js)
    return subs, gis, jss


class _Launch:
    """One kernel launch's share of a bucket: tensors ``lo:hi`` and the tiles' block map."""

    __slots__ = ("lo", "hi", "blocks", "n_programs")

    def __init__(self, lo: int, hi: int, blocks: Tensor) -> None:
        self.lo, self.hi, self.blocks = lo, hi, blocks
        self.n_programs = blocks.shape[0]


class TritonBackend(Backend):
    """SASSHA's phases as fused multi-tensor Triton kernels (fp32, bf16, fp16 params)."""

    name = "triton"
    description = "fused multi-tensor Triton kernels: one launch per phase per (device, dtype)"

    def __init__(
        self,
        max_tensors_per_launch: int = 1 << 16,
        max_blocks_per_launch: int = 1 << 20,
        cache_size: int = 64,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise BackendUnavailable(f"triton could not be imported: {_IMPORT_ERROR}")
        self.max_tensors_per_launch = int(max_tensors_per_launch)
        self.max_blocks_per_launch = int(max_blocks_per_launch)
        self.cache_size = int(cache_size)
        self.launches = 0  # kernel launches made so far
        self.uploads = 0  # host -> device table copies made so far (cache misses and scalars)
        self._tables: "OrderedDict[tuple, Tensor]" = OrderedDict()  # LRU: pointer tables
        self._plans: "OrderedDict[tuple, List[_Launch]]" = OrderedDict()  # LRU: block maps

    # ------------------------------------------------------------ capability
    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return f"triton could not be imported: {_IMPORT_ERROR}"
        if dtype not in _KERNEL_DTYPES:
            return f"the Triton kernels handle float32, bfloat16 and float16 parameters, not {dtype}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreted():
            return None
        return _INTERPRET_HINT if device.type == "cpu" else f"Triton kernels need CUDA tensors, got {device.type}"

    # ----------------------------------------------------------------- tables
    def _lru_get(self, cache: OrderedDict, key: tuple):
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
        return hit

    def _lru_put(self, cache: OrderedDict, key: tuple, value) -> None:
        cache[key] = value
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    def _upload(self, host: Tensor, device: torch.device) -> Tensor:
        """A small host table on ``device``, without synchronising the host."""
        self.uploads += 1
        if device.type == "cuda":
            # pinned + non_blocking: the copy is queued on the stream; the caching
            # host allocator keeps the pinned block alive until the copy has run.
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _ptr_table(self, device: torch.device, rows: List[Tuple[int, ...]]) -> Tensor:
        """int64 [n, cols] table of pointers and numels, cached on its contents."""
        key = (device, tuple(rows))
        table = self._lru_get(self._tables, key)
        if table is None:
            table = self._upload(torch.tensor(rows, dtype=torch.int64), device)
            self._lru_put(self._tables, key, table)
        return table

    def _plan(self, device: torch.device, numels: Tuple[int, ...]) -> List[_Launch]:
        """Split the tiles of tensors with these ``numels`` into launches (cached)."""
        key = (device, numels, self.max_tensors_per_launch, self.max_blocks_per_launch)
        plan = self._lru_get(self._plans, key)
        if plan is not None:
            return plan
        tiles = torch.tensor([(n + BLOCK - 1) // BLOCK for n in numels], dtype=torch.int64)
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        start = (torch.arange(tensor_of.numel(), dtype=torch.int64) - first_tile[tensor_of]) * BLOCK
        plan = []
        p, total = 0, tensor_of.numel()
        while p < total:
            lo = int(tensor_of[p])
            q = min(p + self.max_blocks_per_launch, total)
            # at most max_tensors_per_launch distinct tensors: stop before tensor lo + cap
            cap = lo + self.max_tensors_per_launch
            if cap < len(numels) and int(first_tile[cap]) < q:
                q = int(first_tile[cap])
            hi = int(tensor_of[q - 1]) + 1
            blocks = torch.stack((tensor_of[p:q] - lo, start[p:q]), dim=1).contiguous()
            plan.append(_Launch(lo, hi, self._upload(blocks, device)))
            p = q
        self._lru_put(self._plans, key, plan)
        return plan

    def _scalars(self, device: torch.device, rows: List[Tuple[float, ...]]) -> Tensor:
        # fp32, like the Python scalars eager's torch ops cast to fp32
        return self._upload(torch.tensor(rows, dtype=torch.float32), device)

    @staticmethod
    def _bucket(
        groups: Sequence[GroupTensors],
        arrays: Callable[[GroupTensors, int], List[Optional[Tensor]]],
        extra_ok: Callable[[GroupTensors, int], bool] = lambda g, j: True,
    ) -> Tuple[Dict[tuple, List[Entry]], List[Entry]]:
        """Non-empty tensors by (device, dtypes of their arrays); the rest for the eager fallback."""
        buckets: Dict[tuple, List[Entry]] = {}
        fallback: List[Entry] = []
        for gi, g in enumerate(groups):
            for j, x in enumerate(g.params):
                if x.numel() == 0:
                    continue
                ts = arrays(g, j)
                ok = x.dtype in _KERNEL_DTYPES and extra_ok(g, j) and all(
                    t is None or (t.is_contiguous() and t.numel() == x.numel() and t.device == x.device
                                  and t.dtype in _KERNEL_DTYPES)
                    for t in ts
                )
                if not ok:
                    fallback.append((gi, j))
                    continue
                key = (x.device,) + tuple(None if t is None else t.dtype for t in ts)
                buckets.setdefault(key, []).append((gi, j))
        return buckets, fallback

    # ---------------------------------------------------------------- phase 1
    def sq_norm(self, groups: Sequence[GroupTensors], source: str, adaptive: bool) -> Tensor:
        device = first_device(groups)
        buckets, fallback = self._bucket(groups, lambda g, j: [sources(g, source)[j], g.params[j]])
        # per device: its launches and their partials (a kernel writes only its own device's memory)
        jobs: Dict[torch.device, list] = {device: []}
        n_partials: Dict[torch.device, int] = {device: 0}
        for key, entries in buckets.items():
            numels = tuple(groups[gi].params[j].numel() for gi, j in entries)
            for launch in self._plan(key[0], numels):
                base = n_partials.setdefault(key[0], 0)
                jobs.setdefault(key[0], []).append((key, entries, launch, base))
                n_partials[key[0]] = base + launch.n_programs
        total: Optional[Tensor] = None
        for dev, dev_jobs in jobs.items():  # ``device`` first: one sum launch even with no tiles
            with _on(dev):
                partials = torch.empty(max(n_partials[dev], 1), dtype=torch.float32, device=dev)
                for key, entries, launch, base in dev_jobs:
                    rows = []
                    for gi, j in entries[launch.lo:launch.hi]:
                        g = groups[gi]
                        rows.append((sources(g, source)[j].data_ptr(), g.params[j].data_ptr(), g.params[j].numel()))
                    _kernels.sq_norm_partials_kernel[(launch.n_programs,)](
                        launch.blocks, self._ptr_table(dev, rows), partials, base,
                        V_DTYPE=_tl_dtype(key[1]), X_DTYPE=_tl_dtype(key[2]), ADAPTIVE=bool(adaptive),
                        ALIGNED=_aligned(rows), BLOCK=BLOCK, num_warps=NUM_WARPS,
                    )
                    self.launches += 1
                part = torch.empty((), dtype=torch.float32, device=dev)
                _kernels.sum_partials_kernel[(1,)](partials, n_partials[dev], part, BLOCK=REDUCE_BLOCK, num_warps=4)
                self.launches += 1
            total = part if total is None else total + part.to(device)
        assert total is not None
        if fallback:
            subs, _, _ = _subset(groups, fallback)
            total = total + EagerBackend().sq_norm(subs, source, adaptive).to(device, torch.float32)
        return total

    # ---------------------------------------------------------------- phase 2
    def perturb(
        self,
        groups: Sequence[GroupTensors],
        sq_norm: Tensor,
        source: str,
        sign: float,
        adaptive: bool,
    ) -> None:
        buckets, fallback = self._bucket(
            groups, lambda g, j: [g.params[j], g.backups[j], sources(g, source)[j]],
            lambda g, j: g.backups[j].dtype == g.params[j].dtype,
        )
        sq_cache: Dict[torch.device, Tensor] = {}
        for key, entries in buckets.items():
            device = key[0]
            if device not in sq_cache:
                sq_cache[device] = sq_norm.to(device=device, dtype=torch.float32).reshape(())
            numels = tuple(groups[gi].params[j].numel() for gi, j in entries)
            for launch in self._plan(device, numels):
                rows, scal = [], []
                for gi, j in entries[launch.lo:launch.hi]:
                    g = groups[gi]
                    x = g.params[j]
                    rows.append((x.data_ptr(), g.backups[j].data_ptr(), sources(g, source)[j].data_ptr(), x.numel()))
                    scal.append((sign * g.rho, g.perturb_eps))
                with _on(device):
                    _kernels.perturb_kernel[(launch.n_programs,)](
                        launch.blocks, self._ptr_table(device, rows), self._scalars(device, scal), sq_cache[device],
                        X_DTYPE=_tl_dtype(key[1]), V_DTYPE=_tl_dtype(key[3]), ADAPTIVE=bool(adaptive),
                        ALIGNED=_aligned(rows), BLOCK=BLOCK, num_warps=NUM_WARPS,
                    )
                self.launches += 1
        if fallback:
            subs, _, _ = _subset(groups, fallback)
            EagerBackend().perturb(subs, sq_norm, source, sign, adaptive)

    # ---------------------------------------------------------------- phase 3
    def probes(self, groups: Sequence[GroupTensors], spec: ProbeSpec, sample: int) -> List[List[Tensor]]:
        out: List[List[Optional[Tensor]]] = [[None] * len(g.params) for g in groups]
        by_key: Dict[tuple, List[Entry]] = {}
        for gi, g in enumerate(groups):
            for j, gr in enumerate(g.grads):
                if gr.dtype in _KERNEL_DTYPES:
                    by_key.setdefault((gr.device, gr.dtype), []).append((gi, j))
                else:
                    out[gi][j] = EagerBackend().probes([dataclasses.replace(g, params=[g.params[j]], grads=[gr], param_indices=[g.param_indices[j]])], spec, sample)[0][0]
        for (device, dtype), entries in by_key.items():
            # one buffer for the whole bucket; each z is a view shaped like its grad
            # views start on 64-element boundaries: aligned for vector stores
            numels = [groups[gi].grads[j].numel() for gi, j in entries]
            padded = [(n + _PROBE_ALIGN - 1) // _PROBE_ALIGN * _PROBE_ALIGN for n in numels]
            flat = torch.empty(sum(padded), dtype=dtype, device=device)
            live: List[Entry] = []
            offset = 0
            for (gi, j), n, n_pad in zip(entries, numels, padded):
                out[gi][j] = flat[offset:offset + n].view(groups[gi].grads[j].shape)
                offset += n_pad
                if n:
                    live.append((gi, j))
            if not live:
                continue
            numels_live = tuple(groups[gi].grads[j].numel() for gi, j in live)
            for launch in self._plan(device, numels_live):
                rows, keys = [], []
                for gi, j in live[launch.lo:launch.hi]:
                    z = out[gi][j]
                    rows.append((z.data_ptr(), z.numel()))
                    keys.append(probe_key(spec.seed, spec.refresh, sample, groups[gi].param_indices[j]))
                with _on(device):
                    _kernels.probes_kernel[(launch.n_programs,)](
                        launch.blocks, self._ptr_table(device, rows),
                        self._upload(torch.tensor(keys, dtype=torch.int64), device),
                        Z_DTYPE=_tl_dtype(dtype), ALIGNED=_aligned(rows), BLOCK=BLOCK, num_warps=NUM_WARPS,
                    )
                self.launches += 1
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- phase 4
    def update(
        self,
        groups: Sequence[GroupTensors],
        hvps: Optional[Sequence[Sequence[Sequence[Optional[Tensor]]]]],
        spec: Optional[ProbeSpec],
    ) -> None:
        refresh = hvps is not None
        n_samples = spec.n_samples if refresh else 0

        def arrays(g: GroupTensors, j: int) -> List[Optional[Tensor]]:
            return [g.params[j], g.backups[j], g.exp_avgs[j], g.exp_hessian_diags[j], g.grads[j]]

        hz_of: Callable[[int, int, int], Optional[Tensor]] = lambda gi, s, j: hvps[gi][s][j]  # noqa: E731
        gindex = {id(g): gi for gi, g in enumerate(groups)}

        def ok(g: GroupTensors, j: int) -> bool:
            x = g.params[j]
            if g.backups[j].dtype != x.dtype or g.grads[j].dtype != x.dtype:
                return False
            if g.exp_avgs[j].dtype != math_dtype(x.dtype) or g.exp_hessian_diags[j].dtype != math_dtype(x.dtype):
                return False
            if refresh:
                for s in range(n_samples):
                    hz = hz_of(gindex[id(g)], s, j)
                    if hz is not None and (hz.dtype != x.dtype or not hz.is_contiguous() or hz.numel() != x.numel()
                                           or hz.device != x.device):
                        return False
            return True

        buckets, fallback = self._bucket(groups, arrays, ok)
        n_cols = 6 + n_samples
        for key, entries in buckets.items():
            device = key[0]
            numels = tuple(groups[gi].params[j].numel() for gi, j in entries)
            for launch in self._plan(device, numels):
                rows, scal, keys, powers = [], [], [], set()
                for gi, j in entries[launch.lo:launch.hi]:
                    g = groups[gi]
                    x = g.params[j]
                    row = [x.data_ptr(), g.backups[j].data_ptr(), g.exp_avgs[j].data_ptr(),
                           g.exp_hessian_diags[j].data_ptr(), g.grads[j].data_ptr()]
                    if refresh:
                        k: List[int] = []
                        for s in range(n_samples):
                            hz = hz_of(gi, s, j)
                            row.append(0 if hz is None else hz.data_ptr())
                            k.extend(probe_key(spec.seed, spec.refresh, s, g.param_indices[j]))
                        keys.append(tuple(k))
                    row.append(x.numel())
                    rows.append(tuple(row))
                    p = float(g.hessian_power)
                    powers.add(p)
                    scal.append((
                        -g.lr / (1 - g.beta1 ** g.steps[j]), g.bias_correction2[j], 1 - g.lr * g.weight_decay,
                        g.beta1, 1 - g.beta1, g.beta2, 1 - g.beta2, g.eps, p,
                    ))
                if powers == {0.5}:
                    mode = _kernels.POWER_SQRT
                elif powers == {1.0}:
                    mode = _kernels.POWER_ONE
                else:
                    mode = _kernels.POWER_GENERAL
                ptrs = self._ptr_table(device, rows)
                key_table = self._upload(torch.tensor(keys, dtype=torch.int64), device) if refresh else ptrs
                with _on(device):
                    _kernels.update_kernel[(launch.n_programs,)](
                        launch.blocks, ptrs, key_table, self._scalars(device, scal),
                        X_DTYPE=_tl_dtype(key[1]), G_DTYPE=_tl_dtype(key[5]), S_DTYPE=_tl_dtype(key[3]),
                        REFRESH=refresh, N_SAMPLES=max(n_samples, 1), N_COLS=n_cols if refresh else 6,
                        POWER_MODE=mode, ALIGNED=_aligned(rows), BLOCK=BLOCK, num_warps=NUM_WARPS,
                    )
                self.launches += 1
        if fallback:
            subs, gis, jss = _subset(groups, fallback)
            sub_hvps = None
            if refresh:
                sub_hvps = [[[hvps[gi][s][j] for j in js] for s in range(n_samples)] for gi, js in zip(gis, jss)]
            EagerBackend().update(subs, sub_hvps, spec)


def load(name: str = "triton") -> Backend:
    """The Triton backend, or BackendUnavailable saying why it cannot run here."""
    if _IMPORT_ERROR is not None:
        raise BackendUnavailable(
            f"triton could not be imported ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); "
            "install it with `pip install triton` on a machine with a CUDA GPU"
        )
    if not torch.cuda.is_available() and not _interpreted():
        raise BackendUnavailable(f"no CUDA device. {_INTERPRET_HINT}")
    return TritonBackend()
