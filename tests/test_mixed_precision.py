"""bf16 autocast, bf16 parameters with fp32 state, fp16 with GradScaler."""

import pytest
import torch

from sassha_fused import MSASSHA, SASSHA


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(dtype)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    return x, (x[:, :4] * 2 + x[:, 4:8]).argmax(1)


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_bf16_autocast_forward_trains_like_fp32(cls):
    x, y = _data()
    losses = {}
    for autocast in (False, True):
        model = _model()
        opt = cls(model.parameters(), lr=0.05, rho=0.02, lazy_hessian=2, backend="foreach")

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return torch.nn.functional.cross_entropy(model(x), y)

        first = closure().item()
        for _ in range(40):
            opt.step(closure)
        losses[autocast] = closure().item()
        assert losses[autocast] < 0.6 * first
        assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())
    assert abs(losses[True] - losses[False]) < 0.1 * losses[False] + 0.02


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_bf16_parameters_keep_fp32_state_and_train(backend):
    model = _model(torch.bfloat16)
    x, y = _data()
    opt = SASSHA(model.parameters(), lr=0.05, rho=0.02, lazy_hessian=2, backend=backend)
    f = lambda: torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y)  # noqa: E731
    first = f().item()
    for _ in range(40):
        opt.step(f)
    assert f().item() < 0.6 * first
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_hessian_diag"].dtype == torch.float32


def _scaled_official_step(model, opt, scaler, x, y, autocast, poison=1.0):
    def loss():
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            return torch.nn.functional.cross_entropy(model(x).float(), y) * poison

    scaler.scale(loss()).backward()
    opt.perturb_weights(zero_grad=True)
    scaler.scale(loss()).backward(create_graph=opt.hessian_due)
    opt.unperturb()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def test_grad_scaler_gives_the_unscaled_trajectory():
    # A power-of-two loss scale is exact in fp32, so with the scaler the trajectory
    # must equal the unscaled one bit for bit: the perturbation uses unscaled
    # gradients and the Hessian-vector products are unscaled before the update.
    x, y = _data()
    a, b = _model(), _model()
    opt_a = SASSHA(a.parameters(), lr=0.02, lazy_hessian=2, backend="eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    opt_b = SASSHA(b.parameters(), lr=0.02, lazy_hessian=2, backend="eager", grad_scaler=scaler)
    for _ in range(6):
        opt_a.step(lambda: torch.nn.functional.cross_entropy(a(x), y))
        _scaled_official_step(b, opt_b, scaler, x, y, autocast=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["exp_hessian_diag"], opt_b.state[q]["exp_hessian_diag"])


def test_fp16_autocast_with_grad_scaler_skips_overflow_steps():
    x, y = _data()
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = SASSHA(model.parameters(), lr=0.02, rho=0.02, lazy_hessian=2, backend="foreach", grad_scaler=scaler)
    for _ in range(4):
        _scaled_official_step(model, opt, scaler, x, y, autocast=True)
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()}
    step, scale = opt.global_step, scaler.get_scale()
    _scaled_official_step(model, opt, scaler, x, y, autocast=True, poison=float("inf"))
    assert scaler.get_scale() < scale  # the scaler saw the overflow and backed off
    assert opt.global_step == step
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v)
    for _ in range(4):
        _scaled_official_step(model, opt, scaler, x, y, autocast=True)
    assert opt.global_step == step + 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_inside_one_autocast_region_sees_every_move():
    """opt.step(closure) inside one autocast region equals autocast inside the closure:
    autocast's cache of low-precision weights must not hide the perturbation or the
    finite-difference moves from the passes."""
    import torch.nn.functional as F

    from sassha_fused import SASSHA

    def run(outside):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        opt = SASSHA(model.parameters(), lr=0.05, lazy_hessian=2, hvp="finite_difference", backend="eager")

        def closure():
            if outside:
                return F.cross_entropy(model(x), y)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(model(x), y)

        for _ in range(3):
            if outside:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(closure)
            else:
                opt.step(closure)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), \
            torch.cat([opt.state[p]["exp_hessian_diag"].reshape(-1) for p in model.parameters()])

    (x_in, d_in), (x_out, d_out) = run(False), run(True)
    assert torch.equal(d_in, d_out) and torch.equal(x_in, x_out)
