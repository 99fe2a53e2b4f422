r"""SASSHA and M-SASSHA as ``torch.optim.Optimizer`` classes.

The classes validate arguments, keep state, and drive the closure and the official
protocol; the step's numbers are computed by ``functional.py`` over cached step
plans (``plans.py``), Hessian-vector products come from ``hvp.py``, and every
numeric phase runs in a backend (``backends/``). The algorithm itself is written
once, in ``backends/eager.py`` and ``functional.update_scalars``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import sys
import weakref
from collections import defaultdict, deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional as F
from ._defaults import ARGS_DOC, DEFAULTS, GROUP_KEYS, OPTIONS, SASSHA_ONLY, args_doc, validate_group, validate_options
from .backends import Backend, Bucket, ProbeKeys, RefreshInput
from ._state import ParamStateMixin, StateDictMixin
from .distributed import (BucketedAverager, average_step_inputs, copy_, is_distributed, local, participation,
                          shard_group_of)
from ._passes import NothingToStep, PassDriver
from .hvp import cannot_differentiate_twice
from .phases import BETWEEN_STEPS, MOVES, Phase
from .plans import Counters, PlanCache, StepPlan, attach_state
from .probes import MAX_PROBE_NUMEL, key_prefix
from .schedules import is_schedule
from .utils import warn_at_caller

__all__ = ["SASSHA", "MSASSHA"]




def _options(frame_locals: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in frame_locals.items() if k not in ("self", "params", "__class__")}


_COUNTERS = ("step", "bias_correction2")
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")


class HeldStorage:
    """Tensors whose memory is given back between uses and taken again before the next.

    ``release`` frees each tensor's storage (the tensor object stays, so the step
    plans' lists of it stay valid); ``hold`` allocates every released storage again,
    uninitialised. The addresses may change: the backends re-read pointers they cache.
    """

    def __init__(self) -> None:
        self._released: List[Tuple[Any, int]] = []  # (storage, the bytes it had)

    def release(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            if t.device.type not in ("cpu", "cuda"):  # (resizing other devices' storage: not known to work)
                continue
            storage = local(t).untyped_storage()
            if storage.nbytes():
                self._released.append((storage, storage.nbytes()))
                storage.resize_(0)

    def hold(self) -> None:
        for storage, nbytes in self._released:
            storage.resize_(nbytes)
        self._released.clear()


class SkipMonitor:
    """Brings the steps' finite flags to the host without stalling, and reports skips.

    On a GPU each flag is copied to pinned memory behind an event; ``poll`` reads
    the flags whose copy has completed (``wait=True``: all of them). On the CPU a
    flag is there at once. A skipped step warns (``nonfinite="skip"``), and
    ``max_consecutive`` skips in a row raise ``FloatingPointError``.
    """

    def __init__(self, owner: str, max_consecutive: Optional[int], on_device: bool = False) -> None:
        self.owner = owner
        self.max_consecutive = max_consecutive
        self.on_device = on_device
        self.skipped = 0  # found on the host so far
        self.consecutive = 0
        self.skipped_refresh: Optional[int] = None  # the latest skipped step that refreshed the Hessian
        self._flags: Deque[Tuple[int, Tensor, Any, bool]] = deque()
        self._device_count: Optional[Tensor] = None  # on_device: skipped steps counted where they happen

    def record(self, ok: Tensor, step: int, refreshed: bool = False) -> None:
        if self.on_device:  # capturable: no host copy, no event; counted on the device
            count = self._device_count
            self._device_count = (~ok).to(torch.int64) if count is None else count.add_((~ok).to(torch.int64))
            return
        if ok.device.type == "cuda":
            # on the flag's device and its current stream, whatever device is current: the
            # event then completes after the copy, and no context opens on another device
            with torch.cuda.device(ok.device):
                host = self._to_host(ok)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(ok.device))
            self._flags.append((step, host, event, refreshed))
        else:
            self._flags.append((step, ok, None, refreshed))

    @staticmethod
    def _to_host(ok: Tensor) -> Tensor:
        """A pinned host copy of the flag, on the current stream (the caller made its device current)."""
        host = torch.empty((), dtype=ok.dtype, pin_memory=True)
        host.copy_(ok, non_blocking=True)
        return host

    def total(self) -> int:
        """Skipped steps so far; reads the device count (a synchronisation) in capturable runs."""
        self.poll(wait=True, warn=False)
        return self.skipped + (0 if self._device_count is None else int(self._device_count))

    def poll(self, wait: bool = False, warn: bool = True) -> List[int]:
        """Steps found skipped among the flags that have arrived (all, with ``wait``)."""
        found = []
        while self._flags:
            step, host, event, refreshed = self._flags[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._flags.popleft()
            if bool(host):  # a host (CPU or pinned) copy: no device synchronisation
                self.consecutive = 0
                continue
            self.skipped += 1
            self.consecutive += 1
            if refreshed:
                self.skipped_refresh = max(step, self.skipped_refresh or 0)
            found.append(step)
            if warn:
                warn_at_caller(
                    f"{self.owner}: step {step} skipped: the perturbed gradients or the Hessian estimate "
                    "contain NaN or Inf. Parameters and optimizer state are unchanged.")
            if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
                self._flags.clear()
                raise FloatingPointError(
                    f"{self.owner}: {self.consecutive} consecutive steps were skipped for NaN/Inf gradients "
                    f"or Hessian estimates (the last at step {step}): the run is stuck. Lower the learning "
                    "rate, check the loss and the data, or raise max_consecutive_skips."
                )
        return found


class _Shared:
    """Wraps a handle a deepcopy of the optimizer shares with the original (a process group,
    DDP's ``no_sync``, a GradScaler, a backend instance); pickle stores the handle itself."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Shared":
        return self

    def __reduce__(self) -> Tuple[Any, ...]:
        return _Shared, (self.obj,)


class _StepVars:
    """What the step under way keeps between the public calls that make it up."""

    def __init__(self) -> None:
        self.pending: Optional[Tuple[StepPlan, List[RefreshInput]]] = None  # Hessian products for the update
        self.presence_mask: Optional[Tensor] = None  # data-parallel participation of the step
        self.fd_displaced = False  # the finite-difference passes moved the params and no step() came yet
        self.in_closure = False  # step(closure) is running its passes
        self.closure_calls = 0  # closure passes of the step so far
        self.may_skip = False  # whether a closure returning None may skip this step
        self.standard_closure = False  # the closure calls backward() itself (torch.optim's closures)
        self.begun = False  # the schedules have advanced for this step
        self.schedules_before: Optional[Tuple[list, list]] = None  # their states before it (_unbegin_step)
        self.power_t: Optional[float] = None  # the step's hessian_power
        self.perturbed: Optional[StepPlan] = None  # SASSHA: the plan whose backups hold x_t
        self.x_t_saved: Optional[StepPlan] = None  # M-SASSHA: a plan whose x_t the FD passes saved
        self.idle: List[Tensor] = []  # M-SASSHA: params with state that take no part in this step
        self.grads_seen: Optional[tuple] = None  # (grads, versions) after perturb_weights(zero_grad=False)
        self.checked: Optional[tuple] = None  # SASSHA: the gradients' finite check, read by unperturb()'s restore


class _RunVars:
    """What the run keeps from step to step (``state_dict()`` saves what a resume needs)."""

    def __init__(self, skips: SkipMonitor, hvp_method: str) -> None:
        self.global_step = 0  # optimizer steps taken
        self.refreshes = 0  # Hessian refreshes taken: the probes' counter
        self.refresh_again = False  # the last refresh was skipped: the coming step refreshes
        self.last_refresh = 0  # the global step of the last refresh taken
        self.hvp_method = hvp_method  # "autograd" or "finite_difference", what refresh steps take now
        self.plain_backward = False  # closure passes use loss.backward() (reentrant checkpointing)
        self.graph_checked = False  # the first closure pass looked for reentrant checkpoints
        self.skips = skips
        self.own_rho: List[bool] = []  # per group: whether it sets its own rho (a rho schedule leaves it)
        self.shards: Any = None  # FSDP2: the mesh's group (set by add_param_group)
        self.perturbed_outside = False  # M-SASSHA: unperturbed() is open over perturbed params
        self.perturbation_owed = False  # M-SASSHA: the update ran but its re-perturbation failed


class _Caches:
    """Rebuilt on first use (and after a copy): keyed by id() or holding device tables."""

    def __init__(self, process_group: Any) -> None:
        self.backends: Dict[Tuple[torch.device, torch.dtype], Backend] = {}  # per (device, dtype)
        self.plans = PlanCache()
        self.captured_plans: List[StepPlan] = []  # plans a CUDA graph capture used (capturable)
        self.counters = Counters()  # every param's step and c2, one bank per device
        self.averager = BucketedAverager(process_group)
        self.backups: Dict[int, Tensor] = {}  # SASSHA: x_t while the params hold x_t + e_t, by id(param)
        self.held_backups = HeldStorage()  # their memory, released between steps with compact state
        self.index_of: Dict[int, int] = {}  # id(param) -> position (the probes' counter)
        self.group_of: Dict[int, int] = {}  # id(param) -> param group
        self.trainable: List[Tensor] = []


class _SasshaBase(PassDriver, ParamStateMixin, StateDictMixin, torch.optim.Optimizer):
    """What SASSHA and M-SASSHA share: options, state, plans, the step skeleton.

    The classes differ in four hooks: ``_closure_passes`` (the passes of a step
    through a closure), ``_x_t_for_update`` (where x_t lives when the update
    runs), ``_after_update`` and ``_abort_step``; plus ``_backup``/``_x_t_of``.
    """

    no_sync: Optional[Callable[[], Any]] = None  # DDP-native mode (SASSHA's no_sync argument)
    _perturbs_first = False  # a protocol step() must follow perturb_weights() (SASSHA)

    def __init__(self, params: Iterable, options: Dict[str, Any]) -> None:
        validate_options(options)
        for o in OPTIONS:  # the optimizer-wide options are attributes (plain ones: the step reads them often)
            if o.scope == "optimizer" and o.takes(type(self).__name__):
                setattr(self, o.name, o.convert(options[o.name]) if o.convert else options[o.name])
        rho = options["rho"]
        self.rho_schedule = rho if is_schedule(rho) else None
        defaults = {k: options[k] for k in GROUP_KEYS}
        defaults["betas"] = tuple(defaults["betas"]) if isinstance(defaults["betas"], list) else defaults["betas"]
        defaults["rho"] = 0.0 if self.rho_schedule is not None else rho
        validate_group(defaults)
        self._this_step = _StepVars()
        self._run = _RunVars(SkipMonitor(type(self).__name__, options["max_consecutive_skips"],
                                         on_device=self.capturable),
                             "finite_difference" if self.hvp == "finite_difference" else "autograd")
        self._cache = _Caches(self.process_group)
        self._phase = Phase.IDLE
        self.last_step_collectives = 0  # collectives the last step issued (data-parallel)
        #: the finite-difference step delta of the last refresh that took one (a 0-dim device tensor)
        self.last_fd_step: Optional[Tensor] = None
        super().__init__(params, defaults)
        if self._run.shards is not None or self.no_sync is not None:
            # FSDP2 and DDP's reducer average ordinary backward passes: no double backward
            who = "FSDP2 (fully_shard) parameters" if self._run.shards is not None else "no_sync (DDP averages the passes)"
            if self.hvp == "autograd":
                raise ValueError(
                    f"hvp: 'autograd' needs a double backward, which {who} cannot give; use "
                    "hvp='finite_difference' (or 'auto'): every pass is then an ordinary forward and backward")
            self._run.hvp_method = "finite_difference"
        self._check_encoding(whole=True)
        if self.capturable and any(p.device.type != "cuda" for p in self._all_params()):
            raise ValueError("capturable: CUDA graphs capture CUDA work only; capturable=True needs every "
                             "parameter on a CUDA device (leave it False on the CPU)")

    def _check_encoding(self, whole: bool) -> None:
        """``state_bits`` and ``master_weight_bits`` against the parameters (ValueError naming the
        argument); ``whole``: all of them (the constructor), else a group being added."""
        dtypes = {p.dtype for p in self._all_params()}
        if self.master_weight_bits is not None:
            if torch.float16 in dtypes:
                raise ValueError(
                    "master_weight_bits: it applies to bfloat16 parameters (the master weight's top 16 bits); "
                    "float16 parameters have no such split. Keep float16 parameters with master_weight_bits=None, "
                    "or train in bfloat16")
            if whole and torch.bfloat16 not in dtypes:
                names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "none"
                raise ValueError(
                    f"master_weight_bits: it applies to 16-bit (bfloat16) parameters, and these are {names}: "
                    "float32 parameters are their own master weight; leave master_weight_bits=None")

    # ------------------------------------------------------------ copy, pickle
    #: handles of the run outside the optimizer: a deepcopy shares them, it does not copy them
    _SHARED = ("process_group", "no_sync", "grad_scaler", "backend")
    #: torch.optim's hooks, which its own optimizers do not copy either
    _HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
              "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
              "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> Dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle``: options, param groups, state and counters.

        Caches and backends are rebuilt on first use; the step counters (views into
        one bank per device) travel as plain tensors. Copy between steps.
        """
        if self._phase not in BETWEEN_STEPS or self._this_step.pending is not None or self._this_step.fd_displaced:
            raise RuntimeError(
                f"{type(self).__name__}: copy or pickle the optimizer between steps (after step() or "
                f"zero_grad()); it is in phase {self._phase.value!r}, with the parameters and the step's "
                "products in between. Nothing was changed.")
        self._run.skips.poll(wait=True, warn=self.nonfinite == "skip")  # CUDA events do not copy
        out = {k: v for k, v in self.__dict__.items() if k not in ("_cache",) + self._HOOKS}  # (rebuilt)
        for k in self._SHARED:
            if k in out:
                out[k] = _Shared(out[k])
        out["_run"] = run = copy.copy(self._run)
        run.shards = _Shared(run.shards)
        out["_this_step"] = this_step = copy.copy(self._this_step)
        this_step.checked = None  # (a copy reads its gradients' check again)
        out["state"] = {p: {k: v.clone() if k in _COUNTERS else v for k, v in s.items()}
                        for p, s in self.state.items()}
        return out

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "_run" not in state:  # torch's load_state_dict sets state and param_groups this way
            super().__setstate__(state)
            return
        state = {k: v.obj if isinstance(v, _Shared) else v for k, v in state.items()}
        counters = state.pop("state")
        super().__setstate__(state)
        self._run.shards = self._run.shards.obj
        self.state = defaultdict(dict)
        self._cache = _Caches(self.process_group)
        self._index_maps()
        for p, saved in counters.items():
            entry = self.state[p]
            entry.update(saved)
            if "step" in saved:  # back into the bank, as load_state_dict does
                self._bank_counters(p, entry, saved)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's add_param_group, validated first: a rejected group is not kept."""
        own_rho = isinstance(param_group, dict) and "rho" in param_group
        if own_rho and is_schedule(param_group["rho"]):
            raise ValueError("rho: a param group's rho must be a number; pass a schedule as the "
                             "optimizer's rho= to drive every group that does not set its own")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            shards = shard_group_of(self._all_params())  # FSDP1, mixed or unsupported layouts raise
            if shards is not None and self._run.shards is not None:
                shards = self._run.shards  # one counter of the mesh's collectives
            ids = [id(p) for p in group["params"]]
            if len(set(ids)) != len(ids):
                raise ValueError("params: a parameter appears twice in one param group; pass each "
                                 "parameter once (its perturbation would otherwise be applied twice)")
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("SASSHA does not support complex parameters; optimise "
                                    "torch.view_as_real(p) as a real parameter instead")
                if not p.is_floating_point():
                    raise TypeError(f"SASSHA optimises floating-point parameters, got {p.dtype}")
                if p.numel() > MAX_PROBE_NUMEL:
                    raise ValueError(f"a parameter has {p.numel()} elements; the probes address at most 2**37")
                # an explicit backend that cannot run these params fails now, not at the first step
                self._backend_for(p.device, p.dtype)
            if hasattr(self, "state_bits"):  # (set before torch's constructor adds the first groups)
                self._check_encoding(whole=False)
        except Exception:
            self.param_groups.pop()
            raise
        self._run.own_rho.append(own_rho)
        self._run.shards = shards
        self._index_maps()

    def __repr__(self) -> str:
        """torch's repr (every param group) after the optimizer-wide options and the backends in use."""
        lines = [f"{type(self).__name__} (", "Options"]
        for name, value in self._repr_options():
            lines.append(f"    {name}: {value}")
        groups = super().__repr__().split("\n", 1)[1]  # torch's "Parameter Group i" blocks and ")"
        return "\n".join(lines) + "\n" + groups

    def _repr_options(self) -> List[Tuple[str, Any]]:
        """Every optimizer-wide option of ``OPTIONS`` (handles by their type), and what runs."""
        backends = ", ".join(f"{k}: {v}" for k, v in self.backends.items()) or "none yet"
        shown = {
            "backend": f"{self.backend!r} (in use: {backends})" if isinstance(self.backend, str) else self.backend,
            "hvp": f"{self.hvp!r} (in use: {self._run.hvp_method})" if self.hvp == "auto" else repr(self.hvp),
            "process_group": None if self.process_group is None else type(self.process_group).__name__,
            "grad_scaler": None if self.grad_scaler is None else type(self.grad_scaler).__name__,
            "no_sync": getattr(self.no_sync, "__qualname__", repr(self.no_sync)) if self.no_sync else None,
        }
        options = [(o.name, shown.get(o.name, repr(getattr(self, o.name)))) for o in OPTIONS
                   if o.scope == "optimizer" and o.takes(type(self).__name__)]
        if self.rho_schedule is not None:
            options.append(("rho", f"{self.rho_schedule!r} (a schedule: the groups' rho is its latest value)"))
        return options

    # --------------------------------------------------------------- schedules
    @property
    def refresh_due(self) -> bool:
        """True when the coming step refreshes the Hessian estimate: steps 1, k+1, 2k+1, ...,
        and the step after a skipped refresh (NaN/Inf, or a GradScaler's overflow)."""
        return self._run.global_step % self.lazy_hessian == 0 or self._run.refresh_again

    @property
    def hessian_due(self) -> bool:
        """True when the coming step's last backward needs ``create_graph=True``.

        That is a refresh step taken with autograd HVPs; with finite differences no
        graph is ever needed (the refresh takes ``hvp_passes()`` instead).

        PyTorch warns (once) that ``backward(create_graph=True)`` creates a
        parameter/gradient reference cycle and advises resetting the gradients
        afterwards; the optimizer does that part: it detaches graph-carrying
        gradients when it takes the products (``unperturb()``, ``hvp_passes()`` or
        ``step()``), so the cycle lasts only until then.
        """
        return self.refresh_due and self._run.hvp_method == "autograd"

    @property
    def hvp_method(self) -> str:
        """``"autograd"`` or ``"finite_difference"``: how refresh steps take H z now."""
        return self._run.hvp_method

    @property
    def phase(self) -> Phase:
        """Where the step stands (``Phase``): between steps, or which protocol call came last."""
        return self._phase

    def _move(self, to: Phase) -> None:
        if to is not self._phase and to not in MOVES[self._phase]:
            raise RuntimeError(f"{type(self).__name__}: internal error, no move from phase "
                               f"{self._phase.value!r} to {to.value!r}; please report it")
        self._phase = to

    def _refuse_in_passes(self, call: str) -> None:
        """(Its callers check the phase themselves: no call on the step's path.)"""
        raise RuntimeError(
            f"{type(self).__name__}.{call} was called inside the `for _ in opt.hvp_passes()` loop, whose "
            "iterations hold the parameters at finite-difference points: call it after the loop. "
            "Parameters and optimizer state are unchanged.")

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (skipped steps included)."""
        return self._run.global_step

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for NaN/Inf so far (waits for flags still on the way from the GPU)."""
        return self._run.skips.total()

    def _begin_step(self) -> None:
        """Advance the schedules once per optimizer step (``_unbegin_step`` takes that back)."""
        if self._this_step.begun:
            return
        self._cache.held_backups.hold()  # (compact state: the backups' memory is released between steps)
        self._poll_skips()
        power = self.hessian_power
        scheduled = is_schedule(power)
        schedules = ([power] if scheduled else []) + ([self.rho_schedule] if self.rho_schedule is not None else [])
        self._this_step.schedules_before = ([(s, s.state_dict() if hasattr(s, "state_dict") else None)
                                             for s in schedules],
                                            [group["rho"] for group in self.param_groups] if schedules else [])
        self._this_step.power_t = float(power.step()) if scheduled else float(power)
        if self.rho_schedule is not None:
            rho = float(self.rho_schedule.step())
            if rho < 0:
                raise ValueError(f"rho: the schedule returned {rho}, it must be >= 0")
            for group, own in zip(self.param_groups, self._run.own_rho):
                if not own:
                    group["rho"] = rho
        self._this_step.begun = True

    def _unbegin_step(self) -> None:
        """A step that failed leaves the schedules where it found them (they advance again on
        the retry); a schedule without ``state_dict()`` stays advanced and is not advanced twice."""
        if self._this_step.begun and self._rewind_schedules(self._this_step.schedules_before):
            self._this_step.begun, self._this_step.schedules_before = False, None

    def _rewind_schedules(self, saved: Optional[Tuple[list, list]]) -> bool:
        if saved is None or not all(state is not None and hasattr(s, "load_state_dict") for s, state in saved[0]):
            return False
        for schedule, state in saved[0]:
            schedule.load_state_dict(state)
        for group, rho in zip(self.param_groups, saved[1]):
            group["rho"] = rho
        return True

    def _poll_skips(self, wait: bool = False) -> None:
        self._run.skips.poll(wait=wait, warn=self.nonfinite == "skip")

    def _probe_keys(self) -> ProbeKeys:
        return ProbeKeys(tuple(key_prefix(self.seed, self._run.refreshes, s) for s in range(self.n_samples)))

    def _inv_scale(self, device: torch.device) -> Optional[Tensor]:
        """1 / the grad scaler's current scale, as a device tensor (no host sync)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), dtype=torch.float32, device=device)).reciprocal()

    # ---------------------------------------------------------- the step itself
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Tensor]:
        """One step. With a ``closure`` the optimizer runs every pass itself and returns
        the first loss; the closure either returns the loss (the optimizer runs
        backward) or, as torch.optim's closures do, clears the gradients, calls
        ``backward()`` and returns the loss (refresh steps then take finite
        differences). Without one, it finishes the official protocol.

        A step without a closure on an optimizer that has no state yet, with every
        ``lr`` 0 and every gradient zero, only creates the state: that is how
        ``torch.distributed.checkpoint.state_dict`` initialises an optimizer before
        it saves or loads one, and a SASSHA step needs passes it would not have.
        """
        if closure is not None and ("lightning" in sys.modules or "pytorch_lightning" in sys.modules):
            from .closures import prepare_closure  # refuses what would be wrong under Lightning

            closure = prepare_closure(self, closure)
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("step()")
        if closure is None and self._is_state_initialisation():
            with torch.no_grad():
                participants = self._participants()
                attach_state(self._plan(participants, self._backup), self._state_of)
            return None
        if closure is None:
            if self._without_gradients():
                return None  # as torch.optim: nothing to step; schedules and counters stay
            self._check_protocol()
        loss = None
        if self.capturable and self.refresh_due and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{type(self).__name__}: step {self._run.global_step + 1} refreshes the Hessian estimate, which a CUDA "
                "graph cannot capture (its probes and passes change at every refresh): capture a step on which "
                "opt.refresh_due is False and run refresh steps eagerly")
        if closure is not None:
            self._check_closure_allowed()
            self._this_step.standard_closure = False
            self._this_step.closure_calls = 0
            # a first pass without loss or gradient skips the step only where nothing of a step is
            # under way and no other rank waits for this one's collectives
            self._this_step.may_skip = (not self._mid_step() and self._this_step.pending is None
                                        and not self._this_step.fd_displaced
                                        and not self._data_parallel() and not self._backward_reduces())
            self._this_step.in_closure = True  # a standard closure's zero_grad() is part of the step
            try:
                loss = self._closure_passes(closure)
            except NothingToStep:  # the first pass skipped its batch (returned None, no gradient)
                self._abort_step()
                return None
            except BaseException:
                # Whatever failed (the closure, an out-of-memory error, a backend), the
                # parameters go back to where the step found them and nothing else moved.
                self._abort_step()
                raise
            finally:
                self._this_step.in_closure = False
        with torch.no_grad():
            self._finish_step()
        return loss

    def _without_gradients(self) -> bool:
        """A ``step()`` with no gradient anywhere and no step begun: torch.optim skips such a
        step, and so does this optimizer (its global step and refresh schedule stay). In
        optimizer-averaged data-parallel runs every rank takes part in every step."""
        return (not self._mid_step() and self._this_step.pending is None and not self._data_parallel()
                and all(p.grad is None for p in self._all_params()))

    def _mid_step(self) -> bool:
        """Whether a protocol call of the coming step already ran (SASSHA: ``perturb_weights()``)."""
        return self._phase not in BETWEEN_STEPS

    def _check_protocol(self) -> None:
        """``step()`` without ``perturb_weights()`` would be a step without the perturbation."""
        if not self._perturbs_first or self._phase is not Phase.IDLE:
            return
        rho_set = any(float(g["rho"]) > 0 for g, own in zip(self.param_groups, self._run.own_rho)
                      if own or self.rho_schedule is None)
        if rho_set or (self.rho_schedule is not None and not all(self._run.own_rho)):
            raise RuntimeError(
                "SASSHA.step() was called without perturb_weights() in this step, which would take a step "
                "without the sharpness perturbation (a rho=0 step). Either drive the step with "
                "opt.step(closure), or follow the protocol: loss.backward(); opt.perturb_weights(); a second "
                "forward/backward at the perturbed point; the hvp_passes() loop; opt.unperturb(); opt.step() "
                "(see help(SASSHA) and the README; Hugging Face: use sassha_fused.integrations.hf.SasshaTrainer; "
                "timm's train loop needs the README's timm recipe). "
                "For a step without perturbation, set rho=0. Parameters, gradients and optimizer state are "
                "unchanged.")

    def _is_state_initialisation(self) -> bool:
        """A step of torch.distributed.checkpoint's ``_init_optim_state`` (see ``step``)."""
        if self.state or self._run.global_step or self.is_perturbed or self._this_step.pending is not None:
            return False
        if any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        # (DCP's zero gradients carry no graph; a real step's second pass might)
        return bool(grads) and not any(g.requires_grad or bool(local(g).any()) for g in grads)

    def _finish_step(self) -> None:
        """The step skeleton: refresh input -> average / check -> update -> commit."""
        try:
            self._begin_step()
            participants = self._participants()
            self._check_grads(participants)
            plan = self._plan(participants, self._backup)
            refresh = self._refresh_input(plan)
        except BaseException:
            self._abort_step()
            raise
        # what nonfinite="raise" takes back when the step turns out not to have happened
        undo = (self._this_step.schedules_before, self._run.refresh_again, self._run.last_refresh)
        try:
            x_t_of = self._x_t_for_update(plan)
            ok = self._apply_step(plan, x_t_of, refresh)
        except F.PartialUpdate as exc:  # the written buckets hold the step; the others go back to x_t
            written = set(map(id, exc.written))
            with torch.no_grad():
                for b in plan.buckets:
                    if id(b) not in written and b.params and x_t_of(b) is not b.params:
                        torch._foreach_copy_(b.params, x_t_of(b))
            self._this_step.perturbed, self._this_step.fd_displaced = None, False
            self._phase = Phase.IDLE
            self._forget_step()
            self._detach_grads()
            self._release_backups()
            raise
        except BaseException:  # nothing was written: back to where the step found the params
            self._abort_step()
            raise
        self._this_step.pending = None
        self._this_step.fd_displaced = False
        self._this_step.begun, self._this_step.schedules_before = False, None
        try:
            self._after_update()
        finally:
            if ok is not None:
                self._account(ok, refresh is not None, undo)

    def _apply_step(self, plan: StepPlan, x_t_of: Callable[[Bucket], List[Tensor]],
                    refresh: Optional[List[RefreshInput]]) -> Optional[Tensor]:
        """average / check -> update -> commit, for both classes; returns the step's finite flag."""
        ok = F.finish_step(
            plan, x_t_of, F.GroupTable(self.param_groups, on_device=self.capturable), self._this_step.power_t,
            refresh, self._cache.counters, self._state_of,
            inv_scale=self._inv_scale(plan.participants[0].device) if refresh and plan.participants else None,
            average=self._average if self._data_parallel() else None, check=self.nonfinite != "ignore",
            grads_sq_norm=self._early_check(plan))
        self._run.global_step += 1
        if refresh is not None:
            self._run.refreshes += 1
            self._run.refresh_again = False
            self._run.last_refresh = self._run.global_step
        if self._run.shards is not None:  # FSDP2: the scalar all-reduces since the last step
            self.last_step_collectives, self._run.shards.collectives = self._run.shards.collectives, 0
        return ok

    def _account(self, ok: Tensor, refreshed: bool, undo: Tuple[Any, bool, int]) -> None:
        """Count a skipped step (its update left params and state alone); nonfinite='raise' undoes its
        count, the schedules' advance and the refresh bookkeeping (``undo``).

        A skipped Hessian refresh is taken again on the next step once its flag is on the
        host (at once on the CPU; from a GPU, on the first step after the copy landed), unless
        a refresh was taken since.
        """
        skips = self._run.skips
        skips.record(ok, self._run.global_step, refreshed)
        wait = self.nonfinite == "raise" or (ok.device.type == "cpu" and not self.capturable)
        skipped = skips.poll(wait=wait, warn=self.nonfinite == "skip")
        if skipped and self.nonfinite == "raise":  # not a skipped step: a step that did not happen
            skips.skipped -= 1
            skips.consecutive -= 1
            skips.skipped_refresh = None
            self._run.global_step -= 1
            self._run.refreshes -= refreshed
            self._rewind_schedules(undo[0])
            self._run.refresh_again, self._run.last_refresh = undo[1], undo[2]
            raise FloatingPointError(
                f"{type(self).__name__}: step {self._run.global_step + 1}: the perturbed gradients or the "
                "Hessian estimate contain NaN or Inf (nonfinite='raise'). Parameters and optimizer "
                "state are unchanged.")
        self._run.refresh_again |= self._refresh_skipped()

    def _refresh_skipped(self) -> bool:
        """Whether a skipped refresh, found on the host by now, has had no refresh after it (and clear it)."""
        late, self._run.skips.skipped_refresh = self._run.skips.skipped_refresh, None
        return late is not None and late >= self._run.last_refresh

    def _presence(self) -> Optional[Tensor]:
        """Data-parallel: which trainable params have a gradient on some rank (once per step).

        Taken after the pass at the HVP point; params without a local gradient get a
        zero one, so every rank steps the same tensors.
        """
        if not self._data_parallel():
            return None
        if self._this_step.presence_mask is None:
            self._this_step.presence_mask = participation(self._trainable_now(), self.process_group)
            self.last_step_collectives = 1
        return self._this_step.presence_mask

    def _average(self, plan: StepPlan, refresh: Optional[List[RefreshInput]]) -> List[Tensor]:
        """Data-parallel: average the update's inputs; returns who takes part, per bucket."""
        mask, self._this_step.presence_mask = self._presence(), None
        present = average_step_inputs(plan, refresh, mask, self._cache.averager)
        self.last_step_collectives += self._cache.averager.collectives
        return present

    # ------------------------------------------------------------ class hooks
    def _closure_passes(self, closure: Callable[[], Any]) -> Any:
        """Every forward/backward of a step through the closure; returns the first loss."""
        raise NotImplementedError

    def _x_t_for_update(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        """Where x_t is for the update of ``plan`` (restoring what cannot be fused into it)."""
        raise NotImplementedError

    def _after_update(self) -> None:
        pass

    def _abort_step(self) -> None:
        """Leave params and state as they were before the step began."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; it also ends a step that never reached ``step()``.

        A GradScaler skips ``step()`` on inf/NaN gradients, and a training loop that
        catches an exception mid-step (an out-of-memory batch) calls ``zero_grad()``
        and goes on: the parameters go back to where the step found them (x_t), the
        Hessian-vector products taken for it are dropped with the gradients, and the
        next step starts afresh. Inside a step's own passes (a standard closure's
        ``zero_grad()``, or one inside the ``hvp_passes()`` loop) it clears ``.grad`` only,
        and so it does right after ``perturb_weights(zero_grad=False)``, before any backward
        (the SAM-port habit ``first_step(); optimizer.zero_grad()``).
        """
        phase = self._phase
        clears_only = self._this_step.in_closure or phase is Phase.HVP_PASSES or (
            phase is Phase.PERTURBED and self._grads_untouched())
        super().zero_grad(set_to_none)
        self._this_step.grads_seen = None
        if clears_only:
            return
        if phase not in BETWEEN_STEPS or self._this_step.fd_displaced or self._this_step.pending is not None:
            self._abort_step()
        self._this_step.presence_mask = None

    def _grads_untouched(self) -> bool:
        """Whether the gradients are those ``perturb_weights(zero_grad=False)`` left: no backward since."""
        seen = self._this_step.grads_seen
        if seen is None:
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        return all(g is h and (g is None or g._version == v) for g, h, v in zip(grads, *seen))

    def _materialize_restore(self) -> None:
        """Carry out a restore that ``defer_unperturb`` left for ``step()`` (SASSHA)."""
        if self._phase is Phase.DEFERRED:
            with torch.no_grad():
                self._restore(self._this_step.perturbed)
            self._this_step.perturbed = None
            self._move(Phase.RESTORED)

    def _forget_step(self) -> None:
        """Drop what a step in progress kept for ``step()``: its HVPs, participation, FD move."""
        self._this_step.fd_displaced = False
        self._this_step.pending = None
        self._this_step.presence_mask = None
        self._this_step.checked = None

    def _early_check(self, plan: StepPlan) -> Optional[Tensor]:
        """The gradients' sum of squares SASSHA's unperturb() read, if they are still those it read."""
        checked, self._this_step.checked = self._this_step.checked, None
        if checked is None or checked[0] is not plan:
            return None
        grads = list(map(_GRAD, plan.participants))
        if not all(map(operator.is_, map(weakref.ref.__call__, checked[2]), grads)):
            return None  # a gradient was replaced (or dropped)
        return checked[1] if list(map(_VERSION, grads)) == checked[3] else None  # or changed in place

    @staticmethod
    def _restore(plan: StepPlan) -> None:
        """Params of ``plan`` back to x_t, bit for bit, from the buckets' backups."""
        F.restore(plan)

    def _return_from_fd_point(self) -> None:
        """Parameters an ``hvp_passes()`` loop moved go back where the step had them."""
        raise NotImplementedError

    def _backup(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def _x_t_of(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        """Where the buckets of ``plan`` keep x_t now: their backups, or the params themselves."""
        raise NotImplementedError

    def _fd_x_t(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        """Make the backups of ``plan`` hold x_t (the finite-difference passes move the params)."""
        raise NotImplementedError



class SASSHA(_SasshaBase):
    # (assigned, not a literal docstring: it is built from the shared ARGS_DOC)
    __doc__ = r"""SASSHA: Sharpness-aware Adaptive Second-order optimisation with Stable Hessian
    Approximation (Shin, Lee, Chung, Lee, ICML 2025, arXiv:2502.18153).

    .. math::
        \begin{aligned}
        g_t &= \nabla f_B(x_t), \qquad
            e_t = \rho\, g_t / (\lVert g_t \rVert_2 + \epsilon_p) \\
        \tilde g_t &= \nabla f_B(x_t + e_t) \\
        h_t &= \tfrac1S \textstyle\sum_s z_s \odot H(x_t + e_t) z_s
            \quad\text{(every } k \text{ steps, else } D_t = D_{t-1}) \\
        D_t &= \beta_2 D_{t-1} + (1-\beta_2) |h_t|, \qquad
            c_2 = (1 - \beta_2^{t})^{p} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) \tilde g_t \\
        x_{t+1} &= x_t (1 - \eta\lambda)
            - \frac{\eta}{1-\beta_1^t} \, \frac{m_t}{D_t^{p} / c_2 + \epsilon}
        \end{aligned}

    The norm is one global norm over all params of all groups; ``z_s`` are the
    counter-based Rademacher probes of ``sassha_fused.probes``; the HVP is taken at
    the perturbed point, as in the paper, by double backward or finite differences
    (``hvp``).

    Two ways to drive it::

        # (a) one call per step; the closure returns the loss (or, as torch.optim's
        #     closures do, zeroes the grads, calls backward and returns it)
        loss = opt.step(closure)

        # (b) the official code's protocol, plus the finite-difference passes
        loss_fn(model(x), y).backward()
        opt.perturb_weights(zero_grad=True)
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn(model(x), y).backward()
        opt.unperturb()
        opt.step()
        opt.zero_grad()

    In (b), a ``step()`` that no ``perturb_weights()`` preceded raises and changes
    nothing (it would be a step without the perturbation; with ``rho=0`` it is
    allowed). A ``step()`` with no gradient at all does nothing, as in torch.optim:
    the global step and the Hessian-refresh schedule stay where they are.
    ``backends`` names the backend running each (device, dtype); ``repr(opt)`` shows
    every option.
    """ + ARGS_DOC + args_doc("SASSHA", shared=False) + r"""
    State per parameter (names as in the official code): ``step``, ``exp_avg``
    (:math:`m`), ``exp_hessian_diag`` (:math:`D`), ``bias_correction2``
    (:math:`c_2`, 0 until the parameter's first refresh); fp32 for bf16/fp16 params.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = DEFAULTS["lr"],
        betas: Tuple[float, float] = DEFAULTS["betas"],
        weight_decay: float = DEFAULTS["weight_decay"],
        rho: Union[float, Any] = DEFAULTS["rho"],
        lazy_hessian: int = DEFAULTS["lazy_hessian"],
        n_samples: int = DEFAULTS["n_samples"],
        eps: float = DEFAULTS["eps"],
        perturb_eps: float = DEFAULTS["perturb_eps"],
        hessian_power: Union[float, Any] = DEFAULTS["hessian_power"],
        adaptive: bool = SASSHA_ONLY["adaptive"],
        seed: int = DEFAULTS["seed"],
        backend: Union[str, Backend] = DEFAULTS["backend"],
        *,
        hvp: str = DEFAULTS["hvp"],
        fd_eps: Union[str, float] = DEFAULTS["fd_eps"],
        fd_scheme: str = DEFAULTS["fd_scheme"],
        nonfinite: str = DEFAULTS["nonfinite"],
        max_consecutive_skips: Optional[int] = DEFAULTS["max_consecutive_skips"],
        distributed: bool = DEFAULTS["distributed"],
        process_group: Optional[Any] = DEFAULTS["process_group"],
        grad_scaler: Optional[Any] = DEFAULTS["grad_scaler"],
        capturable: bool = DEFAULTS["capturable"],
        state_bits: int = DEFAULTS["state_bits"],
        master_weight_bits: Optional[int] = DEFAULTS["master_weight_bits"],
        defer_unperturb: bool = SASSHA_ONLY["defer_unperturb"],
        no_sync: Optional[Callable[[], Any]] = SASSHA_ONLY["no_sync"],
    ) -> None:
        options = _options(locals())
        # x_t while the params hold x_t + e_t; not part of state_dict (it lives only
        # between perturb_weights() and the end of the step).
        super().__init__(params, options)

    _perturbs_first = True

    @property
    def is_perturbed(self) -> bool:
        """True between ``perturb_weights()`` and ``unperturb()`` / the end of the step."""
        return self._this_step.perturbed is not None

    def _backup(self, p: Tensor) -> Tensor:
        buf = self._cache.backups.get(id(p))
        # (a param's storage may have been replaced since: p.data = ... with another shape)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._cache.backups[id(p)] = torch.empty_like(p, memory_format=torch.preserve_format)
        self._cache.held_backups.hold()
        return buf

    def _lean(self) -> bool:
        """Whether x_t's backups are held only inside a step: compact state (the configurations
        chosen to save memory), unless a CUDA graph needs their addresses to stay."""
        return (self.state_bits != 32 or self.master_weight_bits is not None) and not self.capturable

    def _release_backups(self) -> None:
        if self._lean():
            self._cache.held_backups.release(self._cache.backups.values())

    def _x_t_of(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        # the backups hold x_t while these very params are perturbed
        return (lambda b: b.backups) if self._this_step.perturbed is plan else (lambda b: b.params)

    def _fd_x_t(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        """x_t of the finite-difference passes' params, in their backups (the passes move them)."""
        if self._phase is not Phase.PERTURBED:
            raise RuntimeError(
                "SASSHA: hvp_passes() takes its passes at the perturbed point: run it after the second "
                "backward and before unperturb() (see the README's loop). Parameters and state are unchanged.")
        if self._this_step.perturbed is not plan:
            # params with a gradient at x~ that were not perturbed (no first-pass gradient):
            # their x_t is where they are; keep it with the others', and restore them all
            covered = set(map(id, self._this_step.perturbed.participants))
            extra = [p for p in plan.participants if id(p) not in covered]
            if extra:
                with torch.no_grad():
                    copy_([self._backup(p) for p in extra], extra)
            self._this_step.perturbed = self._plan(self._this_step.perturbed.participants + extra, self._backup)
        return lambda b: b.backups

    def _return_from_fd_point(self) -> None:
        if self._this_step.perturbed is not None:  # unperturb() was skipped as well
            self._restore(self._this_step.perturbed)
        self._this_step.perturbed = None
        self._move(Phase.IDLE)
        self._release_backups()

    @torch.no_grad()
    def perturb_weights(self, zero_grad: bool = True) -> None:
        """Climb to ``x + rho * g / ||g||`` along the current gradients.

        ``||g||`` is one norm over all params of all groups, computed on the device.
        The unperturbed point is kept (not recomputed), so ``unperturb()`` restores
        every parameter bit for bit.
        """
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("perturb_weights()")
        if self._phase is Phase.PERTURBED:
            raise RuntimeError("SASSHA.perturb_weights() was called twice without unperturb() or step() in between; "
                               "call opt.zero_grad() to abandon the step under way. Parameters and optimizer "
                               "state are unchanged.")
        if self._phase is not Phase.IDLE:
            # a step that never reached step() (a GradScaler skipped it on inf/NaN) leaves
            # nothing behind: this is a new step, with new Hessian-vector products
            self._abort_step()
        self._forget_step()
        self._begin_step()
        participants = self._participants()
        self._check_grads(participants)
        if self._data_parallel():
            for p in participants:  # a param without a local gradient moves by 0
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        plan = self._plan(participants, self._backup)
        if plan.participants:
            grads = [g for b in plan.buckets for g in plan.grads(b)]  # FSDP2: the local shards
            inv = self._inv_scale(grads[0].device)
            if inv is not None:  # the perturbation follows the unscaled gradient
                torch._foreach_mul_(grads, inv.to(grads[0].dtype))
            try:
                self._cache.held_backups.hold()
                F.perturb(plan, plan.grads, 1.0, self.adaptive, F.GroupTable(self.param_groups, self.capturable))
            except BaseException:  # F.perturb put back what it moved; the schedules go back too
                if inv is not None:  # the gradients as the user left them (a power-of-two scale: exact)
                    torch._foreach_div_(grads, inv.to(grads[0].dtype))
                self._unbegin_step()
                self._release_backups()
                raise
        self._this_step.perturbed = plan
        self._move(Phase.PERTURBED)
        if zero_grad:
            torch.optim.Optimizer.zero_grad(self)  # part of this call: it does not end the step
        else:  # (list comprehensions: no Python call per tensor on the step's path)
            grads = [p.grad for g in self.param_groups for p in g["params"]]
            self._this_step.grads_seen = (grads, [-1 if x is None else x._version for x in grads])

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return every parameter to the unperturbed point, bit for bit.

        On a refresh step with autograd HVPs the Hessian-vector products are taken
        first, at the perturbed point, while the graph of the second backward pass
        still describes it; ``step()`` then uses them.
        """
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("unperturb()")
        if self._phase is not Phase.PERTURBED:
            return
        if (self.refresh_due and self._run.hvp_method == "autograd" and self._this_step.pending is None
                and any(p.grad is not None and p.grad.requires_grad for p in self._all_params())):
            try:
                self._take_autograd_refresh()
            except BaseException as exc:
                self._abort_step()
                if cannot_differentiate_twice(exc) and self.hvp == "auto":
                    raise RuntimeError(
                        f"SASSHA: this model cannot be differentiated twice ({str(exc).splitlines()[0]}). "
                        "Construct the optimizer with hvp='finite_difference' and add "
                        "`for _ in opt.hvp_passes(): loss_fn(model(x), y).backward()` after the second "
                        "backward (see the README). Parameters and optimizer state are unchanged.") from exc
                raise
        if self.defer_unperturb:
            self._move(Phase.DEFERRED)  # step() restores inside the fused update
            return
        self._this_step.checked = self._restore_and_check(self._this_step.perturbed)
        self._this_step.perturbed = None
        self._move(Phase.RESTORED)

    def _restore_and_check(self, plan: StepPlan) -> Optional[tuple]:
        """unperturb()'s restore. On a plain step (no other process that could change the gradients,
        no refresh, every gradient there, not capturable) it also reads the perturbed gradients' sum
        of squares in the same sweep: step()'s finite check, which step() takes from here while the
        gradients are the same tensors at the same versions (``_early_check``); a gradient replaced
        or changed in place is read again. Writes the version counter does not see (through
        ``.data``, or by kernels outside PyTorch's dispatcher) are not seen."""
        grads = list(map(_GRAD, plan.participants))  # (C speed: host work flat in the number of tensors)
        # Not where another process can change the gradients (a hand-written all_reduce writes them
        # without a version bump), not on refresh steps (they check their Hessian inputs at step()),
        # not with capturable (a captured step() must read its gradients inside the graph).
        check = not (self.nonfinite == "ignore" or self.refresh_due or self.capturable or self._data_parallel()
                     or any(map(operator.is_, grads, itertools.repeat(None)))
                     or (self._run.shards is None and is_distributed(self.process_group)))
        try:
            with torch.no_grad():
                total = F.restore(plan, check=check)
        except BaseException:  # (the backups still hold x_t: the step ends there)
            self._abort_step()
            raise
        if not check:
            return None
        return plan, total, list(map(weakref.ref, grads)), list(map(_VERSION, grads))

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Parameters at the unperturbed point inside the block.

        Between SASSHA steps they are there anyway; a deferred restore is carried
        out; mid-step (between ``perturb_weights()`` and ``unperturb()``) the
        perturbed values are kept aside and put back after the block.
        """
        self._materialize_restore()
        if self._this_step.perturbed is None:
            yield
            return
        plan = self._this_step.perturbed
        with torch.no_grad():
            aside = [p.detach().clone() for p in plan.participants]
            self._restore(plan)
        try:
            yield
        finally:
            if self._this_step.perturbed is plan:  # (a zero_grad() in the block ended the step: x_t stays)
                with torch.no_grad():
                    copy_(plan.participants, aside)

    def state_dict(self) -> Dict[str, Any]:
        self._materialize_restore()
        return super().state_dict()

    def _closure_passes(self, closure: Callable[[], Any]) -> Any:
        with self.no_sync() if self.no_sync is not None else contextlib.nullcontext():
            loss = self._closure_pass(closure)  # DDP-native: each rank's own gradient
        self.perturb_weights(zero_grad=True)
        self._pass_and_refresh(closure)
        return loss

    def _x_t_for_update(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        if self._this_step.perturbed is not plan:  # not perturbed, or along other params than take part now
            if self._this_step.perturbed is not None:
                self._restore(self._this_step.perturbed)
            self._this_step.perturbed = None
        # the backups when the restore is fused into the update (the update writes
        # every param, so until it has run the backups still hold x_t for an abort)
        return self._x_t_of(plan)

    def _after_update(self) -> None:
        self._this_step.perturbed = None
        self._phase = Phase.IDLE
        self._release_backups()

    def _abort_step(self) -> None:
        """Params back to x_t (bit for bit) and nothing of the step kept: the phase is IDLE."""
        if self._this_step.perturbed is not None:
            with torch.no_grad():
                self._restore(self._this_step.perturbed)
        self._this_step.perturbed = None
        self._phase = Phase.IDLE  # from any phase
        self._forget_step()
        self._unbegin_step()
        self._detach_grads()
        self._release_backups()


class MSASSHA(_SasshaBase):
    __doc__ = r"""M-SASSHA (paper appendix B): SASSHA with one gradient per step.

    The perturbation follows the momentum instead of a fresh gradient:

    .. math::
        \tilde x_t = x_t - \nu_{t-1} m_{t-1}, \qquad
        \nu_{t-1} = \rho / (\lVert m_{t-1} \rVert_2 + 10^{-12}), \quad \nu_0 = 0

    and the only gradient of the step is taken at :math:`\tilde x_t` (with a graph on
    Hessian-refresh steps taken by autograd); the update is SASSHA's, applied to the
    restored :math:`x_t`. The parameters stay perturbed between steps, as in the
    official code: ``unperturb()`` / ``perturb_weights()`` move them, and
    ``with opt.unperturbed():`` does both around an evaluation or a checkpoint.

    Usage::

        loss = opt.step(closure)
        # or
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()

    A ``step()`` with no gradient at all does nothing, as in torch.optim.
    """ + ARGS_DOC + r"""
    State per parameter: ``step``, ``exp_avg``, ``exp_hessian_diag``,
    ``bias_correction2`` and ``unperturbed_param`` (the point :math:`x_t` while the
    parameter holds :math:`\tilde x_t`).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = DEFAULTS["lr"],
        betas: Tuple[float, float] = DEFAULTS["betas"],
        weight_decay: float = DEFAULTS["weight_decay"],
        rho: Union[float, Any] = DEFAULTS["rho"],
        lazy_hessian: int = DEFAULTS["lazy_hessian"],
        n_samples: int = DEFAULTS["n_samples"],
        eps: float = DEFAULTS["eps"],
        perturb_eps: float = DEFAULTS["perturb_eps"],
        hessian_power: Union[float, Any] = DEFAULTS["hessian_power"],
        seed: int = DEFAULTS["seed"],
        backend: Union[str, Backend] = DEFAULTS["backend"],
        *,
        hvp: str = DEFAULTS["hvp"],
        fd_eps: Union[str, float] = DEFAULTS["fd_eps"],
        fd_scheme: str = DEFAULTS["fd_scheme"],
        nonfinite: str = DEFAULTS["nonfinite"],
        max_consecutive_skips: Optional[int] = DEFAULTS["max_consecutive_skips"],
        distributed: bool = DEFAULTS["distributed"],
        process_group: Optional[Any] = DEFAULTS["process_group"],
        grad_scaler: Optional[Any] = DEFAULTS["grad_scaler"],
        capturable: bool = DEFAULTS["capturable"],
        state_bits: int = DEFAULTS["state_bits"],
        master_weight_bits: Optional[int] = DEFAULTS["master_weight_bits"],
    ) -> None:
        super().__init__(params, _options(locals()))

    @property
    def is_perturbed(self) -> bool:
        """True while the parameters hold the perturbed point :math:`\\tilde x`."""
        return self._phase is Phase.RESTING

    def _with_state(self) -> List[Tensor]:
        state = self.state
        return [p for p in self._all_params() if "exp_avg" in state.get(p, ()) or "exp_avg_codes" in state.get(p, ())]

    def _backup(self, p: Tensor) -> Tensor:
        state = self._state_of(p)
        buf = state.get("unperturbed_param")
        if buf is None:  # a param without state is not perturbed: x_t is where it is
            buf = state["unperturbed_param"] = p.detach().clone(memory_format=torch.preserve_format)
        return buf

    def _x_t_of(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        # unperturbed_param holds x_t of every param with state (a newcomer's is a copy of it)
        return (lambda b: b.backups) if self.is_perturbed or self._this_step.x_t_saved is plan else (lambda b: b.params)

    def _fd_x_t(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        """x_t of the finite-difference passes' params, in ``unperturbed_param`` (the passes move them)."""
        if not self.is_perturbed:  # the params hold x_t (first step, or after unperturb()): keep it
            with torch.no_grad():
                for b in plan.buckets:
                    torch._foreach_copy_(b.backups, b.params)
            self._this_step.x_t_saved = plan
        return lambda b: b.backups

    def _return_from_fd_point(self) -> None:
        if self.is_perturbed:  # x_t, then x~_t again (recomputed exactly from x_t and m)
            self.unperturb()
            self.perturb_weights()
        elif self._this_step.x_t_saved is not None:
            self._restore(self._this_step.x_t_saved)
        self._this_step.x_t_saved = None

    @torch.no_grad()
    def unperturb(self) -> None:
        """Move the parameters to the unperturbed point :math:`x_t`, bit for bit."""
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("unperturb()")
        if not self.is_perturbed:
            return
        params = self._with_state()
        if params:
            copy_(params, [self.state[p]["unperturbed_param"] for p in params])
        self._move(Phase.IDLE)

    @torch.no_grad()
    def perturb_weights(self, zero_grad: bool = False) -> None:
        """Move the parameters to :math:`x_t - \\nu m` (where ``step()`` leaves them)."""
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("perturb_weights()")
        if self.is_perturbed:
            return
        plan = self._plan(self._with_state(), self._backup)
        if plan.participants:
            attach_state(plan, self._state_of)
            # m of every bucket once (compact state: decoded into float transients for the norm and the move)
            momentum = {id(b): b.momentum() for b in plan.buckets}
            F.perturb(plan, lambda b: momentum[id(b)], -1.0, False, F.GroupTable(self.param_groups, self.capturable))
            self._move(Phase.RESTING)
        self._run.perturbation_owed = False
        if zero_grad:
            torch.optim.Optimizer.zero_grad(self)

    # The official class's names for the same two moves.
    move_back_from_momentumAscent = unperturb
    move_up_to_momentumAscent = perturb_weights

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Parameters at :math:`x_t` inside the block (evaluation, checkpoints), perturbed after."""
        was = self.is_perturbed
        outer = self._run.perturbed_outside  # the blocks may nest
        self.unperturb()
        self._run.perturbed_outside = was or outer  # a state_dict taken in here records the outside
        try:
            yield
        finally:
            self._run.perturbed_outside = outer
            if was:
                self.perturb_weights()

    def _closure_passes(self, closure: Callable[[], Any]) -> Any:
        self._this_step.pending = None
        if self._run.perturbation_owed:
            self.perturb_weights()
        return self._pass_and_refresh(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad (see the base class); after a step whose update ran but whose
        re-perturbation failed, it also moves the parameters to :math:`\\tilde x_{t+1}`."""
        super().zero_grad(set_to_none)
        if self._run.perturbation_owed and self._phase is Phase.IDLE and not self._this_step.in_closure:
            self.perturb_weights()

    def _x_t_for_update(self, plan: StepPlan) -> Callable[[Bucket], List[Tensor]]:
        if self._this_step.x_t_saved is not None and self._this_step.x_t_saved is not plan:  # FD passes over other params
            self._restore(self._this_step.x_t_saved)
            self._this_step.x_t_saved = None
        # params with state that take no part this step still hold x~_t: restored after
        self._this_step.idle = [p for p in self._with_state() if p.grad is None] if self.is_perturbed else []
        return self._x_t_of(plan)

    def _after_update(self) -> None:
        if self._this_step.idle:
            copy_(self._this_step.idle, [self.state[p]["unperturbed_param"] for p in self._this_step.idle])
        self._this_step.idle = []
        self._this_step.x_t_saved = None
        self._phase = Phase.IDLE  # the params hold x_{t+1}: perturbed for the next step
        self._run.perturbation_owed = True  # (should this fail, zero_grad() or step(closure) does it)
        self.perturb_weights()

    def _abort_step(self) -> None:
        """Back to where the step found the params: x~_t, or x_t where it found them unperturbed."""
        self._forget_step()
        self._unbegin_step()
        self._detach_grads()
        self._this_step.idle = []
        with torch.no_grad():
            self._return_from_fd_point()

    def _extra_state(self) -> Dict[str, Any]:
        extra = super()._extra_state()
        extra["is_perturbed"] = self.is_perturbed or self._run.perturbed_outside
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        """Put the parameters where the saved run had them between steps.

        A checkpoint may be taken with the model at x~ (outside ``unperturbed()``)
        or at x (inside it). Load the model first: if its parameters equal the saved
        unperturbed point, the perturbation is applied again (bit for bit what it
        was, computed from the saved momentum); otherwise they are taken to hold x~.
        """
        self._phase = Phase.IDLE
        if not extra.get("is_perturbed", False):
            return
        params = self._with_state()
        at_x = all(torch.equal(p, self.state[p]["unperturbed_param"]) for p in params
                   if "unperturbed_param" in self.state[p])
        if at_x:
            self.perturb_weights()
        else:
            self._phase = Phase.RESTING

