"""Fused Triton backend: one multi-tensor launch per phase, per bucket and dtype.

The kernels are in ``triton_kernels/sassha.py`` (imported as
``sassha_fused.triton_kernels.sassha``); this module is the host side.

* **Launch plans, cached on the bucket.** A bucket's tensors are split once into
  *kernel groups* by dtype, by whether every array of the tensor is 16-byte
  aligned (so one misaligned view does not turn a whole launch into scalar
  loads; the arrays are the param, its backup and its state: codes, scales and
  master correction included) and by master-weight format (bf16 params with an
  int8 / int16 ``master_correction`` take the update's MASTER_BITS variant). Per
  kernel group the plan holds the block map (program -> tensor slot, first
  element), the ``numels``/``param_index``/``element_offset``/``group_index``
  columns (``element_offset``: where a shard's elements are in the probes) and the
  pointer columns of the optimizer's own arrays (params, backups, state), all on
  the device. A bucket lives as long as its parameters' storage (``plans.py``), so
  none of this is rebuilt per step.
* **Per step.** A pointer column of gradients (or of any other per-step list) is
  rebuilt from ``data_ptr()``s only when the list's storage moved since the last
  call (the caching allocator usually hands back the same blocks); scalars come as
  the group table, the per-tensor update-scalar table and a few kernel arguments.
  So the host makes a constant number of Python calls per kernel group, whatever
  the number of tensors.
* **Launch caps.** A launch holds at most ``max_tensors_per_launch`` tensors and
  ``max_blocks_per_launch`` tiles; the rest is carried to the next launch (never
  reached by real models with the defaults).
* **Device.** Triton launches on the *current* CUDA device's current stream, so
  every launch runs under ``torch.cuda.device(<the tensors' device>)``.
* **No host synchronisation.** The global norm is reduced on the device in
  deterministic stages (per-tile partials, then rounds of fixed-order sums over
  many programs); the
  perturbation scale and the finite-difference step are read by the kernels from
  device memory. Columns go to the device from pinned memory with
  ``non_blocking=True``.
* **CUDA graph capture** (``capturable=True``). No pinned memory is allocated while
  a stream captures (``PinnedSpares``): a pointer column whose pointers change inside
  a capture (gradients allocated in the graph's pool) is written into the pinned
  spare its role got at an eager upload, and that buffer is the graph's from then
  on; a table with no spare (a kernel group or a role first used in the capture)
  raises, asking for an eager warm-up step before capturing.

``launches`` and ``uploads`` count kernel launches and host-to-device table copies
(tests and benchmarks read them).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Backend, BackendUnavailable, Bucket, GroupTable, ProbeKeys, RefreshInput, RefreshMode

__all__ = ["PinnedSpares", "TritonBackend", "load"]

try:  # triton is optional: record why it cannot be used and say so on use
    import triton
    import triton.language as tl

    from sassha_fused.triton_kernels import sassha as _kernels

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = tl = _kernels = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc

_INTERPRET_HINT = "Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 to run them on the CPU (slowly) for testing"

# Elements per program. One size for every kernel, so one block map serves all
# phases. 2048 elements over 8 warps is 8 per thread: 16-byte vector accesses for
# bf16 and 2 x 16 bytes for fp32, enough bytes in flight per SM for a
# bandwidth-bound pass without spilling the update kernel's ~10 live arrays.
# A launch that is not 16-byte aligned moves elements one by one, each with its
# own 64-bit address: there 16 warps (4 elements per thread) keep the refresh
# update under 128 registers. On CUDA every launch also caps its registers at 128
# (``maxnreg``): at least 16 warps per SM whatever the triton version schedules (3.6,
# the GPU machines', once took 179 where 3.9 took 128), and ptxas then spends up to
# the cap rather than spilling for occupancy as it does in some update variants left
# to itself (bench/NOTES-triton.md has both). tests/test_triton_compile.py checks, from
# ptxas, under both tritons: at most 128 registers, no spills, 16-byte accesses.
BLOCK = 2048
# a tile holds whole groups of state_bits=8 (GROUP = 32 elements, one scale each), and its
# codes and scales start 16-byte aligned in an aligned tensor (BLOCK bytes, BLOCK / 8 bytes in)
assert BLOCK % 32 == 0 and BLOCK % 16 == 0 and (BLOCK // 32 * 4) % 16 == 0
NUM_WARPS = 8
NUM_WARPS_UNALIGNED = 16
MAX_REGISTERS = 128
# The norm's partials are summed in rounds: each program of a round adds
# REDUCE_BLOCK * REDUCE_ITERS consecutive partials in a fixed order, until one sum is
# left (deterministic). 875M params (427k partials) take two rounds of 105 and 1
# programs instead of one program looping over all of them.
REDUCE_BLOCK = 1024
REDUCE_ITERS = 4

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_data_ptr = Tensor.data_ptr
_misaligned = (15).__and__
# pointer columns a kernel group keeps per role: the distinct pointer lists a role sees
# in a step (first- and second-pass gradients, momentum) stay uploaded, each with a pinned
# spare a capture can fill (the least recently used column goes first)
COLUMNS_PER_ROLE = 4

_WARM_UP = ("no pinned host memory can be allocated while a stream captures a CUDA graph; run one eager "
            "step with the same parameters (a plain, non-refresh step, like the one captured) before "
            "capturing: the warm-up torch.cuda.graph's documentation asks for. Its uploads prepare every "
            "buffer a captured step copies from")


@functools.lru_cache(maxsize=None)
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


def _i32(key: int) -> int:
    """A uint32 key as the int32 with the same bits: one kernel argument type for every key."""
    return key - (1 << 32) if key >= 1 << 31 else key


def num_warps(aligned: bool) -> int:
    """Warps per program of a launch with this ALIGNED constexpr."""
    return NUM_WARPS if aligned else NUM_WARPS_UNALIGNED


# a launch's compile options by its ALIGNED constexpr (a dict lookup per launch, no call);
# maxnreg is an option of triton's CUDA backend only (its AMD backend refuses it)
REGISTER_CAP = {"maxnreg": MAX_REGISTERS} if torch.version.hip is None else {}
LAUNCH_OPTIONS = {aligned: {"num_warps": num_warps(aligned), **REGISTER_CAP} for aligned in (True, False)}


def reduce_programs(n: int) -> int:
    """Programs of one round of ``sum_partials_kernel`` over ``n`` partials."""
    chunk = REDUCE_BLOCK * REDUCE_ITERS
    return max(1, (n + chunk - 1) // chunk)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _pinned_empty(numel: int, dtype: torch.dtype) -> Tensor:
    """A pinned host buffer from the caching host allocator."""
    return torch.empty(numel, dtype=dtype, pin_memory=True)


class PinnedSpares:
    """The backend's pinned host buffers: none is allocated inside a CUDA graph capture.

    Pinning memory while a stream captures fails on PyTorch builds whose caching
    host allocator is not capture-safe (it queries and records events), so every
    pinned buffer a captured copy reads is allocated before the capture:

    * ``upload`` (outside captures): a table goes to the device from a pinned buffer
      allocated for it, ``non_blocking`` (the host allocator keeps the buffer until
      the copy has run). Inside a capture it raises: a table first needed there has
      no buffer.
    * ``spare`` (outside captures): each uploaded pointer column gets a pinned spare
      of its size (``_KernelGroup.column``).
    * ``from_spare`` (inside a capture): a column whose pointers changed is written
      into a spare (a plain CPU write) and copied from there; the graph records the
      copy and reads that buffer at every replay, so the spare is the graph's from
      then on: kept in ``captured``, never handed out or written again.

    ``allocate(numel, dtype)`` makes the pinned buffers; uploads to devices of
    ``device_types`` go through them (tests inject a CPU allocation and ``("cpu",)``).
    """

    def __init__(self, allocate: Callable[[int, torch.dtype], Tensor] = _pinned_empty,
                 device_types: Iterable[str] = ("cuda",)) -> None:
        self.allocate = allocate
        self.device_types = tuple(device_types)
        self.captured: List[Tensor] = []  # spares captured copies read: they live as long as the backend

    def staged(self, device: torch.device) -> bool:
        """Whether tables go to ``device`` through pinned memory (else the host table is used as it is)."""
        return device.type in self.device_types

    def upload(self, host: Tensor, device: torch.device, what: str = "a table") -> Tensor:
        """``host`` on ``device``, from a new pinned buffer, without waiting; outside captures only."""
        if not self.staged(device):
            return host
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"sassha_fused (triton): {what} is first needed inside a CUDA graph capture, but "
                               + _WARM_UP)
        pinned = self.allocate(host.numel(), host.dtype).view(host.shape)
        pinned.copy_(host)
        return pinned.to(device, non_blocking=True)

    def spare(self, like: Tensor) -> Tensor:
        """A pinned buffer of ``like``'s size and dtype, for a capture to fill (outside captures only)."""
        return self.allocate(like.numel(), like.dtype)

    def from_spare(self, spare: Tensor, host: Tensor, device: torch.device) -> Tensor:
        """``host`` on ``device`` through ``spare``, inside a capture; ``spare`` is the graph's from now on."""
        spare.copy_(host.reshape(spare.shape))
        self.captured.append(spare)
        return spare.to(device, non_blocking=True)


