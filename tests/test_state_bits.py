"""Compact optimizer state (``state_bits``) and master weights (``master_weight_bits``).

The encodings of ``sassha_fused.encoding`` against their stated error bounds; the
optimizer with them: parity of the backends that implement them against the eager
reference, checkpoints (codes saved as they are, resumed bitwise, refused across
encodings unless converted), the skip path, the accessors, and bad input.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from parity import TOLERANCE, clone_params, code_step, coupled_loss, make_params, protocol_step
from sassha_fused import MSASSHA, SASSHA
from sassha_fused.encoding import (
    GROUP,
    convert_state_dict,
    decode_hessian,
    decode_momentum,
    encode_hessian,
    encode_momentum,
    fsdp_state_bits,
    hessian_root,
    join_master,
    scales_shape,
    split_master,
)

SIZES = (1, 31, 33, 96, 1000, 2 * 3 * 37)
F32_EPS = torch.finfo(torch.float32).eps


def group_max(v: torch.Tensor) -> torch.Tensor:
    """Each element's group maximum of |v| (groups of 32 in row-major order), shaped like ``v``."""
    flat = v.reshape(-1).abs()
    pad = (-flat.numel()) % GROUP
    padded = torch.cat([flat, flat.new_zeros(pad)]).view(-1, GROUP)
    return padded.amax(1, keepdim=True).expand(-1, GROUP).reshape(-1)[:flat.numel()].view(v.shape)


