"""A step makes no device-to-host read: no Tensor.item / bool / tolist / cpu / float /
int / numpy from package code, on the paths meant for GPUs (foreach, triton, cuda).

On the CPU the reads are counted directly: every such call made from a
``sassha_fused`` module during steps is recorded, after a warm-up that builds the
step plans (tables are built from host-side values once). The one read allowed is
``SkipMonitor.poll``, which reads host copies of the finite flags (on a GPU it reads
pinned memory after an event, without waiting). With a GPU the same steps run
under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import device_for, every_backend, requires_cuda
from parity import capture_after_warm_up, coupled_loss, make_params, protocol_step
from sassha_fused import MSASSHA, SASSHA

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    calls = []

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if module.startswith("sassha_fused") and frame.f_code.co_name != "poll":
                calls.append(f"{name} in {module}.{frame.f_code.co_name}:{frame.f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return calls


def _steps(opt, params, protocol, n, start=0):
    for t in range(start, start + n):
        protocol_step(opt, lambda: coupled_loss(params, t), protocol)


@pytest.mark.parametrize("backend", every_backend("foreach", "triton", "cuda"))
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_steps_read_nothing_back(host_reads, backend, cls, hvp):
    params = make_params([33, 7, 1025], torch.float32, device=device_for(backend))
    opt = cls(params, lazy_hessian=2, backend=backend, hvp=hvp, lr=0.01)
    for protocol in ("closure", "official"):
        _steps(opt, params, protocol, 2)  # warm-up: plans and tables for refresh and plain steps
        host_reads.clear()
        _steps(opt, params, protocol, 4, start=2)
        assert host_reads == [], f"{protocol}: host reads during steps: {host_reads}"


@requires_cuda
@pytest.mark.parametrize("backend", every_backend("foreach", "triton", "cuda"))
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_cuda_steps_do_not_synchronise(backend, hvp):
    params = make_params([33, 7, 1025, 4096], torch.float32, device="cuda")
    opt = SASSHA(params, lazy_hessian=2, backend=backend, hvp=hvp, lr=0.01)
    _steps(opt, params, "official", 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(opt, params, "official", 4, start=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("backend", every_backend("triton", "cuda"))
def test_captured_step_replays_like_eager_steps(backend):
    """capturable=True: a non-refresh optimizer-side step captured once, replayed with new gradients."""
    sizes = [33, 1025, 4096]
    params = make_params(sizes, torch.float32, device="cuda")
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.01, lazy_hessian=10**6, backend=backend)
    opt, ref = SASSHA(params, capturable=True, **kw), SASSHA(twin, **kw)
    g1 = [torch.randn_like(p) for p in params]
    g2 = [torch.randn_like(p) for p in params]

    def step(o, ps):
        for p, g in zip(ps, g1):
            p.grad = g
        o.perturb_weights(zero_grad=False)
        for p, g in zip(ps, g2):
            p.grad = g
        o.unperturb()
        o.step()

    # warm-up as torch.cuda.graphs asks, the capture, and the captured step's eager counterpart
    graph = capture_after_warm_up(opt, ref, params, twin, step, lambda ps: sum((p * p * p * p).sum() for p in ps))
    opt._cache.plans.clear()  # the graph's tables must outlive the plan cache (eviction, add_param_group)
    torch.cuda.empty_cache()
    scratch = [torch.full_like(p, float("nan")) for p in params for _ in range(4)]  # reuse of freed blocks
    graph.replay()
    del scratch
    for _ in range(4):
        for g in g1 + g2:
            g.copy_(torch.randn_like(g))
        graph.replay()
        step(ref, twin)
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_capturable_needs_cuda_params():
    with pytest.raises(ValueError, match="capturable"):
        SASSHA([torch.nn.Parameter(torch.zeros(3))], capturable=True)


def test_skip_flag_is_recorded_on_its_own_devices_stream(monkeypatch):
    """With the model on cuda:1 and cuda:0 current (per-rank ``model.to(f"cuda:{rank}")``
    without ``set_device``), the flag's copy and its event go on cuda:1's current stream,
    inside cuda:1's device context; nothing touches cuda:0. Checked on the CPU with
    stand-ins for torch.cuda's device context, streams and events."""
    from sassha_fused.optimizer import SkipMonitor

    calls = []

    class Device:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            calls.append(("enter", self.device))

        def __exit__(self, *exc):
            calls.append(("exit", self.device))

    class Event:
        def record(self, stream=None):
            calls.append(("record", stream))

        def query(self):
            return True

    class Flag:  # a 0-dim bool "on cuda:1"
        device = torch.device("cuda", 1)
        dtype = torch.bool

    class Monitor(SkipMonitor):
        @staticmethod
        def _to_host(ok):
            calls.append(("copy", ok.device))
            return torch.ones((), dtype=torch.bool)

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    monitor = Monitor("SASSHA", max_consecutive=3)
    monitor.record(Flag(), step=1)
    cuda1 = torch.device("cuda", 1)
    assert calls == [("enter", cuda1), ("copy", cuda1), ("record", ("stream of", cuda1)), ("exit", cuda1)]
    assert monitor.poll(wait=True) == [] and monitor.skipped == 0
