"""The Triton update on compact state (issue 22) against the eager reference.

``state_bits`` 16 (bfloat16 m and D) and 8 (int8 / uint8 codes with a float32 scale
per group of 32 elements), ``master_weight_bits`` 24 / 32 (bfloat16 params with a
master correction): the fused update decodes, computes and encodes in one pass, as
``sassha_fused/encoding.py`` states the encodings.

Runs under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by
conftest.py) and unchanged on a CUDA machine; the interpreter is slow, so sizes and
step counts are small.

Tolerances. Given the same float32 ``m_new``, ``D_new`` and ``x_new`` the codes,
scales and corrections are the reference's bit for bit (``test_codecs_*``,
``test_codes_bitwise_after_one_refresh``). Where the float32 results differ in their
last bits (fused multiply-adds on a GPU, another summation order), a result next to a
rounding boundary of its encoding lands on the neighbouring code, so state is compared
decoded, within one code step of its group's scale on top of ``parity.TOLERANCE``:

- m: ``t = q / 127`` decodes to ``t |t| s``: one code moves m by at most
  ``(2 * 127 - 1) / 127**2 * s`` (``parity.code_step``);
- D: ``((q / 255) s)**2``, ``s`` the group's largest ``sqrt(D)``: one code moves D by at
  most ``(2 * 255 - 1) / 255**2 * s**2``;
- bfloat16 state: one bfloat16 rounding step (``eps`` relative to the larger value);
- bfloat16 params without a master: ``parity.TOLERANCE[bfloat16]``;
- master weights (compared joined, ``encoding.join_master``): the float32 tolerance,
  plus for 24 bits one step of the 24-bit master (16 significand bits: ``2**-15``
  relative).

Trajectories run in lockstep: after every step the Triton optimizer's params and
state are set to the reference's, so one rounding-boundary case (a code one step
off) is not carried into the next steps, where its effect has no useful bound; each
step is then compared from the same inputs, several steps with refreshes and plain
steps in turn.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import pytest
import torch

from conftest import requires_triton
from parity import (
    DEVICE,
    EDGE_SIZES,
    TOLERANCE,
    assert_close_tensors,
    assert_within,
    code_step,
    clone_params,
    coupled_loss,
    make_params,
    phase_groups,
    protocol_step,
    sync_run,
)
from sassha_fused import SASSHA
from sassha_fused.encoding import (
    GROUP,
    decode_hessian,
    decode_momentum,
    encode_hessian,
    encode_momentum,
    join_master,
    n_groups,
    scales_shape,
    split_master,
    state_keys,
)

pytestmark = requires_triton

# one element; a partial group; a full and a partial group; several groups; a 2-D param
# (3, 700) with a full tile (2048) and a partial one ending in a partial group; empty
SIZES = (1, 31, 33, 300, 2100, 0)
MASTER24_STEP = 2.0 ** -15  # one step of a 24-bit master, relative
_COUNTERS = ("step", "bias_correction2")


def _triton(**kwargs):
    from sassha_fused.backends.triton_backend import TritonBackend

    return TritonBackend(**kwargs)


def _per_element(scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Each element's group scale (float64, shaped like ``like``)."""
    flat = scales.to(torch.float64).repeat_interleave(GROUP)[:like.numel()]
    return flat.view(like.shape)


def _assert_codes_close(ref_codes, ref_scales, codes, scales, decode, key, what: str) -> None:
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape, what
    assert scales.dtype == torch.float32 and scales.shape == ref_scales.shape == scales_shape(ref_codes.shape), what
    if ref_codes.numel() == 0:
        return
    assert_close_tensors(ref_scales, scales, torch.float32, f"{what} scales")
    off = (codes.to(torch.int32) - ref_codes.to(torch.int32)).abs().max()
    assert off <= 1, f"{what}: a code {off} steps off"
    a = decode(ref_codes, ref_scales).to(torch.float64)
    b = decode(codes, scales).to(torch.float64)
    rtol, atol = TOLERANCE[torch.float32]
    # (the scales may differ by rtol; D is quadratic in its scale: 2 rtol relative)
    power = 1 if key == "exp_avg_codes" else 2
    tol = _per_element(code_step(key, torch.maximum(ref_scales, scales)), a) + power * rtol * a.abs() + atol
    assert_within(b.reshape(-1), a.reshape(-1), tol.reshape(-1), f"{what} (decoded)")


