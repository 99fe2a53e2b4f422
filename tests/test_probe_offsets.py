"""Probe element offsets (FSDP2 shards): a shard draws the probes of its unsharded tensor.

A rank of a sharded run holds a contiguous run of a parameter's row-major elements,
starting at global element ``offset``; its local element ``i`` must use probe
element ``offset + i`` (``Bucket.element_offset``), in every backend, so sharded and
unsharded runs see the same z. ``offset`` is any non-negative int, not only a
multiple of the 32-element probe word.
"""

from __future__ import annotations

import pytest
import torch

from conftest import device_for, every_backend
from parity import assert_close_tensors, check_phases_match_eager, phase_bucket
from sassha_fused.backends import Bucket, ProbeKeys, RefreshInput, RefreshMode, UpdateCol, get_backend
from sassha_fused.probes import MAX_PROBE_NUMEL, key_prefix, param_key, probe_key, rademacher, rademacher_element

KEY = probe_key(123456789012, 7, 1, 42)


# ------------------------------------------------------------- the definition
@pytest.mark.parametrize("offset", [0, 1, 31, 32, 33, 63, 64, 1000, 12345])
@pytest.mark.parametrize("numel", [0, 1, 31, 33, 97, 1001])
def test_offset_is_a_slice_of_the_whole_stream(offset, numel):
    got = rademacher(numel, KEY, offset=offset, dtype=torch.float64)
    assert got.shape == (numel,)
    assert torch.equal(got, rademacher(offset + numel, KEY, dtype=torch.float64)[offset:])


def test_offset_near_the_end_of_the_range_matches_the_scalar_definition():
    # words near 2**32: the prefix is never generated (it would be 2**37 elements)
    for offset, numel in ((MAX_PROBE_NUMEL - 75, 75), (2**36 + 5, 67), (2**32 * 3 + 31, 40)):
        z = rademacher(numel, KEY, offset=offset)
        assert [int(v) for v in z] == [rademacher_element(KEY, offset + i) for i in range(numel)]


def test_offset_out_of_range_is_refused():
    with pytest.raises(ValueError, match="offset must be >= 0"):
        rademacher(4, KEY, offset=-1)
    with pytest.raises(ValueError, match="2\\*\\*37"):
        rademacher(4, KEY, offset=MAX_PROBE_NUMEL - 3)
    assert rademacher(3, KEY, offset=MAX_PROBE_NUMEL - 3).shape == (3,)


def test_bucket_offsets_default_to_zero():
    b = Bucket(backend=get_backend("eager"), device=torch.device("cpu"), params=[torch.zeros(3), torch.zeros(5)],
               param_index=[0, 1], group_index=[0, 0], backups=[torch.zeros(3), torch.zeros(5)])
    assert b.element_offset == [] and b.offsets() == [0, 0]
    b.element_offset = [7, 40]
    assert b.offsets() == [7, 40]
    b.element_offset = [7]
    with pytest.raises(ValueError, match="one per param"):
        b.offsets()


# --------------------------------------------------------------- every backend
# Odd sizes crossing words, Triton tiles (2048), CUDA blocks (4096) and C++ chunks
# (16384); offsets mostly not multiples of 32, one past 2**31 (int64 indexing) and
# one that ends the tensor at the last probe element (its last word is 2**32 - 1).
SIZES = (1, 3, 31, 33, 1025, 10001, 40001, 0, 77)
OFFSETS = (5, 29, 1, 33, 1000, 2**31 + 3, 31 * 517, 13, MAX_PROBE_NUMEL - 77)


