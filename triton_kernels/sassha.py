"""Triton kernels of SASSHA's phases, multi-tensor (one launch per phase and bucket).

Import this module as ``sassha_fused.triton_kernels.sassha`` (Triton ships an
unrelated top-level ``triton_kernels`` package).

Layout shared by every kernel (apex ``multi_tensor_apply`` style, see
``sassha_fused/backends/triton_backend.py`` for the host side):

* A launch covers up to tens of thousands of tensors of one dtype. Each program
  handles one *tile* of ``BLOCK`` consecutive elements of one tensor. ``blocks``
  (int64, ``[n_programs, 2]``) maps program ``pid`` to ``(slot, start)``: the
  tensor's index in the launch's arrays and the tile's first element.
* Every array a kernel touches comes as a column of data pointers (int64
  ``[n_tensors]``, one per tensor, cast to a typed pointer in the kernel; element
  dtypes are ``tl.constexpr``). Columns of the optimizer's own arrays (params,
  backups, state) are built once per parameter set and storage; gradient columns
  are uploaded only when the gradients' storage moved. ``numels``,
  ``param_index``, ``element_offset`` and ``group_index`` are static columns too.
* Probes draw the *global* element of a shard (FSDP2): local element ``i`` of a
  tensor with ``element_offset`` ``o`` uses probe element ``o + i`` (word
  ``(o + i) >> 5``, bit ``(o + i) & 31``, computed in int64). ``o`` need not be a
  multiple of 32, so a tile's row of 32 elements spans two probe words.
* Per-step values are few: a row per tensor of the update-scalar table
  (``U_*`` columns), a row per group of the group table (``G_*``), the probe
  vector's key prefix, the finite-difference step ``delta`` as a device scalar,
  and the sign or coefficient of a move. Changing the learning rate changes table
  contents, never a compiled kernel; ``prefix`` is not specialised on.

The per-element math lives in small ``@triton.jit`` helpers (``_fmix32``,
``_rademacher``, ``_perturbed``, ``_momentum``, ``_hessian_ema``, ``_new_param``);
the kernels only walk tensors, load, call the helpers and store.

Compact state (``sassha_fused/encoding.py``, issue 22) is decoded, used and encoded
again inside the update's single pass, chosen by constexprs (``STATE_BITS`` 32 is the
plain float32 path, unchanged):

* ``STATE_BITS`` 16: m and D are bfloat16, widened on load and rounded to nearest
  even at the store (``_round_to``).
* ``STATE_BITS`` 8: int8 / uint8 codes and one float32 scale per group of 32
  elements (``_decode_*``/``_encode_*``). Groups start at element 0 of each tensor
  and a tile starts at a multiple of BLOCK, so the update's ``[BLOCK/32, 32]`` tile
  (the probes' rows) holds whole groups: row r is group ``start / 32 + r``, and the
  group maximum is a ``tl.max(axis=1)`` over the row, elements past the tensor
  counting as 0. D's codes and scales are written on refresh steps only.
* ``MASTER_BITS`` 24 / 32 (bf16 params): the update starts from
  ``join_master(x_t, correction)`` and writes both halves of ``split_master(x_new)``
  (``_join_master``/``_split_master``: integer arithmetic on the bits).

Given the same float32 ``m_new``/``D_new``/``x_new`` the codes, scales and
corrections are the reference's bit for bit: the encodes use the reference's
operations in its order, IEEE-rounded, and never add to a product, so fp fusion
cannot change a rounding.

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
    "fd_move_kernel",
    "fd_fold_kernel",
    "update_kernel",
    "POWER_SQRT",
    "POWER_ONE",
    "POWER_GENERAL",
]

# hessian_power variants (a constexpr: the exponent itself stays a runtime value)
POWER_SQRT = tl.constexpr(0)  # p == 0.5: IEEE square root, as torch.pow(d, 0.5)
POWER_ONE = tl.constexpr(1)  # p == 1: D itself
POWER_GENERAL = tl.constexpr(2)  # any p: exp2(p * log2(D))

# Group table columns (GroupCol of backends/base.py; tests/test_layouts.py checks them)
G_LR = tl.constexpr(0)
G_BETA1 = tl.constexpr(1)
G_BETA2 = tl.constexpr(2)
G_WEIGHT_DECAY = tl.constexpr(3)
G_EPS = tl.constexpr(4)
G_RHO = tl.constexpr(5)
G_PERTURB_EPS = tl.constexpr(6)
G_COUNT = tl.constexpr(7)
# Update-scalar table columns (UpdateCol of backends/base.py)
U_NEG_STEP = tl.constexpr(0)
U_DECAY = tl.constexpr(1)
U_BETA1 = tl.constexpr(2)
U_ONE_MINUS_BETA1 = tl.constexpr(3)
U_BETA2 = tl.constexpr(4)
U_ONE_MINUS_BETA2 = tl.constexpr(5)
U_C2 = tl.constexpr(6)
U_EPS = tl.constexpr(7)
U_LIVE = tl.constexpr(8)
U_COUNT = tl.constexpr(9)
# Refresh modes (RefreshMode of backends/base.py)
MODE_NONE = tl.constexpr(0)
MODE_AUTOGRAD = tl.constexpr(1)
MODE_FD_DIRECT = tl.constexpr(2)
MODE_PRECOMPUTED = tl.constexpr(3)
# parts of a tensor's masked last tile in update_kernel (each a whole number of 32-element rows)
TAIL_PARTS = tl.constexpr(4)
KEY1_SALT = tl.constexpr(0x9E3779B9)
# Compact state (sassha_fused/encoding.py): groups of GROUP elements share a float32 scale
# under state_bits=8; the codes' levels and the constants added before the scaling to the
# code grid (float32 values of encoding.M_HALF / D_HALF, as torch adds them)
GROUP = tl.constexpr(32)
M_LEVELS = tl.constexpr(127.0)
D_LEVELS = tl.constexpr(255.0)
M_HALF = tl.constexpr(0.5 / 127)
D_HALF = tl.constexpr(0.5 / 255)
# the decodes' factors, encoding.M_UNIT / D_UNIT: the float32 values nearest 1/127 and 1/255
M_UNIT = tl.constexpr(0.007874015718698502)
D_UNIT = tl.constexpr(0.003921568859368563)
# float32's smallest normal (encoding.TINY): a group of m whose largest |m| is below it encodes as 0
TINY = tl.constexpr(2.0 ** -126)


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
def _param_key(prefix, param_index):
    """(k0, k1) of ``probes.param_key``: the parameter's stream from its vector's prefix."""
    k0 = _fmix32(prefix.to(tl.uint32) ^ param_index.to(tl.uint32))
    k1 = _fmix32(k0 ^ tl.full((), KEY1_SALT, tl.uint32))
    return k0, k1


@triton.jit
def _rademacher(word, bit, k0, k1):
    """+1/-1 (fp32) of ``probes.rademacher_element`` for element ``32 * word + bit``.

    ``bit`` is in [0, 64): bits 32.. are those of the next word (an element offset
    that is not a multiple of 32 starts a row of 32 elements inside a word). ``word``
    (uint32) may be a ``[R, 1]`` column and ``bit`` a ``[1, 32]`` row: the two hashes
    are then computed once per 32 elements and broadcast.
    """
    lo = _fmix32(_fmix32(word ^ k0) ^ k1)
    hi = _fmix32(_fmix32((word + tl.full((), 1, tl.uint32)) ^ k0) ^ k1)  # wraps only past the last element
    h = tl.where(bit < 32, lo, hi)
    return tl.where(((h >> (bit & 31)) & 1) != 0, 1.0, -1.0)


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
def _preconditioner(d, c2, power, POWER_MODE: tl.constexpr):
    """D_t^p / c2."""
    if POWER_MODE == 0:
        dp = tl.sqrt_rn(d)
    elif POWER_MODE == 1:
        dp = d
    else:
        # d >= 0; pow(0, p) = 0 for p > 0 and 1 for p == 0, as torch.pow
        # (the product cast: Triton 3.6's interpreter widens a float argument to fp64)
        log_dp = (power * tl.log2(tl.maximum(d, 1e-38))).to(tl.float32)
        dp = tl.where(d > 0, tl.exp2(log_dp), tl.where(power == 0, 1.0, 0.0))
    return tl.div_rn(dp, c2)


@triton.jit
def _new_param(x, m, pre, neg_step, decay, eps):
    """x_{t+1} = x_t (1 - lr wd) - step * m_t / (pre + eps), pre = D_t^p / c2."""
    denom = pre + eps
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


# ------------------------------------------------------------- compact state
# encoding.py's encodings, operation for operation: only + - * /, sqrt and floor, each
# rounded on its own (div_rn/sqrt_rn; no product is added to, so fp fusion cannot
# change a rounding). A tile is [BLOCK/32, 32]: row r is group (start / 32) + r.
@triton.jit
def _decode_momentum(q, s):
    """float32 m of int8 codes ``q`` ([R, 32]) and their group scales ``s`` ([R, 1]): (t |t|) s."""
    t = q.to(tl.float32) * tl.full((), M_UNIT, tl.float32)
    return (t * tl.abs(t)) * s


@triton.jit
def _hessian_root(q, s):
    """float32 sqrt(D) of uint8 codes ``q`` and their group scales ``s``: (q / 255) s, a product."""
    return (q.to(tl.float32) * tl.full((), D_UNIT, tl.float32)) * s


@triton.jit
def _decode_hessian(q, s):
    """float32 D of uint8 codes ``q`` and their group scales ``s``: the root squared."""
    root = _hessian_root(q, s)
    return root * root


@triton.jit
def _encode_momentum(m):
    """(int8 codes, [R, 1] float32 scales) of m ([R, 32], elements past the tensor 0)."""
    s = tl.max(tl.abs(m), axis=1, keep_dims=True)
    normal = s >= TINY
    r = tl.where(normal, tl.div_rn(tl.full((), 1.0, tl.float32), tl.where(normal, s, 1.0)), 0.0)  # once per group
    c = tl.sqrt_rn(tl.abs(m) * r)  # square-root companding
    q = tl.minimum(tl.floor((c + tl.full((), M_HALF, tl.float32)) * M_LEVELS), M_LEVELS)
    q = tl.where(m < 0, -q, q)
    return q.to(tl.int8), s


@triton.jit
def _encode_hessian(d):
    """(uint8 codes, [R, 1] float32 scales of sqrt D) of D >= 0 ([R, 32], elements past the tensor 0)."""
    root = tl.sqrt_rn(d)
    s = tl.max(root, axis=1, keep_dims=True)
    c = tl.where(s > 0, tl.div_rn(root, tl.where(s > 0, s, 1.0)), 0.0)
    q = tl.minimum(tl.floor((c + tl.full((), D_HALF, tl.float32)) * D_LEVELS), D_LEVELS)
    q = tl.where((d > 0) & (q < 1.0), 1.0, q)  # a positive entry never decodes to 0
    return q.to(tl.uint8), s


@triton.jit
def _join_master(x, correction, MASTER_BITS: tl.constexpr):
    """The float32 master of bf16 ``x`` and its int8 (24) / int16 (32) correction: integer bit arithmetic."""
    high = x.to(tl.uint16, bitcast=True).to(tl.uint32)
    rest = correction.to(tl.int32)
    if MASTER_BITS == 24:
        rest = rest << 8
    bits = (high << 16) + rest.to(tl.uint32, bitcast=True)  # modulo 2**32, as the reference
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_master(x, MASTER_BITS: tl.constexpr):
    """float32 master -> (bf16 param: its top 16 bits rounded, ties away; the correction below them).

    24 bits: the master is first rounded to 24 bits. Non-finite values keep their
    bf16 rounding and a zero correction.
    """
    u = x.to(tl.uint32, bitcast=True)
    bits = u
    if MASTER_BITS == 24:
        bits = ((bits + 0x80) >> 8) << 8  # (bits + 0x80) & 0xFFFFFF00
    high = (bits + 0x8000) >> 16
    rest = bits.to(tl.int32, bitcast=True) - (high << 16).to(tl.int32, bitcast=True)  # in [-2**15, 2**15)
    finite = (u & 0x7F800000) != 0x7F800000
    param = tl.where(finite, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), _round_to(x, tl.bfloat16))
    if MASTER_BITS == 24:
        correction = tl.where(finite, rest >> 8, 0).to(tl.int8)
    else:
        correction = tl.where(finite, rest, 0).to(tl.int16)
    return param, correction


# -------------------------------------------------------------- tensor walking
@triton.jit
def _tile(blocks, numels, BLOCK: tl.constexpr):
    """(slot, start, numel) of this program's tile.

    Tiles start at multiples of BLOCK (``TritonBackend._split``). The start comes
    from a table, so the compiler cannot see it: without the hint the offsets of a
    tile carry no alignment and every access stays scalar even on aligned tensors.
    """
    pid = tl.program_id(0)
    slot = tl.load(blocks + pid * 2)
    start = tl.multiple_of(tl.load(blocks + pid * 2 + 1), BLOCK)
    return slot, start, tl.load(numels + slot)


@triton.jit
def _ptr(column, slot, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed data pointer of tensor ``slot`` from a pointer column.

    ALIGNED: the host checked every pointer of the launch is 16-byte aligned; the
    hint lets full tiles use vector loads (a column entry carries no alignment).
    """
    p = tl.load(column + slot).to(tl.pointer_type(DTYPE))
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
def _word_tile(start, element_offset, BLOCK: tl.constexpr):
    """Local offsets of a [BLOCK/32, 32] tile, and where its probes are (hashed once per 32 elements).

    Row r holds the local elements ``start + 32 r + c``, global probe elements
    ``e = element_offset + start + 32 r + c``. Returns the probe word of each row's
    first element (``[R, 1]``, uint32) and each column's bit counted from that word
    (``[1, 32]``, uint32 in [0, 64)): ``_rademacher(word, bit, ...)`` is then z[e].
    The global index is formed in int64 (it may exceed 2**31).
    """
    rows = tl.arange(0, BLOCK // 32)[:, None]
    cols = tl.arange(0, 32)[None, :]
    offs = start + rows * 32 + cols
    first = element_offset.to(tl.int64) + start.to(tl.int64)  # global element of the tile's first element
    word = ((first >> 5) + rows).to(tl.uint32)  # start is a multiple of 32: every row starts at bit first & 31
    bits = ((first & 31) + cols).to(tl.uint32)
    return offs, word, bits


@triton.jit
def _probe_tile(blocks, numels, param_index, element_offset, prefix, BLOCK: tl.constexpr):
    """This program's tile and its probe z (fp32 +-1): (slot, start, numel, offs, mask, z)."""
    slot, start, numel = _tile(blocks, numels, BLOCK)
    k0, k1 = _param_key(prefix, tl.load(param_index + slot))
    offs, word, bits = _word_tile(start, tl.load(element_offset + slot), BLOCK)
    return slot, start, numel, offs, offs < numel, _rademacher(word, bits, k0, k1)


# ------------------------------------------------------------------- norms
@triton.jit
def _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE: tl.constexpr, EVEN: tl.constexpr):
    v = _ld(vp, offs, mask, EVEN).to(tl.float32)
    x = v
    if ADAPTIVE:
        x = _ld(xp, offs, mask, EVEN).to(tl.float32)
    return tl.sum(_sq_term(x, v, ADAPTIVE), axis=0)


