"""The foreach backend equals the eager reference: many steps, every state entry."""

import pytest
import torch

from parity import EDGE_SIZES, assert_same_trajectory, clone_params, make_params, run_trajectory
from sassha_fused import MSASSHA, SASSHA
from sassha_fused.backends.foreach import ForeachBackend

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _pair(cls, p0, steps, protocol="closure", groups=None, frozen=None, **kw):
    ref, new = clone_params(p0), clone_params(p0)

    def factory(backend):
        def make(ps):
            if groups is None:
                return cls(ps, backend=backend, **kw)
            return cls([dict(params=[ps[i] for i in idx], **g) for idx, g in groups], backend=backend, **kw)
        return make

    ref_opt = run_trajectory(factory("eager"), ref, steps, protocol, frozen=frozen)
    new_opt = run_trajectory(factory("foreach"), new, steps, protocol, frozen=frozen)
    return ref, ref_opt, new, new_opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("protocol", ["closure", "official"])
def test_sassha_edge_sizes_many_steps(dtype, protocol):
    p0 = make_params(EDGE_SIZES, dtype)
    assert_same_trajectory(*_pair(SASSHA, p0, 32, protocol, lr=0.01, lazy_hessian=3, weight_decay=1e-2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sassha_groups_samples_adaptive(dtype):
    p0 = make_params([5, 33, 64, 0, 1, 257], dtype, seed=3)
    groups = [
        ([0, 1], dict(lr=0.02, weight_decay=0.05, rho=0.1)),
        ([2, 3], dict(lr=0.005, rho=0.3, betas=(0.8, 0.99))),
        ([4, 5], dict(eps=1e-3, perturb_eps=1e-8)),
    ]
    assert_same_trajectory(*_pair(SASSHA, p0, 30, groups=groups, lr=0.01, lazy_hessian=2,
                                  n_samples=2, adaptive=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("protocol", ["closure", "official"])
def test_msassha_many_steps(dtype, protocol):
    p0 = make_params(EDGE_SIZES[:6] + (300,), dtype, seed=5)
    assert_same_trajectory(*_pair(MSASSHA, p0, 30, protocol, lr=0.01, lazy_hessian=4,
                                  weight_decay=1e-2, n_samples=2))


def test_params_that_miss_steps():
    p0 = make_params([17, 40, 3], torch.float32, seed=7)
    frozen = lambda t, k: (k == 1 and t % 3 == 1) or (k == 2 and t < 4)  # noqa: E731
    assert_same_trajectory(*_pair(SASSHA, p0, 20, frozen=frozen, lr=0.01, lazy_hessian=3))
    assert_same_trajectory(*_pair(MSASSHA, p0, 20, frozen=frozen, lr=0.01, lazy_hessian=3))


def test_foreach_path_really_ran():
    class Spy(ForeachBackend):
        def __init__(self):
            self.calls = []

        def update(self, b, x_t, grads, scalars, power, refresh):
            self.calls.append(len(b.params))
            return super().update(b, x_t, grads, scalars, power, refresh)

    spy = Spy()
    ps = make_params([3, 4, 5])
    opt = SASSHA(ps, backend=spy)
    for t in range(3):
        opt.step(lambda: sum((p**4).sum() for p in ps))
    assert spy.calls == [3, 3, 3]
