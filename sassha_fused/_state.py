"""The optimizer's parameters and state (mixins of ``_SasshaBase``).

``ParamStateMixin``: which parameters take part in a step, their cached step plans,
the backend of each (device, dtype), and per-parameter state created lazily with
its step counters as views into one bank per device.

``StateDictMixin``: torch's state dict plus what makes a resumed run continue
exactly: the global step and refresh counters (the probes' counter), the seed,
skipped steps, the HVP method in use and the schedules' positions, under the
``"sassha_fused"`` key. State tensors are copied on load and cast to the dtypes this
package keeps them in (``step`` float32, ``bias_correction2`` float64,
``exp_avg``/``exp_hessian_diag`` in the param's math dtype); checkpoints with
integer or float counters load too.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from ._defaults import OPTIONS
from .backends import Backend, math_dtype, resolve_backend
from .distributed import is_distributed, is_sharded
from . import encoding as _encoding
from .encoding import decode_state, fsdp_state_bits, join_master, n_groups, scales_shape, state_format
from .phases import BETWEEN_STEPS
from .plans import StepPlan, new_state
from .schedules import is_schedule

__all__ = ["ParamStateMixin", "StateDictMixin", "EXTRA_KEY"]

_is_sparse = operator.attrgetter("is_sparse")
_is_not_none = functools.partial(operator.is_not, None)

EXTRA_KEY = _encoding.EXTRA_KEY  # "sassha_fused"
_STATE_DTYPES = {"step": torch.float32, "bias_correction2": torch.float64}
_PARAM_SHAPED = ("exp_avg", "exp_hessian_diag", "unperturbed_param")
#: the integer param-shaped entries (state_bits=8 codes, master corrections) and their dtypes
_CODES = {"exp_avg_codes": (torch.int8,), "exp_hessian_diag_codes": (torch.uint8,),
          "master_correction": (torch.int8, torch.int16)}
_SCALES = ("exp_avg_scales", "exp_hessian_diag_scales")
_CORRECTION = {24: torch.int8, 32: torch.int16}


@contextlib.contextmanager
def _held(opt: Any, hooks: str) -> Iterator["OrderedDict[Any, Any]"]:
    """torch's hooks of one kind kept aside while its own method runs, for the caller to run."""
    held = getattr(opt, hooks)
    setattr(opt, hooks, OrderedDict())
    try:
        yield held
    finally:
        setattr(opt, hooks, held)


