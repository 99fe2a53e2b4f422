"""PyTorch Lightning: automatic optimization as it is, the settings it refuses, the manual recipe.

Every run is compared with a plain loop over the same batches from the same initial
weights (float64 MLP, CPU, no shuffling): bitwise where the two compute the same
operations, to float tolerance where they only agree mathematically (accumulation).

The end-to-end refusals and the manual recipe's ``opt.step()`` through Lightning's
optimizer wrapper rely on ``SASSHA.step`` calling
``sassha_fused.integrations.lightning.prepare_closure`` when Lightning is imported.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning as L
    from lightning.pytorch.plugins.precision import Precision
except Exception as _exc:  # noqa: BLE001 - any import failure means: no Lightning here
    pytest.skip(f"lightning cannot be imported here ({type(_exc).__name__}: {_exc})", allow_module_level=True)

from sassha_fused import MSASSHA, SASSHA
from sassha_fused.integrations.lightning import check_closure, prepare_closure

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*create_graph=True:UserWarning"),
]

KW = dict(lr=0.05, rho=0.05, lazy_hessian=2, backend="eager")
CLASSES = [pytest.param(SASSHA, id="SASSHA"), pytest.param(MSASSHA, id="MSASSHA")]
loss_fn = nn.functional.mse_loss

_g = torch.Generator().manual_seed(0)
X = torch.randn(32, 5, generator=_g, dtype=torch.float64)
Y = torch.randn(32, 1, generator=_g, dtype=torch.float64)


def make_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def loader(batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=False)  # 4 batches per epoch


def batches(n: int):
    bs = list(loader())
    return [bs[i % len(bs)] for i in range(n)]


def schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.5 * step)


def trainer(max_steps: int, **kw) -> "L.Trainer":
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class Auto(L.LightningModule):
    """Automatic optimization: configure_optimizers returns the optimizer and a per-step scheduler."""

    def __init__(self, cls=SASSHA, **kw):
        super().__init__()
        self.net, self.cls, self.kw = make_net(), cls, {**KW, **kw}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return loss_fn(self.net(x), y)

    def configure_optimizers(self):
        opt = self.cls(self.parameters(), **self.kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def plain_closure_loop(cls, n: int, **kw):
    """The same run as ``Auto`` through ``opt.step(closure)`` with torch.optim's closure."""
    net = make_net()
    opt = cls(net.parameters(), **{**KW, **kw})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for x, y in batches(n):
        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        sched.step()
    return net, opt


# ------------------------------------------------------------ automatic optimization
@pytest.mark.parametrize("cls", CLASSES)
def test_automatic_optimization_equals_plain_closure_loop(cls):
    """5 steps (refreshes at 1, 3, 5 by finite differences) and the per-step LR schedule."""
    model = Auto(cls)
    trainer(5).fit(model, loader())
    opt = model.optimizers(use_pl_optimizer=False)
    net, ref = plain_closure_loop(cls, 5)
    assert opt.global_step == ref.global_step == 5
    assert opt.hvp_method == ref.hvp_method == "finite_difference"  # Lightning's closure calls backward()
    assert same(model.net, net)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == KW["lr"] * schedule(5)  # scheduler stepped


@pytest.mark.parametrize("cls", CLASSES)
def test_checkpoint_resume_continues_exactly(cls, tmp_path):
    """Save after step 4, resume to step 8: the refresh phase (lazy_hessian=3) crosses the save.

    One batch per epoch: which batch Lightning feeds first after a restart is its own
    business (a run stopped by max_steps resumes by re-running the epoch it stopped in).
    """
    whole = Auto(cls, lazy_hessian=3)
    trainer(8).fit(whole, loader(32))

    first = Auto(cls, lazy_hessian=3)
    t = trainer(4)
    t.fit(first, loader(32))
    path = str(tmp_path / "step4.ckpt")
    t.save_checkpoint(path)
    resumed = Auto(cls, lazy_hessian=3)
    with torch.no_grad():  # nothing of this start survives the restore
        for p in resumed.parameters():
            p.add_(1.0)
    trainer(8).fit(resumed, loader(32), ckpt_path=path)

    a, b = whole.optimizers(use_pl_optimizer=False), resumed.optimizers(use_pl_optimizer=False)
    assert a.global_step == b.global_step == 8
    assert same(whole.net, resumed.net)
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_hessian_diag"):
            assert torch.equal(a.state[p][key], b.state[q][key])


