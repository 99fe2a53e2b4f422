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

    first = loss()
    scaler.scale(first).backward()
    opt.perturb_weights(zero_grad=True)
    scaler.scale(loss()).backward(create_graph=opt.hessian_due)
    opt.unperturb()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return float(first.detach())


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


@pytest.mark.parametrize("state_bits", [32, 8])
def test_fp16_grad_scaler_overflowing_refresh_does_not_stall(state_bits):
    """The README's GradScaler recipe, fp16 CPU autocast, autograd HVPs, the demo's task.

    Here the scaled Hessian-vector products of the refresh at step 11 overflow fp16
    while the gradients do not. The optimizer reports that to the scaler like an inf
    gradient: the scaler skips the step and halves its scale, and the refresh is taken
    again next step, until it fits. Before, the scaler never saw it (its scale stayed),
    the optimizer skipped the refresh itself, and the loss stood still for a whole
    lazy_hessian period. The same with 8-bit state.
    """
    pytest.importorskip("sklearn", reason="the demo's digits data ships in scikit-learn (the 'demo' extra)")
    from sassha_fused.demo import load_digits, make_model

    (x, y), _ = load_digits(torch.device("cpu"))
    x, y = x[:256], y[:256]
    model = make_model(0, 64, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    opt = SASSHA(model.parameters(), grad_scaler=scaler, backend="foreach", state_bits=state_bits)

    losses, scales = [], []
    for _ in range(24):
        losses.append(_scaled_official_step(model, opt, scaler, x, y, autocast=True))
        scales.append(scaler.get_scale())
    assert scales[-1] < scales[0]  # the scaler saw the overflow
    assert opt.skipped_steps == 0  # ... and skipped those steps itself
    assert 24 - opt.global_step == sum(b < a for a, b in zip(scales, scales[1:]))
    still = max(sum(1 for _ in g) for _, g in __import__("itertools").groupby(losses))
    assert still <= 4, f"the loss stood still for {still} steps: {losses}"
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_skipped_refresh_is_taken_again_on_the_next_step(cls):
    model = _model(torch.float64)
    x, y = _data()
    x = x.double()
    opt = cls(model.parameters(), lr=0.02, lazy_hessian=4, backend="eager")
    poison = [1.0]

    def closure():
        return torch.nn.functional.cross_entropy(model(x), y) * poison[0]

    opt.step(closure)  # step 1 refreshes
    opt.step(closure)
    opt.step(closure)
    opt.step(closure)
    assert opt.refresh_due  # step 5 refreshes
    poison[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure)
    assert opt.skipped_steps == 1 and opt.global_step == 5
    assert opt.refresh_due  # step 6 takes the refresh step 5 lost
    resumed = cls(_model(torch.float64).parameters(), lr=0.02, lazy_hessian=4, backend="eager")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.refresh_due
    poison[0] = 1.0
    opt.step(closure)
    assert not opt.refresh_due  # step 7 follows the schedule again (9 is the next)
    assert opt.global_step == 6