def assert_state_close(k: int, rp: torch.Tensor, rs: Dict[str, Any], p: torch.Tensor, s: Dict[str, Any]) -> None:
    """Param ``k`` and every state entry of the Triton run against the reference's."""
    assert set(rs) == set(s), f"param {k}: state keys {sorted(rs)} != {sorted(s)}"
    what = f"param {k} (shape {tuple(p.shape)})"
    if not rs:  # no state (an empty param takes no part)
        assert torch.equal(rp, p), what
        return
    if "master_correction" in rs:
        assert s["master_correction"].dtype == rs["master_correction"].dtype
        a, b = join_master(rp, rs["master_correction"]), join_master(p, s["master_correction"])
        extra = MASTER24_STEP if rs["master_correction"].dtype == torch.int8 else 0.0
        assert_close_tensors(a, b, torch.float32, f"{what} master weight", extra)
    else:
        assert_close_tensors(rp, p, p.dtype, what)
    if "exp_avg_codes" in rs:
        _assert_codes_close(rs["exp_avg_codes"], rs["exp_avg_scales"], s["exp_avg_codes"], s["exp_avg_scales"],
                            decode_momentum, "exp_avg_codes", f"{what} exp_avg")
        _assert_codes_close(rs["exp_hessian_diag_codes"], rs["exp_hessian_diag_scales"],
                            s["exp_hessian_diag_codes"], s["exp_hessian_diag_scales"], decode_hessian, "exp_hessian_diag_codes",
                            f"{what} exp_hessian_diag")
    else:
        for key in ("exp_avg", "exp_hessian_diag"):
            assert s[key].dtype == rs[key].dtype, f"{what} {key}: {s[key].dtype} != {rs[key].dtype}"
            if rs[key].dtype != torch.bfloat16:
                assert_close_tensors(rs[key], s[key], rs[key].dtype, f"{what} {key}")
                continue
            # one bfloat16 rounding step (eps relative to the larger) on top of float32's tolerance
            a, b = rs[key].to(torch.float64).reshape(-1), s[key].to(torch.float64).reshape(-1)
            rtol, atol = TOLERANCE[torch.float32]
            tol = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs()) + rtol * a.abs() + atol
            assert_within(b, a, tol, f"{what} {key}")
    for key in _COUNTERS:
        assert math.isclose(float(rs[key]), float(s[key]), rel_tol=1e-12), f"{what} {key}"


def _lockstep(sizes, dtype, steps: int, **kwargs: Any):
    """Eager and Triton SASSHA side by side, compared (and re-synchronised) after every step."""
    start = make_params(sizes, dtype)
    ref_p, tri_p = clone_params(start), clone_params(start)
    backend = _triton()
    ref = SASSHA(ref_p, backend="eager", **kwargs)
    tri = SASSHA(tri_p, backend=backend, **kwargs)
    for t in range(steps):
        protocol_step(ref, lambda: coupled_loss(ref_p, t), "closure")
        protocol_step(tri, lambda: coupled_loss(tri_p, t), "closure")
        for k, (rp, p) in enumerate(zip(ref_p, tri_p)):
            assert_state_close(k, rp, ref.state[rp], p, tri.state[p])
        moved = [not torch.equal(a, b) for a, b in zip(start, tri_p) if a.numel()]
        assert any(moved), f"step {t}: the Triton run did not move the params"
        sync_run(ref_p, ref, tri_p, tri)
    assert backend.launches > 0 and set(tri.backends.values()) == {"triton"}
    return ref_p, ref, tri_p, tri


