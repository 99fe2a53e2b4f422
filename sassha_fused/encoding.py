r"""Compact optimizer state: the encodings behind ``state_bits`` and ``master_weight_bits``.

This module states each encoding once, in plain torch ops on one tensor; it is the
reference the fused kernels (``csrc/sassha_math.h``, ``triton_kernels/sassha.py``)
follow operation for operation, so that given the same float32 values every backend
writes the same codes, bit for bit.

``state_bits`` (both state tensors, every parameter):

- ``32``: ``exp_avg`` (:math:`m`) and ``exp_hessian_diag`` (:math:`D`) in the math
  dtype (float32; float64 for float64 params), 8 bytes per parameter.
- ``16``: both in bfloat16, rounded to nearest even from the float32 result.
- ``8``: both as 8-bit codes in groups of ``GROUP`` = 32 consecutive elements
  (row-major, from element 0) with one float32 scale per group:
  1 + 4/32 = 1.125 bytes per parameter and tensor.

  - :math:`m` (signed): scale :math:`s = \max_{group} |m|`, its reciprocal
    :math:`r = 1 / s` (once per group; 0 when :math:`s` is below float32's smallest
    normal, ``TINY``, where :math:`1/s` could overflow: such a group encodes as 0),
    square-root companding :math:`c = \sqrt{|m| \cdot r}`, ``int8`` code
    :math:`q = \mathrm{sign}(m)\,\min(\lfloor (c + \tfrac{1}{254}) \cdot 127
    \rfloor, 127)`. Decoded: :math:`t = q \cdot \tfrac{1}{127}`,
    :math:`m = (t\,|t|) \cdot s`: products only. Companding spends the codes where
    momentum entries are: most sit far below the group's largest, and the square root
    makes the grid's first step :math:`s / 127^2` instead of linear codes'
    :math:`s / 127`, for a step of about :math:`2 s / 127` at the top (softsign's too).
  - :math:`D` (non-negative) through its square root :math:`R = \sqrt{D}`: scale
    :math:`s = \max_{group} R`, :math:`c = R / s` (0 when :math:`s` is 0), ``uint8``
    code :math:`q = \min(\lfloor (c + \tfrac{1}{510}) \cdot 255 \rfloor, 255)`, and
    at least 1 where :math:`D > 0`. Decoded: :math:`\sqrt{D} = (q \cdot
    \tfrac{1}{255}) \cdot s` and :math:`D` its square. With the default
    ``hessian_power`` 0.5 the preconditioner is this root, one product per element
    (``hessian_root``; a step that refreshes D uses the fresh float :math:`D`), and
    an entry far below its group's largest decodes to :math:`s / 255` instead of zero:
    a zero would leave only ``eps`` under that coordinate's step (the failure of
    coarser encodings), while a floor too high only shortens it. D is encoded on
    refresh steps only, so its one division per element is paid once in
    ``lazy_hessian`` steps.

  Only ``+ - * /``, ``sqrt`` and ``floor``, each rounded on its own (no fused
  multiply-add can change a rounding: no product is added to), so every IEEE
  machine encodes alike; the decodes are products by the float32 constants
  ``1/127`` and ``1/255`` (no division), and an update outside a refresh step
  divides once per element, as with float32 state; no ``exp``/``log``, whose last bits differ between math
  libraries. Rounding is deterministic (no stochastic rounding): a resumed run
  and every backend agree.

``master_weight_bits`` (bfloat16 parameters): the parameter holds the top 16 bits of a
float32 master weight, rounded to nearest (ties away from zero); the state entry
``master_correction`` holds what lies below them: the next 8 bits (``24``, ``int8``,
the master rounded to 24 bits) or all 16 (``32``, ``int16``, the exact float32).
``join_master`` puts them together with integer arithmetic on the bits, so nothing is
rounded on the way back.

Groups start at element 0 of each tensor, and run through it in row-major order. The
scales are shaped ``(rows, groups per row)`` when each row of dim 0 holds a multiple of
32 elements (``scales_shape``; the same floats in the same order as a flat ``(groups,)``):
a group then never straddles two rows, so under FSDP2 (which shards dim 0) the codes and
the scales shard like the parameter, and a shard quantises exactly as the whole tensor
does, on any number of ranks. A parameter whose rows do not split at group boundaries
(1-D ones such as biases and norms, or rows of, say, 50 elements) keeps ``state_bits=16``
state under FSDP2 (``fsdp_state_bits``): its shards would start inside a group.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "GROUP",
    "M_LEVELS",
    "D_LEVELS",
    "STATE_BITS",
    "MASTER_WEIGHT_BITS",
    "n_groups",
    "scales_shape",
    "fsdp_state_bits",
    "encode_momentum",
    "decode_momentum",
    "encode_hessian",
    "decode_hessian",
    "hessian_root",
    "split_master",
    "join_master",
    "state_keys",
    "state_format",
    "new_encoded_state",
    "decode_state",
    "encode_state",
    "convert_state_dict",
    "ENCODING_VERSION",
    "saved_encoding",
]

GROUP = 32  # elements per scale
M_LEVELS = 127  # int8 codes of m: -127 .. 127
D_LEVELS = 255  # uint8 codes of D: 0 .. 255
STATE_BITS = (32, 16, 8)
MASTER_WEIGHT_BITS = (None, 24, 32)
#: the constants added before the scaling to the code grid (rounding to nearest)
M_HALF = 0.5 / M_LEVELS
D_HALF = 0.5 / D_LEVELS
#: the decodes' factors: the float32 values nearest 1/127 and 1/255
M_UNIT = float(torch.tensor(1.0 / M_LEVELS, dtype=torch.float32))
D_UNIT = float(torch.tensor(1.0 / D_LEVELS, dtype=torch.float32))
#: float32's smallest normal: a group of m whose largest |m| is below it encodes as 0
TINY = 2.0 ** -126
#: the version of the 8-bit encodings a state dict records (``state_encoding`` among its
#: optimizer-wide values): 1, the first (softsign m codes; D's scale the group's largest D;
#: a state dict without the entry), 2 these. ``convert_state_dict`` reads version 1.
ENCODING_VERSION = 2
EXTRA_KEY = "sassha_fused"  # where a state dict keeps its optimizer-wide values (optimizer.state_dict)
_CORRECTION_DTYPE = {24: torch.int8, 32: torch.int16}


def n_groups(numel: int) -> int:
    """Scales per tensor of ``numel`` elements under ``state_bits=8``."""
    return (numel + GROUP - 1) // GROUP


def scales_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of a tensor's scales under ``state_bits=8``: ``(rows, groups per row)`` when each
    row of dim 0 holds a multiple of ``GROUP`` elements (so the scales shard with the tensor), else
    ``(groups,)``."""
    row = 1
    for size in shape[1:]:
        row *= size
    if len(shape) >= 2 and row % GROUP == 0:
        return (shape[0], row // GROUP)
    return (n_groups(row * (shape[0] if shape else 1)),)


def fsdp_state_bits(shape: Tuple[int, ...], state_bits: int) -> int:
    """The ``state_bits`` a parameter of this (whole) shape keeps when FSDP2 shards its dim 0: 8-bit
    state only where shards split at group boundaries (``scales_shape`` is 2-D), else 16."""
    if state_bits == 8 and len(scales_shape(shape)) != 2:
        return 16
    return state_bits


def _grouped(v: Tensor) -> Tensor:
    """``v`` as float32 ``[groups, GROUP]`` in row-major order, the last group zero-padded."""
    flat = v.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % GROUP
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, GROUP)


