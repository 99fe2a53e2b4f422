"""sharpness.measure against exact values: closed forms, and a dense Hessian from torch.func."""

import pytest
import torch
import torch.nn.functional as F

from sassha_fused import sharpness


class _Quadratic(torch.nn.Module):
    """L(x) = 1/2 x^T A x + b^T x, whatever the batch (the inputs are ignored)."""

    def __init__(self, a, b, x0):
        super().__init__()
        self.a, self.b = a, b
        self.x = torch.nn.Parameter(x0.clone())

    def forward(self, inputs):
        return 0.5 * self.x @ self.a @ self.x + self.b @ self.x


def _spectrum_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


BATCHES = [(None, None)]
LOSS = lambda out, _: out  # noqa: E731


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_quadratic_with_known_spectrum(hvp):
    eigs = [9.0, 4.0, 2.5, -1.0, 0.5, 0.1]
    a = _spectrum_matrix(eigs)
    b = torch.linspace(-1, 1, 6, dtype=torch.float64)
    x0 = torch.linspace(0.3, -0.7, 6, dtype=torch.float64)
    model = _Quadratic(a, b, x0)
    r = sharpness.measure(model, LOSS, BATCHES, rho=0.1, n_samples=400, tol=1e-10, max_iter=500, hvp=hvp)
    assert r.hvp_method == hvp
    assert r.lambda_max == pytest.approx(9.0, rel=1e-6)
    assert r.lambda_max_residual < 1e-3
    # Hutchinson on a dense matrix: the estimate is within a few standard errors of tr A
    assert abs(r.trace - sum(eigs)) < 4 * r.trace_stderr + 1e-9
    # delta_worst directly: L(x + rho g/|g|) - L(x), g = A x + b
    f = lambda x: float(0.5 * x @ a @ x + b @ x)  # noqa: E731
    g = a @ x0 + b
    assert r.delta_worst == pytest.approx(f(x0 + 0.1 * g / g.norm()) - f(x0), rel=1e-9)
    # on a quadratic, E[L(x + rho u) - L(x)] over unit directions = rho^2 tr(A) / (2n)
    assert abs(r.delta_avg - 0.01 * sum(eigs) / 12) < 4 * r.delta_avg_stderr
    assert r.loss == pytest.approx(f(x0), rel=1e-12)


def test_diagonal_hessian_trace_is_exact():
    """Rademacher probes of a diagonal matrix: every sample z^T A z is tr A."""
    d = [3.0, -2.0, 0.5, 7.0]
    model = _Quadratic(torch.diag(torch.tensor(d, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64),
                       torch.ones(4, dtype=torch.float64))
    r = sharpness.measure(model, LOSS, BATCHES, n_samples=5)
    assert r.trace == pytest.approx(sum(d), abs=1e-12) and r.trace_stderr == pytest.approx(0, abs=1e-12)
    assert r.lambda_max == pytest.approx(7.0, rel=1e-4)


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def _dense_hessian(model, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        losses = [F.cross_entropy(torch.func.functional_call(model, params, (x,)), y) for x, y in batches]
        return sum(losses) / len(losses)

    return torch.func.hessian(objective)(flat0)


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_tiny_network_against_its_dense_hessian(hvp):
    model, batches = _tiny_net(), _data()
    h = _dense_hessian(model, batches)
    eigs = torch.linalg.eigvalsh(h)
    top = float(eigs[eigs.abs().argmax()])
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    r = sharpness.measure(model, F.cross_entropy, batches, n_samples=300, tol=1e-10, max_iter=1000, hvp=hvp)
    assert r.lambda_max == pytest.approx(top, rel=1e-4)
    assert abs(r.trace - float(h.trace())) < 4 * r.trace_stderr
    assert r.trace_stderr < 0.1 * abs(float(h.trace()))
    # parameters bitwise unchanged, the mode restored
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model.training
    assert "lambda_max" in str(r) and "trace" in str(r)


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward refuses to build a graph, with the error PyTorch's fused
    attention kernels raise on CUDA."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError("derivative for aten::_fused_tanh_backward is not implemented")
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_model_without_double_backward_takes_finite_differences():
    """hvp='auto' on a model that cannot be differentiated twice: finite differences,
    equal to the same network's exact values."""
    class Net(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.net, self.act = _tiny_net(), act

        def forward(self, x):
            return self.net[2](self.act(self.net[0](x)))

    batches = _data()
    fused = sharpness.measure(Net(_OnceDifferentiableTanh.apply), F.cross_entropy, batches, n_samples=50,
                              tol=1e-10, max_iter=1000)
    exact = sharpness.measure(Net(torch.tanh), F.cross_entropy, batches, n_samples=50, tol=1e-10, max_iter=1000)
    assert fused.hvp_method == "finite_difference" and exact.hvp_method == "autograd"
    assert fused.lambda_max == pytest.approx(exact.lambda_max, rel=1e-6)
    assert fused.trace == pytest.approx(exact.trace, rel=1e-6)  # same probes
    with pytest.raises(RuntimeError, match="is not implemented"):
        sharpness.measure(Net(_OnceDifferentiableTanh.apply), F.cross_entropy, batches, hvp="autograd")


def test_bad_arguments_raise_and_change_nothing():
    model = _tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="hvp"):
        sharpness.measure(model, F.cross_entropy, _data(), hvp="exact")
    with pytest.raises(ValueError, match="rho"):
        sharpness.measure(model, F.cross_entropy, _data(), rho=0)
    with pytest.raises(ValueError, match="batches"):
        sharpness.measure(model, F.cross_entropy, [])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _ranks_worker(rank, world, init_file, out_dir):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = sharpness.measure(_tiny_net(), F.cross_entropy, [_data()[rank]], n_samples=40, tol=1e-10,
                                   max_iter=500)
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_measure_the_mean_objective_and_agree():
    """Under torch.distributed the objective is the mean over ranks: two ranks with one
    batch each equal one process with both, and every rank gets the same report."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ranks_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(2))
    assert r0 == r1
    one = sharpness.measure(_tiny_net(), F.cross_entropy, _data(), n_samples=40, tol=1e-10, max_iter=500)
    for field in ("loss", "lambda_max", "trace", "delta_worst", "delta_avg"):
        assert getattr(r0, field) == pytest.approx(getattr(one, field), rel=1e-9, abs=1e-12), field


def test_under_autocast_no_grad_and_frozen_submodule_modes():
    """Called the way evaluation code calls things: inside autocast and no_grad, with a
    submodule kept in eval mode. In-place moves must reach the forward (autocast caches
    low-precision copies of the parameters), and every submodule's mode comes back."""
    model = _tiny_net().float()
    batches = [(x.float(), y) for x, y in _data()]
    exact = sharpness.measure(model, F.cross_entropy, batches, n_samples=20, max_iter=50)
    model.train()
    model[1].eval()  # a frozen submodule inside a training model
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = sharpness.measure(model, F.cross_entropy, batches, n_samples=20, max_iter=50,
                                 hvp="finite_difference")
    assert model.training and not model[1].training and model[0].training
    for field in ("lambda_max", "trace", "delta_worst"):
        assert getattr(cast, field) == pytest.approx(getattr(exact, field), rel=0.2), field
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        sharpness.measure(model, F.cross_entropy, batches)