class ParamStateMixin:
    """Parameters, plans and lazily created state (a mixin of ``_SasshaBase``)."""

    def _index_maps(self) -> None:
        """id(param) -> position (the probes' counter) and -> group; cached lists."""
        self._cache.index_of = {id(p): i for i, p in enumerate(self._all_params())}
        self._cache.group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._cache.trainable = [p for p in self._all_params() if p.requires_grad]
        self._cache.plans.clear()

    def _all_params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> Backend:
        key = (device, dtype)
        backend = self._cache.backends.get(key)
        if backend is None:
            backend = self._cache.backends[key] = resolve_backend(self.backend, device, dtype)
        return backend

    @property
    def backends(self) -> Dict[str, str]:
        """The backend running each (device, dtype) seen so far, e.g. ``{"cpu/float32": "cpp"}``."""
        return {f"{d}/{str(dt).replace('torch.', '')}": b.name for (d, dt), b in self._cache.backends.items()}

    def _state_bits_of(self, p: Tensor) -> int:
        """The ``state_bits`` parameter ``p`` keeps: the option's, except that under FSDP2 a parameter
        whose shards do not split at groups of 32 elements keeps 16 instead of 8
        (``encoding.fsdp_state_bits``; also where it is sharded on another dim than 0)."""
        if self.state_bits != 8 or not is_sharded(p):
            return self.state_bits
        if not all(pl.is_replicate() or pl.is_shard(dim=0) for pl in p.placements):
            return 16
        return fsdp_state_bits(tuple(p.shape), 8)

    def float_state(self, p: Tensor) -> Dict[str, Tensor]:
        """``exp_avg`` (m) and ``exp_hessian_diag`` (D) of ``p`` as float tensors, whatever ``state_bits``.

        Copies in the param's math dtype (float32 for 16-bit params), decoded from
        bfloat16 or 8-bit codes as the update decodes them; an empty dict before the
        parameter's first step. For logging and analysis: writing to them changes nothing.
        """
        state = self.state.get(p, {})
        if state_format(state) is None:
            return {}
        if is_sharded(p) and "exp_avg_codes" in state:  # FSDP2: each rank decodes its shard (no collective)
            m, d = decode_state({k: v.to_local() if is_sharded(v) else v for k, v in state.items()},
                                math_dtype(p.dtype))
            return {key: type(p).from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    for key, v in (("exp_avg", m), ("exp_hessian_diag", d))}
        m, d = decode_state(state, math_dtype(p.dtype))
        return {"exp_avg": m, "exp_hessian_diag": d}

    def master_weight(self, p: Tensor) -> Tensor:
        """The float32 weight the update computes on (a copy): x_t's bfloat16 bits joined with
        the ``master_correction`` (``master_weight_bits``), else x_t as float32. x_t is ``p``
        itself unless ``p`` holds a perturbed point (then its backup, or M-SASSHA's
        ``unperturbed_param``)."""
        state = self.state.get(p, {})
        x_t = p.detach()
        if "unperturbed_param" in state and self.is_perturbed:  # M-SASSHA between steps
            x_t = state["unperturbed_param"]
        elif getattr(self._this_step, "perturbed", None) is not None and id(p) in self._cache.backups \
                and any(q is p for q in self._this_step.perturbed.participants):  # SASSHA inside a step
            x_t = self._cache.backups[id(p)]
        correction = state.get("master_correction")
        if correction is None:
            return x_t.to(math_dtype(p.dtype), copy=True)
        return join_master(x_t, correction)

    def _participants(self) -> List[Tensor]:
        """Params taking part in the step: those with a gradient (every trainable one
        when data-parallel, so that all ranks bucket the same tensors)."""
        if self._data_parallel():
            return self._trainable_now()
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _data_parallel(self) -> bool:
        """Whether the optimizer itself averages the step's inputs over ``process_group``.

        Not under FSDP2 (FSDP averages every pass) nor with ``no_sync`` (DDP's
        reducer averages the passes after the first).
        """
        return (self.distributed and self._run.shards is None and self.no_sync is None
                and is_distributed(self.process_group))

    def _backward_reduces(self) -> bool:
        """Whether a wrapper averages gradients in ``backward()``'s hooks (FSDP2, DDP),
        which ``torch.autograd.grad`` would bypass: closure passes then call ``backward()``."""
        return (self._run.shards is not None or self.no_sync is not None
                or (not self.distributed and is_distributed(self.process_group)))

    def _trainable_now(self) -> List[Tensor]:
        self._cache.trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        return self._cache.trainable

    def _detach_grads(self) -> None:
        """Gradients that carry a graph are detached (no parameter/gradient reference cycle)."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()

    def _plan(self, participants: List[Tensor], backup_of: Callable[[Tensor], Tensor]) -> StepPlan:
        if not self._cache.index_of and self.param_groups:
            self._index_maps()
        plan = self._cache.plans.get(participants, self._cache.index_of, self._cache.group_of, backup_of,
                                     self._backend_for, self._run.shards, self._state_bits_of)
        if self.capturable and torch.cuda.is_current_stream_capturing() and plan not in self._cache.captured_plans:
            # a CUDA graph replays the plan's device tables, indices and block maps:
            # they live as long as the optimizer, whatever the plan cache evicts
            self._cache.captured_plans.append(plan)
        return plan

    def _state_of(self, p: Tensor) -> dict:
        state = self.state[p]
        if state_format(state) is None:
            step, c2 = self._counter_views(p)
            state.update(new_state(p, step, c2, self._state_bits_of(p), self.master_weight_bits))
        return state

    def _bank_counters(self, p: Tensor, state: dict, saved: Dict[str, Any]) -> None:
        """Point ``state``'s counters at ``p``'s views of the banks, holding the ``saved`` values."""
        state["step"], state["bias_correction2"] = self._counter_views(p)
        for key, dtype in _STATE_DTYPES.items():
            if key in saved:
                state[key].copy_(torch.as_tensor(saved[key], dtype=dtype))

    def _counter_views(self, p: Tensor) -> Tuple[Tensor, Tensor]:
        """The (step, c2) bank views of param ``p`` (its state's counters)."""
        index = self._cache.index_of[id(p)]
        size = len(self._cache.index_of)

        def states():  # params on this device whose state points into the bank
            return [(self._cache.index_of[id(q)], self.state[q]) for q in self._all_params()
                    if q.device == p.device and "step" in self.state.get(q, ())]

        return self._cache.counters.views(p.device, index, size, states)

    @staticmethod
    def _check_grads(params: List[Tensor]) -> None:
        # at C speed: this runs for every tensor of every step
        if any(map(_is_sparse, filter(_is_not_none, [p.grad for p in params]))):
            raise RuntimeError("SASSHA does not support sparse gradients; use a dense embedding "
                               "(sparse=False) for parameters this optimizer updates")


class StateDictMixin:
    """State dict methods of the optimizer classes (a mixin of ``_SasshaBase``)."""

    def _extra_state(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {
            "global_step": self._run.global_step,
            "refreshes": self._run.refreshes,
            **{o.name: getattr(self, o.name) for o in OPTIONS if o.saved and o.takes(type(self).__name__)},
            "skipped_steps": self.skipped_steps,  # (polls the flags still on the way from a GPU first)
            # the refresh retry, and a skipped refresh found but not yet acted on (at the end of the next step)
            "refresh_again": self._run.refresh_again,
            "skipped_refresh": self._run.skips.skipped_refresh or 0,  # (0: none; steps count from 1)
            "last_refresh": self._run.last_refresh,
            "hvp_method": self._run.hvp_method,
            "state_encoding": _encoding.ENCODING_VERSION,  # of 8-bit state (encoding.saved_encoding)
        }
        if is_schedule(self.hessian_power) and hasattr(self.hessian_power, "state_dict"):
            extra["hessian_power_schedule"] = self.hessian_power.state_dict()
        if self.rho_schedule is not None and hasattr(self.rho_schedule, "state_dict"):
            extra["rho_schedule"] = self.rho_schedule.state_dict()
        return extra

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus the optimizer-wide counters, schedules and HVP method.

        Take it between steps (for M-SASSHA the saved model holds the perturbed
        point and this state holds the unperturbed one; both resume exactly).
        The counters are under ``"sassha_fused"`` and also in every param group:
        ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and
        ``param_groups``.
        """
        with _held(self, "_optimizer_state_dict_post_hooks") as post_hooks:  # they see the whole dict
            sd = super().state_dict()
        extra = sd[EXTRA_KEY] = self._extra_state()
        for group in sd["param_groups"]:
            group[EXTRA_KEY] = extra
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume exactly: steps, refresh phase, probe counter, schedules and HVP method.

        The dict (after the load pre-hooks, whose returned dicts are used in full) is
        checked against the parameters before anything changes: counts, shapes and
        dtypes; a refusal names the first mismatch and loads nothing.
        """
        if self._phase not in BETWEEN_STEPS:
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict: a step is under way (phase {self._phase.value!r}); load "
                "between steps, or call opt.zero_grad() first to end the step. Nothing was loaded.")
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        extra = state_dict.pop(EXTRA_KEY, None)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group in groups:  # the copy a distributed state dict carries (see state_dict)
            in_group = group.pop(EXTRA_KEY, None)
            extra = in_group if extra is None else extra
        state_dict["param_groups"] = groups
        saved_state = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        self._check_loadable(state_dict, extra)
        # the pre-hooks ran above; the post-hooks run once everything is loaded
        with _held(self, "_optimizer_load_state_dict_pre_hooks"), \
                _held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks:
            super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype (16-bit params keep fp32
        # state here) and may alias the given tensors: every tensor is copied, so
        # loading a live optimizer's state_dict shares no buffer with it.
        for p, i in zip(self._all_params(), ids):
            saved = saved_state.get(i, {})
            if not saved:
                continue
            state = self.state[p]
            self._bank_counters(p, state, saved)
            for key, value in saved.items():
                if key in _STATE_DTYPES:
                    continue
                value = torch.as_tensor(value)
                if key in ("exp_avg", "exp_hessian_diag"):  # state_bits 32 or 16 (checked to match)
                    dtype = torch.bfloat16 if self._state_bits_of(p) == 16 else math_dtype(p.dtype)
                elif key in _SCALES:
                    dtype = value.dtype  # as saved (checked), in this version's shape
                    if not is_sharded(value):
                        value = value.reshape(scales_shape(tuple(p.shape)))
                elif key in _CODES:
                    dtype = value.dtype  # as saved (checked)
                else:
                    dtype = p.dtype
                state[key] = value.to(device=p.device, dtype=dtype, copy=True)
            if (self.master_weight_bits is not None and p.dtype == torch.bfloat16 and "master_correction" not in state
                    and state_format(state) is not None):  # a checkpoint without master weights: they start at p
                state["master_correction"] = torch.zeros_like(
                    p, dtype=_CORRECTION[self.master_weight_bits], memory_format=torch.contiguous_format)
        if extra is not None:
            self._run.global_step = int(extra["global_step"])
            self._run.refreshes = int(extra["refreshes"])
            for o in OPTIONS:
                if o.saved and o.name in extra and o.takes(type(self).__name__):
                    setattr(self, o.name, extra[o.name])
            self._run.skips.skipped = int(extra.get("skipped_steps", 0))
            self._run.refresh_again = bool(extra.get("refresh_again", False))
            self._run.skips.skipped_refresh = int(extra.get("skipped_refresh", 0)) or None
            self._run.last_refresh = int(extra.get("last_refresh", 0))
            if (self.hvp == "auto" and extra.get("hvp_method") in ("autograd", "finite_difference")
                    and not self._backward_reduces()):  # FSDP2 / DDP-native: finite differences only
                self._run.hvp_method = extra["hvp_method"]
            if "hessian_power_schedule" in extra and hasattr(self.hessian_power, "load_state_dict"):
                self.hessian_power.load_state_dict(extra["hessian_power_schedule"])
            if "rho_schedule" in extra and hasattr(self.rho_schedule, "load_state_dict"):
                self.rho_schedule.load_state_dict(extra["rho_schedule"])
        self._cache.plans.clear()
        self._forget_step()  # what a step that never reached step() kept (a scaler's skip)
        self._this_step.begun = False
        self._load_extra_state(extra or {})
        for hook in post_hooks.values():
            hook(self)

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass

    def _check_loadable(self, state_dict: Dict[str, Any], extra: Any) -> None:
        """Refuse, before anything changes, a state dict that would load into a wrong run."""
        name = type(self).__name__
        saved_state, saved_groups = state_dict.get("state"), state_dict.get("param_groups")
        if not isinstance(saved_state, dict) or not isinstance(saved_groups, list):
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (an "
                             "optimizer's state_dict()). Nothing was loaded.")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state dict has {len(saved_groups)} param group(s), "
                             f"this optimizer {len(self.param_groups)}: load a state dict of the same model and "
                             "param groups. Nothing was loaded.")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} "
                                 f"parameter(s) in the state dict and {len(group['params'])} here: load a state "
                                 "dict of the same model and param groups. Nothing was loaded.")
        places = [(gi, j) for gi, g in enumerate(self.param_groups) for j in range(len(g["params"]))]
        ids = [i for g in saved_groups for i in g["params"]]
        for (gi, j), p, i in zip(places, self._all_params(), ids):
            for key, value in saved_state.get(i, {}).items():
                where = f"param_groups[{gi}]['params'][{j}] (state entry {i!r}): '{key}'"
                if key in _STATE_DTYPES:
                    if not (isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)):
                        raise ValueError(f"{name}.load_state_dict: {where} must be a number or a one-element "
                                         f"tensor, got {type(value).__name__}. Nothing was loaded.")
                    continue
                if key in _SCALES:
                    if not isinstance(value, Tensor) or value.dtype != torch.float32 or value.numel() != n_groups(p.numel()):
                        raise ValueError(f"{name}.load_state_dict: {where} must be a float32 tensor of "
                                         f"{n_groups(p.numel())} group scales. Nothing was loaded.")
                    continue
                if key in _CODES:
                    if not isinstance(value, Tensor) or value.dtype not in _CODES[key]:
                        raise ValueError(f"{name}.load_state_dict: {where} must be a tensor of "
                                         f"{' or '.join(map(str, _CODES[key]))} codes. Nothing was loaded.")
                    if key == "master_correction" and p.dtype != torch.bfloat16:
                        raise ValueError(f"{name}.load_state_dict: {where} is a master correction, but the "
                                         f"parameter is {p.dtype}: master weights are kept for bfloat16 parameters "
                                         "only (the parameters are in another order, or of another dtype). Nothing "
                                         "was loaded.")
                    if key == "master_correction" and (self.master_weight_bits is None
                                                       or value.dtype != _CORRECTION[self.master_weight_bits]):
                        raise ValueError(
                            f"{name}.load_state_dict: {where} is a {value.dtype} master correction (master_weight_bits="
                            f"{24 if value.dtype == torch.int8 else 32}) but this optimizer has master_weight_bits="
                            f"{self.master_weight_bits}: build it with the checkpoint's master_weight_bits. Nothing "
                            "was loaded.")
                elif key not in _PARAM_SHAPED:
                    continue
                elif not isinstance(value, Tensor) or not value.is_floating_point():
                    what = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{name}.load_state_dict: {where} must be a floating-point tensor, got "
                                     f"{what}. Nothing was loaded.")
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name}.load_state_dict: {where} has shape {tuple(value.shape)} but the parameter has "
                        f"shape {tuple(p.shape)}: the state dict comes from a model with other shapes (or the "
                        "parameters are in another order). Nothing was loaded.")
        version = int(extra.get("state_encoding", 1)) if isinstance(extra, dict) else 1
        if version != _encoding.ENCODING_VERSION and any(isinstance(s, dict) and "exp_avg_codes" in s
                                                         for s in saved_state.values()):
            raise ValueError(
                f"{name}.load_state_dict: the state dict keeps 8-bit state in the encodings of version {version}"
                f"{' (the first: softsign momentum codes)' if version == 1 else ''}, "
                f"which this version ({_encoding.ENCODING_VERSION}) reads differently. Convert it first: "
                "opt.load_state_dict(sassha_fused.encoding.convert_state_dict(sd, state_bits=8)). Nothing was loaded.")
        for gi_j, p, i in zip(places, self._all_params(), ids):
            saved_bits = state_format(saved_state.get(i, {}))
            bits = self._state_bits_of(p)
            if saved_bits is not None and saved_bits != bits:
                kept = "" if bits == self.state_bits else (
                    f" (under FSDP2 this parameter of shape {tuple(p.shape)} keeps state_bits={bits}: its shards do "
                    "not split at groups of 32 elements; see encoding.fsdp_state_bits)")
                raise ValueError(
                    f"{name}.load_state_dict: the state dict keeps exp_avg and exp_hessian_diag with state_bits="
                    f"{saved_bits} for param_groups[{gi_j[0]}]['params'][{gi_j[1]}] and this optimizer has "
                    f"state_bits={bits}{kept}. Build the optimizer with "
                    f"state_bits={saved_bits}, or convert the state first: "
                    f"opt.load_state_dict(sassha_fused.encoding.convert_state_dict(sd, state_bits={bits})). "
                    "Nothing was loaded.")
        if extra is None and any(float(s.get("step", 0)) > 0 for s in saved_state.values()):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has per-parameter steps but not the optimizer-wide "
                f"counters ('{EXTRA_KEY}': global step, refresh count, seed, schedules), so the refresh phase "
                "and the probes would restart. torch.distributed.checkpoint with "
                "StateDictOptions(flatten_optimizer_state_dict=True) drops them: save and load without that "
                "option. Nothing was loaded.")
        for p, i in zip(self._all_params(), ids):
            for key, value in saved_state.get(i, {}).items():
                if key in _STATE_DTYPES or not isinstance(value, Tensor) or is_sharded(value) == is_sharded(p):
                    continue
                raise ValueError(
                    f"{name}.load_state_dict: state '{key}' is {'sharded' if is_sharded(value) else 'whole'} "
                    f"but its parameter is {'an FSDP2 shard' if is_sharded(p) else 'a whole tensor'}. Move "
                    "optimizer state between sharded and unsharded runs with torch.distributed.checkpoint "
                    "(get_state_dict / set_state_dict and dcp.save / dcp.load). Nothing was loaded.")