def _ungrouped(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1)[:like.numel()].view(like.shape)


def _sqrt(v: Tensor) -> Tensor:
    """The correctly rounded float32 square root (torch's CPU float32 sqrt is not, in about 1 in 5
    results): computed in float64, whose rounding to float32 is then exact to the last bit."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _unit(codes: Tensor, unit: float) -> Tensor:
    """The codes (grouped) times the float32 constant ``unit``: 1/127 or 1/255, rounded."""
    return _grouped(codes) * torch.tensor(unit, dtype=torch.float32)


def encode_momentum(m: Tensor) -> Tuple[Tensor, Tensor]:
    """``m`` (float) -> (``int8`` codes shaped like ``m``, float32 scale per group, ``scales_shape``)."""
    v = _grouped(m)
    s = v.abs().amax(dim=1)
    normal = s >= TINY
    r = torch.where(normal, torch.ones_like(s) / torch.where(normal, s, torch.ones_like(s)), torch.zeros_like(s))
    c = _sqrt(v.abs() * r[:, None])
    q = torch.floor((c + M_HALF) * M_LEVELS).clamp_(max=M_LEVELS)
    q = torch.where(v < 0, -q, q)
    return _ungrouped(q.to(torch.int8), m), s.view(scales_shape(tuple(m.shape)))


def decode_momentum(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 ``m`` from its codes and group scales."""
    t = _unit(codes, M_UNIT)
    return _ungrouped((t * t.abs()) * scales.reshape(-1, 1), codes)


