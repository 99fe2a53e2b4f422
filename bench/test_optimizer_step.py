"""Optimizer-side SASSHA step, every implementation, pytest-benchmark.

What one case times: the optimizer's work of one training step with synthetic
gradients (see ``common.py``): perturbation (global norm + climb), restore, and the
update, on a refresh step (with the Hessian-vector product of a cheap graph, the
probes and the |z*Hz| EMA) or a non-refresh step. AdamW's step is timed on the same
tensors for scale.
"""

import pytest
import torch

from common import implementations, make_problem, synchronize

TENSORS = [10, 100, 1000]


def _device(config):
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _cases():
    # AdamW has no refresh step and the compiled eager step covers the non-refresh
    # step only: one row each per problem.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in implementations(device):
        for refresh in (False, True):
            if refresh and (name.startswith("adamw") or name == "compiled-eager"):
                continue
            yield pytest.param(name, refresh, id=f"{name}-{'refresh' if refresh else 'nonrefresh'}")


@pytest.mark.parametrize("n_tensors", TENSORS)
@pytest.mark.parametrize("impl_name,refresh", list(_cases()))
def test_step(benchmark, request, impl_name, refresh, numel, n_tensors):
    device = _device(request.config)
    problem = make_problem(numel, n_tensors, device)
    try:
        impl = implementations(device)[impl_name](problem, refresh)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    benchmark.group = f"{numel:,} params / {n_tensors} tensors / {'refresh' if refresh else 'non-refresh'}"
    benchmark.extra_info.update(impl=impl_name, numel=numel, tensors=n_tensors, refresh=refresh,
                                device=str(device))

    def run():
        impl.step()
        synchronize(device)

    benchmark.pedantic(run, rounds=5 if numel >= 10**8 else 15, warmup_rounds=2, iterations=1)
    assert all(torch.isfinite(p).all() for p in problem.params[:3])
