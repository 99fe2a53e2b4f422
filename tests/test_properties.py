"""Property-based: random shapes, dtypes, groups and hyper-parameters; every
available backend equals the eager reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import device_for, every_backend
from parity import assert_same_trajectory, clone_params, coupled_loss
from sassha_fused import MSASSHA, SASSHA

# The Triton interpreter is slow on the CPU: it gets fewer examples here, and the
# full count on a GPU.
_ON_GPU = torch.cuda.is_available()
DTYPES = {"foreach": [torch.float64, torch.float32, torch.bfloat16],
          "cpp": [torch.float64, torch.float32, torch.bfloat16],
          "triton": [torch.float32, torch.bfloat16],
          "cuda": [torch.float32, torch.bfloat16]}


@st.composite
def problems(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    sizes = draw(st.lists(st.integers(0, 300), min_size=1, max_size=5))
    n_groups = draw(st.integers(1, min(3, len(sizes))))
    groups = []
    for g in range(n_groups):
        groups.append(dict(
            lr=draw(st.floats(1e-4, 0.05)),
            weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
            rho=draw(st.floats(0.0, 0.5)),
            betas=(draw(st.floats(0.0, 0.95)), draw(st.floats(0.5, 0.9999))),
        ))
    options = dict(
        lazy_hessian=draw(st.integers(1, 4)),
        n_samples=draw(st.integers(1, 2)),
        hessian_power=draw(st.sampled_from([0.5, 1.0, 0.75])),
        eps=draw(st.sampled_from([1e-4, 1e-3])),
        seed=draw(st.integers(0, 2**40)),
        hvp=draw(st.sampled_from(["autograd", "finite_difference"])),
        fd_scheme=draw(st.sampled_from(["forward", "central"])),
    )
    cls = draw(st.sampled_from([SASSHA, MSASSHA]))
    if cls is SASSHA:
        options["adaptive"] = draw(st.booleans())
    init_seed = draw(st.integers(0, 1000))
    return dtype, sizes, groups, options, cls, init_seed


def _make(sizes, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(n, generator=g, dtype=torch.float64) * 0.5).to(device, dtype))
            for n in sizes]


@pytest.mark.parametrize("backend", every_backend("foreach", "cpp", "triton", "cuda"))
def test_backend_equals_reference(backend):
    examples = 25 if backend != "triton" or _ON_GPU else 4

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems(backend))
    def check(problem):
        dtype, sizes, groups, options, cls, init_seed = problem
        p0 = _make(sizes, dtype, init_seed, device_for(backend))

        def run(name, params):
            split = [params[i::len(groups)] for i in range(len(groups))]
            opt = cls([dict(params=ps, **g) for ps, g in zip(split, groups) if ps], backend=name, **options)
            for t in range(6):
                opt.step(lambda: coupled_loss(params, t))
            return opt

        ref, new = clone_params(p0), clone_params(p0)
        assert_same_trajectory(ref, run("eager", ref), new, run(backend, new))

    check()