def encode_hessian(d: Tensor) -> Tuple[Tensor, Tensor]:
    """``D`` (float, >= 0) -> (``uint8`` codes shaped like ``D``, float32 scale of sqrt(D) per group)."""
    v = _grouped(d)
    root = _sqrt(v)
    s = root.amax(dim=1)
    positive = s > 0
    c = torch.where(positive[:, None], root / torch.where(positive, s, torch.ones_like(s))[:, None],
                    torch.zeros_like(root))
    q = torch.floor((c + D_HALF) * D_LEVELS).clamp_(max=D_LEVELS)
    q = torch.where((v > 0) & (q < 1), torch.ones_like(q), q)  # a positive entry never decodes to 0
    return _ungrouped(q.to(torch.uint8), d), s.view(scales_shape(tuple(d.shape)))


def hessian_root(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 ``sqrt(D)`` from its codes and group scales: ``(q * 1/255) * s``.

    Called with ``scales / c2`` (one division per group) it is the default
    preconditioner ``sqrt(D) / c2`` of a step that does not refresh D.
    """
    return _ungrouped(_unit(codes, D_UNIT) * scales.reshape(-1, 1), codes)


def decode_hessian(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 ``D`` from its codes and group scales: the square of ``hessian_root``."""
    root = hessian_root(codes, scales)
    return root * root


# ------------------------------------------------------------------------ master weights
def split_master(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """A float32 master weight -> (the bfloat16 parameter, its ``master_correction``).

    The parameter is the master's top 16 bits rounded to nearest, ties away from
    zero (after rounding the master to 24 bits when ``bits`` is 24); the correction
    is the rest as a signed integer: master bits = (parameter bits << 16) +
    (correction << 8) for 24, + correction for 32. Non-finite values keep their
    bfloat16 rounding and a zero correction.
    """
    bits_of = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if bits == 24:
        bits_of = (bits_of + 0x80) & 0xFFFFFF00
    high = (bits_of + 0x8000) >> 16
    rest = bits_of - (high << 16)
    finite = torch.isfinite(x)
    param = torch.where(finite, _bits_to_bf16(high), x.to(torch.bfloat16))
    correction = torch.where(finite, rest >> 8 if bits == 24 else rest, torch.zeros_like(rest))
    return param, correction.to(_CORRECTION_DTYPE[bits])


def join_master(param: Tensor, correction: Tensor) -> Tensor:
    """The float32 master weight of a bfloat16 ``param`` and its ``master_correction``."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    rest = correction.to(torch.int64)
    if correction.dtype == torch.int8:
        rest = rest << 8
    bits = ((high << 16) + rest) & 0xFFFFFFFF
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def _bits_to_bf16(high: Tensor) -> Tensor:
    h = torch.where(high >= 1 << 15, high - (1 << 16), high)
    return h.to(torch.int16).view(torch.bfloat16)


# ------------------------------------------------------------------------- state entries
def state_keys(state_bits: int) -> Tuple[str, ...]:
    """The param-shaped and per-group state entries ``state_bits`` keeps (besides the counters)."""
    if state_bits == 8:
        return ("exp_avg_codes", "exp_avg_scales", "exp_hessian_diag_codes", "exp_hessian_diag_scales")
    return ("exp_avg", "exp_hessian_diag")


def state_format(state: Dict[str, object]) -> Optional[int]:
    """The ``state_bits`` a parameter's state dict was written with (None: no state yet)."""
    if "exp_avg_codes" in state:
        return 8
    m = state.get("exp_avg")
    if isinstance(m, Tensor):
        return 16 if m.dtype == torch.bfloat16 else 32
    return None


def new_encoded_state(p: Tensor, state_bits: int, math_dtype: torch.dtype) -> Dict[str, Tensor]:
    """Zero ``m`` and ``D`` of ``p`` in the encoding of ``state_bits`` (zero codes and scales).

    For a DTensor ``p`` (FSDP2) every entry is a DTensor placed like ``p``: the scales
    too, which then shard with it (``scales_shape``; see ``fsdp_state_bits``).
    """
    if state_bits == 8:
        return {
            "exp_avg_codes": torch.zeros_like(p, dtype=torch.int8, memory_format=torch.contiguous_format),
            "exp_avg_scales": _zero_scales(p),
            "exp_hessian_diag_codes": torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format),
            "exp_hessian_diag_scales": _zero_scales(p),
        }
    dtype = torch.bfloat16 if state_bits == 16 else math_dtype
    return {
        "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
        "exp_hessian_diag": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
    }


def _zero_scales(p: Tensor) -> Tensor:
    shape = scales_shape(tuple(p.shape))
    if type(p).__name__ == "DTensor":
        from torch.distributed.tensor import zeros

        return zeros(shape, dtype=torch.float32, device_mesh=p.device_mesh, placements=p.placements)
    return torch.zeros(shape, dtype=torch.float32, device=p.device)


def decode_state(state: Dict[str, Tensor], math_dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """``(m, D)`` of one parameter's state as ``math_dtype`` tensors (copies), whatever its encoding."""
    if "exp_avg_codes" in state:
        return (decode_momentum(state["exp_avg_codes"], state["exp_avg_scales"]).to(math_dtype),
                decode_hessian(state["exp_hessian_diag_codes"], state["exp_hessian_diag_scales"]).to(math_dtype))
    return (state["exp_avg"].to(math_dtype, copy=True), state["exp_hessian_diag"].to(math_dtype, copy=True))


def encode_state(m: Tensor, d: Tensor, state_bits: int, math_dtype: torch.dtype) -> Dict[str, Tensor]:
    """The state entries of ``state_bits`` holding ``m`` and ``D``."""
    if state_bits == 8:
        mc, ms = encode_momentum(m)
        dc, ds = encode_hessian(d)
        return {"exp_avg_codes": mc, "exp_avg_scales": ms, "exp_hessian_diag_codes": dc,
                "exp_hessian_diag_scales": ds}
    dtype = torch.bfloat16 if state_bits == 16 else math_dtype
    return {"exp_avg": m.to(dtype), "exp_hessian_diag": d.to(dtype)}


def saved_encoding(state_dict: Dict[str, object]) -> int:
    """The 8-bit encoding version a state dict was written with (``ENCODING_VERSION``; 1 when it
    does not say: the first version recorded none)."""
    extras = [state_dict.get(EXTRA_KEY)] + [g.get(EXTRA_KEY) for g in state_dict.get("param_groups", [])  # type: ignore
                                            if isinstance(g, dict)]
    for extra in extras:
        if isinstance(extra, dict):
            return int(extra.get("state_encoding", 1))
    return 1


def _decode_state_v1(state: Dict[str, Tensor], math_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(m, D) of 8-bit state written with version 1: m = c / (2 - |c|) s, c = q / 127; D = (q / 255)^2 s."""
    c = _grouped(state["exp_avg_codes"]) / M_LEVELS
    s = state["exp_avg_scales"].reshape(-1, 1).to(torch.float32)
    m = _ungrouped(c / (2.0 - c.abs()) * s, state["exp_avg_codes"])
    c = _grouped(state["exp_hessian_diag_codes"]) / D_LEVELS
    s = state["exp_hessian_diag_scales"].reshape(-1, 1).to(torch.float32)
    d = _ungrouped(c * c * s, state["exp_hessian_diag_codes"])
    return m.to(math_dtype), d.to(math_dtype)


def convert_state_dict(state_dict: Dict[str, object], state_bits: int) -> Dict[str, object]:
    """A copy of an optimizer ``state_dict()`` with ``m`` and ``D`` re-encoded for ``state_bits``.

    Load the result into an optimizer built with that ``state_bits``; converting to
    fewer bits rounds the state as a step would. A state dict of the first 8-bit
    encodings (version 1, ``saved_encoding``) is read as such and written in these.
    Whole (unsharded) tensors only.
    """
    if state_bits not in STATE_BITS:
        raise ValueError(f"state_bits: expected one of {STATE_BITS}, got {state_bits!r}")
    version = saved_encoding(state_dict)
    out = dict(state_dict)
    new_state = {}
    for key, entry in dict(state_dict["state"]).items():  # type: ignore[arg-type]
        entry = dict(entry)
        if state_format(entry) is not None:
            if any(type(v).__name__ == "DTensor" for v in entry.values()):
                raise ValueError("convert_state_dict: the state holds DTensor shards (FSDP2); convert a full "
                                 "state dict (torch.distributed.checkpoint's full_state_dict=True) instead")
            kept = entry["exp_avg"] if "exp_avg" in entry else None
            mdt = kept.dtype if kept is not None and kept.dtype == torch.float64 else torch.float32
            if "exp_avg_codes" in entry and version == 1:
                m, d = _decode_state_v1(entry, mdt)
            else:
                m, d = decode_state(entry, mdt)
            for k in state_keys(8) + state_keys(32):
                entry.pop(k, None)
            entry.update(encode_state(m, d, state_bits, mdt))
        new_state[key] = entry
    out["state"] = new_state
    # the optimizer-wide values (and the copies in the param groups) record these encodings
    if isinstance(out.get(EXTRA_KEY), dict):
        out[EXTRA_KEY] = {**out[EXTRA_KEY], "state_encoding": ENCODING_VERSION}  # type: ignore[dict-item]
    if isinstance(out.get("param_groups"), list):
        out["param_groups"] = [{**g, EXTRA_KEY: {**g[EXTRA_KEY], "state_encoding": ENCODING_VERSION}}
                               if isinstance(g, dict) and isinstance(g.get(EXTRA_KEY), dict) else g
                               for g in out["param_groups"]]  # type: ignore[union-attr]
    return out
