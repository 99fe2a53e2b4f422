"""timm: "sassha"/"msassha" in timm's optimizer registry, timm's param groups, timm's schedulers.

Skipped, with the import error as the reason, where timm cannot be imported (a CPU
torch next to torchvision's CUDA wheel fails with "operator torchvision::nms does not
exist"). The naive-loop test relies on SASSHA.step() refusing a step without
perturb_weights().
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

try:
    import timm
    import timm.optim
    import timm.scheduler
    import timm.utils
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim._optim_factory import OptimizerRegistry, default_registry
except Exception as _exc:  # noqa: BLE001 - ImportError, or a torchvision that cannot load
    _msg = str(_exc).splitlines()[0] if str(_exc) else repr(_exc)
    pytest.skip(f"timm cannot be imported here ({type(_exc).__name__}: {_msg})", allow_module_level=True)

from sassha_fused import MSASSHA, SASSHA
from sassha_fused.integrations.timm import NAMES, register

OURS = dict(rho=0.05, lazy_hessian=2, backend="eager", hvp="finite_difference")  # passed through by timm


@pytest.fixture(autouse=True, scope="module")
def registered():
    register()
    yield


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc1(x))))


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)


def images(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_register_is_idempotent(caplog):
    infos = [default_registry.get_optimizer_info(n) for n in NAMES]
    with caplog.at_level(logging.WARNING):
        register()
    assert "already registered" not in caplog.text
    assert [default_registry.get_optimizer_info(n) for n in NAMES] == infos
    assert set(NAMES) <= set(timm.optim.list_optimizers())
    info = timm.optim.get_optimizer_info("sassha")
    assert info.has_betas and info.has_eps and not info.has_momentum and info.second_order
    assert info.opt_class.__wrapped__ is SASSHA and timm.optim.get_optimizer_info("msassha").opt_class.__wrapped__ is MSASSHA

    own = OptimizerRegistry()  # another registry
    register(own)
    assert own.list_optimizers() == sorted(NAMES)
    opt = own.create_optimizer(Small(), "msassha", lr=0.1, **OURS)
    assert type(opt) is MSASSHA


def test_weight_decay_groups():
    model = Small()
    opt = timm.optim.create_optimizer_v2(model, opt="sassha", lr=0.1, weight_decay=0.05, betas=(0.8, 0.99),
                                         eps=1e-3, **OURS)
    assert type(opt) is SASSHA and opt.lazy_hessian == 2 and opt.hvp == "finite_difference"
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model.fc1.weight), id(model.head.weight)}
    assert no_decay == {id(p) for p in (model.fc1.bias, model.norm.weight, model.norm.bias, model.head.bias)}
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"], g["rho"]) == (0.1, (0.8, 0.99), 1e-3, 0.05)


def test_foreach_is_refused_with_the_backend_option_named():
    with pytest.raises(ValueError, match="backend="):
        timm.optim.create_optimizer_v2(Small(), opt="sassha", lr=0.1, foreach=True)


def test_layer_decay_groups_train_with_timms_scheduler():
    """timm's training-loop style: create_optimizer_v2 with layer decay, a timm scheduler
    stepped per update, clipping, and the official protocol with the hvp_passes() loop."""
    model = tiny_vit()
    opt = timm.optim.create_optimizer_v2(model, opt="sassha", lr=0.05, weight_decay=0.05, layer_decay=0.5, **OURS)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 4 and scales[-1] == 1.0  # embeddings, 2 blocks, head
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = model.no_weight_decay()  # pos_embed, cls_token, ...
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 or names[id(p)] in exempt else 0.05)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10, lr_min=0.0, t_in_epochs=False)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = images()
    loss_fn = nn.CrossEntropyLoss()
    for num_updates in range(1, 5):
        loss_fn(model(x), y).backward()
        opt.perturb_weights(zero_grad=True)
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn(model(x), y).backward()
        opt.unperturb()
        timm.utils.dispatch_clip_grad(model.parameters(), value=1.0, mode="norm")
        opt.step()
        opt.zero_grad()
        sched.step_update(num_updates=num_updates)
    assert opt.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    base = {round(g["lr"] / g["lr_scale"], 12) for g in opt.param_groups}  # timm's scheduler applied lr_scale
    assert len(base) == 1 and 0.0 < base.pop() < 0.05  # one cosine-decayed lr, scaled per layer

    # timm's extra group keys survive a checkpoint round trip
    again = timm.optim.create_optimizer_v2(model, opt="sassha", lr=0.05, weight_decay=0.05, layer_decay=0.5, **OURS)
    again.load_state_dict(opt.state_dict())
    assert again.global_step == 4
    assert [g["lr_scale"] for g in again.param_groups] == [g["lr_scale"] for g in opt.param_groups]


def test_msassha_with_a_closure():
    model = tiny_vit()
    opt = timm.optim.create_optimizer_v2(model, opt="msassha", lr=0.05, weight_decay=0.05, **OURS)
    x, y = images()
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        opt.step(lambda: loss_fn(model(x), y))
    assert opt.global_step == 3
    with opt.unperturbed():
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_timms_plain_loop_is_refused():
    """timm's train.py: loss.backward(create_graph=second_order); optimizer.step()."""
    model = Small()
    opt = timm.optim.create_optimizer_v2(model, opt="sassha", lr=0.1, weight_decay=0.05, **OURS)
    before = [p.detach().clone() for p in model.parameters()]
    second_order = getattr(opt, "is_second_order", False)
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward(
        create_graph=second_order)
    with pytest.raises(RuntimeError, match="perturb_weights"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.global_step == 0 and not opt.state
