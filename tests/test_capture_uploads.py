"""No pinned allocation inside a CUDA graph capture (issue 21, item 4): the Triton backend.

Pinning host memory while a stream captures fails on PyTorch builds whose caching
host allocator is not capture-safe. The backend prepares, outside captures, a pinned
spare for every pointer column it uploads; a column whose pointers change inside a
capture (gradients in the graph's pool) is copied from a spare, which then belongs
to the graph; anything else a capture would have to upload raises, asking for an
eager warm-up step (``triton_backend.PinnedSpares``).

Checked on the CPU: the capture is simulated (``torch.cuda.is_current_stream_capturing``
answers True inside it), ``Tensor.pin_memory`` raises, and the backend's pinned
allocation is an injected CPU allocation that records every buffer and fails when
called during the capture. The CPU "device" is staged like CUDA, so a column is the
very buffer it was written into (``.to("cpu")`` copies nothing): a spare written
after its capture shows in the captured column.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import every_backend, requires_cuda, requires_triton
from parity import TOLERANCE, capture_after_warm_up, make_params
from sassha_fused import SASSHA
from sassha_fused.backends import triton_backend as tb
from sassha_fused.backends.base import Bucket, GroupTable

SIZES = (5, 7, 300)


class Staged:
    """A TritonBackend whose CPU tables go through injected "pinned" buffers, and a simulated capture."""

    def __init__(self, monkeypatch) -> None:
        self.capturing = False
        self.buffers = []  # every "pinned" buffer allocated, in order
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)

        def no_pinning(*args, **kwargs):
            raise AssertionError("Tensor.pin_memory called (the backend allocates through PinnedSpares.allocate)")

        monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
        self.backend = tb.TritonBackend()
        self.backend.pinned = tb.PinnedSpares(self.allocate, device_types=("cpu",))

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.capturing:
            raise AssertionError("pinned allocation inside a capture")
        buf = torch.full((numel,), -1, dtype=dtype)
        self.buffers.append(buf)
        return buf

    @contextlib.contextmanager
    def capture(self):
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    def group(self, sizes=SIZES) -> "tb._KernelGroup":
        params = [torch.zeros(n) for n in sizes]
        b = Bucket(backend=self.backend, device=torch.device("cpu"), params=params,
                   param_index=list(range(len(params))), group_index=[0] * len(params),
                   backups=[torch.zeros(n) for n in sizes])
        (g,) = self.backend._groups(b)
        return g


def grads(sizes=SIZES):
    return [torch.randn(n) for n in sizes]


def ptrs(tensors):
    return [t.data_ptr() for t in tensors]


@requires_triton
def test_changed_column_is_copied_from_a_spare_prepared_before_the_capture(monkeypatch):
    s = Staged(monkeypatch)
    g = s.group()
    kept = []  # every gradient list stays alive: distinct addresses throughout
    # eager warm-up step: the role sees first- and second-pass gradients
    a, b = grads(), grads()
    kept += [a, b]
    for _ in range(2):
        col_a, _ = g.column("sq_norm.v", a)
        col_b, _ = g.column("sq_norm.v", b)
    assert col_a.tolist() == ptrs(a) and col_b.tolist() == ptrs(b)
    entries = g._columns["sq_norm.v"]
    spares = [e.spare for e in entries.values()]
    assert all(sp is not None and sp.numel() == len(SIZES) for sp in spares)
    assert len({sp.data_ptr() for sp in spares}) == 2
    allocated, uploads = len(s.buffers), s.backend.uploads

    # the capture: both passes' gradients live in the graph's pool (new addresses)
    c, d = grads(), grads()
    kept += [c, d]
    with s.capture():
        col_c, aligned_c = g.column("sq_norm.v", c)
        col_d, _ = g.column("sq_norm.v", d)
        assert g.column("sq_norm.v", c)[0] is col_c  # unchanged pointers: no copy
        assert g.column("sq_norm.v", a)[0] is col_a  # a column uploaded eagerly: no copy
        with pytest.raises(RuntimeError, match="eager step with the same parameters"):
            g.column("sq_norm.v", grads())  # a third new list: both spares are taken
    assert len(s.buffers) == allocated, "pinned memory was allocated inside the capture"
    assert s.backend.uploads == uploads + 2
    assert aligned_c
    # each from its own spare made before the capture, with the new pointers
    assert col_c.tolist() == ptrs(c) and col_d.tolist() == ptrs(d)
    used = {col_c.data_ptr(), col_d.data_ptr()}
    assert used == {sp.data_ptr() for sp in spares}
    assert {t.data_ptr() for t in s.backend.pinned.captured} == used
    assert all(e.spare is None for e in entries.values())
    assert g._in_graphs[("sq_norm.v", tuple(ptrs(c)))] is col_c
    assert g._in_graphs[("sq_norm.v", tuple(ptrs(a)))] is col_a

    # eager steps after the capture: new spares, the captured ones never handed out or written
    col_a2, _ = g.column("sq_norm.v", a)
    assert col_a2 is col_a and entries[tuple(ptrs(a))].spare is not None
    for _ in range(2 * tb.COLUMNS_PER_ROLE):  # more lists than a role keeps: columns dropped, spares passed on
        e = grads()
        kept.append(e)
        assert g.column("sq_norm.v", e)[0].tolist() == ptrs(e)
    assert len(s.buffers) > allocated
    live = [e.spare for cols in g._columns.values() for e in cols.values() if e.spare is not None]
    assert not {sp.data_ptr() for sp in live} & used
    assert col_c.tolist() == ptrs(c) and col_d.tolist() == ptrs(d)
    assert [t.tolist() for t in s.backend.pinned.captured] == [ptrs(c), ptrs(d)]

    # a second capture (after that warm-up) has spares again
    f = grads()
    kept.append(f)
    allocated = len(s.buffers)
    with s.capture():
        col_f, _ = g.column("sq_norm.v", f)
    assert len(s.buffers) == allocated and col_f.tolist() == ptrs(f)
    assert col_c.tolist() == ptrs(c) and col_d.tolist() == ptrs(d)


@requires_triton
def test_tables_first_needed_inside_a_capture_raise(monkeypatch):
    s = Staged(monkeypatch)
    g = s.group()
    g.column("params", [torch.zeros(n) for n in SIZES])
    allocated = len(s.buffers)
    with s.capture():
        # a role never uploaded eagerly: no spare
        with pytest.raises(RuntimeError, match="'update.grad'.*eager step with the same parameters"):
            g.column("update.grad", grads())
        # a kernel group (block map, index columns) built inside the capture
        with pytest.raises(RuntimeError, match="first needed inside a CUDA graph capture.*eager step"):
            s.group((11, 13))
        # a non-capturable group table (capturable=False) would be pinned inside the capture
        table = GroupTable([dict(lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, rho=0.05,
                                 perturb_eps=1e-12)])
        with pytest.raises(RuntimeError, match="capturable=True"):
            table.tensor(torch.device("cuda"))
    assert len(s.buffers) == allocated
    assert s.backend.pinned.captured == []


@requires_triton
def test_spare_of_a_shared_role_serves_one_capture_only(monkeypatch):
    """A spare the first capture took is not there for the next one until an eager call."""
    s = Staged(monkeypatch)
    g = s.group()
    a, c, d = grads(), grads(), grads()
    g.column("update.grad", a)
    with s.capture():
        g.column("update.grad", c)
    with s.capture():
        assert g.column("update.grad", c)[0].tolist() == ptrs(c)  # the graph's column, unchanged
        with pytest.raises(RuntimeError, match="all 2 of its pinned spares are taken"):
            g.column("update.grad", d)
    g.column("update.grad", c)  # eager: the captured column gets a spare of its own
    with s.capture():
        assert g.column("update.grad", d)[0].tolist() == ptrs(d)
    assert len(s.backend.pinned.captured) == 2


@requires_triton
@pytest.mark.skipif(not tb._interpreted(), reason="runs the kernels on CPU tensors (TRITON_INTERPRET=1)")
def test_captured_norm_reads_the_spare_column(monkeypatch):
    """The kernels read the column filled from a spare: a norm over new sources inside the capture."""
    s = Staged(monkeypatch)
    params = [torch.zeros(n) for n in SIZES]
    bucket = Bucket(backend=s.backend, device=torch.device("cpu"), params=params,
                    param_index=list(range(len(params))), group_index=[0] * len(params),
                    backups=[torch.zeros(n) for n in SIZES])
    warm = grads()
    s.backend.sq_norm(bucket, warm, False, torch.float32)  # eager warm-up
    new = grads()
    allocated = len(s.buffers)
    with s.capture():
        out = s.backend.sq_norm(bucket, new, False, torch.float32)
    assert len(s.buffers) == allocated
    # two sums of N non-negative float32 terms in different orders: each within (N - 1) u of the exact one
    rtol = 2 * (sum(SIZES) - 1) * 2.0**-24
    torch.testing.assert_close(out, sum((t * t).sum() for t in new), rtol=rtol, atol=0.0)


@requires_cuda
@pytest.mark.parametrize("backend", every_backend("triton", "cuda"))
def test_captured_step_with_gradients_made_in_the_graph(backend):
    """The usual whole-step recipe: gradients are None before the capture, so its backward
    passes allocate them in the graph's pool, and the pointer columns (Triton) and tensor
    records (CUDA) change inside the capture: they go up from pinned spares the eager
    warm-up prepared (no pinned allocation while capturing). Replays with new data track
    an eager twin."""
    sizes = [33, 1025, 4096]
    params = make_params(sizes, torch.float32, device="cuda")
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.01, lazy_hessian=10**6, backend=backend)
    opt, ref = SASSHA(params, capturable=True, **kw), SASSHA(twin, **kw)
    data = [torch.randn_like(p) for p in params]  # the static input, refilled between replays

    def loss_of(ps):
        return sum(((p - d) ** 2 * (1 + p * p)).sum() for p, d in zip(ps, data))

    def step(o, ps):  # a non-refresh step of the official protocol; grads are None before it
        loss_of(ps).backward()
        o.perturb_weights(zero_grad=True)
        loss_of(ps).backward()
        o.unperturb()
        o.step()
        o.zero_grad(set_to_none=True)

    graph = capture_after_warm_up(opt, ref, params, twin, step, loss_of)
    for _ in range(3):
        for d in data:
            d.copy_(torch.randn_like(d))
        graph.replay()
        step(ref, twin)
    torch.cuda.synchronize()
    rtol, atol = TOLERANCE[torch.float32]  # capturable computes its scalars on the device
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
