"""Counter-based Rademacher probes: the one definition every backend implements.

Hutchinson's estimator needs random sign vectors ``z``. Stored random state would
differ between backends, devices and ranks, and storing ``z`` costs a full pass of
memory, so ``z`` is a pure function of integer counters instead:

    z = z(seed, refresh, sample, param, element)

* ``seed``    -- the optimizer's ``seed`` argument (0 <= seed < 2**64).
* ``refresh`` -- 0-based count of Hessian refreshes before this one (0 at step 1,
  1 at step k+1, ...).
* ``sample``  -- 0-based Hutchinson sample index, ``0 <= sample < n_samples``.
* ``param``   -- 0-based position of the parameter in the optimizer's ordered list
  of all parameters, across param groups, including parameters without a gradient.
* ``element`` -- 0-based index of the element in the parameter's logical row-major
  order (``p.reshape(-1)[element]``), always of the whole (unsharded) parameter: a
  shard holding the run of elements that starts at global element ``offset`` (FSDP2)
  draws element ``offset + i`` for its local element ``i`` (``Bucket.element_offset``,
  ``rademacher(..., offset=offset)``), so sharded and unsharded runs see the same z.

The mapping, with all arithmetic on unsigned 32-bit integers (wrapping)::

    fmix32(x):                       # MurmurHash3's finaliser, a bijection
        x ^= x >> 16;  x *= 0x85EBCA6B
        x ^= x >> 13;  x *= 0xC2B2AE35
        x ^= x >> 16;  return x

    c  = 0x243F6A88                  # stream key, computed once per tensor on the host
    c  = fmix32(c ^ (seed & 0xFFFFFFFF))
    c  = fmix32(c ^ (seed >> 32))
    c  = fmix32(c ^ refresh)
    c  = fmix32(c ^ sample)
    c  = fmix32(c ^ param)
    k0 = c
    k1 = fmix32(c ^ 0x9E3779B9)

    word = element >> 5;  bit = element & 31
    h    = fmix32(fmix32(word ^ k0) ^ k1)
    z    = +1 if (h >> bit) & 1 else -1

Why this shape:

* For a fixed (seed, refresh, sample) the last ``fmix32(c ^ param)`` is a bijection
  of ``param``, so two parameters of the same probe vector never share a key.
* The key enters twice, once inside each finaliser, so two keys give unrelated
  streams, not one stream shifted or permuted by the other (with a single
  ``fmix32(word ^ k)`` two parameters would see the same signs at indices that
  differ by ``k0 ^ k0'``, a correlation Hutchinson's estimator would turn into bias).
* One hash yields 32 signs: the eager reference hashes ``numel / 32`` words, and a
  kernel that needs ``z[i]`` computes one hash of ``i >> 5``, never reading memory.

``tests/test_probes.py`` pins golden values of this function, so a change to it is a
deliberate, visible break of bitwise compatibility.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "fmix32",
    "key_prefix",
    "param_key",
    "probe_key",
    "rademacher",
    "rademacher_element",
    "MAX_PROBE_NUMEL",
]

MASK32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_KEY_INIT = 0x243F6A88
_KEY1_SALT = 0x9E3779B9

#: Largest tensor the probes address: ``word = element >> 5`` must fit in 32 bits.
MAX_PROBE_NUMEL = 1 << 37


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int (the host-side half)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _FMIX_C1) & MASK32
    x ^= x >> 13
    x = (x * _FMIX_C2) & MASK32
    x ^= x >> 16
    return x


def key_prefix(seed: int, refresh: int, sample: int) -> int:
    """The key chain up to the parameter: shared by every parameter of one probe vector.

    Kernels receive this one number per sample and finish each parameter's key
    themselves (``param_key``), so nothing per parameter is computed on the host.
    """
    if seed < 0 or seed >= 1 << 64:
        raise ValueError(f"probe seed must be in [0, 2**64), got {seed}")
    c = _KEY_INIT
    c = fmix32(c ^ (seed & MASK32))
    c = fmix32(c ^ (seed >> 32))
    c = fmix32(c ^ (refresh & MASK32))
    return fmix32(c ^ (sample & MASK32))


def param_key(prefix: int, param: int) -> Tuple[int, int]:
    """The stream key ``(k0, k1)`` of parameter ``param`` from its probe vector's prefix."""
    c = fmix32(prefix ^ (param & MASK32))
    return c, fmix32(c ^ _KEY1_SALT)


def probe_key(seed: int, refresh: int, sample: int, param: int) -> Tuple[int, int]:
    """The stream key ``(k0, k1)`` of one parameter's probe, as unsigned 32-bit ints."""
    return param_key(key_prefix(seed, refresh, sample), param)


def rademacher_element(key: Tuple[int, int], element: int) -> int:
    """``z[element]`` (+1 or -1) for a stream key: the scalar statement of the mapping."""
    k0, k1 = key
    h = fmix32(fmix32((element >> 5) ^ k0) ^ k1)
    return 1 if (h >> (element & 31)) & 1 else -1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 on int64 tensors holding values < 2**32, without ever
    # overflowing int64: split c into 16-bit halves so each product stays < 2**48.
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def _fmix32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_C2)
    return x ^ (x >> 16)


def rademacher(
    numel: int,
    key: Tuple[int, int],
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Elements ``offset .. offset + numel - 1`` of a probe stream (flat, +1/-1) in ``dtype``.

    With ``offset = 0`` this is the probe ``z`` of a whole tensor; a shard of a
    tensor that starts at its global row-major element ``offset`` passes it, and
    gets ``rademacher(offset + numel, key)[offset:]`` without the prefix being
    generated (only words ``offset >> 5 .. (offset + numel - 1) >> 5`` are hashed).

    This is the reference implementation in plain torch ops (int64 arithmetic,
    masked to 32 bits); fused kernels implement the same function natively.
    """
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"probe element offset must be >= 0, got {offset}")
    if numel < 0 or offset + numel > MAX_PROBE_NUMEL:
        raise ValueError(f"probes address tensors of at most 2**37 elements, got {numel} elements"
                         + (f" from element offset {offset}" if offset else ""))
    k0, k1 = key
    first = offset >> 5
    skip = offset & 31  # elements of the first word before the offset
    n_words = (skip + numel + 31) >> 5
    words = torch.arange(first, first + n_words, dtype=torch.int64, device=device)
    h = _fmix32_tensor(_fmix32_tensor(words ^ k0) ^ k1)
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    bits = ((h.unsqueeze(1) >> shifts) & 1).reshape(-1)[skip:skip + numel]
    return (bits * 2 - 1).to(dtype)