# --------------------------------------------------------------- trajectories
@pytest.mark.parametrize(
    "state_bits, master_bits, dtype, extra",
    [
        (16, None, torch.float32, {}),
        (8, None, torch.float32, {}),
        (8, None, torch.float32, {"n_samples": 2, "weight_decay": 0.0}),
        (8, None, torch.float32, {"hvp": "finite_difference"}),
        (16, None, torch.bfloat16, {}),
        (8, None, torch.bfloat16, {}),
        (8, None, torch.float16, {"hessian_power": 1.0}),
        (32, 24, torch.bfloat16, {}),
        (32, 32, torch.bfloat16, {}),
        (16, 24, torch.bfloat16, {}),
        (16, 32, torch.bfloat16, {"hessian_power": 0.75}),
        (8, 24, torch.bfloat16, {}),
        (8, 32, torch.bfloat16, {"hvp": "finite_difference"}),
    ],
)
def test_lockstep_matches_eager(state_bits, master_bits, dtype, extra):
    kwargs = dict(lr=0.05, lazy_hessian=2, weight_decay=1e-2, state_bits=state_bits, master_weight_bits=master_bits)
    kwargs.update(extra)
    _, ref, tri_p, tri = _lockstep(SIZES, dtype, 6, **kwargs)
    for p in tri_p:
        if p.numel():
            assert tri.float_state(p)["exp_hessian_diag"].abs().sum() > 0
            if master_bits is not None:
                assert tri.state[p]["master_correction"].any(), "the master corrections were written"


def test_state_bits_8_with_mixed_dtypes_and_master_weights():
    # one bucket per dtype: bf16 params with master corrections next to fp32 ones without
    start = make_params(SIZES, torch.float32)
    start[1:4] = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in start[1:4]]
    ref_p, tri_p = clone_params(start), clone_params(start)
    kwargs = dict(lr=0.05, lazy_hessian=2, state_bits=8, master_weight_bits=24)
    ref = SASSHA(ref_p, backend="eager", **kwargs)
    tri = SASSHA(tri_p, backend=_triton(), **kwargs)
    for t in range(4):
        protocol_step(ref, lambda: coupled_loss(ref_p, t), "official")
        protocol_step(tri, lambda: coupled_loss(tri_p, t), "official")
        for k, (rp, p) in enumerate(zip(ref_p, tri_p)):
            assert ("master_correction" in tri.state[p]) == (p.dtype == torch.bfloat16)
            assert_state_close(k, rp, ref.state[rp], p, tri.state[p])
        sync_run(ref_p, ref, tri_p, tri)


# ------------------------------------------------------------------ bitwise codes
@pytest.mark.parametrize("state_bits, dtype", [(8, torch.float32), (8, torch.bfloat16), (16, torch.float32)])
def test_codes_bitwise_after_one_refresh(state_bits, dtype):
    # betas (0, 0): m_new = g and D_new = |z * Hz| exactly (one autograd sample, rho 0: the
    # gradient is taken at x itself), so both backends encode the same float32 values and
    # the codes and scales (bfloat16 values at 16 bits) are the reference's bit for bit
    start = make_params(SIZES, dtype)
    ref_p, tri_p = clone_params(start), clone_params(start)
    kwargs = dict(lr=0.05, betas=(0.0, 0.0), rho=0.0, n_samples=1, hvp="autograd", lazy_hessian=1,
                  state_bits=state_bits)
    ref = SASSHA(ref_p, backend="eager", **kwargs)
    tri = SASSHA(tri_p, backend=_triton(), **kwargs)
    ref.step(lambda: coupled_loss(ref_p, 0))
    tri.step(lambda: coupled_loss(tri_p, 0))
    for k, (rp, p) in enumerate(zip(ref_p, tri_p)):
        if not p.numel():
            continue
        keys = state_keys(state_bits)
        for key in keys:
            a, b = ref.state[rp][key], tri.state[p][key]
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), f"param {k} {key} differs"
        assert ref.state[rp][keys[0]].any() and ref.state[rp][keys[-2 if state_bits == 8 else -1]].any()


