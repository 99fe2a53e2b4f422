"""The counter-based Rademacher probes (SPEC section 3)."""

import pytest
import torch

from sassha_fused.probes import MAX_PROBE_NUMEL, fmix32, probe_key, rademacher, rademacher_element

# Golden values: (seed, refresh, sample, param) -> key and the first 64 signs as bits
# (bit i set <=> z[i] = +1). A change here breaks bitwise compatibility on purpose.
GOLDEN = [
    ((0, 0, 0, 0), (0x7A9E9811, 0xE06972C5), 0x38C2AFA84AA722A9),
    ((0, 1, 0, 0), (0x32BE7BDB, 0x482DACBC), 0xC8DA8A4181F90408),
    ((0, 0, 1, 0), (0xEC11B119, 0x38172EDC), 0xA229EBDEB879F6CC),
    ((0, 0, 0, 1), (0x6124DF56, 0x196D8176), 0x949FBB327A8A0944),
    ((123456789012, 7, 1, 42), (0x0FD2F2DE, 0xBA170DC8), 0x7A96AA8DBBE79441),
]


def test_fmix32_is_murmur3_finaliser():
    assert fmix32(0) == 0
    assert fmix32(1) == 0x514E28B7  # MurmurHash3's published fmix32(1)


@pytest.mark.parametrize("counters,key,bits", GOLDEN)
def test_golden_values(counters, key, bits):
    assert probe_key(*counters) == key
    got = sum(1 << i for i in range(64) if rademacher_element(key, i) > 0)
    assert got == bits
    z = rademacher(64, key)
    assert int(sum(1 << i for i in range(64) if z[i] > 0)) == bits


@pytest.mark.parametrize("numel", [0, 1, 31, 32, 33, 1000, 4099])
def test_tensor_form_equals_scalar_definition(numel):
    key = probe_key(5, 3, 1, 17)
    z = rademacher(numel, key, dtype=torch.float64)
    assert z.shape == (numel,)
    expected = torch.tensor([rademacher_element(key, i) for i in range(numel)], dtype=torch.float64)
    assert torch.equal(z, expected)


def test_large_element_indices_match_scalar_definition():
    # Word indices past 2**16 exercise the high half of the split multiply.
    key = probe_key(0, 0, 0, 3)
    n = (1 << 21) + 37
    z = rademacher(n, key)
    for i in [65535 * 32, 65536 * 32 + 5, (1 << 21) - 1, n - 1]:
        assert z[i].item() == rademacher_element(key, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_hold_exact_signs(dtype):
    z = rademacher(1000, probe_key(1, 2, 3, 4), dtype=dtype)
    assert z.dtype == dtype
    assert set(z.float().unique().tolist()) == {-1.0, 1.0}


def test_balanced_and_uncorrelated():
    n = 200_000
    a = rademacher(n, probe_key(0, 0, 0, 0), dtype=torch.float64)
    b = rademacher(n, probe_key(0, 0, 0, 1), dtype=torch.float64)  # next param
    c = rademacher(n, probe_key(0, 0, 1, 0), dtype=torch.float64)  # next sample
    d = rademacher(n, probe_key(0, 1, 0, 0), dtype=torch.float64)  # next refresh
    bound = 5 / n**0.5  # five standard deviations
    assert abs(a.mean().item()) < bound
    for other in (b, c, d):
        assert abs((a * other).mean().item()) < bound
    # Neighbouring elements are uncorrelated (inside a word and across words).
    assert abs((a[1:] * a[:-1]).mean().item()) < bound
    assert abs((a[32:] * a[:-32]).mean().item()) < bound


def test_keys_of_one_probe_vector_never_collide():
    keys = {probe_key(9, 4, 0, p) for p in range(20_000)}
    assert len(keys) == 20_000


def test_hutchinson_is_unbiased_on_non_diagonal_quadratic():
    # E[z * Hz] = diag(H) for any symmetric H; average many refreshes' probes.
    torch.manual_seed(0)
    n = 24
    a = torch.randn(n, n, dtype=torch.float64)
    h = a + a.T
    refreshes = 4000
    est = torch.zeros(n, dtype=torch.float64)
    for r in range(refreshes):
        z = rademacher(n, probe_key(0, r, 0, 0), dtype=torch.float64)
        est += z * (h @ z)
    est /= refreshes
    offdiag = (h - torch.diag(torch.diag(h))).pow(2).sum(1).sqrt()  # per-row std of the estimate
    assert torch.all((est - torch.diag(h)).abs() < 5 * offdiag / refreshes**0.5)


def test_rejects_out_of_range():
    with pytest.raises(ValueError, match="seed"):
        probe_key(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="2\\*\\*37"):
        rademacher(MAX_PROBE_NUMEL + 1, (0, 0))
