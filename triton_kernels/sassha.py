"""Triton kernels of SASSHA's four phases, multi-tensor (one launch per phase).

Import this module as ``sassha_fused.triton_kernels.sassha`` (Triton ships an
unrelated top-level ``triton_kernels`` package).

Layout shared by every kernel (apex ``multi_tensor_apply`` style, see
``sassha_fused/backends/triton_backend.py`` for the host side):

* A launch covers up to a few thousand tensors. Each program handles one *tile*
  of ``BLOCK`` consecutive elements of one tensor. ``blocks`` (int64, shape
  ``[n_programs, 2]``) maps program ``pid`` to ``(slot, start)``: the tensor's row
  in the launch's tables and the tile's first element.
* ``ptrs`` (int64, shape ``[n_tensors, N_COLS]``) holds, per tensor, the data
  pointers of the arrays the kernel touches (column order documented per kernel)
  and, in its last column, the tensor's ``numel``. A pointer is cast to the typed
  pointer in the kernel; the element dtypes are ``tl.constexpr``.
* ``scalars`` (fp32, shape ``[n_tensors, N_SCALARS]``) holds per-tensor runtime
  hyper-parameters (they differ per param group, and the step size per tensor):
  changing the learning rate changes table contents, never a compiled kernel.

The per-element math lives in small ``@triton.jit`` helpers (``_fmix32``,
``_rademacher``, ``_perturbed``, ``_momentum``, ``_hessian_ema``, ``_new_param``);
the kernels only walk tensors, load, call the helpers and store.

Rounding choices follow ``backends/eager.py``: fp32 math, ``div_rn``/``sqrt_rn``
(IEEE-rounded, like torch) where the reference divides or takes a square root,
one rounding to the parameter dtype at the store.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "sq_norm_partials_kernel",
    "sum_partials_kernel",
    "perturb_kernel",
    "probes_kernel",
    "update_kernel",
    "POWER_SQRT",
    "POWER_ONE",
    "POWER_GENERAL",
    "PTR_COLS_SQ_NORM",
    "PTR_COLS_PERTURB",
    "PTR_COLS_PROBES",
    "SCALARS_PERTURB",
    "SCALARS_UPDATE",
]

# hessian_power variants (a constexpr: the exponent itself stays a runtime value)
POWER_SQRT = 0  # p == 0.5: IEEE square root, as torch.pow(d, 0.5)
POWER_ONE = 1  # p == 1: D itself
POWER_GENERAL = 2  # any p: exp2(p * log2(D))

PTR_COLS_SQ_NORM = 3  # v, x, numel
PTR_COLS_PERTURB = 4  # x, backup, v, numel
PTR_COLS_PROBES = 2  # z (output), numel
SCALARS_PERTURB = 2  # sign * rho, perturb_eps
SCALARS_UPDATE = 9  # -step_size, c2, 1 - lr*wd, beta1, 1 - beta1, beta2, 1 - beta2, eps, p
# update ptr columns: x, backup, exp_avg, exp_hessian_diag, grad, Hz_0..Hz_{S-1}, numel


# --------------------------------------------------------------------------- math
@triton.jit
def _fmix32(x):
    """MurmurHash3's finaliser on uint32 (wrapping multiply, logical shifts)."""
    x ^= x >> 16
    x *= tl.full((), 0x85EBCA6B, tl.uint32)
    x ^= x >> 13
    x *= tl.full((), 0xC2B2AE35, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def _rademacher(word, bit, k0, k1):
    """+1/-1 (fp32) of ``probes.rademacher_element``: word = element >> 5, bit = element & 31.

    ``word`` may be a ``[R, 1]`` column and ``bit`` a ``[1, 32]`` row: the hash is then
    computed once per 32 elements and broadcast.
    """
    h = _fmix32(_fmix32(word ^ k0) ^ k1)
    return tl.where(((h >> bit) & 1) != 0, 1.0, -1.0)


@triton.jit
def _sq_term(x, v, ADAPTIVE: tl.constexpr):
    """(w * v)^2 with w = |x| (adaptive) or 1."""
    if ADAPTIVE:
        v = tl.abs(x) * v
    return v * v


@triton.jit
def _perturbed(x, v, scale, ADAPTIVE: tl.constexpr):
    """x + scale * v [* x^2]: the perturbed point, in fp32."""
    e = v * scale
    if ADAPTIVE:
        e = e * (x * x)
    return x + e


@triton.jit
def _momentum(m, g, beta1, one_minus_beta1):
    """m_t = beta1 m_{t-1} + (1 - beta1) g~_t."""
    return m * beta1 + g * one_minus_beta1


@triton.jit
def _hessian_ema(d, h, beta2, one_minus_beta2):
    """D_t = beta2 D_{t-1} + (1 - beta2) |h_t|."""
    return d * beta2 + tl.abs(h) * one_minus_beta2


@triton.jit
def _new_param(x, m, d, neg_step, c2, decay, eps, power, POWER_MODE: tl.constexpr):
    """x_{t+1} = x_t (1 - lr wd) - step * m_t / (D_t^p / c2 + eps)."""
    if POWER_MODE == 0:
        dp = tl.sqrt_rn(d)
    elif POWER_MODE == 1:
        dp = d
    else:
        # d >= 0; pow(0, p) = 0 for p > 0 and 1 for p == 0, as torch.pow
        dp = tl.where(d > 0, tl.exp2(power * tl.log2(tl.maximum(d, 1e-38))), tl.where(power == 0, 1.0, 0.0))
    denom = tl.div_rn(dp, c2) + eps
    return x * decay + neg_step * tl.div_rn(m, denom)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even (torch's ``copy_``).

    bf16 is rounded on the bits: Triton's interpreter truncates fp32 -> bf16, and
    the explicit form gives the same bits everywhere at the cost of a few integer
    ops in a bandwidth-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = u + 0x7FFF + ((u >> 16) & 1)
        r = tl.where(x != x, u | 0x400000, r)  # NaN stays a (quiet) NaN
        return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# -------------------------------------------------------------- tensor walking
@triton.jit
def _tile(blocks, ptrs, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """(slot, start, numel) of this program's tile."""
    pid = tl.program_id(0)
    slot = tl.load(blocks + pid * 2)
    start = tl.multiple_of(tl.load(blocks + pid * 2 + 1), BLOCK)  # tiles start on a BLOCK boundary
    numel = tl.load(ptrs + slot * N_COLS + (N_COLS - 1))
    return slot, start, numel


@triton.jit
def _ptr(ptrs, slot, col, N_COLS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed data pointer of column ``col`` of tensor ``slot``.

    ALIGNED: the host checked every pointer of the launch is 16-byte aligned; the
    hint lets full tiles use vector loads (a table entry carries no alignment).
    """
    p = tl.load(ptrs + slot * N_COLS + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(p, offs, mask, EVEN: tl.constexpr):
    """Load a tile; a full tile (EVEN) needs no mask, so the compiler can vectorise."""
    if EVEN:
        v = tl.load(p + offs)
    else:
        v = tl.load(p + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _st(p, offs, v, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(p + offs, v)
    else:
        tl.store(p + offs, v, mask=mask)


@triton.jit
def _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE: tl.constexpr, EVEN: tl.constexpr):
    v = _ld(vp, offs, mask, EVEN).to(tl.float32)
    x = v
    if ADAPTIVE:
        x = _ld(xp, offs, mask, EVEN).to(tl.float32)
    return tl.sum(_sq_term(x, v, ADAPTIVE), axis=0)


@triton.jit
def sq_norm_partials_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    ptrs,  # int64 [n_tensors, 3]: v (grad or exp_avg), x (param; read only if ADAPTIVE), numel
    partials,  # fp32 [>= base + n_programs]: per-tile sums of (w v)^2, written at base + pid
    base,  # first index of this launch's tiles in ``partials``
    V_DTYPE: tl.constexpr,  # element type of v
    X_DTYPE: tl.constexpr,  # element type of x
    ADAPTIVE: tl.constexpr,  # w = |x| (True) or 1
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile
):
    slot, start, numel = _tile(blocks, ptrs, 3, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    vp = _ptr(ptrs, slot, 0, 3, V_DTYPE, ALIGNED)
    xp = _ptr(ptrs, slot, 1, 3, X_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        part = _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE, True)
    else:
        part = _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE, False)
    tl.store(partials + base + tl.program_id(0), part)


@triton.jit
def sum_partials_kernel(
    partials,  # fp32 [n]: per-tile partial sums of every launch of the phase
    n,  # number of partials
    out,  # fp32 [1]: the global squared norm (a 0-dim tensor)
    BLOCK: tl.constexpr,  # partials summed per loop iteration (fixed order: deterministic)
):
    # One program sums in a fixed order: no atomics, the same bits on every run.
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


@triton.jit
def _perturb_tile(xp, bp, vp, offs, mask, scale, X_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
                  EVEN: tl.constexpr):
    x_raw = _ld(xp, offs, mask, EVEN)
    _st(bp, offs, x_raw, mask, EVEN)  # keep x_t itself: the restore is exact
    v = _ld(vp, offs, mask, EVEN).to(tl.float32)
    x_new = _perturbed(x_raw.to(tl.float32), v, scale, ADAPTIVE)
    _st(xp, offs, _round_to(x_new, X_DTYPE), mask, EVEN)


@triton.jit
def perturb_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    ptrs,  # int64 [n_tensors, 4]: x (param, in place), backup (x_t is copied here), v, numel
    scalars,  # fp32 [n_tensors, 2]: sign * rho (the tensor's group), perturb_eps
    sq_norm,  # fp32 [1]: global squared norm from sum_partials_kernel (never read on the host)
    X_DTYPE: tl.constexpr,  # element type of x and backup
    V_DTYPE: tl.constexpr,  # element type of v (grad: param dtype; exp_avg: fp32)
    ADAPTIVE: tl.constexpr,  # e = scale * x^2 * v (True) or scale * v
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile
):
    slot, start, numel = _tile(blocks, ptrs, 4, BLOCK)
    rho = tl.load(scalars + slot * 2)
    peps = tl.load(scalars + slot * 2 + 1)
    # the reference computes (sign * rho) * (1 / (sqrt(n2) + perturb_eps)), rounding twice
    scale = tl.div_rn(1.0, tl.sqrt_rn(tl.load(sq_norm)) + peps) * rho
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    xp = _ptr(ptrs, slot, 0, 4, X_DTYPE, ALIGNED)
    bp = _ptr(ptrs, slot, 1, 4, X_DTYPE, ALIGNED)
    vp = _ptr(ptrs, slot, 2, 4, V_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _perturb_tile(xp, bp, vp, offs, mask, scale, X_DTYPE, ADAPTIVE, True)
    else:
        _perturb_tile(xp, bp, vp, offs, mask, scale, X_DTYPE, ADAPTIVE, False)


@triton.jit
def probes_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    ptrs,  # int64 [n_tensors, 2]: z (output, contiguous), numel
    keys,  # int64 [n_tensors, 2]: the tensor's probe key (k0, k1), uint32 values
    Z_DTYPE: tl.constexpr,  # element type of z (the grad's)
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32 (tiles start on a word)
):
    slot, start, numel = _tile(blocks, ptrs, 2, BLOCK)
    k0 = tl.load(keys + slot * 2).to(tl.uint32)
    k1 = tl.load(keys + slot * 2 + 1).to(tl.uint32)
    # a [BLOCK/32, 32] tile: row r is probe word (start >> 5) + r, hashed once
    rows = tl.arange(0, BLOCK // 32)[:, None]
    bits = tl.arange(0, 32)[None, :]
    offs = start + rows * 32 + bits
    word = ((start >> 5) + rows).to(tl.uint32)
    z = _rademacher(word, bits.to(tl.uint32), k0, k1).to(Z_DTYPE)
    zp = _ptr(ptrs, slot, 0, 2, Z_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _st(zp, offs, z, offs < numel, True)
    else:
        _st(zp, offs, z, offs < numel, False)


@triton.jit
def _update_tile(
    ptrs, keys, slot, start, offs, mask,
    neg_step, c2, decay, beta1, omb1, beta2, omb2, eps, power,
    X_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, REFRESH: tl.constexpr,
    N_SAMPLES: tl.constexpr, N_COLS: tl.constexpr, POWER_MODE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    gp = _ptr(ptrs, slot, 4, N_COLS, G_DTYPE, ALIGNED)
    mp = _ptr(ptrs, slot, 2, N_COLS, S_DTYPE, ALIGNED)
    dp = _ptr(ptrs, slot, 3, N_COLS, S_DTYPE, ALIGNED)
    x = _ld(_ptr(ptrs, slot, 1, N_COLS, X_DTYPE, ALIGNED), offs, mask, EVEN).to(tl.float32)
    m = _ld(mp, offs, mask, EVEN)
    d = _ld(dp, offs, mask, EVEN)
    g = _ld(gp, offs, mask, EVEN).to(tl.float32)
    m = _momentum(m, g, beta1, omb1)
    if REFRESH:
        rows = tl.arange(0, BLOCK // 32)[:, None]
        word = ((start >> 5) + rows).to(tl.uint32)
        ubits = tl.arange(0, 32)[None, :].to(tl.uint32)
        h = tl.zeros([BLOCK // 32, 32], tl.float32)
        for s in tl.static_range(N_SAMPLES):
            k0 = tl.load(keys + slot * (2 * N_SAMPLES) + 2 * s).to(tl.uint32)
            k1 = tl.load(keys + slot * (2 * N_SAMPLES) + 2 * s + 1).to(tl.uint32)
            # an absent Hz (null pointer: param not in the second-order graph) counts
            # as zero; the load then reads the grad instead, so it needs no mask
            present = tl.load(ptrs + slot * N_COLS + 5 + s) != 0
            hp = _ptr(ptrs, slot, 5 + s, N_COLS, G_DTYPE, ALIGNED)
            hz = _ld(tl.where(present, hp, gp), offs, mask, EVEN).to(tl.float32)
            # z regenerated from the counters, never read back from memory
            h += tl.where(present, _rademacher(word, ubits, k0, k1) * hz, 0.0)
        if N_SAMPLES > 1:
            h = tl.div_rn(h, tl.full((), N_SAMPLES, tl.float32))
        d = _hessian_ema(d, h, beta2, omb2)
        _st(dp, offs, d, mask, EVEN)
    _st(mp, offs, m, mask, EVEN)
    x_new = _new_param(x, m, d, neg_step, c2, decay, eps, power, POWER_MODE)
    _st(_ptr(ptrs, slot, 0, N_COLS, X_DTYPE, ALIGNED), offs, _round_to(x_new, X_DTYPE), mask, EVEN)


@triton.jit
def update_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    ptrs,  # int64 [n_tensors, N_COLS]: x (written), backup (x_t, read; may equal x),
    #        exp_avg, exp_hessian_diag, grad, [Hz_0 .. Hz_{S-1} on refresh steps; 0: absent,
    #        Hz = 0], numel
    keys,  # int64 [n_tensors, 2 S]: probe keys (k0, k1) of each sample (read if REFRESH)
    scalars,  # fp32 [n_tensors, 9]: -lr/(1-beta1^t), c2, 1 - lr*wd, beta1, 1 - beta1,
    #           beta2, 1 - beta2, eps, hessian_power
    X_DTYPE: tl.constexpr,  # element type of x and backup
    G_DTYPE: tl.constexpr,  # element type of grad and of Hz
    S_DTYPE: tl.constexpr,  # element type of exp_avg and exp_hessian_diag (fp32)
    REFRESH: tl.constexpr,  # Hessian refresh step: h = mean_s z_s Hz_s, D EMA
    N_SAMPLES: tl.constexpr,  # S, the number of probes
    N_COLS: tl.constexpr,  # columns of ``ptrs``: 6 + S on refresh steps, else 6
    POWER_MODE: tl.constexpr,  # POWER_SQRT / POWER_ONE / POWER_GENERAL
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32
):
    slot, start, numel = _tile(blocks, ptrs, N_COLS, BLOCK)
    sc = scalars + slot * 9
    neg_step = tl.load(sc)
    c2 = tl.load(sc + 1)
    decay = tl.load(sc + 2)
    beta1 = tl.load(sc + 3)
    omb1 = tl.load(sc + 4)
    beta2 = tl.load(sc + 5)
    omb2 = tl.load(sc + 6)
    eps = tl.load(sc + 7)
    power = tl.load(sc + 8)
    # A [BLOCK/32, 32] tile: row r holds probe word (start >> 5) + r, so on refresh
    # steps the hash is computed once per 32 elements.
    rows = tl.arange(0, BLOCK // 32)[:, None]
    bits = tl.arange(0, 32)[None, :]
    offs = start + rows * 32 + bits
    mask = offs < numel
    if start + BLOCK <= numel:
        _update_tile(ptrs, keys, slot, start, offs, mask, neg_step, c2, decay, beta1, omb1, beta2, omb2,
                     eps, power, X_DTYPE, G_DTYPE, S_DTYPE, REFRESH, N_SAMPLES, N_COLS, POWER_MODE,
                     ALIGNED, BLOCK, True)
    else:
        _update_tile(ptrs, keys, slot, start, offs, mask, neg_step, c2, decay, beta1, omb1, beta2, omb2,
                     eps, power, X_DTYPE, G_DTYPE, S_DTYPE, REFRESH, N_SAMPLES, N_COLS, POWER_MODE,
                     ALIGNED, BLOCK, False)