# Small kernels running the update's encode / decode / master helpers on given values
# (defined only where triton imports; the tests are skipped elsewhere).
try:
    import triton
    import triton.language as tl

    from sassha_fused.triton_kernels import sassha as K
except Exception:  # triton missing or broken: requires_triton skips the tests
    triton = None

if triton is not None:
    @triton.jit
    def _encode_kernel(v_ptr, mq_ptr, ms_ptr, dq_ptr, ds_ptr, m_ptr, d_ptr, numel, R: tl.constexpr):
        rows = tl.arange(0, R)[:, None]
        offs = rows * 32 + tl.arange(0, 32)[None, :]
        mask = offs < numel
        gmask = rows * 32 < numel
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        q, s = K._encode_momentum(v)
        tl.store(mq_ptr + offs, q, mask=mask)
        tl.store(ms_ptr + rows, s, mask=gmask)
        tl.store(m_ptr + offs, K._decode_momentum(q, s), mask=mask)
        d = tl.abs(v)
        q, s = K._encode_hessian(d)
        tl.store(dq_ptr + offs, q, mask=mask)
        tl.store(ds_ptr + rows, s, mask=gmask)
        tl.store(d_ptr + offs, K._decode_hessian(q, s), mask=mask)

    @triton.jit
    def _master_kernel(x_ptr, h24_ptr, c24_ptr, h32_ptr, c32_ptr, j24_ptr, j32_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        h, c = K._split_master(x, 24)
        tl.store(h24_ptr + offs, h, mask=mask)
        tl.store(c24_ptr + offs, c, mask=mask)
        tl.store(j24_ptr + offs, K._join_master(h, c, 24), mask=mask)
        h, c = K._split_master(x, 32)
        tl.store(h32_ptr + offs, h, mask=mask)
        tl.store(c32_ptr + offs, c, mask=mask)
        tl.store(j32_ptr + offs, K._join_master(h, c, 32), mask=mask)

    @triton.jit
    def _join_kernel(h_ptr, c_ptr, out_ptr, numel, MASTER_BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = K._join_master(tl.load(h_ptr + offs, mask=mask), tl.load(c_ptr + offs, mask=mask), MASTER_BITS)
        tl.store(out_ptr + offs, x, mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def test_codecs_encode_bitwise_like_the_reference():
    gen = torch.Generator().manual_seed(3)
    groups = [
        torch.randn(32, generator=gen),  # an ordinary group
        torch.randn(32, generator=gen) * 10.0 ** torch.randint(-30, 30, (32,), generator=gen),  # wide magnitudes
        torch.zeros(32),  # scale 0: u = 0, codes 0
        torch.tensor([0.0] * 31 + [-3.0]),  # one entry: the rest encode 0 (D: 0, not the floor)
        torch.tensor([1e-30] * 16 + [2.0] * 16),  # far below the scale: D's floor code 1
        torch.tensor([-0.0, 0.0, 1.0, -1.0] * 8),
        torch.rand(32, generator=gen).round(decimals=2) - 0.5,  # repeated values
    ]
    v = torch.cat(groups + [torch.randn(19, generator=gen)])  # and a partial last group
    n, r = v.numel(), 1 << (n_groups(v.numel()) - 1).bit_length()
    v = v.to(DEVICE)
    mq, dq = torch.empty(n, dtype=torch.int8, device=DEVICE), torch.empty(n, dtype=torch.uint8, device=DEVICE)
    ms, ds = (torch.empty(n_groups(n), dtype=torch.float32, device=DEVICE) for _ in range(2))
    m, d = (torch.empty(n, dtype=torch.float32, device=DEVICE) for _ in range(2))
    _encode_kernel[(1,)](v, mq, ms, dq, ds, m, d, n, R=r)
    ref_mq, ref_ms = encode_momentum(v)
    ref_dq, ref_ds = encode_hessian(v.abs())
    assert torch.equal(mq, ref_mq) and torch.equal(_bits(ms), _bits(ref_ms))
    assert torch.equal(dq, ref_dq) and torch.equal(_bits(ds), _bits(ref_ds))
    assert torch.equal(_bits(m), _bits(decode_momentum(ref_mq, ref_ms)))
    assert torch.equal(_bits(d), _bits(decode_hessian(ref_dq, ref_ds)))
    assert ref_dq[4 * 32:4 * 32 + 16].eq(1).all()  # the floor code was exercised


def test_codecs_master_split_and_join_bitwise_like_the_reference():
    gen = torch.Generator().manual_seed(4)
    special = torch.tensor([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0xFF7FFFFF,
                            0x7F7F8000, 0x7F7FFF80, 0x00000001, 0x80007FFF, 0x00008000, 0x3F808000, 0x3F818000,
                            0xBF808000, 0x3F800080, 0x3F800180, 0x3F80807F, 0x3F807F80, 0xC07FFF80],
                           dtype=torch.int64)
    random = torch.randint(0, 1 << 32, (3000,), generator=gen, dtype=torch.int64)
    bits = torch.cat([special, random])
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32).to(DEVICE)
    n = x.numel()
    h24, h32 = (torch.empty(n, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    c24, c32 = torch.empty(n, dtype=torch.int8, device=DEVICE), torch.empty(n, dtype=torch.int16, device=DEVICE)
    j24, j32 = (torch.empty(n, dtype=torch.float32, device=DEVICE) for _ in range(2))
    _master_kernel[(_cdiv(n, 1024),)](x, h24, c24, h32, c32, j24, j32, n, BLOCK=1024)
    nan = torch.isnan(x)
    for bits_, h, c, j in ((24, h24, c24, j24), (32, h32, c32, j32)):
        ref_h, ref_c = split_master(x, bits_)
        assert torch.equal(c, ref_c), f"{bits_}: corrections differ"
        same = _bits(h) == _bits(ref_h)
        assert (same | (nan & torch.isnan(h) & torch.isnan(ref_h))).all(), f"{bits_}: params differ"
        assert torch.equal(_bits(j), _bits(join_master(h, c))), f"{bits_}: join differs"
        finite = torch.isfinite(x)
        if bits_ == 32:  # the 32-bit master is the float32 value itself
            assert torch.equal(_bits(j)[finite], _bits(x)[finite])
    # join on arbitrary bits: any param and correction, NaN patterns included
    hb = torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int16).view(torch.bfloat16).to(DEVICE)
    cb = torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int16).to(DEVICE)
    for bits_, c in ((24, cb.to(torch.int8)), (32, cb)):
        out = _join_only(hb, c)
        assert torch.equal(_bits(out), _bits(join_master(hb, c))), f"join {bits_}"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _join_only(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = torch.empty(h.numel(), dtype=torch.float32, device=h.device)
    _join_kernel[(_cdiv(h.numel(), 1024),)](h, c, out, h.numel(), MASTER_BITS=24 if c.dtype == torch.int8 else 32,
                                            BLOCK=1024)
    return out


# ---------------------------------------------------------------- skipped steps
@pytest.mark.parametrize("state_bits, master_bits", [(8, 24), (16, 32), (8, None)])
def test_skipped_step_leaves_codes_scales_and_corrections(state_bits, master_bits):
    dtype = torch.bfloat16 if master_bits else torch.float32
    params = make_params((33, 300), dtype)
    opt = SASSHA(params, lr=0.05, lazy_hessian=2, state_bits=state_bits, master_weight_bits=master_bits,
                 backend=_triton())
    for t in range(3):
        opt.step(lambda: coupled_loss(params, t))
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for t in (3, 4):  # with lazy_hessian 2 one of them is a refresh step
        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step(lambda: coupled_loss(params, t) * float("nan"))
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        for key, value in s.items():
            if key not in _COUNTERS:
                assert torch.equal(opt.state[p][key], value), key
    opt.step(lambda: coupled_loss(params, 5))
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


# ------------------------------------------------------------------ the phase
def _compact_bucket(backend, dtype: torch.dtype, sizes, state_bits: int, master_bits: Optional[int], seed: int):
    """A Bucket with random params and random state in the encoding of ``state_bits``."""
    from sassha_fused.backends import Bucket

    gen = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randn(n, generator=gen, dtype=torch.float64)

    params = [rnd(n).to(DEVICE, dtype) for n in sizes]
    b = Bucket(backend=backend, device=torch.device(DEVICE), params=params,
               param_index=[3 * j + 1 for j in range(len(sizes))], group_index=[j % 2 for j in range(len(sizes))],
               backups=[rnd(n).to(DEVICE, dtype) for n in sizes], positions=list(range(len(sizes))),
               state_bits=state_bits)
    for n in sizes:
        m, d = rnd(n).to(DEVICE, torch.float32), rnd(n).abs().to(DEVICE, torch.float32)
        d[::7] = 0.0
        if state_bits == 8:
            mc, ms = encode_momentum(m)
            dc, ds = encode_hessian(d)
            b.exp_avgs.append(mc)
            b.exp_hessian_diags.append(dc)
            b.exp_avg_scales.append(ms)
            b.exp_hessian_diag_scales.append(ds)
        else:
            sdt = torch.bfloat16 if state_bits == 16 else torch.float32
            b.exp_avgs.append(m.to(sdt))
            b.exp_hessian_diags.append(d.to(sdt))
    if master_bits is not None:
        cdt = torch.int8 if master_bits == 24 else torch.int16
        b.master_corrections = [torch.randint(-100, 100, (n,), generator=gen).to(DEVICE, cdt) for n in sizes]
    return b


def _clone(b, backend):
    from sassha_fused.backends import Bucket

    def cl(ts):
        return [None if t is None else t.clone() for t in ts]

    return Bucket(backend=backend, device=b.device, params=cl(b.params), param_index=list(b.param_index),
                  group_index=list(b.group_index), backups=cl(b.backups), positions=list(b.positions),
                  state_bits=b.state_bits, exp_avgs=cl(b.exp_avgs), exp_hessian_diags=cl(b.exp_hessian_diags),
                  exp_avg_scales=cl(b.exp_avg_scales), exp_hessian_diag_scales=cl(b.exp_hessian_diag_scales),
                  master_corrections=cl(b.master_corrections))


def _entries(b, j) -> Dict[str, torch.Tensor]:
    if b.state_bits == 8:
        s = {"exp_avg_codes": b.exp_avgs[j], "exp_avg_scales": b.exp_avg_scales[j],
             "exp_hessian_diag_codes": b.exp_hessian_diags[j], "exp_hessian_diag_scales": b.exp_hessian_diag_scales[j]}
    else:
        s = {"exp_avg": b.exp_avgs[j], "exp_hessian_diag": b.exp_hessian_diags[j]}
    if b.master_corrections:
        s["master_correction"] = b.master_corrections[j]
    return {**s, "step": 1.0, "bias_correction2": 1.0}


@pytest.mark.parametrize(
    "state_bits, master_bits, dtype",
    [(8, None, torch.float32), (16, None, torch.float16), (8, 24, torch.bfloat16), (16, 32, torch.bfloat16)],
)
def test_update_phase_matches_eager_with_params_not_live(state_bits, master_bits, dtype):
    """The update phase on one bucket, every refresh mode, some params not live (state untouched there)."""
    from sassha_fused import functional as F
    from sassha_fused.backends import ProbeKeys, RefreshInput, RefreshMode, get_backend

    eager, backend = get_backend("eager"), _triton()
    sizes = [n for n in EDGE_SIZES if n] + [2100]
    groups = phase_groups()
    keys = ProbeKeys((0x1234567, 0x89ABCDEF))
    gen = torch.Generator().manual_seed(11)
    n = len(sizes)
    for mode, power in ((RefreshMode.NONE, 0.5), (RefreshMode.AUTOGRAD, 0.75), (RefreshMode.FD_DIRECT, 0.5),
                        (RefreshMode.PRECOMPUTED, 1.0)):
        ref = _compact_bucket(eager, dtype, sizes, state_bits, master_bits, seed=int(mode))
        new = _clone(ref, backend)

        def like():
            return [torch.randn(p.numel(), generator=gen, dtype=torch.float64).to(DEVICE, dtype) for p in ref.params]

        grads = like()
        refresh = None
        if mode == RefreshMode.AUTOGRAD:
            refresh = RefreshInput(mode, [[None if (j + s) % 3 == 0 else y for j, y in enumerate(like())]
                                          for s in range(2)], keys)
        elif mode != RefreshMode.NONE:
            ys = [[None if j % 4 == 1 else y for j, y in enumerate(like())]]
            floor = torch.tensor(300.0 if mode == RefreshMode.FD_DIRECT else 0.5, device=DEVICE)
            refresh = RefreshInput(mode, ys, ProbeKeys(keys.prefixes[:1]),
                                   torch.stack([torch.tensor(3e-3, device=DEVICE), floor]))
        live = torch.tensor([0.0 if j % 4 == 2 else 1.0 for j in range(n)], device=DEVICE)
        steps = torch.tensor([3.0 + j for j in range(n)], dtype=torch.float64, device=DEVICE)
        c2 = torch.tensor([0.05 + 0.01 * j for j in range(n)], dtype=torch.float64, device=DEVICE)
        table, _, _ = F.update_scalars(ref, groups, power, refresh is not None, steps, c2, None, live)
        untouched = _clone(new, backend)
        eager.update(ref, ref.backups, grads, table, power, refresh)
        backend.update(new, new.backups, [g.clone() for g in grads], table, power, refresh)
        for j in range(n):
            what = f"mode {mode}"
            if live[j] == 0:
                assert torch.equal(new.params[j], new.backups[j]), "a param that is not live is x_t again"
                for key, value in _entries(untouched, j).items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(_entries(new, j)[key], value), f"{what}: param {j} {key} was written"
                continue
            if refresh is None:  # D is not written on plain steps
                for key in ("exp_hessian_diag_codes", "exp_hessian_diag_scales", "exp_hessian_diag"):
                    if key in _entries(new, j):
                        assert torch.equal(_entries(new, j)[key], _entries(untouched, j)[key]), key
            assert_state_close(j, ref.params[j], _entries(ref, j), new.params[j], _entries(new, j))


@pytest.mark.parametrize("state_bits, master_bits", [(16, None), (8, None), (8, 24)])
def test_compact_state_takes_the_same_launches(state_bits, master_bits):
    # decode, compute and encode in the one update launch: a step makes the launches of state_bits=32
    def launches(**kwargs):
        backend = _triton()
        params = make_params([3, 40, 33], torch.bfloat16)
        opt = SASSHA(params, lazy_hessian=2, n_samples=2, backend=backend, **kwargs)
        counts = []
        for t in range(2):  # a refresh step, a plain step
            before = backend.launches
            opt.step(lambda: coupled_loss(params, t))
            counts.append(backend.launches - before)
        return counts

    assert launches(state_bits=state_bits, master_weight_bits=master_bits) == launches() == [12, 6]