class _Column:
    """An uploaded pointer column: the device column, its alignment, and its pinned spare (None: none yet)."""

    __slots__ = ("column", "aligned", "spare")

    def __init__(self, column: Tensor, aligned: bool, spare: Optional[Tensor]) -> None:
        self.column, self.aligned, self.spare = column, aligned, spare


class _Launch:
    """One kernel launch's share of a kernel group: tensors ``lo:hi`` and the tiles' block map."""

    __slots__ = ("lo", "hi", "blocks", "n_programs")

    def __init__(self, lo: int, hi: int, blocks: Tensor) -> None:
        self.lo, self.hi, self.blocks = lo, hi, blocks
        self.n_programs = blocks.shape[0]


class _KernelGroup:
    """The tensors of a bucket one launch sequence covers: one dtype, one alignment, one master format.

    ``idx`` are the tensors' positions in the bucket (``None``: all of them, in
    order); columns are device tensors, static ones built once.
    """

    def __init__(self, backend: "TritonBackend", b: Bucket, dtype: torch.dtype, aligned: bool,
                 idx: Optional[List[int]], master: int = 0) -> None:
        self.backend, self.dtype, self.aligned, self.idx = backend, dtype, aligned, idx
        self.master = master  # MASTER_BITS of the group's params: 0, or 24 / 32 (bf16 with a master correction)
        self.device = b.device
        pick = self.pick
        params = pick(b.params)
        self.n = len(params)
        numels = [p.numel() for p in params]
        self.launches = backend._split(b.device, numels)
        self.numels = backend._upload(torch.tensor(numels, dtype=torch.int64), b.device)
        self.param_index = backend._upload(torch.tensor(pick(b.param_index), dtype=torch.int64), b.device)
        # global probe element of each tensor's first element (FSDP2 shards; zeros otherwise)
        self.element_offset = backend._upload(torch.tensor(pick(b.offsets()), dtype=torch.int64), b.device)
        self.group_index = backend._upload(torch.tensor(pick(b.group_index), dtype=torch.int64), b.device)
        self.staged = backend.pinned.staged(b.device)  # columns go up through pinned memory (CUDA)
        # per role, its latest pointer lists (at most COLUMNS_PER_ROLE, least recently used first)
        self._columns: Dict[str, "OrderedDict[Tuple[int, ...], _Column]"] = {}
        self._in_graphs: Dict[Tuple[str, Tuple[int, ...]], Tensor] = {}  # columns CUDA graph captures read
        self._rows: Optional[Tensor] = None if idx is None else backend._upload(
            torch.tensor(idx, dtype=torch.int64), b.device)

    def pick(self, xs: Sequence) -> list:
        return list(xs) if self.idx is None else [xs[j] for j in self.idx]

    def column(self, role: str, tensors: Sequence[Optional[Tensor]], maybe_none: bool = False) -> Tuple[Tensor, bool]:
        """The pointer column of ``tensors`` and whether all are 16-byte aligned.

        With ``maybe_none``, ``None`` entries become null pointers (refresh inputs of
        absent params). A role keeps its latest ``COLUMNS_PER_ROLE`` pointer lists
        uploaded (first- and second-pass gradients alternate without re-uploads); a
        new list is uploaded. The lookup and the pointer reads run at C speed.

        Each column uploaded outside a capture gets a pinned spare of its size. Inside
        a CUDA graph capture nothing is allocated: a new pointer list (gradients in
        the graph's pool) takes the spare of the role's least recently used column,
        and a role with no spare left raises (``PinnedSpares``).
        """
        picked = self.pick(tensors)
        if maybe_none:
            ptrs = tuple(0 if t is None else t.data_ptr() for t in picked)
        else:
            ptrs = tuple(map(_data_ptr, picked))
        capturing = self.staged and torch.cuda.is_current_stream_capturing()
        cols = self._columns.get(role)
        if cols is None:
            cols = self._columns[role] = OrderedDict()
        entry = cols.get(ptrs)
        if entry is None:
            entry = self._new_column(role, cols, ptrs, capturing)
        else:
            cols.move_to_end(ptrs)
            if entry.spare is None and self.staged and not capturing:  # a capture took it: a new one
                entry.spare = self.backend.pinned.spare(entry.column)
        if capturing:
            # a replay reads this column again: keep exactly the columns captures read
            self._in_graphs.setdefault((role, ptrs), entry.column)
        return entry.column, entry.aligned

    def _new_column(self, role: str, cols: "OrderedDict[Tuple[int, ...], _Column]", ptrs: Tuple[int, ...],
                    capturing: bool) -> _Column:
        """Upload a new pointer list of ``role`` (from a spare inside a capture)."""
        backend, pinned = self.backend, self.backend.pinned
        host = torch.tensor(ptrs, dtype=torch.int64)
        aligned = not any(map(_misaligned, ptrs))
        if capturing:  # no allocation: a spare prepared at an eager upload, the graph's from now on
            donor = next((e for e in cols.values() if e.spare is not None), None)
            if donor is None:
                why = ("is first needed inside a CUDA graph capture (no pinned spare was prepared for it)" if not cols
                       else f"changes inside a CUDA graph capture and all {len(cols)} of its pinned spares are taken "
                            "(by this capture or an earlier one)")
                raise RuntimeError(f"sassha_fused (triton): the pointer column {role!r} {why}; " + _WARM_UP)
            spare, donor.spare = donor.spare, None
            backend.uploads += 1
            entry = _Column(pinned.from_spare(spare, host, self.device), aligned, None)
        else:  # the columns dropped are freed, unless a captured graph reads them (_in_graphs)
            spare = None
            while len(cols) >= COLUMNS_PER_ROLE:
                old = cols.popitem(last=False)[1]
                if spare is None:
                    spare = old.spare  # never written: it serves the new column
            column = backend._upload(host, self.device, f"the pointer column {role!r}")
            if spare is None and self.staged:
                spare = pinned.spare(column)
            entry = _Column(column, aligned, spare)
        cols[ptrs] = entry
        return entry

    def rows(self, table: Tensor) -> Tensor:
        """This group's rows of a per-tensor table of the bucket."""
        return table if self._rows is None else table.index_select(0, self._rows)