# ------------------------------------------------------- settings that are refused
class ClipOverridden(Auto):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("setting", [dict(gradient_clip_val=0.5), dict(accumulate_grad_batches=2)],
                         ids=["gradient_clip_val", "accumulate_grad_batches"])
def test_trainer_settings_a_multi_pass_step_cannot_take_are_refused(cls, setting):
    model = Auto(cls)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=list(setting)[0]):
        trainer(2, **setting).fit(model, loader())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert model.optimizers(use_pl_optimizer=False).global_step == 0


def _attached(model: L.LightningModule, **trainer_kw):
    """A LightningModule attached to a Trainer, as during fit (no fit run)."""
    model.trainer = trainer(1, **trainer_kw)
    return model


def _lightning_closure(model, opt, inner=lambda: None):
    """What Lightning's Precision.optimizer_step hands to optimizer.step."""
    return functools.partial(Precision()._wrap_closure, model, opt, inner)


def test_check_closure_recognises_lightning_closures():
    model = Auto()
    opt = SASSHA(model.parameters(), **KW)
    check_closure(opt, _lightning_closure(_attached(model), opt))  # default trainer: nothing to refuse
    check_closure(opt, _lightning_closure(_attached(model, gradient_clip_val=0.0), opt))
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.5.*between opt\.unperturb\(\) and opt\.step\(\)"):
        check_closure(opt, _lightning_closure(_attached(model, gradient_clip_val=1.5), opt))
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3.*manual optimization"):
        check_closure(opt, _lightning_closure(_attached(model, accumulate_grad_batches=3), opt))
    m_opt = MSASSHA(model.parameters(), **KW)
    with pytest.raises(ValueError, match=r"MSASSHA.*after the `for _ in opt.hvp_passes\(\)` loop"):
        check_closure(m_opt, _lightning_closure(_attached(model, gradient_clip_val=1.5), m_opt))
    # manual optimization: Lightning neither clips nor accumulates inside step()
    model.automatic_optimization = False
    check_closure(opt, _lightning_closure(_attached(model, gradient_clip_val=1.5), opt))
    # an overridden configure_gradient_clipping runs after every pass: a warning, not an error
    with pytest.warns(RuntimeWarning, match="configure_gradient_clipping"):
        check_closure(opt, _lightning_closure(_attached(ClipOverridden()), opt))


def test_check_closure_ignores_what_it_does_not_recognise():
    model = Auto()
    opt = SASSHA(model.parameters(), **KW)

    class NotAPlugin:
        def _wrap_closure(self, model, optimizer, closure):
            return closure()

    class Raises:
        def __getattr__(self, name):
            raise RuntimeError(name)

    detached = Auto()  # no trainer: LightningModule.trainer would raise
    odd = [
        lambda: None,
        functools.partial(print, 1),
        functools.partial(NotAPlugin()._wrap_closure, _attached(Auto(), gradient_clip_val=1.0), opt, None),
        functools.partial(Precision()._wrap_closure, _attached(Auto(), gradient_clip_val=1.0), opt),  # 2 args
        functools.partial(Precision()._wrap_closure, Raises(), opt, None),
        functools.partial(Precision()._wrap_closure, detached, opt, None),
        functools.partial(Precision()._wrap_closure, object(), opt, None),
        Raises(),
    ]
    for closure in odd:
        check_closure(opt, closure)
        assert prepare_closure(opt, closure) is closure


