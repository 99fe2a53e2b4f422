"""The fused Triton backend against the eager reference.

Runs under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by
conftest.py) and unchanged on a CUDA machine. The interpreter executes programs one
by one in numpy, so trajectories are short where tensors are many or large.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import pytest
import torch

from conftest import requires_triton
from parity import (
    DEVICE,
    EDGE_SIZES,
    SpyBackend,
    check_phases_match_eager,
    phase_bucket,
    assert_same_trajectory,
    clone_params,
    coupled_loss,
    make_params,
    run_trajectory,
)
from sassha_fused import MSASSHA, SASSHA, BackendUnavailable
from sassha_fused.backends import ProbeKeys
from sassha_fused.probes import key_prefix, probe_key, rademacher

pytestmark = requires_triton


def _triton(**kwargs):
    from sassha_fused.backends.triton_backend import TritonBackend

    return TritonBackend(**kwargs)


def _compare(cls, sizes, dtype, steps, protocol="closure", backend=None, loss_fn=coupled_loss,
             param_groups=None, **kwargs: Any):
    """Run eager and triton from the same start; assert the trajectories match."""
    start = make_params(sizes, dtype)
    ref_p, tri_p = clone_params(start), clone_params(start)
    backend = backend if backend is not None else _triton()

    def make(backend_arg):
        def build(ps):
            groups = ps if param_groups is None else param_groups(ps)
            return cls(groups, backend=backend_arg, **kwargs)
        return build

    ref_opt = run_trajectory(make("eager"), ref_p, steps, protocol, loss_fn=loss_fn)
    tri_opt = run_trajectory(make(backend), tri_p, steps, protocol, loss_fn=loss_fn)
    assert_same_trajectory(ref_p, ref_opt, tri_p, tri_opt)
    # the run moved the params: a backend that did nothing would not pass
    moved = [not torch.equal(a, b) for a, b in zip(start, tri_p) if a.numel()]
    assert any(moved)
    for p in tri_p:
        if p.numel():
            assert tri_opt.state[p]["exp_hessian_diag"].abs().sum() > 0
    return backend, tri_opt


# ------------------------------------------------------------------- phases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_phase_matches_eager(dtype):
    check_phases_match_eager(_triton(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probes_bitwise_equal_to_reference(dtype):
    # sizes cross word (32) and tile boundaries and go past 2**16 elements; every
    # bit position of the 32-bit hash is used
    sizes = [1, 31, 32, 33, 2049, 70001, 0]
    backend = _triton()
    b = phase_bucket(backend, dtype, sizes)
    b.param_index = [3, 0, 7, 2**20, 1, 9, 4]
    for seed, refresh, sample in [(0, 0, 0), (2**40 + 7, 5, 1), (2**64 - 1, 2**31 + 3, 3)]:
        keys = ProbeKeys(tuple(key_prefix(seed, refresh, s) for s in range(4)))
        before = backend.launches
        zs = backend.probes(b, keys, sample)
        assert backend.launches - before == 1  # every tensor in one launch
        for p, pidx, z in zip(b.params, b.param_index, zs):
            ref = rademacher(p.numel(), probe_key(seed, refresh, sample, pidx), dtype=dtype).view(p.shape)
            assert z.dtype == dtype and z.shape == p.shape
            assert torch.equal(z.cpu(), ref), (seed, refresh, sample, p.numel())


# --------------------------------------------------------------- trajectories
@pytest.mark.parametrize(
    "cls, dtype, protocol, lazy, n_samples, steps",
    [
        (SASSHA, torch.float32, "closure", 1, 1, 12),
        (SASSHA, torch.float32, "official", 10, 2, 12),
        (SASSHA, torch.bfloat16, "closure", 3, 1, 12),
        (SASSHA, torch.bfloat16, "official", 1, 2, 6),
        (MSASSHA, torch.float32, "closure", 1, 2, 12),
        (MSASSHA, torch.float32, "official", 10, 1, 12),
        (MSASSHA, torch.bfloat16, "official", 2, 1, 8),
    ],
)
def test_trajectory_matches_eager(cls, dtype, protocol, lazy, n_samples, steps):
    _compare(cls, EDGE_SIZES, dtype, steps, protocol, lr=0.05, lazy_hessian=lazy, n_samples=n_samples,
             weight_decay=1e-2)


@pytest.mark.parametrize(
    "cls, protocol, n_samples, scheme",
    [(SASSHA, "closure", 1, "forward"), (SASSHA, "official", 2, "central"), (MSASSHA, "closure", 2, "forward"),
     (MSASSHA, "official", 1, "central")],
)
def test_finite_difference_trajectory_matches_eager(cls, protocol, n_samples, scheme):
    _compare(cls, EDGE_SIZES, torch.float32, 6, protocol, lr=0.05, lazy_hessian=2, n_samples=n_samples,
             hvp="finite_difference", fd_scheme=scheme)


def test_adaptive_perturbation_matches_eager():
    _compare(SASSHA, EDGE_SIZES, torch.float32, 8, adaptive=True, lr=0.05, lazy_hessian=2, rho=0.1)


def test_hessian_power_variants_match_eager():
    # p = 1 and a general p take the kernel's other branches of D^p
    for power in (1.0, 0.75):
        _compare(SASSHA, (33, 1025), torch.float32, 4, lr=0.05, lazy_hessian=2, hessian_power=power)


def test_param_groups_mixed_dtypes_match_eager():
    def groups(ps):
        return [
            {"params": ps[0:3], "lr": 0.05, "weight_decay": 0.0, "rho": 0.2},
            {"params": ps[3:6], "lr": 0.02, "weight_decay": 0.1, "rho": 0.05, "betas": (0.8, 0.99)},
            {"params": ps[6:], "lr": 0.1, "weight_decay": 1e-3, "rho": 0.3, "eps": 1e-3},
        ]

    _compare(SASSHA, EDGE_SIZES, torch.float32, 10, param_groups=groups, lazy_hessian=3)
    _compare(MSASSHA, EDGE_SIZES, torch.float32, 6, param_groups=groups, lazy_hessian=2, n_samples=2)
    # one bf16 group next to fp32 groups: two dtype buckets in one call
    start = make_params(EDGE_SIZES, torch.float32)
    start[1:4] = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in start[1:4]]
    ref_p, tri_p = clone_params(start), clone_params(start)
    ref = run_trajectory(lambda ps: SASSHA(groups(ps), lazy_hessian=2, backend="eager"), ref_p, 6)
    tri = run_trajectory(lambda ps: SASSHA(groups(ps), lazy_hessian=2, backend=_triton()), tri_p, 6)
    assert_same_trajectory(ref_p, ref, tri_p, tri)


def _partly_linear_loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
    # param 2 enters linearly: it has a gradient but no Hessian-vector product (Hz None)
    rest = [p for k, p in enumerate(params) if k != 2]
    return coupled_loss(rest, step) + 0.3 * params[2].to(torch.float64).sum()


def test_params_absent_from_second_order_graph():
    start = make_params((33, 1025, 31, 3))
    ref_p, tri_p = clone_params(start), clone_params(start)
    kw = dict(lr=0.05, lazy_hessian=1, n_samples=2)
    ref = run_trajectory(lambda ps: SASSHA(ps, backend="eager", **kw), ref_p, 4, loss_fn=_partly_linear_loss)
    tri = run_trajectory(lambda ps: SASSHA(ps, backend=_triton(), **kw), tri_p, 4, loss_fn=_partly_linear_loss)
    assert_same_trajectory(ref_p, ref, tri_p, tri)
    assert torch.count_nonzero(tri.state[tri_p[2]]["exp_hessian_diag"]) == 0
    assert not torch.equal(start[2], tri_p[2])


def test_non_contiguous_param_falls_back_and_matches():
    start = make_params((33, 6, 1025))
    start[1] = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).t())
    assert not start[1].is_contiguous()
    ref_p, tri_p = clone_params(start), clone_params(start)
    ref = run_trajectory(lambda ps: SASSHA(ps, lazy_hessian=2, backend="eager"), ref_p, 4)
    tri = run_trajectory(lambda ps: SASSHA(ps, lazy_hessian=2, backend=_triton()), tri_p, 4)
    assert_same_trajectory(ref_p, ref, tri_p, tri)


# ----------------------------------------------------------- multi-tensor launches
def _launches_per_step(n_tensors: int, cls, lazy: int, n_samples: int) -> List[int]:
    backend = _triton()
    params = make_params([3] * n_tensors)
    opt = cls(params, lazy_hessian=lazy, n_samples=n_samples, backend=backend)
    counts = []
    for t in range(2):
        before = backend.launches
        opt.step(lambda: coupled_loss(params, t))
        counts.append(backend.launches - before)
    return counts


def test_launch_count_does_not_grow_with_tensor_count():
    # 2 steps with lazy_hessian=2: one refresh step, one plain step
    few = _launches_per_step(5, SASSHA, 2, 2)
    many = _launches_per_step(500, SASSHA, 2, 2)
    assert few == many
    # refresh: norm 2 + perturb 1 + probes S + finite check 2 (g~) + 2 S (H z) + update 1;
    # plain: norm 2 + perturb 1 + finite check 2 + update 1
    assert few == [12, 6]


def test_msassha_launch_count():
    # every step: finite check 2 (+ 2 per sample of H z) + update 1 + the next
    # perturbation (norm 2 + perturb 1), plus probes S on refresh steps
    assert _launches_per_step(5, MSASSHA, 1, 2) == [12, 12]
    assert _launches_per_step(5, MSASSHA, 2, 1) == [9, 6]


def test_many_small_tensors_match_eager():
    sizes = [(k % 7) + 1 for k in range(500)]
    _compare(SASSHA, sizes, torch.float32, 2, lazy_hessian=1)


def test_launch_cap_carries_rest_to_next_launch():
    capped = _triton(max_tensors_per_launch=3, max_blocks_per_launch=2)
    backend, _ = _compare(SASSHA, EDGE_SIZES, torch.float32, 4, backend=capped, lazy_hessian=2)
    # 7 non-empty tensors, 10001 elements span 5 tiles: several launches per phase
    assert backend.launches > 4 * 4 + 2 * 1


# --------------------------------------------------------------- determinism
def test_norm_is_deterministic_and_restore_is_bitwise():
    params = make_params(EDGE_SIZES)
    backend = _triton()
    opt = SASSHA(params, rho=0.3, backend=backend)
    before = [p.detach().clone() for p in params]
    coupled_loss(params, 0).backward()
    b = phase_bucket(backend, torch.float32, [p.numel() for p in params])
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]  # the empty one has none
    first = backend.sq_norm(b, grads, False, torch.float32)
    assert torch.equal(first, backend.sq_norm(b, grads, False, torch.float32))
    ref = sum((gr.double() ** 2).sum() for gr in grads)
    torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=0)
    opt.perturb_weights(zero_grad=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, params) if a.numel())
    opt.unperturb()
    for a, p in zip(before, params):
        assert torch.equal(a, p)


def test_norm_partials_are_summed_by_many_programs_in_fixed_order_rounds():
    from sassha_fused.backends import triton_backend as tb

    backend = _triton()
    chunk = tb.REDUCE_BLOCK * tb.REDUCE_ITERS
    n = 4 * chunk + 17  # a round of 5 programs, then the last round of one
    partials = torch.rand(n + 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # 3 past n: never read
    before = backend.launches
    total = backend._sum_partials(partials, n)
    assert backend.launches - before == 2 and tb.reduce_programs(n) == 5
    assert total.shape == () and torch.equal(total, backend._sum_partials(partials, n))
    torch.testing.assert_close(total.double().cpu(), partials[:n].double().sum().cpu(), rtol=1e-6, atol=0)


def test_two_runs_are_bitwise_identical():
    start = make_params(EDGE_SIZES)
    a, b = clone_params(start), clone_params(start)
    oa = run_trajectory(lambda ps: SASSHA(ps, lazy_hessian=2, backend=_triton()), a, 4)
    ob = run_trajectory(lambda ps: SASSHA(ps, lazy_hessian=2, backend=_triton()), b, 4)
    assert_same_trajectory(a, oa, b, ob, exact=True)


# ---------------------------------------------------------------- dispatch
def test_spy_sees_the_triton_backend_run():
    inner = _triton()
    spy = SpyBackend(inner)
    params = make_params((33, 1025))
    ref = clone_params(params)
    opt = SASSHA(params, lazy_hessian=1, backend=spy)
    ref_opt = SASSHA(ref, lazy_hessian=1, backend="eager")
    opt.step(lambda: coupled_loss(params, 0))
    ref_opt.step(lambda: coupled_loss(ref, 0))
    assert [phase for phase, _ in spy.calls] == ["sq_norm", "perturb", "probes", "sq_norm", "sq_norm", "update"]
    assert inner.launches == 9
    assert_same_trajectory(ref, ref_opt, params, opt)


def test_supports_and_refusals():
    backend = _triton()
    device = torch.device(DEVICE)  # the CPU only under the interpreter (no GPU here)
    assert backend.supports(device, torch.float32) is None
    assert backend.supports(device, torch.bfloat16) is None
    reason = backend.supports(device, torch.float64)
    assert reason is not None and "float64" in reason
    with pytest.raises(BackendUnavailable, match="float64"):
        SASSHA(make_params((3,), torch.float64), backend="triton")
    assert backend.name == "triton" and isinstance(backend.description, str)
