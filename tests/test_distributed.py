"""Data-parallel semantics (SPEC section 6) with two gloo processes on the CPU.

Each rank has its own data, so its own first-pass gradient and perturbation; the
perturbed gradients and Hessian-vector products are averaged. On a diagonal
quadratic with a linear term, f_r(x) = 1/2 sum a_r x^2 + b_r . x, every quantity
has a closed form, so the two-process result is checked against a single-process
computation of the same semantics, and the replicas against each other bitwise.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parity import assert_within, outside_tolerance, protocol_step
from sassha_fused import MSASSHA, SASSHA

SIZES = [5, 0, 33, 2]
STEPS, K = 12, 3
LR, RHO, WD, EPS, B1, B2 = 0.05, 0.1, 0.01, 1e-4, 0.9, 0.999


def _problem(rank):
    g = torch.Generator().manual_seed(100 + rank)
    n = sum(SIZES)
    a = torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1  # indefinite
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b


def _x0():
    return torch.linspace(-1, 1, sum(SIZES), dtype=torch.float64)


def _split(v):
    return list(torch.split(v, SIZES))


def _simulate(steps, draw=None, fd=False, rho=RHO):
    """Single process, both ranks' data: the semantics of SPEC section 6.

    ``draw``: every quantity moved by its rounding bound (``_tolerance``), random signs
    from a seeded generator; ``fd``: h also moved by a finite difference's rounding.
    """
    problems = [_problem(r) for r in range(2)]
    n = sum(SIZES)
    gen = torch.Generator().manual_seed(1000 + (draw or 0))
    u = torch.finfo(torch.float64).eps / 2

    def rounded(v, magnitude, ulps=ELEM_ULPS):
        if draw is None:
            return v
        sign = torch.randint(0, 2, v.shape, generator=gen).to(v.dtype) * 2 - 1
        return v + sign * (ulps * u) * magnitude

    x, m, d, c2 = _x0(), torch.zeros(n, dtype=torch.float64), None, None
    d = torch.zeros_like(m)
    for t in range(1, steps + 1):
        gt, scale = [], []
        for a, b in problems:
            g = rounded(a * x + b, (a * x).abs() + b.abs())
            e = rho * g / (rounded(g.norm(), g.norm(), n) + 1e-12)
            e = rounded(e, e.abs())
            xe = x + e
            gt.append(rounded(a * xe + b, a.abs() * (x.abs() + e.abs()) + b.abs()))
            scale.append(a.abs() * xe.abs() + b.abs())
        gt = rounded((gt[0] + gt[1]) / 2, (gt[0].abs() + gt[1].abs()) / 2)
        if (t - 1) % K == 0:
            a0, a1 = problems[0][0], problems[1][0]
            h = rounded((a0 + a1) / 2, (a0.abs() + a1.abs()) / 2)  # z * mean(H_r z) = mean(a_r)
            if fd:
                # float64's step: 1e-7 (1 + ||x_t||) / sqrt(N), held in float32 (hvp.fd_scalars)
                delta = float(torch.tensor(1e-7 * (1 + x.norm().item()) / n**0.5, dtype=torch.float32))
                h = rounded(h, (scale[0] + scale[1]) / 2 / delta, FD_ULPS)
            d = rounded(B2 * d + (1 - B2) * h.abs(), B2 * d + (1 - B2) * h.abs())
            c2 = float(rounded(torch.tensor((1 - B2**t) ** 0.5, dtype=torch.float64), (1 - B2**t) ** 0.5))
        m = rounded(B1 * m + (1 - B1) * gt, B1 * m.abs() + (1 - B1) * gt.abs())
        step = LR / (1 - B1**t) * m / (d.sqrt() / c2 + EPS)
        x = rounded(x * (1 - LR * WD) - step, (x * (1 - LR * WD)).abs() + step.abs())
    return x


# ---------------------------------------------------------------- tolerances from a rounding bound
# The ranks compute what _simulate computes in another order of operations, so each
# comparison's tolerance comes from bounds on that rounding, carried through the 12 steps by
# rerunning _simulate under them (the chain divides by sqrt(d), small where mean(a) is, which a
# hand bound would overstate by orders of magnitude):
# - every elementwise quantity (g, e, g~, h, d, m, x and c2) is a formula of at most 4 rounded
#   operations in either implementation, each erring by at most u (= eps / 2) times its
#   operands' magnitudes: the two differ by at most ELEM_ULPS = 2 * 4 u times the magnitudes
#   of the terms (not of the result: cancellation is covered); the norm ||g|| is a sum of
#   N = 40 squares in any order: N u relative;
# - finite differences (fd=True): h = z (g(x~ + delta z) - g(x~)) / delta, exact on a
#   quadratic but for the rounding of two gradients a_r y + b_r (3 operations each) and of the
#   move x~ + delta z (u |x~|, times |a_r|), averaged over the ranks (1 more): FD_ULPS = 8 u
#   (|a_r| |x~_r| + |b_r|) / delta, delta ~ 7e-8: about 1e-8 relative.
# Each draw moves every quantity by +-its bound, random signs; the tolerance is SAFETY times the
# largest deviation of DRAWS draws, per element (per-element maxima of 16 draws vary up to 2.1x
# between seeds). Measured here (float64, eager and foreach, 1 and 2 threads): autograd runs
# 8.9e-16 from _simulate, 1/40 of the tolerance (4e-15..8e-14); finite differences (the gloo and
# the DDP runs) 2.8e-8, 1/23 of it (1e-9..2.6e-6). A wrong result fails: rho 1% off (asserted
# below) lies up to 3e10 times (autograd) and 2.5e4 times (finite differences) outside it.
ELEM_ULPS, FD_ULPS, DRAWS, SAFETY = 2 * 4, 8, 16, 4


def _tolerance(fd):
    expected = _simulate(STEPS)
    spread = torch.stack([(_simulate(STEPS, draw, fd) - expected).abs() for draw in range(DRAWS)]).amax(0)
    return SAFETY * spread


def _worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _problem(rank)
        results = {}
        for protocol, hvp in (("closure", "autograd"), ("official", "autograd"),
                              ("closure", "finite_difference"), ("official", "finite_difference")):
            params = [torch.nn.Parameter(v.clone()) for v in _split(_x0())]
            opt = SASSHA(params, lr=LR, rho=RHO, weight_decay=WD, eps=EPS, lazy_hessian=K, backend=backend, hvp=hvp)

            def loss():
                x = torch.cat([p.reshape(-1) for p in params])
                return 0.5 * (a * x * x).sum() + (b * x).sum()

            collectives = []
            for _ in range(STEPS):
                protocol_step(opt, loss, protocol)
                collectives.append(opt.last_step_collectives)
            results[protocol, hvp] = (torch.cat([p.detach().reshape(-1) for p in params]), collectives)

        # Collectives per step do not grow with the number of tensors.
        counts = {}
        for n_tensors in (5, 500):
            ps = [torch.nn.Parameter(torch.full((3,), 0.5 + rank, dtype=torch.float64)) for _ in range(n_tensors)]
            opt = SASSHA(ps, lazy_hessian=1, backend=backend)
            opt.step(lambda: sum((p**4).sum() for p in ps))
            counts[n_tensors] = opt.last_step_collectives

        # Rank 1 does not use param b on odd steps; rank 0 always does.
        uneven = {}
        for hvp in ("autograd", "finite_difference"):
            a_ = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
            b_ = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            uopt = SASSHA([a_, b_], lr=0.05, lazy_hessian=2, backend=backend, hvp=hvp)
            for t in range(6):
                use_b = rank == 0 or t % 2 == 0
                protocol_step(uopt, lambda: (a_**4).sum() * (1 + rank) + ((b_**4).sum() if use_b else 0), "closure")
            uneven[hvp] = torch.cat([a_.detach(), b_.detach()])

        # Finite differences, float32 (the precision decision is all-reduced): rank 1's
        # difference pass does not reach param b, so its estimate for b is no difference
        # (y = g~), and D_b is half rank 0's curvature.
        curv = torch.tensor([[2.0, 3.0, 4.0], [6.0, 1.0, 5.0]])[rank]
        pa, pb = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        fopt = SASSHA([pa, pb], lazy_hessian=1, backend=backend, hvp="finite_difference")
        calls = [0]

        def partial_loss():
            calls[0] += 1
            x = torch.cat([pa, pb if rank == 0 or calls[0] < 3 else pb.detach()])
            return 0.5 * (curv * x * x).sum()

        fopt.step(partial_loss)
        fd_diag = torch.cat([fopt.state[pa]["exp_hessian_diag"], fopt.state[pb]["exp_hessian_diag"]])

        # M-SASSHA replicas stay bitwise equal too.
        ps = [torch.nn.Parameter(v.clone()) for v in _split(_x0())]
        mopt = MSASSHA(ps, lr=LR, rho=RHO, lazy_hessian=K, backend=backend)
        for _ in range(STEPS):
            mopt.step(lambda: sum(((1 + rank) * p**4).sum() for p in ps))
        with mopt.unperturbed():
            msassha = torch.cat([p.detach().reshape(-1) for p in ps])
        torch.save({"results": results, "counts": counts, "msassha": msassha, "uneven": uneven, "fd_diag": fd_diag},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing down gloo mid-collective aborts the other rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_two_gloo_ranks(backend):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp, backend), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"))
        r1 = torch.load(os.path.join(tmp, "rank1.pt"))
    expected = _simulate(STEPS)
    tolerance = {hvp: _tolerance(hvp == "finite_difference") for hvp in ("autograd", "finite_difference")}
    for (protocol, hvp), (x0, coll0) in r0["results"].items():
        x1, coll1 = r1["results"][protocol, hvp]
        assert torch.equal(x0, x1), f"{protocol}, {hvp}: replicas differ"
        assert_within(x0, expected, tolerance[hvp], f"{protocol}, {hvp} vs _simulate")
        # the participation mask, then g~ and (on refresh steps) H z or the gradients
        # at the difference point in flat buckets: one bucket for these small tensors
        assert coll0 == [2] * STEPS, (protocol, hvp)
    wrong = _simulate(STEPS, rho=RHO * 1.01)
    assert outside_tolerance(wrong, expected, tolerance["autograd"]) and outside_tolerance(wrong, expected, tolerance["finite_difference"])
    assert r0["counts"][5] == r0["counts"][500] == 2
    # ranks that differ in which params get a gradient still agree
    for hvp in ("autograd", "finite_difference"):
        assert torch.equal(r0["uneven"][hvp], r1["uneven"][hvp]), hvp
    # Finite differences against autograd on c x^4 (x_0 = 1, 7 elements, float64): the forward
    # difference of g = 4 c x^3 at the HVP point x~ errs by the truncation delta / |x~| relative
    # (12 c x~ delta z over 12 c x~^2, plus delta^2 / 3 x~^2), plus the rounding of the two
    # gradients and the move (FD_ULPS u |x~| / delta relative, as above); delta = 1e-7 (1 + ||x_t||)
    # / sqrt(7) lies between 1e-7 / sqrt(7) and 1e-7 (1 + sqrt(7)) / sqrt(7) (the iterates shrink
    # from x_0), and lr = 0.05 keeps |x~| <= 1 + rho (0.2, the default) and the iterates above their
    # final values. Each update divides by sqrt of an average of |h|: a relative error eps_h of h
    # moves each step by at most eps_h / 2 of itself, and the steps (a descent from 1) add up to
    # |x_0 - x_6| per element. SAFETY covers the feedback through the later gradients (a changed
    # x changes g by 12 c x^2 times it, the step by lr (1 - beta1) / (1 - beta1^t) / sqrt(d^) times
    # that: at most 1.17 per step, 2.6 over 6). Measured here: 2.3e-8, 1/11 of the tolerance
    # (2.7e-7 at most).
    ag, fd = r0["uneven"]["autograd"], r0["uneven"]["finite_difference"]
    u = torch.finfo(torch.float64).eps / 2
    delta_lo, delta_hi = 1e-7 / 7**0.5, 1e-7 * (1 + 7**0.5) / 7**0.5
    eps_h = delta_hi / ag.min() + (delta_hi / ag.min()) ** 2 / 3 + FD_ULPS * u * (1 + 0.2) / delta_lo
    assert_within(fd, ag, SAFETY * eps_h / 2 * (1 - ag).abs(), "uneven ranks: finite differences vs autograd")
    assert torch.equal(r0["msassha"], r1["msassha"])
    assert torch.equal(r0["fd_diag"], r1["fd_diag"])
    # One float32 finite difference on 0.5 curv x^2 at x_t = 1 (3 elements): exact on a quadratic
    # but for the rounding of the move x~ + delta z (u |x~|, times curv) and of two gradients
    # curv y (3 operations each: 6 u |curv x~|), averaged over the ranks (1 more), over
    # delta = 1e-3 (1 + sqrt(3)) / sqrt(3): FD_ULPS u32 |x~| / delta times the ranks' mean |curv|,
    # |x~| <= 1 + rho (0.2); then (1 - beta2) |h|, a few ulps more. Up to 4e-4 relative (7e-4 for
    # b, whose h is half the ranks' mean curvature); measured here 1.7e-5 relative, 1/21 of it.
    u32 = torch.finfo(torch.float32).eps / 2
    mean_curv = torch.tensor([4.0, 2.0, 4.5])  # the ranks' mean |curv| per element
    delta32 = 1e-3 * (1 + 3**0.5) / 3**0.5
    fd_tol = (1 - 0.999) * (FD_ULPS * u32 * (1 + 0.2) / delta32 * mean_curv + 4 * u32 * torch.tensor([4.0, 2.0, 2.0]))
    expected_diag = (1 - 0.999) * torch.tensor([4.0, 2.0, 2.0])
    assert_within(r0["fd_diag"], expected_diag, fd_tol, "float32 finite differences")
    assert outside_tolerance(expected_diag * 1.01, expected_diag, fd_tol)  # 1% off: 12x the tolerance (b) to 27x


class _Quadratic(torch.nn.Module):
    """The quadratic of ``_problem`` as a module, for DistributedDataParallel."""

    def __init__(self):
        super().__init__()
        self.parts = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in _split(_x0())])

    def forward(self, a, b):
        x = torch.cat([p.reshape(-1) for p in self.parts])
        return 0.5 * (a * x * x).sum() + (b * x).sum()


def _ddp_native_worker(rank, world, init_file, out_dir, backend):
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _problem(rank)
        results = {}
        for protocol, bucket_view in (("closure", False), ("official", False), ("closure", True)):
            # gradient_as_bucket_view: DDP writes every pass's gradient into the same memory
            model = DistributedDataParallel(_Quadratic(), gradient_as_bucket_view=bucket_view)
            opt = SASSHA(model.parameters(), lr=LR, rho=RHO, weight_decay=WD, eps=EPS, lazy_hessian=K,
                         backend=backend, no_sync=model.no_sync)
            collectives = []
            for _ in range(STEPS):
                if protocol == "closure":
                    opt.step(lambda: model(a, b))
                else:
                    with model.no_sync():  # each rank's own gradient: its own perturbation
                        model(a, b).backward()
                    opt.perturb_weights(zero_grad=True)
                    model(a, b).backward()  # DDP averages this pass ...
                    for _ in opt.hvp_passes():
                        model(a, b).backward()  # ... and the finite-difference passes
                    opt.unperturb()
                    opt.step()
                    opt.zero_grad()
                collectives.append(opt.last_step_collectives)
            results[protocol + ("-bucket-view" if bucket_view else "")] = (
                torch.cat([p.detach().reshape(-1) for p in model.parameters()]), collectives, opt.hvp_method)
        # M-SASSHA: one pass per step at a point every replica shares; DDP averages it with
        # distributed=False (its closure passes then call backward(), which runs DDP's hooks)
        msassha = {}
        for protocol in ("closure", "official", "optimizer-averaged"):
            if protocol == "optimizer-averaged":
                model, kw = _Quadratic(), {}
            else:
                model, kw = DistributedDataParallel(_Quadratic(), gradient_as_bucket_view=True), {"distributed": False}
            opt = MSASSHA(model.parameters(), lr=LR, rho=RHO, lazy_hessian=K, backend=backend,
                          hvp="finite_difference", **kw)
            for _ in range(STEPS):
                protocol_step(opt, lambda: model(a, b), "official" if protocol == "official" else "closure")
            with opt.unperturbed():
                msassha[protocol] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.save((results, msassha), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing down gloo mid-collective aborts the other rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_ddp_native_reducer_averages_the_passes(backend):
    """DDP's reducer averages the perturbed and finite-difference passes, the first runs
    under no_sync: the semantics of the optimizer's own averaging, no collective of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_native_worker, args=(2, os.path.join(tmp, "init"), tmp, backend), nprocs=2, join=True)
        (r0, m0), (r1, m1) = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    expected, tolerance = _simulate(STEPS), _tolerance(fd=True)
    assert len(r0) == 3
    for protocol, (x0, coll0, method) in r0.items():
        x1, coll1, _ = r1[protocol]
        assert torch.equal(x0, x1), f"{protocol}: replicas differ"
        assert method == "finite_difference"
        assert coll0 == coll1 == [0] * STEPS, protocol
        assert_within(x0, expected, tolerance, f"DDP {protocol} vs _simulate")
    # Bitwise, on any CPU: both protocols take the same passes and DDP averages the same
    # gradients; the closure's difference quotient, (y - g) z / delta inside the update
    # (FD_DIRECT), and the official one, folded as (y - g) z * 1.0 / delta (PRECOMPUTED), are the
    # same correctly rounded IEEE operations on the same operands (z = +-1 and 1.0 multiply
    # exactly), then the same update; no reduction of another order comes in.
    assert torch.equal(r0["closure"][0], r0["official"][0])
    for protocol in m0:
        assert torch.equal(m0[protocol], m1[protocol]), f"M-SASSHA {protocol}: replicas differ"
    # Bitwise too: with two ranks DDP's average (each gradient halved, then summed) and the
    # optimizer's (summed, then halved) give the same bits: a + b = b + a in IEEE arithmetic and
    # halving is exact (no subnormals here); both average the gradients at the difference point
    # before the quotient, which is then the same operations as above.
    assert torch.equal(m0["closure"], m0["optimizer-averaged"])
    assert torch.equal(m0["official"], m0["optimizer-averaged"])