@triton.jit(do_not_specialize=["base"])
def sq_norm_partials_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    v_ptrs,  # int64 [n]: v (gradient, momentum or the params themselves)
    x_ptrs,  # int64 [n]: x (params; read only if ADAPTIVE)
    numels,  # int64 [n]: elements of each tensor
    partials,  # fp32 [>= base + n_programs]: per-tile sums of (w v)^2, written at base + pid
    base,  # first index of this launch's tiles in ``partials``
    V_DTYPE: tl.constexpr,  # element type of v
    X_DTYPE: tl.constexpr,  # element type of x
    ADAPTIVE: tl.constexpr,  # w = |x| (True) or 1
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile
):
    slot, start, numel = _tile(blocks, numels, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    vp = _ptr(v_ptrs, slot, V_DTYPE, ALIGNED)
    xp = _ptr(x_ptrs, slot, X_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        part = _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE, True)
    else:
        part = _sq_norm_tile(vp, xp, offs, mask, ADAPTIVE, False)
    tl.store(partials + base + tl.program_id(0), part)


@triton.jit(do_not_specialize=["n"])
def sum_partials_kernel(
    partials,  # fp32 [n]: partial sums (per tile, or of the previous round)
    n,  # number of partials
    out,  # fp32 [cdiv(n, BLOCK * ITERS)]: one sum per program (a 0-dim tensor in the last round)
    BLOCK: tl.constexpr,  # partials one program adds per loop iteration
    ITERS: tl.constexpr,  # loop iterations: a program sums BLOCK * ITERS consecutive partials
):
    # Each program adds a fixed slice in a fixed order: no atomics, the same bits on
    # every run whatever the scheduling. The host repeats rounds until one sum is left.
    first = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(ITERS):
        offs = first + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


# ------------------------------------------------------------- perturbation
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
    x_ptrs,  # int64 [n]: x (param, in place)
    b_ptrs,  # int64 [n]: backup (x_t is copied here)
    v_ptrs,  # int64 [n]: v, the direction (gradient, or momentum for M-SASSHA)
    numels,  # int64 [n]
    group_index,  # int64 [n]: the tensor's row in ``groups``
    groups,  # fp32 [n_groups, G_COUNT]: the step's group table (rho, perturb_eps read)
    sq_norm,  # fp32 [1]: global squared norm (never read on the host)
    sign,  # +1 (SASSHA, along g) or -1 (M-SASSHA, against m)
    X_DTYPE: tl.constexpr,  # element type of x and backup
    V_DTYPE: tl.constexpr,  # element type of v (grad: param dtype; exp_avg: fp32)
    ADAPTIVE: tl.constexpr,  # e = scale * x^2 * v (True) or scale * v
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile
):
    slot, start, numel = _tile(blocks, numels, BLOCK)
    row = groups + tl.load(group_index + slot) * G_COUNT
    # the reference computes (1 / (sqrt(n2) + perturb_eps)) * (sign * rho), rounding twice
    scale = tl.div_rn(1.0, tl.sqrt_rn(tl.load(sq_norm)) + tl.load(row + G_PERTURB_EPS)) * (sign * tl.load(row + G_RHO))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    xp = _ptr(x_ptrs, slot, X_DTYPE, ALIGNED)
    bp = _ptr(b_ptrs, slot, X_DTYPE, ALIGNED)
    vp = _ptr(v_ptrs, slot, V_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _perturb_tile(xp, bp, vp, offs, mask, scale, X_DTYPE, ADAPTIVE, True)
    else:
        _perturb_tile(xp, bp, vp, offs, mask, scale, X_DTYPE, ADAPTIVE, False)


# ------------------------------------------------------------------- probes
@triton.jit(do_not_specialize=["prefix"])
def probes_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    z_ptrs,  # int64 [n]: z (output, contiguous)
    numels,  # int64 [n]
    param_index,  # int64 [n]: the tensor's position in the optimizer (probe counter)
    element_offset,  # int64 [n]: global probe element of the tensor's first element (a shard's offset)
    prefix,  # the probe vector's key prefix (uint32 value)
    Z_DTYPE: tl.constexpr,  # element type of z (the param's)
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32 (tiles start on a word)
):
    slot, start, numel, offs, mask, z = _probe_tile(blocks, numels, param_index, element_offset, prefix, BLOCK)
    zp = _ptr(z_ptrs, slot, Z_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _st(zp, offs, z.to(Z_DTYPE), mask, True)
    else:
        _st(zp, offs, z.to(Z_DTYPE), mask, False)


# -------------------------------------------------------- finite differences
@triton.jit
def _fd_move_tile(xp, bp, sp, offs, mask, step, z, X_DTYPE: tl.constexpr, HAS_BASE: tl.constexpr,
                  HAS_SAVE: tl.constexpr, EVEN: tl.constexpr):
    x_raw = _ld(xp, offs, mask, EVEN)
    if HAS_SAVE:
        _st(sp, offs, x_raw, mask, EVEN)
    x0 = x_raw.to(tl.float32)
    if HAS_BASE:
        x0 = _ld(bp, offs, mask, EVEN).to(tl.float32)
    _st(xp, offs, _round_to(x0 + step * z, X_DTYPE), mask, EVEN)


@triton.jit(do_not_specialize=["prefix"])
def fd_move_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    x_ptrs,  # int64 [n]: x (param, written)
    base_ptrs,  # int64 [n]: the point to move from (read if HAS_BASE, else x itself)
    save_ptrs,  # int64 [n]: x is copied here first (if HAS_SAVE)
    numels,  # int64 [n]
    param_index,  # int64 [n]: probe counters
    element_offset,  # int64 [n]: global probe element of each tensor's first element
    prefix,  # the probe vector's key prefix
    delta,  # fp32 [1]: the finite-difference step (a device scalar)
    sign,  # +1 or -1: which side of x~
    X_DTYPE: tl.constexpr,  # element type of x, base and save
    HAS_BASE: tl.constexpr,
    HAS_SAVE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32
):
    slot, start, numel, offs, mask, z = _probe_tile(blocks, numels, param_index, element_offset, prefix, BLOCK)
    step = sign * tl.load(delta)  # exact: sign is +-1
    xp = _ptr(x_ptrs, slot, X_DTYPE, ALIGNED)
    bp = _ptr(base_ptrs, slot, X_DTYPE, ALIGNED)
    sp = _ptr(save_ptrs, slot, X_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _fd_move_tile(xp, bp, sp, offs, mask, step, z, X_DTYPE, HAS_BASE, HAS_SAVE, True)
    else:
        _fd_move_tile(xp, bp, sp, offs, mask, step, z, X_DTYPE, HAS_BASE, HAS_SAVE, False)


@triton.jit
def _fd_fold_tile(ap, gp, bp, offs, mask, coefficient, delta, z, X_DTYPE: tl.constexpr,
                  HAS_BASELINE: tl.constexpr, FIRST: tl.constexpr, EVEN: tl.constexpr):
    diff = _ld(gp, offs, mask, EVEN).to(tl.float32)
    if HAS_BASELINE:
        diff = diff - _ld(bp, offs, mask, EVEN).to(tl.float32)
    # (g - baseline) * z * coefficient / delta: the update's quotient's roundings when coefficient = 1
    term = tl.div_rn(diff * z * coefficient, delta)
    if not FIRST:
        term = _ld(ap, offs, mask, EVEN).to(tl.float32) + term
    _st(ap, offs, _round_to(term, X_DTYPE), mask, EVEN)


@triton.jit(do_not_specialize=["prefix"])
def fd_fold_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    acc_ptrs,  # int64 [n]: the running sum (written; may alias grads or baselines)
    g_ptrs,  # int64 [n]: this pass's gradient
    base_ptrs,  # int64 [n]: subtracted from it (if HAS_BASELINE)
    numels,  # int64 [n]
    param_index,  # int64 [n]: probe counters
    element_offset,  # int64 [n]: global probe element of each tensor's first element
    prefix,  # the probe vector's key prefix
    delta,  # fp32 [1]: the finite-difference step
    coefficient,  # the pass's weight: 1/S (forward) or -1/(2S) (central)
    X_DTYPE: tl.constexpr,  # element type of acc, grads and baselines
    HAS_BASELINE: tl.constexpr,
    FIRST: tl.constexpr,  # acc starts from zero (the first fold)
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32
):
    slot, start, numel, offs, mask, z = _probe_tile(blocks, numels, param_index, element_offset, prefix, BLOCK)
    dlt = tl.load(delta)
    ap = _ptr(acc_ptrs, slot, X_DTYPE, ALIGNED)
    gp = _ptr(g_ptrs, slot, X_DTYPE, ALIGNED)
    bp = _ptr(base_ptrs, slot, X_DTYPE, ALIGNED)
    if start + BLOCK <= numel:
        _fd_fold_tile(ap, gp, bp, offs, mask, coefficient, dlt, z, X_DTYPE, HAS_BASELINE, FIRST, True)
    else:
        _fd_fold_tile(ap, gp, bp, offs, mask, coefficient, dlt, z, X_DTYPE, HAS_BASELINE, FIRST, False)