# ----------------------------------------------------------------------------- encodings
def samples(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Values over many orders of magnitude within a group, zeros and signs mixed."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 3, (n,), generator=g).float()
    v[::7] = 0.0
    return v


def test_momentum_codes_are_within_one_code_step():
    m = samples()
    codes, scales = encode_momentum(m)
    assert codes.dtype == torch.int8 and codes.shape == m.shape and scales.numel() == -(-m.numel() // GROUP)
    back = decode_momentum(codes, scales)
    s = group_max(m)
    # c = sqrt(|m| / s) rounded to the grid of 1/127 errs by half a step, so
    # |m' - m| = |c' - c| (c' + c) s <= (1/254) (2 + 1/254) s; a few ulps for the roundings on the way
    assert ((back - m).abs() <= s * (1 / 127 + 1 / 254 ** 2 + 16 * F32_EPS)).all()
    assert (back[m.abs() == s] == m[m.abs() == s]).all(), "each group's largest entry decodes exactly"
    assert (torch.sign(back) * torch.sign(m) >= 0).all(), "no sign flips"
    assert (back[m == 0] == 0).all()
    # companding: the error shrinks with the entry, (2c/254 + 1/254^2) s with c = sqrt(|m| / s) (the first
    # step of the grid is s / 127^2), not a fixed s / 254 as with linear codes
    c = torch.sqrt(m.abs() / s.clamp_min(1e-38))
    assert ((back - m).abs() <= s * (c / 127 + 1 / 254 ** 2 + 16 * F32_EPS)).all()


def test_a_group_of_momentum_below_the_smallest_normal_encodes_as_zero():
    # 1 / s would overflow for a subnormal s: such a group is encoded as zeros (encoding.TINY)
    m = torch.tensor([1e-39, -2e-39] + [0.0] * 30 + [3.0, -1.0] + [0.0] * 30)
    codes, scales = encode_momentum(m)
    assert torch.equal(codes[:32], torch.zeros(32, dtype=torch.int8))
    assert torch.equal(scales, torch.tensor([2e-39, 3.0]))
    back = decode_momentum(codes, scales)
    assert (back[:32] == 0).all() and back[32] == 3.0 and back[33] < 0


def test_hessian_codes_are_within_one_code_step_and_never_zero():
    d = samples().abs()
    codes, scales = encode_hessian(d)
    assert codes.dtype == torch.uint8
    back = decode_hessian(codes, scales)
    s = group_max(d)
    # c = sqrt(D / s) on a grid of 1/255: |c' - c| <= 1/510, so |D' - D| <= (2c/510 + 1/510^2) s <= s/255 + ...
    assert ((back - d).abs() <= s * (1 / 255 + 1 / 510 ** 2 + 16 * F32_EPS)).all()
    assert (back[d > 0] > 0).all(), "a positive entry never decodes to zero (only eps would be left under it)"
    assert (back[d == 0] == 0).all()
    # sqrt(D), the default preconditioner, is on a uniform grid of sqrt(s) / 255, and its largest entry exact
    root = hessian_root(codes, scales)
    exact_root = torch.sqrt(d.double()).float()
    half_step = torch.where(codes == 1, 1 / 255, 1 / 510)  # code 1 also holds the floor, down to 0
    assert ((root - exact_root).abs() <= scales.repeat_interleave(GROUP)[:d.numel()] * (half_step + 4 * F32_EPS)).all()
    assert (root[d == s] == exact_root[d == s]).all(), "each group's largest sqrt(D) decodes exactly"
    # and D is its square, so sqrt(decoded D) is the root again, bit for bit (sqrt(x * x) = x in binary IEEE
    # arithmetic): the preconditioner taken from the codes equals the one taken from D
    assert torch.equal(torch.sqrt(back.double()).float(), root)
    # an entry far below its group's largest decodes to the floor: code 1, s / 255^2
    tiny = (d > 0) & (d < s / 255 ** 2 / 4)
    assert tiny.any()
    torch.testing.assert_close(back[tiny], s[tiny] / 255 ** 2, rtol=8 * F32_EPS, atol=0)


def test_scales_are_shaped_to_shard_with_rows_that_hold_whole_groups():
    # rows of dim 0 holding a multiple of 32 elements: (rows, groups per row), the same floats as (groups,)
    assert scales_shape((5, 64)) == (5, 2) and scales_shape((3, 4, 8)) == (3, 1) and scales_shape((0, 32)) == (0, 1)
    assert scales_shape((5, 7)) == (2,) and scales_shape((64,)) == (2,) and scales_shape(()) == (1,)
    assert fsdp_state_bits((5, 64), 8) == 8 and fsdp_state_bits((64,), 8) == 16 and fsdp_state_bits((64,), 32) == 32
    m = samples(5 * 64).view(5, 64)
    codes, scales = encode_momentum(m)
    flat_codes, flat_scales = encode_momentum(m.reshape(-1))
    assert scales.shape == (5, 2) and torch.equal(scales.reshape(-1), flat_scales) and torch.equal(codes.reshape(-1),
                                                                                                 flat_codes)
    # a shard of whole rows quantises exactly as the whole tensor does (what FSDP2 keeps per rank)
    shard_codes, shard_scales = encode_momentum(m[3:])
    assert torch.equal(shard_codes, codes[3:]) and torch.equal(shard_scales, scales[3:])
    d_codes, d_scales = encode_hessian(m[3:].abs())
    assert torch.equal(d_codes, encode_hessian(m.abs())[0][3:]) and torch.equal(d_scales, encode_hessian(m.abs())[1][3:])
    opt = SASSHA([torch.nn.Parameter(m.clone()), torch.nn.Parameter(torch.zeros(7))], state_bits=8, lr=0.1)
    opt.step(lambda: sum((p * p).sum() for g in opt.param_groups for p in g["params"]))
    shapes = [tuple(opt.state[p]["exp_avg_scales"].shape) for p in opt.param_groups[0]["params"]]
    assert shapes == [(5, 2), (1,)]


def test_groups_follow_row_major_elements_whatever_the_layout():
    m = samples(32 * 6).view(6, 32)
    t = m.t().contiguous().t()  # same values, column-major storage
    assert not t.is_contiguous()
    for enc in (encode_momentum, encode_hessian):
        v = m.abs() if enc is encode_hessian else m
        vt = t.abs() if enc is encode_hessian else t
        codes, scales = enc(v)
        codes_t, scales_t = enc(vt)
        assert torch.equal(codes, codes_t) and torch.equal(scales, scales_t)
        rows = [enc(v[i]) for i in range(6)]  # each row is one group
        assert torch.equal(scales.reshape(-1), torch.cat([s for _, s in rows]))
        assert torch.equal(codes, torch.stack([c for c, _ in rows]))


def test_master_weight_split_and_join():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * 10.0 ** torch.randint(-30, 30, (20000,), generator=g).float()
    x[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39])  # zeros and float32 subnormals
    p, c = split_master(x, 32)
    assert p.dtype == torch.bfloat16 and c.dtype == torch.int16
    assert torch.equal(join_master(p, c).view(torch.int32), x.view(torch.int32)), "32 bits: the float32 itself"
    assert torch.equal(p, x.to(torch.bfloat16)) or ((p.float() - x).abs() <= x.abs() * 2 ** -8 + 1e-38).all()
    p24, c24 = split_master(x, 24)
    assert c24.dtype == torch.int8
    joined = join_master(p24, c24)
    normal = x.abs() >= torch.finfo(torch.float32).tiny
    # the master rounded to 24 bits (16 significant): half a unit of 2^-15 relative
    assert ((joined - x).abs()[normal] <= x.abs()[normal] * 2 ** -16).all()
    # the parameter is the master's nearest bfloat16 (ties away from zero): half a bfloat16 ulp
    assert ((p24.float() - joined).abs()[normal] <= joined.abs()[normal] * 2 ** -8).all()
    inf = torch.tensor([float("inf"), float("-inf"), float("nan")])
    pi, ci = split_master(inf, 24)
    assert torch.equal(ci, torch.zeros(3, dtype=torch.int8)) and torch.isinf(pi[:2]).all() and torch.isnan(pi[2])


# ----------------------------------------------------------------------------- the optimizer
def compact_run(backend: str, state_bits: int, master=None, dtype=torch.float32, steps: int = 8, cls=SASSHA,
                hvp: str = "autograd", **kw):
    """``steps`` closure steps on ``coupled_loss``; the optimizer records ``largest_move``: the
    largest change of any param element in one step (the scale of a code flip's effect)."""
    params = make_params(SIZES, dtype=dtype, seed=3)
    opt = cls(params, lr=0.01, lazy_hessian=2, backend=backend, hvp=hvp, state_bits=state_bits,
              master_weight_bits=master, **kw)
    opt.largest_move = 0.0
    for t in range(steps):
        before = [p.detach().float().clone() for p in params]
        protocol_step(opt, lambda t=t: coupled_loss(params, t), "closure")
        opt.largest_move = max([opt.largest_move] + [(p.detach().float() - b).abs().max().item()
                                                     for p, b in zip(params, before)])
    return params, opt


def state_of(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("state_bits", [16, 8])
def test_first_step_codes_equal_the_float32_state_encoded(state_bits):
    """From zero state the first step's m and D are those of a float32-state run: encoded, bit for bit."""
    ref_params, ref = compact_run("eager", 32, steps=1)
    params, opt = compact_run("eager", state_bits, steps=1)
    for rp, p in zip(ref_params, params):
        assert torch.equal(rp, p)
        m, d = ref.state[rp]["exp_avg"], ref.state[rp]["exp_hessian_diag"]
        got = opt.state[p]
        if state_bits == 16:
            assert torch.equal(got["exp_avg"], m.to(torch.bfloat16))
            assert torch.equal(got["exp_hessian_diag"], d.to(torch.bfloat16))
        else:
            assert torch.equal(got["exp_avg_codes"], encode_momentum(m)[0])
            assert torch.equal(got["exp_avg_scales"], encode_momentum(m)[1])
            assert torch.equal(got["exp_hessian_diag_codes"], encode_hessian(d)[0])
            assert torch.equal(got["exp_hessian_diag_scales"], encode_hessian(d)[1])


def assert_compact_close(ref_params, ref_opt, params, opt, dtype):
    """Params and decoded state of two compact runs agree within the float tolerance plus code flips.

    Where the two runs' float32 values differ by an ulp and straddle a code boundary, their
    codes differ by one: m by up to 2 s / 127 (du/dc <= 2), D by up to 2.01 s / 255 (s the
    group's scale), and a step that reads them by up to its own size (a D code of 1 against
    2). FLIPS = 2 such flips per element over the run, each moving a param by at most the
    largest one-step move of the reference run, carried on with KAPPA = 2.
    """
    rtol, atol = TOLERANCE[dtype]
    flips = 2 * 2 * ref_opt.largest_move
    for k, (rp, p) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(p.float(), rp.float(), rtol=rtol, atol=atol + flips,
                                   msg=lambda m: f"param {k}: {m}")
        a, b = ref_opt.float_state(rp), opt.float_state(p)
        for key, code_step in (("exp_avg", 2 / 127), ("exp_hessian_diag", 2.01 / 255)):
            s = group_max(a[key])
            err = (a[key] - b[key]).abs()
            assert (err <= rtol * a[key].abs() + atol + 2 * code_step * s).all(), (
                f"param {k} {key}: off by {err.max().item():.3g}")


@pytest.mark.parametrize("state_bits,master,dtype", [
    (16, None, torch.float32), (8, None, torch.float32), (8, None, torch.bfloat16), (8, 24, torch.bfloat16),
    (16, 32, torch.bfloat16)])
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_foreach_matches_eager(state_bits, master, dtype, hvp):
    ref_params, ref = compact_run("eager", state_bits, master, dtype, hvp=hvp)
    params, opt = compact_run("foreach", state_bits, master, dtype, hvp=hvp)
    assert set(ref.state[ref_params[0]]) == set(opt.state[params[0]])
    assert_compact_close(ref_params, ref, params, opt, dtype)


def test_msassha_perturbs_along_the_decoded_momentum():
    ref_params, ref = compact_run("eager", 8, cls=MSASSHA, steps=6)
    params, opt = compact_run("foreach", 8, cls=MSASSHA, steps=6)
    assert_compact_close(ref_params, ref, params, opt, torch.float32)
    assert "unperturbed_param" in opt.state[params[0]]


def test_master_weights_carry_what_bfloat16_rounds_away():
    """A step too small for bfloat16 moves the master; without it the parameter never moves."""
    p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    q = torch.nn.Parameter(p.detach().clone())
    with_master = SASSHA([p], lr=1e-4, rho=0.0, lazy_hessian=1, backend="eager", master_weight_bits=24)
    without = SASSHA([q], lr=1e-4, rho=0.0, lazy_hessian=1, backend="eager")
    for _ in range(40):
        for opt, w in ((with_master, p), (without, q)):
            opt.step(lambda w=w: (w.float() * 0.5).sum() + (w.float() ** 2).sum() * 1e-3)
    assert torch.equal(q, torch.full_like(q, 1.0)), "each step is below half a bfloat16 ulp at 1.0"
    master = with_master.master_weight(p)
    assert (master < 1.0 - 1e-3).all(), "the master moved by 40 steps of about lr"
    assert torch.equal(p, master.to(torch.bfloat16)) or ((p.float() - master).abs() <= 2 ** -8).all()


def test_checkpoints_hold_codes_and_resume_bitwise():
    def fresh():
        params = make_params(SIZES, dtype=torch.bfloat16, seed=3)
        return params, SASSHA(params, lr=0.01, lazy_hessian=2, backend="foreach", state_bits=8, master_weight_bits=24)

    params, opt = fresh()
    for t in range(3):
        opt.step(lambda t=t: coupled_loss(params, t))
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    for t in range(3, 6):
        opt.step(lambda t=t: coupled_loss(params, t))
    params2, opt2 = fresh()
    with torch.no_grad():
        for p2, s in zip(params2, saved):
            p2.copy_(s)
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        opt2.step(lambda t=t: coupled_loss(params2, t))
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
        for key, value in state_of(opt, p).items():
            assert torch.equal(value, opt2.state[p2][key]), key
    # the checkpoint is smaller: codes and scales as they are
    def size(o):
        buf = io.BytesIO()
        torch.save(o.state_dict(), buf)
        return buf.tell()

    big_params = make_params((100_000,), seed=0)
    sizes = {}
    for bits in (32, 8):
        o = SASSHA(big_params, lr=0.01, backend="foreach", state_bits=bits)
        o.step(lambda: coupled_loss(big_params, 0))
        sizes[bits] = size(o)
    assert sizes[8] < 0.3 * sizes[32], sizes


def test_loading_another_encoding_is_refused_unless_converted():
    params, opt = compact_run("foreach", 8, steps=3)
    sd = opt.state_dict()
    other = SASSHA(clone_params(params), lr=0.01, lazy_hessian=2, backend="foreach", state_bits=32)
    with pytest.raises(ValueError, match=r"state_bits=8.*state_bits=32.*convert_state_dict"):
        other.load_state_dict(sd)
    assert not other.state, "nothing was loaded"
    other.load_state_dict(convert_state_dict(sd, 32))
    for p, q in zip(params, other.param_groups[0]["params"]):
        a, b = opt.float_state(p), other.float_state(q)
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_hessian_diag"], b["exp_hessian_diag"])
    # and back: re-encoding decoded codes gives the same codes
    back = convert_state_dict(other.state_dict(), 8)
    for i, p in enumerate(params):
        for key in ("exp_avg_codes", "exp_avg_scales", "exp_hessian_diag_codes", "exp_hessian_diag_scales"):
            assert torch.equal(back["state"][i][key], opt.state[p][key]), key


def _encode_v1(m: torch.Tensor, d: torch.Tensor) -> dict:
    """The first 8-bit encodings (version 1), as they were: softsign m codes, D = (q/255)^2 * max D."""
    v = m.reshape(-1).float()
    v = torch.cat([v, v.new_zeros((-v.numel()) % GROUP)]).view(-1, GROUP)
    s = v.abs().amax(1)
    u = torch.where(s[:, None] > 0, v / torch.where(s > 0, s, 1)[:, None], 0)
    c = (u + u) / (1 + u.abs())
    q = torch.where(c < 0, -1, 1) * torch.floor((c.abs() + 0.5 / 127) * 127).clamp(max=127)
    w = d.reshape(-1).float()
    w = torch.cat([w, w.new_zeros((-w.numel()) % GROUP)]).view(-1, GROUP)
    t = w.amax(1)
    r = torch.sqrt(torch.where(t[:, None] > 0, w / torch.where(t > 0, t, 1)[:, None], 0).double()).float()
    qd = torch.floor((r + 0.5 / 255) * 255).clamp(max=255)
    qd = torch.where((w > 0) & (qd < 1), 1, qd)
    n = m.numel()
    return {"exp_avg_codes": q.reshape(-1)[:n].to(torch.int8).view(m.shape), "exp_avg_scales": s,
            "exp_hessian_diag_codes": qd.reshape(-1)[:n].to(torch.uint8).view(m.shape), "exp_hessian_diag_scales": t}


def test_a_checkpoint_of_the_first_8bit_encodings_is_refused_and_converts():
    """The encodings changed (version 2): a version-1 checkpoint would decode to other values (D about
    1e-4 of itself), so loading one is refused with nothing changed; convert_state_dict reads it."""
    params, opt = compact_run("foreach", 8, steps=3)
    sd = opt.state_dict()
    assert sd["sassha_fused"]["state_encoding"] == 2
    floats = [opt.float_state(p) for p in params]
    old = copy.deepcopy(sd)
    for i, f in enumerate(floats):  # the same m and D, written as version 1 wrote them
        old["state"][i].update(_encode_v1(f["exp_avg"], f["exp_hessian_diag"]))
    for extra in [old["sassha_fused"]] + [g["sassha_fused"] for g in old["param_groups"]]:
        extra.pop("state_encoding", None)  # version 1 recorded none (the dicts may be one shared dict)
    other = SASSHA(clone_params(params), lr=0.01, lazy_hessian=2, backend="foreach", state_bits=8)
    with pytest.raises(ValueError, match=r"version 1.*convert_state_dict"):
        other.load_state_dict(old)
    assert not other.state, "nothing was loaded"
    other.load_state_dict(convert_state_dict(old, 8))
    for p, q, f in zip(params, other.param_groups[0]["params"], floats):
        got = other.float_state(q)
        for key, unit in (("exp_avg", "exp_avg_codes"), ("exp_hessian_diag", "exp_hessian_diag_codes")):
            # two roundings to a code grid (version 1's, then these): within two code steps of the group
            step = code_step(unit, other.state[q][unit.replace("codes", "scales")]).reshape(-1)
            bound = 2 * step.repeat_interleave(GROUP)[:p.numel()].view(p.shape) + 1e-6 * f[key].abs()
            assert ((got[key].double() - f[key].double()).abs() <= bound).all(), key


def test_master_correction_mismatch_is_refused():
    params, opt = compact_run("foreach", 8, master=24, dtype=torch.bfloat16, steps=2)
    other = SASSHA(clone_params(params), lr=0.01, backend="foreach", state_bits=8, master_weight_bits=32)
    with pytest.raises(ValueError, match="master_weight_bits"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_a_skipped_step_leaves_codes_scales_and_corrections_alone():
    params, opt = compact_run("foreach", 8, master=24, dtype=torch.bfloat16, steps=3)
    before = [state_of(opt, p) for p in params]
    before = [{k: v.clone() for k, v in s.items()} for s in before]
    x_before = [p.detach().clone() for p in params]

    def nan_loss():
        return coupled_loss(params, 3) * float("nan")

    with pytest.warns(RuntimeWarning, match="skipped") as record:
        opt.step(nan_loss)
    assert record[0].filename == __file__, "the warning points at the user's opt.step() line"
    for p, x, s in zip(params, x_before, before):
        assert torch.equal(p, x)
        for key, value in s.items():
            assert torch.equal(opt.state[p][key], value), key


def test_float_state_reads_every_encoding():
    for bits in (32, 16, 8):
        params, opt = compact_run("foreach", bits, steps=2)
        fs = opt.float_state(params[4])
        assert fs["exp_avg"].dtype == torch.float32 and fs["exp_avg"].shape == params[4].shape
        assert fs["exp_hessian_diag"].min() >= 0 and fs["exp_avg"].abs().max() > 0
    fresh = SASSHA(make_params((3,)), state_bits=8)
    assert fresh.float_state(fresh.param_groups[0]["params"][0]) == {}


def test_backups_are_released_between_steps_with_compact_state():
    params, opt = compact_run("foreach", 8, steps=2)
    assert opt._cache.backups and all(b.untyped_storage().nbytes() == 0 for b in opt._cache.backups.values())
    params32, opt32 = compact_run("foreach", 32, steps=2)
    assert all(b.untyped_storage().nbytes() > 0 for b in opt32._cache.backups.values())
    # the official protocol holds them again for the step, and a zero_grad() in between restores exactly
    x = [p.detach().clone() for p in params]
    coupled_loss(params, 2).backward()
    opt.perturb_weights()
    assert all(b.untyped_storage().nbytes() > 0 for b in opt._cache.backups.values())
    opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(params, x))
    assert all(b.untyped_storage().nbytes() == 0 for b in opt._cache.backups.values())


def test_deepcopy_of_compact_state_steps_alike():
    params, opt = compact_run("foreach", 8, master=24, dtype=torch.bfloat16, steps=2)
    twin = copy.deepcopy(opt)  # (its params are copies of these)
    twin_params = twin.param_groups[0]["params"]
    for o, ps in ((opt, params), (twin, twin_params)):
        o.step(lambda ps=ps: coupled_loss(ps, 2))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_codes"], twin.state[q]["exp_avg_codes"])


@pytest.mark.parametrize("kwargs,match", [
    ({"state_bits": 12}, "state_bits"),
    ({"state_bits": True}, "state_bits"),
    ({"master_weight_bits": 16}, "master_weight_bits"),
])
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SASSHA(make_params((4,)), **kwargs)


def test_master_weights_need_bfloat16_params():
    with pytest.raises(ValueError, match="16-bit"):
        SASSHA(make_params((4,)), master_weight_bits=24)
    with pytest.raises(ValueError, match="float16"):
        SASSHA(make_params((4,), dtype=torch.float16), master_weight_bits=24)
    # float32 params beside bfloat16 ones are their own master: no correction for them
    mixed = make_params((4,), dtype=torch.bfloat16) + make_params((4,))
    opt = SASSHA(mixed, backend="foreach", master_weight_bits=24, lazy_hessian=1)
    opt.step(lambda: coupled_loss(mixed, 0))
    assert "master_correction" in opt.state[mixed[0]] and "master_correction" not in opt.state[mixed[1]]


def test_a_checkpoint_without_master_weights_starts_them_at_the_parameter():
    params, opt = compact_run("foreach", 8, dtype=torch.bfloat16, steps=2)
    other_params = clone_params(params)
    other = SASSHA(other_params, lr=0.01, lazy_hessian=2, backend="foreach", state_bits=8, master_weight_bits=24)
    other.load_state_dict(opt.state_dict())
    for p in other_params:
        assert torch.equal(other.state[p]["master_correction"], torch.zeros_like(p, dtype=torch.int8))
        assert torch.equal(other.master_weight(p), p.float())
    other.step(lambda: coupled_loss(other_params, 2))


@pytest.mark.parametrize("backend", ["eager", "foreach", "cpp"])
def test_msassha_float64_with_8bit_state(backend):
    """M-SASSHA perturbs along m decoded in the param's math dtype (float64 here)."""
    from sassha_fused import available_backends

    if not available_backends()[backend]:
        pytest.skip(available_backends()[backend].reason)
    params, opt = compact_run(backend, 8, cls=MSASSHA, dtype=torch.float64, steps=3)
    assert opt.global_step == 3 and all(torch.isfinite(p).all() for p in params)


def test_master_weight_is_x_t_while_the_params_hold_a_perturbed_point():
    for cls in (SASSHA, MSASSHA):
        params, opt = compact_run("foreach", 8, master=32, dtype=torch.bfloat16, steps=3, cls=cls)
        if cls is MSASSHA:
            assert opt.is_perturbed  # between steps the params hold x_t - nu m
            with opt.unperturbed():
                at_x_t = [opt.master_weight(p) for p in params]
            assert all(torch.equal(opt.master_weight(p), w) for p, w in zip(params, at_x_t))
        else:
            before = [opt.master_weight(p) for p in params]
            coupled_loss(params, 3).backward()
            opt.perturb_weights()
            assert all(torch.equal(opt.master_weight(p), w) for p, w in zip(params, before))
            opt.zero_grad()


def test_a_master_correction_for_a_float32_param_is_refused():
    a, b = make_params((40,), dtype=torch.bfloat16) + make_params((40,), dtype=torch.bfloat16, seed=1)
    opt = SASSHA([a, b], backend="foreach", master_weight_bits=24, lazy_hessian=1)
    opt.step(lambda: coupled_loss([a, b], 0))
    a2, b2 = make_params((40,), dtype=torch.bfloat16) + make_params((40,), seed=1)
    other = SASSHA([a2, b2], backend="foreach", master_weight_bits=24)
    with pytest.raises(ValueError, match="bfloat16 parameters only"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_add_param_group_checks_the_encoding_too():
    opt = SASSHA(make_params((4,), dtype=torch.bfloat16), master_weight_bits=24)
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": make_params((4,), dtype=torch.float16)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": make_params((4,))})  # float32 beside bfloat16: its own master
