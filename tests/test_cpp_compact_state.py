"""The C++ backend's update with compact state (``state_bits`` 16 / 8) and master weights.

The cpp update decodes, computes and encodes in one pass (``csrc/sassha_ops.cpp``,
the encodings in ``csrc/sassha_math.h``); the reference is ``sassha_fused/encoding.py``
through the eager backend. Three kinds of checks:

- trajectories: both optimizers run many steps (refreshes included, autograd and
  finite-difference HVPs) in lockstep; after every step every state entry is compared,
  then the cpp optimizer is given the reference's params and state again, so each step
  starts from the same values. Float results may differ in the last bits (another
  operation order, other vector widths), and a last-bit difference can move a code by
  one step: codes within one step, decoded values within one code step of their group
  scale plus the float tolerance of ``parity.py``, master weights compared joined;
- bitwise: where the float32 values fed to the encoders are exact (beta1 = 0: m_new = g;
  beta2 = 0 with one autograd sample: D_new = |z * Hz| = |Hz|; beta1 = 1: m_new is the
  decoded m; no step: x_new = x_t * decay, one product), codes, scales and corrections
  equal the reference's bit for bit;
- a param that is not live (a skipped step) keeps its codes, scales and corrections.
"""

from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch

from conftest import requires_cpp, requires_cuda_backend
from parity import (TOLERANCE, clone_params, code_step, coupled_loss, fd_bound, make_params, phase_groups,
                    protocol_step, sync_run)
from sassha_fused import SASSHA, encoding
from sassha_fused.backends import Bucket, ProbeKeys, RefreshInput, RefreshMode, UpdateCol, get_backend

# odd sizes: one element, a group short and a group over, a 2-D param (3 x 11 and 3 x 32 by
# parity.shape_for), a param of whole groups and a partial one, several CPU chunks (16384)
SIZES = (1, 31, 33, 1000, 96, 40003)


def cpp():
    return get_backend("cpp")


def _groups(ps):
    return [dict(params=ps[:3], lr=0.02, weight_decay=0.05, rho=0.1),
            dict(params=ps[3:], lr=0.01, betas=(0.8, 0.99))]


def _state_tensors(opt, p) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k not in ("step",
                                                                                                "bias_correction2")}


def _tol(dtype, extra=0.0):
    rtol, atol = TOLERANCE[dtype]
    return rtol + extra, atol + extra


def _assert_within(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    dev = (a.double() - b.double()).abs()
    bad = (dev > bound) | (a.isnan() != b.isnan())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {dev.numel()} elements outside the bound, e.g. "
                           f"{a.flatten()[bad.flatten()][:3].tolist()} vs {b.flatten()[bad.flatten()][:3].tolist()}")