def _definition(b, keys, sample):
    """The probes of a bucket's params straight from ``probes.rademacher`` with their offsets."""
    return [rademacher(p.numel(), param_key(keys.prefixes[sample], b.param_index[j]), offset=b.offsets()[j],
                       dtype=p.dtype, device=p.device).view(p.shape) for j, p in enumerate(b.params)]


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phases_with_offsets_match_eager(backend, dtype):
    """probes (bitwise), fd_move, fd_fold and the update in every refresh mode, with offsets."""
    check_phases_match_eager(get_backend(backend), dtype, SIZES, element_offset=OFFSETS, device=device_for(backend))


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probes_with_offsets_equal_the_definition(backend, dtype):
    b = phase_bucket(get_backend(backend), dtype, SIZES, device=device_for(backend), element_offset=OFFSETS)
    keys = ProbeKeys(tuple(key_prefix(2**64 - 1, 9, s) for s in range(2)))
    for sample in (0, 1):
        got = get_backend(backend).probes(b, keys, sample)
        for j, (z, want) in enumerate(zip(got, _definition(b, keys, sample))):
            assert z.dtype == dtype and z.shape == b.params[j].shape
            assert torch.equal(z.cpu(), want.cpu()), f"probe {j} (offset {OFFSETS[j]}, {SIZES[j]} elements) differs"
        # and not the probes without the offsets (the test can tell)
        b0 = Bucket(backend=b.backend, device=b.device, params=b.params, param_index=b.param_index,
                    group_index=b.group_index, backups=b.backups)
        plain = get_backend(backend).probes(b0, keys, sample)
        assert not torch.equal(plain[5].cpu(), got[5].cpu())


# ------------------------------------------------------------------- shards
ROWS, COLS = 37, 61  # 2257 elements: more than a Triton tile
CUTS = (0, 5, 22, 37)  # shards of rows 0:5, 5:22, 22:37 start at elements 0, 305 (= 9*32 + 17), 1342 (= 41*32 + 30)
PARAM_INDEX = 11


def _table(n: int, device) -> torch.Tensor:
    row = [0.0] * UpdateCol.COUNT
    row[UpdateCol.NEG_STEP] = -0.01 / (1 - 0.9**3)
    row[UpdateCol.DECAY] = 1 - 0.01 * 0.1
    row[UpdateCol.BETA1], row[UpdateCol.ONE_MINUS_BETA1] = 0.9, 0.1
    row[UpdateCol.BETA2], row[UpdateCol.ONE_MINUS_BETA2] = 0.99, 0.01
    row[UpdateCol.C2] = 0.05
    row[UpdateCol.EPS] = 1e-4
    row[UpdateCol.LIVE] = 1.0
    return torch.tensor([row] * n, dtype=torch.float64, device=device)


class _Setup:
    """One (ROWS, COLS) param as one whole tensor, and as shards of its rows with their offsets."""

    def __init__(self, backend: str, dtype: torch.dtype, seed: int = 0):
        self.backend = get_backend(backend)
        self.device = torch.device(device_for(backend))
        gen = torch.Generator().manual_seed(seed)

        def rnd(dt, positive=False):
            t = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
            return (t.abs() if positive else t).to(device=self.device, dtype=dt)

        mdt = torch.float32
        self.x, self.backup = rnd(dtype), rnd(dtype)
        self.m, self.d = rnd(mdt), rnd(mdt, positive=True)
        self.g, self.base = rnd(dtype), rnd(dtype)
        self.ys = [rnd(dtype), rnd(dtype)]

    def shards(self, t: torch.Tensor):
        return [t[a:b].clone() for a, b in zip(CUTS, CUTS[1:])]

    def whole_bucket(self):
        return Bucket(backend=self.backend, device=self.device, params=[self.x.clone()], param_index=[PARAM_INDEX],
                      group_index=[0], backups=[self.backup.clone()], positions=[0],
                      exp_avgs=[self.m.clone()], exp_hessian_diags=[self.d.clone()])

    def shard_bucket(self):
        n = len(CUTS) - 1
        return Bucket(backend=self.backend, device=self.device, params=self.shards(self.x),
                      param_index=[PARAM_INDEX] * n, group_index=[0] * n, backups=self.shards(self.backup),
                      positions=list(range(n)), element_offset=[a * COLS for a in CUTS[:-1]],
                      exp_avgs=self.shards(self.m), exp_hessian_diags=self.shards(self.d))


def _cat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).cpu()