class TritonBackend(Backend):
    """SASSHA's phases as fused multi-tensor Triton kernels (fp32, bf16, fp16 params)."""

    name = "triton"
    description = "fused multi-tensor Triton kernels: one launch per phase per (device, dtype)"

    def __init__(self, max_tensors_per_launch: int = 1 << 16, max_blocks_per_launch: int = 1 << 20) -> None:
        if _IMPORT_ERROR is not None:
            raise BackendUnavailable(f"triton could not be imported: {_IMPORT_ERROR}")
        self.max_tensors_per_launch = int(max_tensors_per_launch)
        self.max_blocks_per_launch = int(max_blocks_per_launch)
        self.launches = 0  # kernel launches made so far
        self.uploads = 0  # host -> device table copies made so far
        self.pinned = PinnedSpares()  # pinned host buffers; none allocated inside a capture

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

    # ----------------------------------------------------------------- plans
    def _upload(self, host: Tensor, device: torch.device, what: str = "a kernel group's table") -> Tensor:
        """A small host table on ``device``, without synchronising the host (never inside a capture).

        Pinned + non_blocking: the copy is queued on the stream; the caching host
        allocator keeps the pinned block alive until the copy has run. Inside a CUDA
        graph capture this raises (``PinnedSpares.upload``): the tables of a captured
        step are built by its eager warm-up, and changed pointer columns come from
        spares (``_KernelGroup.column``). What a graph reads from outside its memory
        pool is kept: the spares its copies read (``pinned.captured``), the columns
        (``_KernelGroup._in_graphs``) and the plans (the optimizer's captured plans).
        """
        self.uploads += 1
        return self.pinned.upload(host, device, what)

    def _split(self, device: torch.device, numels: List[int]) -> List[_Launch]:
        """Split the tiles of tensors with these ``numels`` into launches."""
        tiles = torch.tensor([(n + BLOCK - 1) // BLOCK for n in numels], dtype=torch.int64)
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        start = (torch.arange(tensor_of.numel(), dtype=torch.int64) - first_tile[tensor_of]) * BLOCK
        plan: List[_Launch] = []
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
        return plan

    def _groups(self, b: Bucket) -> List[_KernelGroup]:
        """The bucket's kernel groups (built on first use, cached in the bucket)."""
        groups = b.backend_cache.get("triton")
        if groups is None:
            keys: Dict[Tuple[torch.dtype, bool, int], List[int]] = {}
            for j, p in enumerate(b.params):
                if p.numel() == 0:
                    continue
                own = [p, b.backups[j]] + self._state_of(b, j)
                aligned = not any(t.data_ptr() % 16 for t in own)
                correction = b.master_corrections[j] if b.master_corrections else None
                master = 0 if correction is None else (24 if correction.dtype == torch.int8 else 32)
                keys.setdefault((p.dtype, aligned, master), []).append(j)
            groups = []
            for (dtype, aligned, master), idx in keys.items():
                whole = len(keys) == 1 and len(idx) == len(b.params)
                groups.append(_KernelGroup(self, b, dtype, aligned, None if whole else idx, master))
            b.backend_cache["triton"] = groups
            b.backend_cache["triton_state"] = bool(b.exp_avgs)
        elif b.exp_avgs and not b.backend_cache["triton_state"]:  # state attached since: alignment of state too
            del b.backend_cache["triton"]
            return self._groups(b)
        return groups

    @staticmethod
    def _state_of(b: Bucket, j: int) -> List[Tensor]:
        """The state arrays of param ``j`` the update reads and writes (their alignment decides the launch's).

        A tile starts BLOCK elements after the previous one: BLOCK bytes into int8 / uint8
        codes and int8 corrections, 2 BLOCK into bf16 state and int16 corrections, BLOCK / 32
        floats into the scales, all multiples of 16, so each tile of a 16-byte aligned array
        starts 16-byte aligned too.
        """
        own = [b.exp_avgs[j], b.exp_hessian_diags[j]] if b.exp_avgs else []
        if b.state_bits == 8 and b.exp_avg_scales:
            own += [b.exp_avg_scales[j], b.exp_hessian_diag_scales[j]]
        if b.master_corrections and b.master_corrections[j] is not None:
            own.append(b.master_corrections[j])
        return own

    def _launch(self, kernel, g: _KernelGroup, launch: _Launch, columns: Sequence[Tensor], *args, **meta) -> None:
        lo = launch.lo
        with _on(g.device):
            kernel[(launch.n_programs,)](launch.blocks, *[c[lo:] for c in columns], *args, BLOCK=BLOCK,
                                         **LAUNCH_OPTIONS[meta["ALIGNED"]], **meta)
        self.launches += 1

    # ---------------------------------------------------------------- phases
    def sq_norm(self, b: Bucket, sources: Sequence[Tensor], adaptive: bool, acc_dtype: torch.dtype) -> Tensor:
        groups = self._groups(b)
        n_partials = sum(launch.n_programs for g in groups for launch in g.launches)
        with _on(b.device):
            partials = torch.empty(max(n_partials, 1), dtype=torch.float32, device=b.device)
            base = 0
            for g in groups:
                v, v_aligned = g.column("sq_norm.v", sources)
                x, _ = g.column("params", b.params)
                v_dtype = g.pick(sources)[0].dtype
                for launch in g.launches:
                    self._launch(_kernels.sq_norm_partials_kernel, g, launch, (v, x, g.numels), partials, base,
                                 V_DTYPE=_tl_dtype(v_dtype), X_DTYPE=_tl_dtype(g.dtype),
                                 ADAPTIVE=bool(adaptive), ALIGNED=g.aligned and v_aligned)
                    base += launch.n_programs
            out = self._sum_partials(partials, n_partials)
        return out.to(acc_dtype)

    def _sum_partials(self, partials: Tensor, n: int) -> Tensor:
        """The sum of ``partials[:n]`` as a 0-dim fp32 tensor: fixed-order rounds, many programs each."""
        while True:
            programs = reduce_programs(n)
            out = torch.empty(() if programs == 1 else (programs,), dtype=torch.float32, device=partials.device)
            _kernels.sum_partials_kernel[(programs,)](partials, n, out, BLOCK=REDUCE_BLOCK, ITERS=REDUCE_ITERS,
                                                      num_warps=4, **REGISTER_CAP)
            self.launches += 1
            if programs == 1:
                return out
            partials, n = out, programs

    def perturb(self, b: Bucket, sources: Sequence[Tensor], sq_norm: Tensor, sign: float, adaptive: bool,
                groups: GroupTable) -> None:
        table = groups.tensor(b.device).to(torch.float32)
        sq = sq_norm.to(device=b.device, dtype=torch.float32).reshape(())
        for g in self._groups(b):
            x, _ = g.column("params", b.params)
            bk, _ = g.column("backups", b.backups)
            v, v_aligned = g.column("perturb.v", sources)
            v_dtype = g.pick(sources)[0].dtype
            for launch in g.launches:
                self._launch(_kernels.perturb_kernel, g, launch, (x, bk, v, g.numels, g.group_index), table, sq,
                             float(sign), X_DTYPE=_tl_dtype(g.dtype), V_DTYPE=_tl_dtype(v_dtype),
                             ADAPTIVE=bool(adaptive), ALIGNED=g.aligned and v_aligned)

    def probes(self, b: Bucket, keys: ProbeKeys, sample: int) -> List[Tensor]:
        out = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in b.params]
        for g in self._groups(b):
            z, z_aligned = g.column("probes.z", out)
            for launch in g.launches:
                self._launch(_kernels.probes_kernel, g, launch, (z, g.numels, g.param_index, g.element_offset),
                             _i32(keys.prefixes[sample]),
                             Z_DTYPE=_tl_dtype(g.dtype), ALIGNED=g.aligned and z_aligned)
        return out

    def fd_move(self, b: Bucket, delta: Tensor, keys: ProbeKeys, sample: int, sign: float,
                base: Optional[Sequence[Tensor]], save: Optional[Sequence[Tensor]]) -> None:
        for g in self._groups(b):
            x, _ = g.column("params", b.params)
            bs, b_aligned = g.column("fd.base", base) if base is not None else (x, True)
            sv, s_aligned = g.column("fd.save", save) if save is not None else (x, True)
            for launch in g.launches:
                self._launch(_kernels.fd_move_kernel, g, launch, (x, bs, sv, g.numels, g.param_index,
                                                                    g.element_offset),
                             _i32(keys.prefixes[sample]), delta, float(sign), X_DTYPE=_tl_dtype(g.dtype),
                             HAS_BASE=base is not None, HAS_SAVE=save is not None,
                             ALIGNED=g.aligned and b_aligned and s_aligned)

    def fd_fold(self, b: Bucket, acc: Sequence[Tensor], grads: Sequence[Tensor], baseline: Optional[Sequence[Tensor]],
                delta: Tensor, keys: ProbeKeys, sample: int, coefficient: float, first: bool) -> None:
        for g in self._groups(b):
            a, a_aligned = g.column("fd.acc", acc)
            gr, g_aligned = g.column("fd.grad", grads)
            bl, b_aligned = g.column("fd.baseline", baseline) if baseline is not None else (gr, True)
            for launch in g.launches:
                self._launch(_kernels.fd_fold_kernel, g, launch, (a, gr, bl, g.numels, g.param_index,
                                                                    g.element_offset),
                             _i32(keys.prefixes[sample]), delta, float(coefficient), X_DTYPE=_tl_dtype(g.dtype),
                             HAS_BASELINE=baseline is not None, FIRST=bool(first),
                             ALIGNED=g.aligned and a_aligned and g_aligned and b_aligned)

    def update(self, b: Bucket, x_t: Sequence[Tensor], grads: Sequence[Tensor], scalars: Tensor, power: float,
               refresh: Optional[RefreshInput]) -> None:
        if power == 0.5:
            power_mode = _kernels.POWER_SQRT.value
        elif power == 1.0:
            power_mode = _kernels.POWER_ONE.value
        else:
            power_mode = _kernels.POWER_GENERAL.value
        mode = RefreshMode.NONE if refresh is None else refresh.mode
        state_bits = b.state_bits
        s_dtype = {32: tl.float32, 16: tl.bfloat16, 8: tl.int8}[state_bits]  # exp_avg's element type
        table = scalars.to(torch.float32)
        fd = refresh.fd if refresh is not None and refresh.fd is not None else table
        prefixes = None
        if refresh is not None and mode != RefreshMode.PRECOMPUTED:
            prefixes = self._upload(torch.tensor(refresh.keys.prefixes[:len(refresh.ys)], dtype=torch.int64),
                                    b.device, "a refresh step's probe prefixes")
        for g in self._groups(b):
            x, _ = g.column("params", b.params)
            xt, xt_aligned = g.column("update.x_t", x_t)
            gr, g_aligned = g.column("update.grad", grads)
            m, _ = g.column("exp_avgs", b.exp_avgs)
            d, _ = g.column("exp_hessian_diags", b.exp_hessian_diags)
            # columns a format does not read get any column of the right length (never dereferenced)
            ms, ds = m, d
            if state_bits == 8:
                ms, _ = g.column("exp_avg_scales", b.exp_avg_scales)
                ds, _ = g.column("exp_hessian_diag_scales", b.exp_hessian_diag_scales)
            cs = g.column("master_corrections", b.master_corrections)[0] if g.master else m
            aligned = g.aligned and xt_aligned and g_aligned
            if refresh is not None:
                ys = [g.column(f"update.y{s}", sample, maybe_none=True) for s, sample in enumerate(refresh.ys)]
                y = torch.stack([c for c, _ in ys]) if len(ys) > 1 else ys[0][0].reshape(1, -1)
                aligned = aligned and all(a for _, a in ys)
            else:
                y = gr.reshape(1, -1)
            rows = g.rows(table)
            for launch in g.launches:
                lo = launch.lo
                with _on(g.device):
                    _kernels.update_kernel[(launch.n_programs,)](
                        launch.blocks, x[lo:], xt[lo:], gr[lo:], m[lo:], d[lo:], ms[lo:], ds[lo:], cs[lo:],
                        y[:, lo:], g.numels[lo:], g.param_index[lo:], g.element_offset[lo:],
                        prefixes if prefixes is not None else g.param_index, y.stride(0), rows[lo:], float(power), fd,
                        X_DTYPE=_tl_dtype(g.dtype), S_DTYPE=s_dtype, STATE_BITS=state_bits, MASTER_BITS=g.master,
                        MODE=mode,
                        N_SAMPLES=y.shape[0], POWER_MODE=power_mode, ALIGNED=aligned, BLOCK=BLOCK,
                        **LAUNCH_OPTIONS[aligned],
                    )
                self.launches += 1


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