def test_pytorch_lightning_namespace_is_recognised():
    pl = pytest.importorskip("pytorch_lightning", reason="the pytorch_lightning package (a dependency of "
                             "lightning) is not installed here")
    from pytorch_lightning.plugins.precision import Precision as PLPrecision

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

    model = Module()
    model.trainer = pl.Trainer(gradient_clip_val=1.0, accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    opt = SASSHA(model.parameters(), **KW)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        check_closure(opt, functools.partial(PLPrecision()._wrap_closure, model, opt, lambda: None))


def test_the_check_does_not_import_lightning():
    code = (
        "import sys, functools, torch\n"
        "from sassha_fused import SASSHA\n"
        "from sassha_fused.integrations.lightning import check_closure, prepare_closure\n"
        "p = torch.nn.Parameter(torch.ones(2))\n"
        "opt = SASSHA([p])\n"
        "for c in (lambda: 0, functools.partial(print, 1)):\n"
        "    check_closure(opt, c); assert prepare_closure(opt, c) is c\n"
        "opt.step(lambda: (p * p).sum())\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# --------------------------------------------------------------- manual optimization
class Manual(L.LightningModule):
    """The README's manual-optimization recipe: protocol (b), clipping once, micro-batches in every pass."""

    def __init__(self, cls=SASSHA, clip=None, micro_batches=1, **kw):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.cls, self.clip, self.k, self.kw = make_net(), cls, clip, micro_batches, {**KW, **kw}

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()  # Lightning's wrapper: its step() counts global_step and runs the hooks
        sassha = opt.optimizer   # the optimizer itself: call the protocol's methods on it

        def backward(**kw):
            for xc, yc in zip(x.chunk(self.k), y.chunk(self.k)):
                self.manual_backward(loss_fn(self.net(xc), yc) / self.k, **kw)

        if isinstance(sassha, SASSHA):
            backward()
            sassha.perturb_weights(zero_grad=True)
        backward(create_graph=sassha.hessian_due)
        for _ in sassha.hvp_passes():
            backward()
        if isinstance(sassha, SASSHA):
            sassha.unperturb()
        if self.clip:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        sassha.zero_grad()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = self.cls(self.parameters(), **self.kw)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, schedule)]


def plain_protocol_loop(cls, data, clip=None, **kw):
    net = make_net()
    opt = cls(net.parameters(), **{**KW, **kw})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for x, y in data:
        if cls is SASSHA:
            loss_fn(net(x), y).backward()
            opt.perturb_weights(zero_grad=True)
        loss_fn(net(x), y).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn(net(x), y).backward()
        if cls is SASSHA:
            opt.unperturb()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
        sched.step()
    return net, opt


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
@pytest.mark.parametrize("cls", CLASSES)
def test_manual_recipe_equals_plain_protocol_loop(cls, hvp):
    model = Manual(cls, clip=0.05, hvp=hvp)
    t = trainer(5)
    t.fit(model, loader())
    opt = model.optimizers(use_pl_optimizer=False)
    net, ref = plain_protocol_loop(cls, batches(5), clip=0.05, hvp=hvp)
    assert t.global_step == opt.global_step == ref.global_step == 5  # the wrapper's step() counted them
    assert same(model.net, net)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == KW["lr"] * schedule(5)


@pytest.mark.parametrize("cls", CLASSES)
def test_manual_recipe_accumulates_micro_batches_in_every_pass(cls):
    """Two micro-batches of 4 per pass equal one batch of 8, to float tolerance (finite differences)."""
    fd = dict(hvp="finite_difference", fd_eps=1e-4)  # a wider step: less rounding in the difference quotient
    model = Manual(cls, micro_batches=2, **fd)
    trainer(5).fit(model, loader())
    net, _ = plain_protocol_loop(cls, batches(5), **fd)
    for p, q in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    lone, _ = plain_protocol_loop(cls, [(x[4:], y[4:]) for x, y in batches(5)], **fd)
    assert not torch.allclose(next(model.net.parameters()), next(lone.parameters()))  # both halves count


def test_protocol_methods_on_lightnings_wrapper_are_not_silent():
    """``self.optimizers()`` is a subclass instance that forwards attribute *reads* only:
    perturb_weights() called on it keeps its bookkeeping on the wrapper, so the real
    optimizer's step() finds no perturb_weights() and refuses (instead of a wrong step)."""

    class OnWrapper(Manual):
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            self.manual_backward(loss_fn(self.net(x), y))
            opt.perturb_weights(zero_grad=True)
            self.manual_backward(loss_fn(self.net(x), y), create_graph=opt.hessian_due)
            for _ in opt.hvp_passes():
                self.manual_backward(loss_fn(self.net(x), y))
            opt.unperturb()
            opt.step()

    model = OnWrapper()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without perturb_weights"):
        trainer(2).fit(model, loader())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