def _same(whole, shards, what):
    a, b = _cat(whole), _cat(shards)
    assert torch.equal(a, b), f"{what}: the shards differ from the whole tensor at {(a != b).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_draw_the_probes_of_the_whole_tensor(backend, dtype):
    s = _Setup(backend, dtype)
    be = s.backend
    keys = ProbeKeys(tuple(key_prefix(31337, 4, k) for k in range(2)))
    whole, shards = s.whole_bucket(), s.shard_bucket()
    assert [o % 32 for o in shards.element_offset] == [0, 17, 30]

    for sample in (0, 1):
        _same(be.probes(whole, keys, sample), be.probes(shards, keys, sample), f"probes (sample {sample})")
        want = rademacher(ROWS * COLS, param_key(keys.prefixes[sample], PARAM_INDEX), dtype=dtype)
        assert torch.equal(_cat(be.probes(shards, keys, sample)), want)

    delta = torch.tensor(3e-3, device=s.device)
    saved_w, saved_s = [torch.empty_like(p) for p in whole.params], [torch.empty_like(p) for p in shards.params]
    be.fd_move(whole, delta, keys, 1, 1.0, None, saved_w)
    be.fd_move(shards, delta, keys, 1, 1.0, None, saved_s)
    _same(whole.params, shards.params, "fd_move")
    _same(saved_w, saved_s, "fd_move save")
    be.fd_move(whole, delta, keys, 0, -1.0, saved_w, None)
    be.fd_move(shards, delta, keys, 0, -1.0, saved_s, None)
    _same(whole.params, shards.params, "fd_move from a base")

    acc_w, acc_s = [s.g.clone()], s.shards(s.g)
    for first, coefficient in ((True, 0.5), (False, -0.25)):
        be.fd_fold(whole, acc_w, [s.ys[0].clone()], [s.base.clone()], delta, keys, 1, coefficient, first)
        be.fd_fold(shards, acc_s, s.shards(s.ys[0]), s.shards(s.base), delta, keys, 1, coefficient, first)
        _same(acc_w, acc_s, f"fd_fold(first={first})")


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("mode", [RefreshMode.AUTOGRAD, RefreshMode.FD_DIRECT])
def test_shards_update_as_the_whole_tensor(backend, mode):
    s = _Setup(backend, torch.float32, seed=1)
    be = s.backend
    whole, shards = s.whole_bucket(), s.shard_bucket()
    n = len(shards)
    if mode == RefreshMode.AUTOGRAD:
        keys = ProbeKeys(tuple(key_prefix(5, 2, k) for k in range(2)))
        r_w = RefreshInput(mode, [[y.clone()] for y in s.ys], keys)
        r_s = RefreshInput(mode, [s.shards(y) for y in s.ys], keys)
    else:
        keys = ProbeKeys((key_prefix(5, 2, 0),))
        fd = torch.tensor([3e-3, 0.0], dtype=torch.float32, device=s.device)
        r_w = RefreshInput(mode, [[s.ys[0].clone()]], keys, fd)
        r_s = RefreshInput(mode, [s.shards(s.ys[0])], keys, fd)
    be.update(whole, whole.backups, [s.g.clone()], _table(1, s.device), 0.5, r_w)
    be.update(shards, shards.backups, s.shards(s.g), _table(n, s.device), 0.5, r_s)
    _same(whole.params, shards.params, "update: params")
    _same(whole.exp_avgs, shards.exp_avgs, "update: exp_avg")
    _same(whole.exp_hessian_diags, shards.exp_hessian_diags, "update: exp_hessian_diag")

    # and the sharded update is the reference's update of the whole tensor
    ref = _Setup("eager", torch.float32, seed=1)
    rw = ref.whole_bucket()
    rr = RefreshInput(mode, [[y.clone()] for y in (ref.ys if mode == RefreshMode.AUTOGRAD else ref.ys[:1])], keys,
                      r_w.fd.cpu() if r_w.fd is not None else None)
    get_backend("eager").update(rw, rw.backups, [ref.g.clone()], _table(1, "cpu"), 0.5, rr)
    for name, a, b in (("params", rw.params, shards.params), ("exp_hessian_diag", rw.exp_hessian_diags,
                                                              shards.exp_hessian_diags)):
        assert_close_tensors(_cat(a), _cat(b), torch.float32, f"sharded {backend} update vs eager: {name}")
