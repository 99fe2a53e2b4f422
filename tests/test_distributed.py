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
        for protocol in ("closure", "official"):
            params = [torch.nn.Parameter(v.clone()) for v in _split(_x0())]
            opt = SASSHA(params, lr=LR, rho=RHO, weight_decay=WD, eps=EPS, lazy_hessian=K, backend=backend)

            def loss():
                x = torch.cat([p.reshape(-1) for p in params])
                return 0.5 * (a * x * x).sum() + (b * x).sum()

            collectives = []
            for _ in range(STEPS):
                protocol_step(opt, loss, protocol)
                collectives.append(opt.last_step_collectives)
            results[protocol] = (torch.cat([p.detach().reshape(-1) for p in params]), collectives)

        # Collectives per step do not grow with the number of tensors.
        counts = {}
        for n_tensors in (5, 500):
            ps = [torch.nn.Parameter(torch.full((3,), 0.5 + rank, dtype=torch.float64)) for _ in range(n_tensors)]
            opt = SASSHA(ps, lazy_hessian=1, backend=backend)
            opt.step(lambda: sum((p**4).sum() for p in ps))
            counts[n_tensors] = opt.last_step_collectives

        # Rank 1 does not use param b on odd steps; rank 0 always does.
        a_, b_ = torch.nn.Parameter(torch.ones(4, dtype=torch.float64)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        uopt = SASSHA([a_, b_], lr=0.05, lazy_hessian=2, backend=backend)
        for t in range(6):
            use_b = rank == 0 or t % 2 == 0
            protocol_step(uopt, lambda: (a_**4).sum() * (1 + rank) + ((b_**4).sum() if use_b else 0), "closure")
        uneven = torch.cat([a_.detach(), b_.detach()])

        # M-SASSHA replicas stay bitwise equal too.
        ps = [torch.nn.Parameter(v.clone()) for v in _split(_x0())]
        mopt = MSASSHA(ps, lr=LR, rho=RHO, lazy_hessian=K, backend=backend)
        for _ in range(STEPS):
            mopt.step(lambda: sum(((1 + rank) * p**4).sum() for p in ps))
        with mopt.unperturbed():
            msassha = torch.cat([p.detach().reshape(-1) for p in ps])
        torch.save({"results": results, "counts": counts, "msassha": msassha, "uneven": uneven},
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
    for protocol in ("closure", "official"):
        x0, coll0 = r0["results"][protocol]
        x1, coll1 = r1["results"][protocol]
        assert torch.equal(x0, x1), f"{protocol}: replicas differ"
        torch.testing.assert_close(x0, expected, rtol=1e-11, atol=1e-13)
        # the participation mask, then g~ and (on refresh steps) H z in flat buckets:
        # one bucket for these small tensors
        assert coll0 == [2] * STEPS
    assert r0["counts"][5] == r0["counts"][500] == 2
    # ranks that differ in which params get a gradient still agree
    assert torch.equal(r0["uneven"], r1["uneven"])
    assert torch.equal(r0["msassha"], r1["msassha"])


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