def test_no_sync_needs_finite_differences_and_a_callable():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="finite_difference"):
        SASSHA(model.parameters(), hvp="autograd", no_sync=lambda: None)
    with pytest.raises(ValueError, match="no_sync"):
        SASSHA(model.parameters(), no_sync=True)
    opt = SASSHA(model.parameters(), no_sync=lambda: None)
    assert opt.hvp_method == "finite_difference"
    # a checkpoint of a run that took autograd HVPs does not switch it back
    trained = SASSHA(model.parameters())
    trained.step(lambda: (model(torch.ones(4, 3)) ** 2).sum())
    assert trained.hvp_method == "autograd"
    opt.load_state_dict(trained.state_dict())
    assert opt.hvp_method == "finite_difference" and opt.global_step == 1


def _scaler_overflow_worker(rank, world, init_file, out_dir, distributed):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        w = torch.nn.Parameter(torch.full((4,), 1e-11))
        scaler = torch.amp.GradScaler("cpu")
        opt = SASSHA([w], lr=1e-3, rho=1e-13, backend="foreach", hvp="autograd", grad_scaler=scaler,
                     distributed=distributed)
        c = 1e14 if rank == 0 else 1.0  # only rank 0's scaled Hessian-vector product overflows

        def loss():
            return ((c * w) ** 4).sum()

        scaler.scale(loss()).backward()
        opt.perturb_weights(zero_grad=True)
        scaler.scale(loss()).backward(create_graph=opt.hessian_due)
        opt.unperturb()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        dist.barrier()
        torch.save({"step": opt.global_step, "scale": scaler.get_scale(), "w": w.detach().clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("distributed", [True, False], ids=["optimizer-averages", "wrapper-averages"])
def test_grad_scaler_overflow_on_one_rank_skips_the_step_on_every_rank(distributed):
    """A Hessian estimate that overflows on one rank only is reported to every rank's scaler
    (one MAX): all skip the step together, none waits alone in a collective."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_scaler_overflow_worker, args=(2, os.path.join(tmp, "init"), tmp, distributed), nprocs=2,
                 join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    assert r0["step"] == r1["step"] == 0
    assert r0["scale"] == r1["scale"] < 65536.0
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["w"], torch.full((4,), 1e-11))


def _compact_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _problem(rank)
        out = {}
        for mode in ("optimizer-averages", "ddp-native"):
            if mode == "ddp-native":
                model = DistributedDataParallel(_Quadratic())
                kw = {"no_sync": model.no_sync}
            else:
                model, kw = _Quadratic(), {}
            opt = SASSHA(model.parameters(), lr=LR, rho=RHO, weight_decay=WD, eps=EPS, lazy_hessian=K,
                         backend="foreach", state_bits=8, **kw)
            for _ in range(STEPS):
                opt.step(lambda: model(a, b))
            out[mode] = [p.detach().clone() for p in model.parameters()] + [
                v.clone() for p in model.parameters() for k, v in sorted(opt.state[p].items())
                if k.startswith("exp_")]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_compact_state_stays_identical_on_every_replica():
    """state_bits=8 with data parallelism: every rank encodes the same averaged inputs to the same
    codes and scales (the optimizer's averaging and DDP's reducer alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compact_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    for mode in r0:
        assert len(r0[mode]) > 2
        for x0, x1 in zip(r0[mode], r1[mode]):
            assert torch.equal(x0, x1), mode
    assert any(t.dtype == torch.int8 and t.abs().max() > 0 for t in r0["ddp-native"])