def _compare_step(ref, ref_opt, new, new_opt, dtype, step: int) -> None:
    """Every state entry and param of the cpp optimizer against the reference after one step."""
    fd = fd_bound(ref_opt, torch.float32 if dtype == torch.float64 else dtype)
    for k, (rp, p) in enumerate(zip(ref, new)):
        where = f"step {step}, param {k} ({tuple(p.shape)}, {dtype})"
        rs, s = _state_tensors(ref_opt, rp), _state_tensors(new_opt, p)
        assert set(rs) == set(s), where
        for key in ("step", "bias_correction2"):
            assert math.isclose(float(ref_opt.state[rp][key]), float(new_opt.state[p][key]), rel_tol=1e-12), where
        # the float state (state_bits 32 / 16): the usual tolerance (16: one bfloat16 rounding flip)
        for key in ("exp_avg", "exp_hessian_diag"):
            if key in rs:
                rtol, atol = _tol(torch.bfloat16 if rs[key].dtype == torch.bfloat16 else rs[key].dtype, fd)
                _assert_within(s[key], rs[key], atol + rtol * rs[key].double().abs(), f"{where}: {key}")
        # 8-bit: codes within one step; scales within the float tolerance; decoded values within
        # one code step (parity.code_step: neighbouring codes of m = (q/127)|q/127| s differ by at most
        # (2*127 - 1)/127^2 s; of D = ((q/255) s)^2, s the scale of sqrt(D), by (2*255 - 1)/255^2 s^2)
        # plus that tolerance
        if "exp_avg_codes" in rs:
            rtol, atol = _tol(torch.float32, fd)
            for codes, scales in (("exp_avg_codes", "exp_avg_scales"),
                                  ("exp_hessian_diag_codes", "exp_hessian_diag_scales")):
                assert s[codes].dtype == rs[codes].dtype and s[codes].shape == rs[codes].shape, where
                dq = (s[codes].int() - rs[codes].int()).abs()
                assert int(dq.max()) <= 1, f"{where}: {codes} differ by {int(dq.max())} steps"
                _assert_within(s[scales], rs[scales], atol + rtol * rs[scales].double().abs(), f"{where}: {scales}")
                decode = encoding.decode_momentum if codes == "exp_avg_codes" else encoding.decode_hessian
                a, b = decode(s[codes], s[scales]), decode(rs[codes], rs[scales])
                # (the scales may differ by rtol; D is quadratic in its scale, so by 2 rtol relative)
                scale = torch.maximum(s[scales], rs[scales])
                power = 1 if codes == "exp_avg_codes" else 2
                step = code_step(codes, scale).reshape(-1).repeat_interleave(encoding.GROUP)[:a.numel()].view(a.shape)
                top = (scale.double() ** power).reshape(-1).repeat_interleave(encoding.GROUP)[:a.numel()].view(a.shape)
                bound = step + atol + rtol * (power * b.double().abs() + top)
                _assert_within(a, b, bound, f"{where}: decoded {codes}")
        # params and master weights: a master weight is compared joined (float32); the param,
        # its top half, within one bfloat16 step (a float32 last bit can cross its rounding)
        rtol, atol = _tol(dtype, fd)
        _assert_within(p.detach(), rp.detach(), atol + rtol * rp.detach().double().abs(), f"{where}: param")
        if "master_correction" in rs:
            assert s["master_correction"].dtype == rs["master_correction"].dtype, where
            a = encoding.join_master(p.detach(), s["master_correction"])
            b = encoding.join_master(rp.detach(), rs["master_correction"])
            rtol, atol = _tol(torch.float32, fd)
            _assert_within(a, b, atol + rtol * b.double().abs(), f"{where}: master weight")


CASES = [
    # dtype, state_bits, master_weight_bits, hvp
    (torch.float32, 16, None, "autograd"),
    (torch.float32, 8, None, "autograd"),
    (torch.float32, 8, None, "finite_difference"),
    (torch.float64, 8, None, "autograd"),
    (torch.float64, 16, None, "autograd"),
    (torch.float16, 8, None, "autograd"),
    (torch.bfloat16, 16, None, "autograd"),
    (torch.bfloat16, 8, None, "autograd"),
    (torch.bfloat16, 8, None, "finite_difference"),
    (torch.bfloat16, 8, 24, "autograd"),
    (torch.bfloat16, 8, 32, "autograd"),
    (torch.bfloat16, 16, 24, "autograd"),
    (torch.bfloat16, 16, 32, "finite_difference"),
    (torch.bfloat16, 32, 24, "autograd"),
    (torch.bfloat16, 32, 32, "autograd"),
]


