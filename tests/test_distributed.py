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


def test_fsdp2_parameters_get_a_clear_error():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
            with pytest.raises(NotImplementedError, match="DistributedDataParallel"):
                SASSHA(model.parameters())
        finally:
            dist.destroy_process_group()
