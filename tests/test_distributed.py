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

from parity import protocol_step
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


def _simulate(steps):
    """Single process, both ranks' data: the semantics of SPEC section 6."""
    problems = [_problem(r) for r in range(2)]
    x, m, d, c2 = _x0(), torch.zeros(sum(SIZES), dtype=torch.float64), None, None
    d = torch.zeros_like(m)
    for t in range(1, steps + 1):
        gt = []
        for a, b in problems:
            g = a * x + b
            e = RHO * g / (g.norm() + 1e-12)
            gt.append(a * (x + e) + b)
        gt = (gt[0] + gt[1]) / 2
        if (t - 1) % K == 0:
            h = (problems[0][0] + problems[1][0]) / 2  # z * mean(H_r z) = mean(a_r)
            d = B2 * d + (1 - B2) * h.abs()
            c2 = (1 - B2**t) ** 0.5
        m = B1 * m + (1 - B1) * gt
        x = x * (1 - LR * WD) - LR / (1 - B1**t) * m / (d.sqrt() / c2 + EPS)
    return x


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
    for (protocol, hvp), (x0, coll0) in r0["results"].items():
        x1, coll1 = r1["results"][protocol, hvp]
        assert torch.equal(x0, x1), f"{protocol}, {hvp}: replicas differ"
        # On a quadratic the finite differences are exact up to the rounding of two
        # gradients over the step delta (about 1e-8 relative in float64).
        tol = dict(rtol=1e-11, atol=1e-13) if hvp == "autograd" else dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(x0, expected, **tol)
        # the participation mask, then g~ and (on refresh steps) H z or the gradients
        # at the difference point in flat buckets: one bucket for these small tensors
        assert coll0 == [2] * STEPS, (protocol, hvp)
    assert r0["counts"][5] == r0["counts"][500] == 2
    # ranks that differ in which params get a gradient still agree
    for hvp in ("autograd", "finite_difference"):
        assert torch.equal(r0["uneven"][hvp], r1["uneven"][hvp]), hvp
    torch.testing.assert_close(r0["uneven"]["finite_difference"], r0["uneven"]["autograd"], rtol=1e-5, atol=0)
    assert torch.equal(r0["msassha"], r1["msassha"])
    assert torch.equal(r0["fd_diag"], r1["fd_diag"])
    torch.testing.assert_close(r0["fd_diag"], (1 - 0.999) * torch.tensor([4.0, 2.0, 2.0]), rtol=1e-3, atol=0)


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
    expected = _simulate(STEPS)
    assert len(r0) == 3
    for protocol, (x0, coll0, method) in r0.items():
        x1, coll1, _ = r1[protocol]
        assert torch.equal(x0, x1), f"{protocol}: replicas differ"
        assert method == "finite_difference"
        assert coll0 == coll1 == [0] * STEPS, protocol
        torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(r0["closure"][0], r0["official"][0], rtol=1e-12, atol=1e-14)
    for protocol in m0:
        assert torch.equal(m0[protocol], m1[protocol]), f"M-SASSHA {protocol}: replicas differ"
    torch.testing.assert_close(m0["closure"], m0["optimizer-averaged"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m0["official"], m0["optimizer-averaged"], rtol=1e-9, atol=1e-12)


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