BACKENDS = [pytest.param("cpp", marks=requires_cpp), pytest.param("cuda", marks=requires_cuda_backend)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,state_bits,master_weight_bits,hvp", CASES)
def test_compact_state_matches_eager_every_step(backend, dtype, state_bits, master_weight_bits, hvp):
    # 12 steps, a refresh every 2 (the first one included), two probes with autograd HVPs
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32, bfloat16 and float16")
    device = "cuda" if backend == "cuda" else "cpu"
    p0 = make_params(SIZES, dtype, seed=7, device=device)
    if master_weight_bits is not None:  # a float32 param beside the bfloat16 ones: no correction of its own
        p0 = p0 + make_params([77], torch.float32, seed=8, device=device)
    ref, new = clone_params(p0), clone_params(p0)
    kw = dict(lazy_hessian=2, n_samples=2 if hvp == "autograd" else 1, hvp=hvp, state_bits=state_bits,
              master_weight_bits=master_weight_bits)
    ref_opt = SASSHA(_groups(ref), backend="eager", **kw)
    new_opt = SASSHA(_groups(new), backend=backend, **kw)
    for t in range(12):
        protocol_step(ref_opt, lambda: coupled_loss(ref, t), "closure")
        protocol_step(new_opt, lambda: coupled_loss(new, t), "closure")
        _compare_step(ref, ref_opt, new, new_opt, dtype, t)
        sync_run(ref, ref_opt, new, new_opt)
    assert new_opt.global_step == 12
    if master_weight_bits is not None:
        assert "master_correction" not in new_opt.state[new[-1]]  # the float32 param
        assert new_opt.state[new[0]]["master_correction"].dtype == (torch.int8 if master_weight_bits == 24
                                                                     else torch.int16)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_codes_and_scales_bitwise_after_a_refresh_step(dtype):
    # betas (0, 0), one autograd sample and rho 0 (the gradients are taken at x_t itself): the
    # first step is a refresh with m_new = g and D_new = |z * Hz| exactly, so both 8-bit tensors'
    # codes and scales equal the reference's bit for bit (encoding.py takes a correctly rounded
    # sqrt, as the kernels do).
    p0 = make_params(SIZES, dtype, seed=9, device="cpu")
    ref, new = clone_params(p0), clone_params(p0)
    kw = dict(lazy_hessian=1, n_samples=1, hvp="autograd", betas=(0.0, 0.0), rho=0.0, state_bits=8, lr=0.01)
    ref_opt = SASSHA(ref, backend="eager", **kw)
    new_opt = SASSHA(new, backend="cpp", **kw)
    protocol_step(ref_opt, lambda: coupled_loss(ref, 0), "closure")
    protocol_step(new_opt, lambda: coupled_loss(new, 0), "closure")
    for k, (rp, p) in enumerate(zip(ref, new)):
        rs, s = ref_opt.state[rp], new_opt.state[p]
        for key in encoding.state_keys(8):
            assert torch.equal(s[key], rs[key]), f"param {k} ({p.numel()} elements): {key} differs"
        assert bool((s["exp_hessian_diag_scales"] > 0).all())


# ---------------------------------------------------------------- the update phase alone
def _bucket(backend, dtype, state_bits, sizes, master_weight_bits=None, seed=0) -> Bucket:
    """Random params, state (encoded from random m and D) and master corrections."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    b = Bucket(backend=backend, device=torch.device("cpu"), params=params, param_index=[3 * j + 1 for j in range(len(sizes))],
               group_index=[j % 2 for j in range(len(sizes))], backups=[p.clone() for p in params],
               state_bits=state_bits)
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    for n in sizes:
        m = torch.randn(n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen, dtype=torch.float64) ** 3
        d = torch.rand(n, generator=gen, dtype=torch.float64) ** 4
        if n > 40:
            m[32:64] = 0  # a group of zeros (scale 0)
            d[7] = 0
        st = encoding.encode_state(m.to(mdt), d.to(mdt), state_bits, mdt)
        b.exp_avgs.append(st["exp_avg_codes" if state_bits == 8 else "exp_avg"])
        b.exp_hessian_diags.append(st["exp_hessian_diag_codes" if state_bits == 8 else "exp_hessian_diag"])
        if state_bits == 8:
            b.exp_avg_scales.append(st["exp_avg_scales"])
            b.exp_hessian_diag_scales.append(st["exp_hessian_diag_scales"])
    if master_weight_bits is not None:
        cdt = torch.int8 if master_weight_bits == 24 else torch.int16
        info = torch.iinfo(cdt)
        b.master_corrections = [torch.randint(info.min, info.max + 1, (n,), generator=gen, dtype=cdt)
                                if p.dtype == torch.bfloat16 else None for n, p in zip(sizes, params)]
    return b


def _clone(b: Bucket, backend) -> Bucket:
    params = [p.clone() for p in b.params]
    return Bucket(backend=backend, device=b.device, params=params, param_index=list(b.param_index),
                  group_index=list(b.group_index), backups=[t.clone() for t in b.backups], state_bits=b.state_bits,
                  exp_avgs=[t.clone() for t in b.exp_avgs], exp_hessian_diags=[t.clone() for t in b.exp_hessian_diags],
                  exp_avg_scales=[t.clone() for t in b.exp_avg_scales],
                  exp_hessian_diag_scales=[t.clone() for t in b.exp_hessian_diag_scales],
                  master_corrections=[None if t is None else t.clone() for t in b.master_corrections])


def _lists(b: Bucket) -> Dict[str, List]:
    return {"params": b.params, "exp_avgs": b.exp_avgs, "exp_hessian_diags": b.exp_hessian_diags,
            "exp_avg_scales": b.exp_avg_scales, "exp_hessian_diag_scales": b.exp_hessian_diag_scales,
            "master_corrections": b.master_corrections}


def _table(n, neg_step=0.0, decay=1.0, beta1=0.9, beta2=0.99, live=None):
    rows = []
    for j in range(n):
        row = [0.0] * UpdateCol.COUNT
        row[UpdateCol.NEG_STEP] = neg_step if not callable(neg_step) else neg_step(j)
        row[UpdateCol.DECAY] = decay if not callable(decay) else decay(j)
        row[UpdateCol.BETA1], row[UpdateCol.ONE_MINUS_BETA1] = beta1, 1.0 - beta1
        row[UpdateCol.BETA2], row[UpdateCol.ONE_MINUS_BETA2] = beta2, 1.0 - beta2
        row[UpdateCol.C2] = 0.05 + 0.01 * j
        row[UpdateCol.EPS] = 1e-6
        row[UpdateCol.LIVE] = 1.0 if live is None else float(live(j))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _refresh(b: Bucket, seed: int, n_samples: int = 1) -> RefreshInput:
    gen = torch.Generator().manual_seed(seed)
    ys = [[torch.randn(p.numel(), generator=gen, dtype=torch.float64).mul_(3).to(p.dtype) for p in b.params]
          for _ in range(n_samples)]
    for y in ys[0][:2]:
        y[:5] = 0  # |h| = 0: code 0
    return RefreshInput(RefreshMode.AUTOGRAD, ys, ProbeKeys(tuple(0x51ED + 77 * s for s in range(n_samples))))


PHASE_SIZES = (1, 31, 33, 64, 1000, 16384 + 40)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("beta1", [0.0, 1.0])
def test_update_encodes_exact_values_bitwise(dtype, beta1):
    # beta2 = 0 with one autograd sample: D_new = |z * y| = |y| exactly; beta1 = 0: m_new = g
    # exactly; beta1 = 1: m_new is the decoded m (encode(decode(codes)) through both backends).
    # The codes and scales are then functions of exact float32 values: equal bit for bit.
    eager = get_backend("eager")
    ref = _bucket(eager, dtype, 8, PHASE_SIZES, seed=1)
    new, before = _clone(ref, cpp()), _clone(ref, eager)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.numel(), generator=gen, dtype=torch.float64).to(dtype) for p in ref.params]
    grads[3][:32] = 0
    refresh = _refresh(ref, 3)
    table = _table(len(PHASE_SIZES), neg_step=-0.01, decay=0.999, beta1=beta1, beta2=0.0)
    eager.update(ref, ref.params, grads, table, 0.5, refresh)
    cpp().update(new, new.params, [g.clone() for g in grads], table, 0.5, refresh)
    for name in ("exp_avgs", "exp_avg_scales", "exp_hessian_diag_scales"):
        for j, (a, c) in enumerate(zip(_lists(ref)[name], _lists(new)[name])):
            assert torch.equal(a, c), f"{name}[{j}] ({PHASE_SIZES[j]} elements) differs"
    for j, p in enumerate(ref.params):
        # m_new = g / the decoded m, D_new = |y|: encoding.py's encodings of them, bit for bit
        m_new = grads[j] if beta1 == 0 else encoding.decode_momentum(before.exp_avgs[j], before.exp_avg_scales[j])
        want_m = encoding.encode_momentum(m_new.view(p.shape))
        assert torch.equal(new.exp_avgs[j], want_m[0]) and torch.equal(new.exp_avg_scales[j], want_m[1]), j
        d_new = refresh.ys[0][j].float().abs().view(p.shape)
        want_d = encoding.encode_hessian(d_new)
        assert torch.equal(new.exp_hessian_diags[j], want_d[0]), f"D codes of param {j} differ"
        assert torch.equal(new.exp_hessian_diag_scales[j], want_d[1])
        assert torch.equal(ref.exp_hessian_diags[j], want_d[0]), j


@requires_cpp
@pytest.mark.parametrize("master_weight_bits", [24, 32])
@pytest.mark.parametrize("state_bits", [32, 8])
def test_master_split_and_join_bitwise(master_weight_bits, state_bits):
    # neg_step 0: x_new = join(x_t, correction) * decay + 0 * (m / denom), one product, the
    # same float32 in both backends; the param and the correction written are split_master of
    # it, checked against encoding.py directly. Random masters times decays near 1 put every
    # pattern in the low bits (ties of both roundings included); special values: zeros,
    # subnormals, the largest floats (rounding up to inf), inf and NaN.
    eager = get_backend("eager")
    sizes = (1, 31, 33, 1000, 20000)
    ref = _bucket(eager, torch.bfloat16, state_bits, sizes, master_weight_bits, seed=4)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 3.4e38, -3.39e38, float("inf"), -float("inf"), float("nan"),
                            1.0, -1.0, 65504.0], dtype=torch.float32)
    x = ref.params[3]
    hi, lo = encoding.split_master(special, master_weight_bits)
    x[:special.numel()] = hi
    ref.master_corrections[3][:special.numel()] = lo
    new = _clone(ref, cpp())
    decays = [1.0, 0.999, 1.3, 0.7001, 1.0001]
    table = _table(len(sizes), neg_step=0.0, decay=lambda j: decays[j])
    x_t = [p.clone() for p in ref.params]
    masters = [encoding.join_master(p, c) for p, c in zip(x_t, ref.master_corrections)]
    grads = [torch.randn(p.numel(), generator=torch.Generator().manual_seed(j)).to(torch.bfloat16)
             for j, p in enumerate(ref.params)]
    eager.update(ref, [t.clone() for t in x_t], grads, table, 0.5, None)
    cpp().update(new, [t.clone() for t in x_t], grads, table, 0.5, None)
    for j in range(len(sizes)):
        x_new = masters[j] * decays[j]
        want_p, want_c = encoding.split_master(x_new, master_weight_bits)
        # a NaN's bfloat16 bits depend on torch's conversion path (0x7FC0 scalar, 0xFFFF vectorised):
        # NaN is all the contract says; a zero's sign is the sum's (x * decay + 0 * (m / denom))
        nan, zero = x_new.isnan(), x_new == 0
        same = ~(nan | zero)
        for got in (new, ref):
            assert torch.equal(got.params[j].view(torch.int16)[same], want_p.view(torch.int16)[same]), f"param {j}"
            assert torch.equal(got.master_corrections[j], want_c), f"master_correction {j} differs"
            assert bool(got.params[j][nan].isnan().all()) and bool((got.params[j][zero] == 0).all())
        assert torch.equal(new.params[j][~nan].view(torch.int16), ref.params[j][~nan].view(torch.int16))
    # the special values went through as encoding.py splits them (inf and NaN: correction 0)
    assert not bool(new.master_corrections[3][6:9].any())
    assert new.params[3][6] == float("inf") and new.params[3][7] == -float("inf")


@requires_cpp
@pytest.mark.parametrize("state_bits,master_weight_bits,dtype", [(8, None, torch.float32), (8, 24, torch.bfloat16),
                                                                 (16, 32, torch.bfloat16), (32, 24, torch.bfloat16)])
def test_update_phase_matches_eager(state_bits, master_weight_bits, dtype):
    # general betas, steps and refresh modes on one bucket: codes within one step of the
    # reference (a last-bit difference of m_new can cross a code boundary), params within the
    # float tolerance, params that are not live restored with their state untouched
    eager = get_backend("eager")
    from sassha_fused import functional as F

    for mode in (RefreshMode.NONE, RefreshMode.AUTOGRAD, RefreshMode.FD_DIRECT, RefreshMode.PRECOMPUTED):
        ref = _bucket(eager, dtype, state_bits, PHASE_SIZES, master_weight_bits, seed=5 + mode)
        new = _clone(ref, cpp())
        before = _clone(ref, eager)
        gen = torch.Generator().manual_seed(6)
        grads = [torch.randn(p.numel(), generator=gen, dtype=torch.float64).to(dtype) for p in ref.params]
        refresh = None
        if mode == RefreshMode.AUTOGRAD:
            refresh = _refresh(ref, 7, n_samples=2)
        elif mode != RefreshMode.NONE:
            r = _refresh(ref, 7)
            fd = torch.tensor([3e-3, 300.0 if mode == RefreshMode.FD_DIRECT else 0.5])
            refresh = RefreshInput(mode, r.ys, r.keys, fd)
        n = len(PHASE_SIZES)
        live = torch.tensor([0.0 if j % 4 == 2 else 1.0 for j in range(n)])
        steps = torch.tensor([3.0 + j for j in range(n)], dtype=torch.float64)
        c2 = torch.tensor([0.05 + 0.01 * j for j in range(n)], dtype=torch.float64)
        table, _, _ = F.update_scalars(ref, phase_groups(), 0.5, refresh is not None, steps, c2, None, live)
        x_t = [p.clone() for p in ref.backups]
        eager.update(ref, x_t, grads, table, 0.5, refresh)
        cpp().update(new, x_t, [g.clone() for g in grads], table, 0.5, refresh)
        rtol, atol = TOLERANCE[dtype]
        for j in range(n):
            if live[j] == 0:  # x_t again, every state entry as it was
                assert torch.equal(new.params[j], x_t[j])
                for name, lists in _lists(before).items():
                    if name != "params" and lists and lists[j] is not None:
                        assert torch.equal(_lists(new)[name][j], lists[j]), f"{name}[{j}] written although not live"
                continue
            _assert_within(new.params[j], ref.params[j], atol + rtol * ref.params[j].double().abs(), f"param {j}")
            for name in ("exp_avgs", "exp_hessian_diags"):
                a, c = _lists(ref)[name][j], _lists(new)[name][j]
                if state_bits == 8:
                    assert int((a.int() - c.int()).abs().max()) <= 1, f"mode {mode}: {name}[{j}]"
                else:
                    r, t = TOLERANCE[torch.bfloat16 if a.dtype == torch.bfloat16 else a.dtype]
                    _assert_within(c, a, t + r * a.double().abs(), f"mode {mode}: {name}[{j}]")
            if mode == RefreshMode.NONE:  # D is written on refresh steps only
                assert torch.equal(new.exp_hessian_diags[j], before.exp_hessian_diags[j])
                if state_bits == 8:
                    assert torch.equal(new.exp_hessian_diag_scales[j], before.exp_hessian_diag_scales[j])


@requires_cpp
@pytest.mark.parametrize("state_bits,master_weight_bits", [(8, None), (8, 24), (16, 32)])
def test_skipped_step_leaves_codes_scales_and_corrections(state_bits, master_weight_bits):
    # a NaN gradient: the step is skipped (nonfinite="skip"); params back at x_t, every state
    # entry bit for bit as before
    dtype = torch.bfloat16 if master_weight_bits else torch.float32
    params = make_params(SIZES, dtype, seed=10, device="cpu")
    opt = SASSHA(params, backend="cpp", lazy_hessian=2, state_bits=state_bits, master_weight_bits=master_weight_bits)
    for t in range(3):
        protocol_step(opt, lambda: coupled_loss(params, t), "closure")
    before = [{k: v.clone() for k, v in _state_tensors(opt, p).items()} for p in params]
    x_before = [p.detach().clone() for p in params]

    def nan_loss():
        return coupled_loss(params, 3) + params[3].sum() * float("nan")

    with pytest.warns(RuntimeWarning):
        protocol_step(opt, nan_loss, "closure")
    for k, p in enumerate(params):
        assert torch.equal(p.detach(), x_before[k]), f"param {k} moved on a skipped step"
        for key, v in before[k].items():
            assert torch.equal(opt.state[p][key], v), f"param {k}: {key} written on a skipped step"


@requires_cpp
def test_compact_op_argument_errors_say_what_to_do():
    ops = torch.ops.sassha_fused
    x = [torch.zeros(40)]
    table = _table(1)
    codes_m, codes_d = [torch.zeros(40, dtype=torch.int8)], [torch.zeros(40, dtype=torch.uint8)]
    scales = [torch.zeros(2)]
    with pytest.raises(RuntimeError, match="state_bits must be 32, 16 or 8"):
        ops.update(x, x, x, x, x, [], [], [], 12, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match=r"int8 codes of m and uint8 codes of D"):
        ops.update(x, x, x, x, x, scales, scales, [], 8, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match=r"needs 2 \(one per group of 32 elements"):
        ops.update(x, x, x, codes_m, codes_d, [torch.zeros(1)], scales, [], 8, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        ops.update(x, x, x, codes_m, codes_d, [], [], [], 8, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match="scales are for state_bits=8 only"):
        ops.update(x, x, x, x, x, scales, scales, [], 32, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match="master weights are for bfloat16 parameters"):
        ops.update(x, x, x, x, x, [], [], [torch.zeros(40, dtype=torch.int8)], 32, table, 0.5, 0, [], [0], [], [],
                   None)
    bf = [torch.zeros(40, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"expected int8 \(master_weight_bits=24\) or int16"):
        ops.update(bf, bf, bf, x, x, [], [], [torch.zeros(40, dtype=torch.int32)], 32, table, 0.5, 0, [], [0], [],
                   [], None)
    with pytest.raises(RuntimeError, match="or an empty list"):
        ops.update(bf, bf, bf, x, x, [], [], [None, None], 32, table, 0.5, 0, [], [0], [], [], None)
    # None: a param without a correction
    ops.update(bf, bf, bf, x, x, [], [], [None], 32, table, 0.5, 0, [], [0], [], [], None)