# ------------------------------------------------------------------- update
@triton.jit
def _hutchinson(y_ptrs, prefixes, pidx, slot, n, gp, g, word, bits, offs, mask, delta,
                X_DTYPE: tl.constexpr, MODE: tl.constexpr, N_SAMPLES: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """h of one tile: the sample mean of z * Hz, however Hz was obtained (MODE)."""
    h = tl.zeros([BLOCK // 32, 32], tl.float32)
    for s in tl.static_range(N_SAMPLES):
        # an absent y (null pointer) counts as zero; the load then reads the
        # gradient instead, so it needs no mask
        present = tl.load(y_ptrs + s * n + slot) != 0
        yp = _ptr(y_ptrs + s * n, slot, X_DTYPE, ALIGNED)
        y = _ld(tl.where(present, yp, gp), offs, mask, EVEN).to(tl.float32)
        if MODE == 3:  # PRECOMPUTED: y is h
            h += tl.where(present, y, 0.0)
        else:
            k0, k1 = _param_key(tl.load(prefixes + s), pidx)
            z = _rademacher(word, bits, k0, k1)  # regenerated from the counters, never read
            if MODE == 2:  # FD_DIRECT: h = (y - g) * z / delta
                h += tl.where(present, tl.div_rn((y - g) * z, delta), 0.0)
            else:  # AUTOGRAD: h = (1/S) sum_s z_s * (H z_s)
                h += tl.where(present, z * y, 0.0)
    if MODE == 1:
        h = tl.div_rn(h, tl.full((), N_SAMPLES, tl.float32))
    return h


@triton.jit
def _load_state(p, sp, offs, grp, mask, gmask, HESSIAN: tl.constexpr, STATE_BITS: tl.constexpr,
                EVEN: tl.constexpr):
    """m (or D: HESSIAN) of a tile as float32, decoded from its encoding (``grp``: the rows' groups)."""
    v = _ld(p, offs, mask, EVEN)
    if STATE_BITS == 8:
        s = _ld(sp, grp, gmask, EVEN)
        if HESSIAN:
            v = _decode_hessian(v, s)
        else:
            v = _decode_momentum(v, s)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def _store_state(p, sp, offs, grp, v, mask, gmask, HESSIAN: tl.constexpr, STATE_BITS: tl.constexpr,
                 EVEN: tl.constexpr):
    """Store m (or D) of a tile in its encoding: float32, bf16 (nearest even), or 8-bit codes and group scales."""
    if STATE_BITS == 8:
        if not EVEN:
            v = tl.where(mask, v, 0.0)  # elements past the tensor do not count in a group's scale
        if HESSIAN:
            q, s = _encode_hessian(v)
        else:
            q, s = _encode_momentum(v)
        _st(p, offs, q, mask, EVEN)
        _st(sp, grp, s, gmask, EVEN)
    elif STATE_BITS == 16:
        _st(p, offs, _round_to(v, tl.bfloat16), mask, EVEN)
    else:
        _st(p, offs, v, mask, EVEN)


@triton.jit
def _update_tile(
    x_ptrs, xt_ptrs, g_ptrs, m_ptrs, d_ptrs, ms_ptrs, ds_ptrs, c_ptrs, y_ptrs, prefixes, pidx, slot, n, start,
    numel, offs, word, bits, mask, neg_step, decay, beta1, omb1, beta2, omb2, c2, eps, power, delta, h_floor,
    X_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STATE_BITS: tl.constexpr, MASTER_BITS: tl.constexpr,
    MODE: tl.constexpr, N_SAMPLES: tl.constexpr, POWER_MODE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    gp = _ptr(g_ptrs, slot, X_DTYPE, ALIGNED)
    mp = _ptr(m_ptrs, slot, S_DTYPE, ALIGNED)
    if STATE_BITS == 8:
        dp = _ptr(d_ptrs, slot, tl.uint8, ALIGNED)
    else:
        dp = _ptr(d_ptrs, slot, S_DTYPE, ALIGNED)
    xp = _ptr(x_ptrs, slot, X_DTYPE, ALIGNED)
    # state_bits=8: row r of the tile is group (start / 32) + r, with its scale
    grp = start // GROUP + tl.arange(0, BLOCK // GROUP)[:, None]
    gmask = grp * GROUP < numel
    msp = _ptr(ms_ptrs, slot, tl.float32, ALIGNED)
    dsp = _ptr(ds_ptrs, slot, tl.float32, ALIGNED)
    # The order keeps few arrays live at once (registers: tests/test_triton_compile.py):
    # D and its refresh first, then g~ and m, x_t last. An autograd refresh's h needs
    # no g~, which is loaded after it; the other modes floor h by |g~| and load it first.
    if MODE == 1:
        g = 0.0  # not read by the autograd refresh
    else:
        g = _ld(gp, offs, mask, EVEN).to(tl.float32)
    if STATE_BITS == 8 and MODE == 0 and POWER_MODE == 0:
        # 8-bit state, sqrt power, no refresh: sqrt(D) / c2 straight from the codes (encoding.hessian_root
        # with the group scales over c2)
        pre = _hessian_root(_ld(dp, offs, mask, EVEN), tl.div_rn(_ld(dsp, grp, gmask, EVEN), c2))
    else:
        d = _load_state(dp, dsp, offs, grp, mask, gmask, True, STATE_BITS, EVEN)
        if MODE != 0:
            h = _hutchinson(y_ptrs, prefixes, pidx, slot, n, gp, g, word, bits, offs, mask, delta, X_DTYPE, MODE,
                            N_SAMPLES, ALIGNED, BLOCK, EVEN)
            if MODE != 1:  # finite differences resolve |h| only down to h_floor * |g~|
                h = tl.maximum(tl.abs(h), h_floor * tl.abs(g))
            d = _hessian_ema(d, h, beta2, omb2)
            _store_state(dp, dsp, offs, grp, d, mask, gmask, True, STATE_BITS, EVEN)  # D: on refresh steps only
        pre = _preconditioner(d, c2, power, POWER_MODE)
    if MODE == 1:
        g = _ld(gp, offs, mask, EVEN).to(tl.float32)
    m = _momentum(_load_state(mp, msp, offs, grp, mask, gmask, False, STATE_BITS, EVEN), g, beta1, omb1)
    if STATE_BITS == 8:  # 8-bit: m's codes are stored before x_t is read (fewer values live across the group maxima)
        _store_state(mp, msp, offs, grp, m, mask, gmask, False, STATE_BITS, EVEN)
    # x_t is read last: on refresh steps it is not held through the Hutchinson sum
    xt = _ld(_ptr(xt_ptrs, slot, X_DTYPE, ALIGNED), offs, mask, EVEN)
    if MASTER_BITS != 0:  # bf16 params: the update starts from the float32 master weight
        if MASTER_BITS == 24:
            cp = _ptr(c_ptrs, slot, tl.int8, ALIGNED)
        else:
            cp = _ptr(c_ptrs, slot, tl.int16, ALIGNED)
        x = _join_master(xt, _ld(cp, offs, mask, EVEN), MASTER_BITS)
        x_new = _new_param(x, m, pre, neg_step, decay, eps)
        high, low = _split_master(x_new, MASTER_BITS)
        _st(xp, offs, high, mask, EVEN)
        _st(cp, offs, low, mask, EVEN)
    else:
        x_new = _new_param(xt.to(tl.float32), m, pre, neg_step, decay, eps)
        _st(xp, offs, _round_to(x_new, X_DTYPE), mask, EVEN)
    if STATE_BITS != 8:
        _store_state(mp, msp, offs, grp, m, mask, gmask, False, STATE_BITS, EVEN)


@triton.jit
def _restore_tile(x_ptrs, xt_ptrs, slot, offs, mask, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                  EVEN: tl.constexpr):
    """A param that is not live: x = x_t, bit for bit; state (and master correction) untouched."""
    xt = _ld(_ptr(xt_ptrs, slot, X_DTYPE, ALIGNED), offs, mask, EVEN)
    _st(_ptr(x_ptrs, slot, X_DTYPE, ALIGNED), offs, xt, mask, EVEN)


@triton.jit
def update_kernel(
    blocks,  # int64 [n_programs, 2]: (tensor slot, first element) of each tile
    x_ptrs,  # int64 [n]: x (param, written)
    xt_ptrs,  # int64 [n]: x_t, the point the update starts from (a backup, or x itself)
    g_ptrs,  # int64 [n]: the gradient at the perturbed point, g~
    m_ptrs,  # int64 [n]: exp_avg (S_DTYPE: fp32, bf16, or int8 codes at STATE_BITS 8)
    d_ptrs,  # int64 [n]: exp_hessian_diag (S_DTYPE, or uint8 codes at STATE_BITS 8)
    ms_ptrs,  # int64 [n]: exp_avg's fp32 group scales (STATE_BITS 8; else any column, not read)
    ds_ptrs,  # int64 [n]: exp_hessian_diag's fp32 group scales (STATE_BITS 8; else not read)
    c_ptrs,  # int64 [n]: master corrections, int8 (MASTER_BITS 24) / int16 (32) (else not read)
    y_ptrs,  # int64 [N_SAMPLES, n]: refresh input per sample (MODE; 0: absent, counts as 0)
    numels,  # int64 [n]
    param_index,  # int64 [n]: probe counters
    element_offset,  # int64 [n]: global probe element of each tensor's first element
    prefixes,  # int64 [N_SAMPLES]: key prefix of each sample's probe vector
    n,  # tensors of the launch (the row length of y_ptrs)
    scalars,  # fp32 [n, U_COUNT]: per-tensor update scalars (functional.update_scalars)
    power,  # hessian_power of the step
    fd,  # fp32 [2]: the finite-difference step delta and h_floor (read in the FD modes)
    X_DTYPE: tl.constexpr,  # element type of x, x_t, g~ and y
    S_DTYPE: tl.constexpr,  # element type of exp_avg (fp32 at STATE_BITS 32, bf16 at 16, int8 at 8)
    STATE_BITS: tl.constexpr,  # 32 / 16 / 8: the state's encoding (sassha_fused.encoding)
    MASTER_BITS: tl.constexpr,  # 0, or 24 / 32: bf16 params with a master correction
    MODE: tl.constexpr,  # MODE_NONE / MODE_AUTOGRAD / MODE_FD_DIRECT / MODE_PRECOMPUTED
    N_SAMPLES: tl.constexpr,  # rows of y_ptrs (S for AUTOGRAD, 1 otherwise)
    POWER_MODE: tl.constexpr,  # POWER_SQRT / POWER_ONE / POWER_GENERAL
    ALIGNED: tl.constexpr,  # every data pointer of the launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per tile, a multiple of 32 (a tile holds whole groups)
):
    # the parts of a last tile cover it, each in whole 32-element rows
    tl.static_assert(BLOCK // TAIL_PARTS * TAIL_PARTS == BLOCK)
    tl.static_assert(BLOCK // TAIL_PARTS % 32 == 0)
    slot, start, numel = _tile(blocks, numels, BLOCK)
    sc = scalars + slot * U_COUNT
    # A [BLOCK/32, 32] tile: row r starts in probe word ((element_offset + start) >> 5) + r,
    # so on refresh steps the hashes are computed once per 32 elements; at STATE_BITS 8
    # row r is also a group of the encoding (groups start at the tensor's element 0).
    first = tl.load(element_offset + slot)
    offs, word, bits = _word_tile(start, first, BLOCK)
    mask = offs < numel
    if tl.load(sc + U_LIVE) != 0:
        neg_step = tl.load(sc + U_NEG_STEP)
        decay = tl.load(sc + U_DECAY)
        beta1 = tl.load(sc + U_BETA1)
        omb1 = tl.load(sc + U_ONE_MINUS_BETA1)
        beta2 = tl.load(sc + U_BETA2)
        omb2 = tl.load(sc + U_ONE_MINUS_BETA2)
        c2 = tl.load(sc + U_C2)
        eps = tl.load(sc + U_EPS)
        dlt = 1.0
        h_floor = 0.0
        if MODE == 2:
            dlt = tl.load(fd)
        if MODE >= 2:
            h_floor = tl.load(fd + 1)
        pidx = tl.load(param_index + slot)
        if start + BLOCK <= numel:
            _update_tile(x_ptrs, xt_ptrs, g_ptrs, m_ptrs, d_ptrs, ms_ptrs, ds_ptrs, c_ptrs, y_ptrs, prefixes, pidx,
                         slot, n, start, numel, offs, word, bits, mask, neg_step, decay, beta1, omb1, beta2, omb2,
                         c2, eps, power, dlt, h_floor, X_DTYPE, S_DTYPE, STATE_BITS, MASTER_BITS, MODE, N_SAMPLES,
                         POWER_MODE, ALIGNED, BLOCK, True)
        else:
            # A tensor's last tile moves element by element under a mask, each access with its
            # own 64-bit address: it goes in TAIL_PARTS parts, a loop the compiler keeps, so that
            # only a part's addresses are live at once. Whole, the refresh variants took up to
            # 179 registers with triton 3.6 (the full tile's vector path: at most 76).
            for part in range(TAIL_PARTS):
                sub = start + part * (BLOCK // TAIL_PARTS)
                if sub < numel:
                    sub_offs, sub_word, sub_bits = _word_tile(sub, first, BLOCK // TAIL_PARTS)
                    _update_tile(x_ptrs, xt_ptrs, g_ptrs, m_ptrs, d_ptrs, ms_ptrs, ds_ptrs, c_ptrs, y_ptrs, prefixes,
                                 pidx, slot, n, sub, numel, sub_offs, sub_word, sub_bits, sub_offs < numel, neg_step,
                                 decay, beta1, omb1, beta2, omb2, c2, eps, power, dlt, h_floor, X_DTYPE, S_DTYPE,
                                 STATE_BITS, MASTER_BITS, MODE, N_SAMPLES, POWER_MODE, ALIGNED, BLOCK // TAIL_PARTS, False)
    else:
        if start + BLOCK <= numel:
            _restore_tile(x_ptrs, xt_ptrs, slot, offs, mask, X_DTYPE, ALIGNED, True)
        else:
            _restore_tile(x_ptrs, xt_ptrs, slot, offs, mask, X_DTYPE, ALIGNED, False)
