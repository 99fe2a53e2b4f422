r"""SASSHA and M-SASSHA as ``torch.optim.Optimizer`` classes.

The classes validate arguments, keep state, run autograd (both backward passes and
the Hessian-vector products) and hand every numeric phase to a backend
(``sassha_fused.backends``); the algorithm itself is written once, in
``backends/eager.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import (
    Backend,
    BackendUnavailable,
    GroupTensors,
    ProbeSpec,
    check_backend_name,
    math_dtype,
    resolve_backend,
)
from .distributed import BucketedAverager, is_distributed, reject_sharded_params, sync_participation
from .probes import MAX_PROBE_NUMEL
from .schedules import is_schedule

__all__ = ["SASSHA", "MSASSHA"]

_STATE_KEYS_MATH_DTYPE = ("exp_avg", "exp_hessian_diag")
_EXTRA_KEY = "sassha_fused"

_SHARED_ARGS_DOC = r"""
    Args:
        params: iterable of parameters or dicts defining parameter groups. Groups
            may set their own ``lr``, ``betas``, ``weight_decay``, ``rho``, ``eps``
            and ``perturb_eps``.
        lr: learning rate :math:`\eta` (default 0.15).
        betas: :math:`(\beta_1, \beta_2)`, decays of the momentum and of the
            absolute Hessian-diagonal EMA (default (0.9, 0.999)).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rho: perturbation radius :math:`\rho`, a number or a schedule object with
            ``step() -> float`` called once per optimizer step (``schedules.py``).
        lazy_hessian: refresh the Hessian estimate every ``k`` steps: at steps
            1, k+1, 2k+1, ... (default 10).
        n_samples: Rademacher probes per refresh (default 1).
        eps: added to the preconditioner after the power (default 1e-4).
        hessian_power: exponent :math:`p` of the preconditioner, a number or a
            schedule object (default 0.5, the square root).
        seed: seed of the counter-based probes (``sassha_fused.probes``); the
            same seed gives the same probes on every backend, device and rank.
        backend: ``"auto"``, ``"eager"``, ``"foreach"``, ``"triton"``, ``"cuda"``,
            ``"cpp"``, or a ``Backend`` instance. ``"auto"`` picks the fastest
            available for each device; an explicit choice that cannot run raises
            and says why (``available_backends()`` lists them).
        nonfinite: what a step whose gradients or Hessian estimate hold NaN/Inf
            does. ``"skip"`` (default): parameters (unperturbed) and every state
            entry stay as they were, a warning is issued and ``skipped_steps``
            counts it. ``"raise"``: the same, then ``FloatingPointError``.
            ``"ignore"``: no check (no extra pass, no host synchronisation).
        distributed: when ``torch.distributed`` is initialised, average the
            perturbed gradients and Hessian-vector products over ``process_group``
            in flat buckets before the update (default True). Turn off when a
            wrapper already averages them.
        process_group: the group to average over (default: the default group).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training: the optimizer
            unscales the first-pass gradients before perturbing and the
            Hessian-vector products before the update (drive the step with
            ``scaler.step(opt)``; see the README).
"""


def _validate_group_hparams(group: Dict[str, Any]) -> None:
    lr, betas = group["lr"], group["betas"]
    if not isinstance(lr, (int, float)) or not 0.0 <= lr:
        raise ValueError(f"lr: invalid learning rate {lr!r}, it must be a number >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas: beta{i + 1} = {b!r} is outside [0, 1)")
    for name in ("weight_decay", "eps", "perturb_eps"):
        if not group[name] >= 0.0:
            raise ValueError(f"{name}: invalid value {group[name]!r}, it must be >= 0")
    rho = group["rho"]
    if not is_schedule(rho) and not rho >= 0.0:
        raise ValueError(f"rho: invalid perturbation radius {rho!r}, it must be >= 0")


class _SasshaBase(torch.optim.Optimizer):
    """What SASSHA and M-SASSHA share: arguments, state, schedules, HVPs, dispatch."""

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        betas: Tuple[float, float],
        weight_decay: float,
        rho: Union[float, Any],
        lazy_hessian: int,
        n_samples: int,
        eps: float,
        perturb_eps: float,
        hessian_power: Union[float, Any],
        seed: int,
        backend: Union[str, Backend],
        nonfinite: str = "skip",
        distributed: bool = True,
        process_group: Optional[Any] = None,
        grad_scaler: Optional[Any] = None,
    ) -> None:
        if nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"nonfinite: expected 'skip', 'raise' or 'ignore', got {nonfinite!r}")
        if not isinstance(lazy_hessian, int) or lazy_hessian < 1:
            raise ValueError(f"lazy_hessian: must be an integer >= 1, got {lazy_hessian!r}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples: must be an integer >= 1, got {n_samples!r}")
        if not is_schedule(hessian_power) and not isinstance(hessian_power, (int, float)):
            raise ValueError(f"hessian_power: expected a number or a schedule, got {hessian_power!r}")
        if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed: must be an integer in [0, 2**64), got {seed!r}")
        check_backend_name(backend)

        self.lazy_hessian = lazy_hessian
        self.n_samples = n_samples
        self.seed = seed
        self.hessian_power = hessian_power
        self.rho_schedule = rho if is_schedule(rho) else None
        self.backend = backend
        self.nonfinite = nonfinite
        self.distributed = bool(distributed)
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0  # steps skipped for non-finite gradients or Hessian estimates
        self._averager = BucketedAverager(process_group)
        self.last_step_collectives = 0  # collectives the last step issued (data-parallel)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            weight_decay=weight_decay,
            rho=0.0 if self.rho_schedule is not None else rho,
            eps=eps,
            perturb_eps=perturb_eps,
        )
        _validate_group_hparams(defaults)
        self._own_rho: List[bool] = []  # per group: did it set its own rho?
        super().__init__(params, defaults)
        reject_sharded_params(list(self._all_params()))

        # Optimizer-wide counters (saved by state_dict under _EXTRA_KEY).
        self._global_step = 0  # optimizer steps taken
        self._refreshes = 0  # Hessian refreshes taken: the probes' counter
        self._power_t: Optional[float] = None  # hessian_power of the current step
        self._step_begun = False
        self._backend_cache: Dict[Tuple[torch.device, torch.dtype], Backend] = {}
        # An explicit backend that cannot run the params it was given fails now,
        # not at the first step.
        for p in self._all_params():
            self._backend_for(p.device, p.dtype)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's add_param_group, validated first: a rejected group is not kept."""
        own_rho = isinstance(param_group, dict) and "rho" in param_group
        if own_rho and is_schedule(param_group["rho"]):
            raise ValueError(
                "rho: a param group's rho must be a number; pass a schedule as the "
                "optimizer's rho= to drive every group that does not set its own"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group_hparams(group)
            ids = [id(p) for p in group["params"]]
            if len(set(ids)) != len(ids):
                raise ValueError(
                    "params: a parameter appears twice in one param group; pass each "
                    "parameter once (its perturbation would otherwise be applied twice)"
                )
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        "SASSHA does not support complex parameters; optimise "
                        "torch.view_as_real(p) as a real parameter instead"
                    )
                if not p.is_floating_point():
                    raise TypeError(f"SASSHA optimises floating-point parameters, got {p.dtype}")
                if p.numel() > MAX_PROBE_NUMEL:
                    raise ValueError(f"a parameter has {p.numel()} elements; the probes address at most 2**37")
            if hasattr(self, "_backend_cache"):
                for p in group["params"]:
                    self._backend_for(p.device, p.dtype)
        except Exception:
            self.param_groups.pop()
            raise
        self._own_rho.append(own_rho)
        self._index_cache = None

    def _all_params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _param_indices(self) -> Dict[int, int]:
        """Each param's position in the optimizer's order (the probes' counter)."""
        # Keyed by id(): Tensor.__hash__ is a Python-level call, and this map is
        # read for every param of every phase.
        cache = getattr(self, "_index_cache", None)
        total = sum(len(g["params"]) for g in self.param_groups)
        if cache is None or len(cache) != total:
            cache = {id(p): i for i, p in enumerate(self._all_params())}
            self._index_cache = cache
        return cache

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> Backend:
        key = (device, dtype)
        if key not in self._backend_cache:
            self._backend_cache[key] = resolve_backend(self.backend, device, dtype)
        return self._backend_cache[key]

    # --------------------------------------------------------------- schedules
    @property
    def hessian_due(self) -> bool:
        """True when the coming step refreshes the Hessian estimate.

        The second backward pass of such a step needs ``create_graph=True``; on
        every other step no double-backward graph is built.
        """
        return self._global_step % self.lazy_hessian == 0

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self._global_step

    def _begin_step(self) -> None:
        """Advance the schedules once per optimizer step."""
        if self._step_begun:
            return
        power = self.hessian_power
        self._power_t = float(power.step()) if is_schedule(power) else float(power)
        if self.rho_schedule is not None:
            rho = float(self.rho_schedule.step())
            if rho < 0:
                raise ValueError(f"rho: the schedule returned {rho}, it must be >= 0")
            for group, own in zip(self.param_groups, self._own_rho):
                if not own:
                    group["rho"] = rho
        self._step_begun = True

    # ------------------------------------------------------------ tensor lists
    def _group_tensors(
        self,
        params_of: Callable[[Dict[str, Any]], List[Tensor]],
        backups_of: Callable[[Tensor], Tensor],
        refresh: bool = False,
        with_state: bool = True,
    ) -> Dict[torch.device, List[GroupTensors]]:
        """GroupTensors per device for the params ``params_of(group)`` selects.

        With ``with_state`` the state lists are filled too (``_attach_state``).
        """
        index = self._param_indices()
        if any(id(p) not in index for g in self.param_groups for p in g["params"][:1]):
            self._index_cache = None
            index = self._param_indices()
        power = self._power_t if self._power_t is not None else 0.5
        out: Dict[torch.device, List[GroupTensors]] = {}
        for group in self.param_groups:
            selected = params_of(group)
            if not selected:
                continue
            devices = [p.device for p in selected]
            by_device: Dict[torch.device, List[Tensor]]
            if devices.count(devices[0]) == len(devices):  # the common case: one device
                by_device = {devices[0]: selected}
            else:
                by_device = {}
                for p, device in zip(selected, devices):
                    by_device.setdefault(device, []).append(p)
            beta1, beta2 = group["betas"]
            for device, ps in by_device.items():
                out.setdefault(device, []).append(GroupTensors(
                    params=list(ps), grads=[p.grad for p in ps], exp_avgs=[], exp_hessian_diags=[],
                    backups=[backups_of(p) for p in ps], steps=[], bias_correction2=[],
                    param_indices=[index[id(p)] for p in ps],
                    lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                    weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                    rho=float(group["rho"]), perturb_eps=float(group["perturb_eps"]),
                    hessian_power=power,
                ))
        if with_state:
            self._attach_state(out, refresh)
        return out

    def _attach_state(self, per_device: Dict[torch.device, List[GroupTensors]], refresh: bool) -> None:
        """Fill the state lists, with the step and c2 of the coming step.

        They are computed, not written: state is committed only after the backend ran.
        """
        for groups in per_device.values():
            for gt in groups:
                gt.exp_avgs, gt.exp_hessian_diags, gt.steps, gt.bias_correction2 = [], [], [], []
                states = gt.extras["states"] = [self.state[p] for p in gt.params]
                for state in states:
                    step = state["step"] + 1
                    gt.exp_avgs.append(state["exp_avg"])
                    gt.exp_hessian_diags.append(state["exp_hessian_diag"])
                    gt.steps.append(step)
                    gt.bias_correction2.append(
                        (1 - gt.beta2**step) ** gt.hessian_power if refresh else state["bias_correction2"]
                    )

    def _backend_groups(
        self, per_device: Dict[torch.device, List[GroupTensors]]
    ) -> List[Tuple[Backend, List[GroupTensors]]]:
        """Split each device's groups by the backend that runs their dtype.

        Each sub-group records in ``extras["origin"]`` the ``(device, group, j)``
        of each of its tensors, so per-tensor results map back.
        """
        jobs: List[Tuple[Backend, List[GroupTensors]]] = []
        for device, groups in per_device.items():
            dtypes = {p.dtype for g in groups for p in g.params}
            backends = {id(b): b for b in (self._backend_for(device, dt) for dt in dtypes)}
            if len(backends) == 1:  # the common case: one backend runs the whole device
                for gi, g in enumerate(groups):
                    g.extras["origin"] = [(device, gi, j) for j in range(len(g.params))]
                jobs.append((next(iter(backends.values())), groups))
                continue
            by_backend: Dict[int, Tuple[Backend, List[GroupTensors]]] = {}
            for gi, g in enumerate(groups):
                split: Dict[int, GroupTensors] = {}
                for j, p in enumerate(g.params):
                    backend = self._backend_for(device, p.dtype)
                    sub = split.get(id(backend))
                    if sub is None:
                        sub = GroupTensors(
                            params=[], grads=[], exp_avgs=[], exp_hessian_diags=[], backups=[],
                            steps=[], bias_correction2=[], param_indices=[],
                            lr=g.lr, beta1=g.beta1, beta2=g.beta2, weight_decay=g.weight_decay,
                            eps=g.eps, rho=g.rho, perturb_eps=g.perturb_eps,
                            hessian_power=g.hessian_power, extras={"origin": []},
                        )
                        split[id(backend)] = sub
                        by_backend.setdefault(id(backend), (backend, []))[1].append(sub)
                    sub.extras["origin"].append((device, gi, j))
                    for name in ("params", "grads", "backups", "param_indices"):
                        getattr(sub, name).append(getattr(g, name)[j])
                    if g.exp_avgs:
                        for name in ("exp_avgs", "exp_hessian_diags", "steps", "bias_correction2"):
                            getattr(sub, name).append(getattr(g, name)[j])
            jobs.extend(by_backend.values())
        return jobs

    def _global_sq_norm(self, jobs: List[Tuple[Backend, List[GroupTensors]]], source: str, adaptive: bool) -> Tensor:
        """One global squared norm over all jobs, reduced on the first job's device."""
        total: Optional[Tensor] = None
        for backend, groups in jobs:
            part = backend.sq_norm(groups, source, adaptive)
            total = part if total is None else total + part.to(total.device, total.dtype)
        assert total is not None
        return total

    @staticmethod
    def _check_grads(params: Iterable[Tensor]) -> None:
        """Sparse gradients are refused (one pass over the params, no per-param call)."""
        if any(g is not None and g.is_sparse for g in [p.grad for p in params]):
            raise RuntimeError(
                "SASSHA does not support sparse gradients; use a dense embedding "
                "(sparse=False) for parameters this optimizer updates"
            )

    def _check_closure_allowed(self) -> None:
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            raise ValueError(
                "grad_scaler: with a GradScaler, drive the step with the official protocol "
                "(scaler.scale(loss).backward(), perturb_weights, ..., scaler.step(opt)); "
                "a closure's loss is never scaled, so step(closure) cannot use it"
            )

    @staticmethod
    def _set_grads(loss: Tensor, params: List[Tensor], create_graph: bool = False) -> None:
        """``p.grad = d loss / d p`` for the closure protocol, via autograd.grad.

        autograd.grad (not backward) leaves no parameter/gradient reference cycle;
        a loss that depends on no parameter leaves every gradient None.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
        hint = (
            "the closure must return the loss without calling backward() on it: "
            "the optimizer runs both backward passes itself"
        )
        if not loss.requires_grad and any(p.numel() > 0 for p in params):
            raise ValueError(f"the closure's loss does not depend on any parameter ({hint})")
        if loss.requires_grad and params:
            try:
                grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
            except RuntimeError as exc:
                if "second time" in str(exc):
                    raise RuntimeError(f"{exc}\n\n{type(loss).__name__}: {hint}") from exc
                raise
        else:
            grads = [None] * len(params)
        for p, g in zip(params, grads):
            p.grad = g

    def _ensure_state(self, p: Tensor) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            mdt = math_dtype(p.dtype)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
            state["exp_hessian_diag"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
            state["bias_correction2"] = 0.0

    def _update_params(self, group: Dict[str, Any], refresh: bool) -> List[Tensor]:
        """The params of ``group`` this step updates.

        A param with a gradient takes part once it has state; it gets state at a
        Hessian refresh, so its first update always has a Hessian estimate (a param
        that starts receiving gradients between refreshes waits for the next one).
        """
        with_grad = [p for p in group["params"] if p.grad is not None]
        self._check_grads(with_grad)
        if refresh:
            return with_grad
        state = self.state
        return [p for p in with_grad if "exp_avg" in state.get(p, ())]

    # ------------------------------------------------------------------- HVPs
    def _hessian_vector_products(
        self, per_device: Dict[torch.device, List[GroupTensors]]
    ) -> Tuple[Dict[Tensor, List[Optional[Tensor]]], bool]:
        """``H z_s`` for every param and sample, at the params' current values.

        Returns ``(hvps, has_graph)``: ``hvps[param][s]`` (None where the param is
        absent from the second-order graph). Gradients that carry a graph are
        detached afterwards (no reference cycle).
        """
        spec = ProbeSpec(self.seed, self._refreshes, self.n_samples)
        flat: List[Tuple[torch.device, int, int]] = []
        for device, groups in per_device.items():
            for gi, g in enumerate(groups):
                for j, grad in enumerate(g.grads):
                    if g.params[j].grad is not None and g.params[j].grad.requires_grad:
                        flat.append((device, gi, j))
        hvps: Dict[Tensor, List[Optional[Tensor]]] = {
            p: [None] * self.n_samples for groups in per_device.values() for g in groups for p in g.params
        }
        if not flat:
            return hvps, False
        outputs = [per_device[d][gi].params[j].grad for d, gi, j in flat]
        inputs = [per_device[d][gi].params[j] for d, gi, j in flat]
        jobs = self._backend_groups(per_device)
        try:
            for s in range(self.n_samples):
                zs: Dict[Tuple[torch.device, int, int], Tensor] = {}
                for backend, sub in jobs:
                    for g_sub, z_sub in zip(sub, backend.probes(sub, spec, s)):
                        zs.update(zip(g_sub.extras["origin"], z_sub))
                grad_outputs = [zs[key] for key in flat]
                with torch.enable_grad():
                    hz = torch.autograd.grad(
                        outputs, inputs, grad_outputs=grad_outputs,
                        retain_graph=s < self.n_samples - 1, allow_unused=True,
                    )
                for p, h in zip(inputs, hz):
                    hvps[p][s] = None if h is None else h.detach()
        finally:
            for p in inputs:
                p.grad = p.grad.detach()
        return hvps, True

    def _run_update(
        self,
        per_device: Dict[torch.device, List[GroupTensors]],
        hvps_by_param: Optional[Dict[Tensor, List[Optional[Tensor]]]],
    ) -> None:
        """The backends' update phase; ``hvps_by_param`` is None on non-refresh steps."""
        refresh = hvps_by_param is not None
        spec = ProbeSpec(self.seed, self._refreshes, self.n_samples) if refresh else None
        for backend, groups in self._backend_groups(per_device):
            hvps = None
            if refresh:
                hvps = [[[hvps_by_param[p][s] for p in g.params] for s in range(self.n_samples)] for g in groups]
            backend.update(groups, hvps, spec)

    def _missing_graph_error(self) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}: step {self._global_step + 1} refreshes the Hessian "
            "estimate, but the gradients carry no autograd graph. Run that backward "
            "pass as loss.backward(create_graph=opt.hessian_due). (If the loss has no "
            "curvature in any parameter, the Hessian is zero and this step cannot "
            "estimate it.)"
        )

    def _commit_state(self, per_device: Dict[torch.device, List[GroupTensors]], refresh: bool) -> None:
        for groups in per_device.values():
            for g in groups:
                states = g.extras.get("states") or [self.state[p] for p in g.params]
                for j, state in enumerate(states):
                    state["step"] = g.steps[j]
                    state["bias_correction2"] = g.bias_correction2[j]
        self._global_step += 1
        if refresh:
            self._refreshes += 1
        self._step_begun = False

    # ---------------------------------------------- averaging, scaling, faults
    def _inv_scale(self, device: torch.device) -> Optional[Tensor]:
        """1 / the grad scaler's current scale, as a device tensor (no host sync)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), dtype=torch.float32, device=device)).reciprocal()

    def _sync_participation(self) -> None:
        """Data-parallel: the same params take part in the step on every rank."""
        self.last_step_collectives = 0
        if self.distributed and is_distributed(self.process_group):
            params = [p for p in self._all_params() if p.requires_grad]
            self.last_step_collectives = sync_participation(params, self.process_group)

    def _average_and_check(
        self,
        per_device: Dict[torch.device, List[GroupTensors]],
        hvps_by_param: Optional[Dict[Tensor, List[Optional[Tensor]]]],
    ) -> bool:
        """Unscale and average the update's inputs; False when they are not all finite.

        Inputs are the perturbed gradients of the params in ``per_device`` and, on
        refresh steps, their Hessian-vector products. Averaging comes first, so every
        rank takes the same decision. The check is the backend's own squared-norm
        pass over them and one host read of the result per step (a squared norm
        that overflows, |g| beyond ~1e19 in fp32, counts as non-finite too).
        """
        params = [p for groups in per_device.values() for g in groups for p in g.params]
        averaging = self.distributed and is_distributed(self.process_group)
        if averaging and hvps_by_param is not None:
            # Ranks must reduce the same tensor list: a param absent from this rank's
            # second-order graph contributes H z = 0.
            for p in params:
                entry = hvps_by_param.setdefault(p, [None] * self.n_samples)
                for s in range(self.n_samples):
                    if entry[s] is None:
                        entry[s] = torch.zeros_like(p)
        hz = [h for p in params for h in hvps_by_param.get(p, ()) if h is not None] if hvps_by_param else []
        if hz:
            inv = self._inv_scale(hz[0].device)
            if inv is not None:
                torch._foreach_mul_(hz, inv.to(hz[0].dtype))
        if averaging:
            self._averager.average([p.grad for p in params] + hz)
            self.last_step_collectives += self._averager.collectives
        if self.nonfinite == "ignore" or not params:
            return True
        checked: Dict[torch.device, List[GroupTensors]] = {}
        for device, groups in per_device.items():
            for g in groups:
                checked.setdefault(device, []).append(g)
                for s in range(self.n_samples if hvps_by_param else 0):
                    live = [j for j, p in enumerate(g.params) if hvps_by_param[p][s] is not None]
                    if live:
                        checked[device].append(dataclasses.replace(
                            g, params=[g.params[j] for j in live],
                            grads=[hvps_by_param[g.params[j]][s] for j in live],
                            backups=[g.backups[j] for j in live],
                            param_indices=[g.param_indices[j] for j in live],
                            exp_avgs=[], exp_hessian_diags=[], steps=[], bias_correction2=[]))
        total = self._global_sq_norm(self._backend_groups(checked), "grads", False)
        return bool(torch.isfinite(total))

    def _skip_step(self) -> None:
        """After a non-finite step was undone: count and warn, or raise.

        The schedules stay where this step put them: the retried step reuses their
        values, as after any other step that did not happen.
        """
        msg = (
            f"{type(self).__name__}: step {self._global_step + 1} skipped: the perturbed "
            "gradients or the Hessian estimate contain NaN or Inf. Parameters and "
            "optimizer state are unchanged."
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + " (nonfinite='raise')")
        self.skipped_steps += 1
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -------------------------------------------------------------- state dict
    def _extra_state(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {
            "global_step": self._global_step,
            "refreshes": self._refreshes,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
        }
        if is_schedule(self.hessian_power) and hasattr(self.hessian_power, "state_dict"):
            extra["hessian_power_schedule"] = self.hessian_power.state_dict()
        if self.rho_schedule is not None and hasattr(self.rho_schedule, "state_dict"):
            extra["rho_schedule"] = self.rho_schedule.state_dict()
        return extra

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus the optimizer-wide counters and schedules.

        Take it between steps (for M-SASSHA the saved model holds the perturbed
        point and this state holds the unperturbed one; both resume exactly).
        """
        sd = super().state_dict()
        sd[_EXTRA_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume exactly: steps, refresh phase, probe counter and schedules included."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_KEY, None)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype (16-bit params keep fp32
        # state here) and may alias the given tensors: every tensor is copied, so
        # loading a live optimizer's state_dict shares no buffer with it.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(self._all_params(), ids):
            for key, value in saved_state.get(i, {}).items():
                if isinstance(value, Tensor):
                    dtype = math_dtype(p.dtype) if key in _STATE_KEYS_MATH_DTYPE else p.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        if extra is not None:
            self._global_step = int(extra["global_step"])
            self._refreshes = int(extra["refreshes"])
            self.seed = int(extra.get("seed", self.seed))
            self.skipped_steps = int(extra.get("skipped_steps", 0))
            if "hessian_power_schedule" in extra and hasattr(self.hessian_power, "load_state_dict"):
                self.hessian_power.load_state_dict(extra["hessian_power_schedule"])
            if "rho_schedule" in extra and hasattr(self.rho_schedule, "load_state_dict"):
                self.rho_schedule.load_state_dict(extra["rho_schedule"])
            self._load_extra_state(extra)
        self._step_begun = False

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass


class SASSHA(_SasshaBase):
    r"""SASSHA: Sharpness-aware Adaptive Second-order optimisation with Stable Hessian
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
    the perturbed point, as in the paper.

    Two ways to drive it::

        # (a) one call per step; the closure returns the loss and does not call backward
        loss = opt.step(lambda: loss_fn(model(x), y))

        # (b) the official code's protocol, unchanged
        loss_fn(model(x), y).backward()
        opt.perturb_weights(zero_grad=True)
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        opt.unperturb()
        opt.step()
        opt.zero_grad()
    """ + _SHARED_ARGS_DOC + r"""
        perturb_eps: added to the gradient norm of the perturbation (default 1e-12).
        adaptive: element-wise adaptive perturbation (ASAM): the norm is taken over
            :math:`|x| \odot g` and :math:`e = \rho\, x^2 \odot g / (n + \epsilon_p)`.
        defer_unperturb: in the official protocol, let ``unperturb()`` leave the
            restore to the next ``step()``, which fuses it into the update (one read
            and one write of every parameter less per step). Parameters read between
            ``unperturb()`` and ``step()`` then still hold the perturbed point; any
            other call (``perturb_weights``, ``state_dict``, ``unperturbed()``)
            restores first. Default False: ``unperturb()`` restores at once.

    State per parameter (names as in the official code): ``step``, ``exp_avg``
    (:math:`m`), ``exp_hessian_diag`` (:math:`D`), ``bias_correction2``
    (:math:`c_2`); fp32 for bf16/fp16 parameters.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: Tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        rho: Union[float, Any] = 0.2,
        lazy_hessian: int = 10,
        n_samples: int = 1,
        eps: float = 1e-4,
        perturb_eps: float = 1e-12,
        hessian_power: Union[float, Any] = 0.5,
        adaptive: bool = False,
        seed: int = 0,
        backend: Union[str, Backend] = "auto",
        nonfinite: str = "skip",
        distributed: bool = True,
        process_group: Optional[Any] = None,
        grad_scaler: Optional[Any] = None,
        defer_unperturb: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, weight_decay=weight_decay, rho=rho,
            lazy_hessian=lazy_hessian, n_samples=n_samples, eps=eps,
            perturb_eps=perturb_eps, hessian_power=hessian_power, seed=seed, backend=backend,
            nonfinite=nonfinite, distributed=distributed, process_group=process_group,
            grad_scaler=grad_scaler,
        )
        self.adaptive = bool(adaptive)
        self.defer_unperturb = bool(defer_unperturb)
        # x_t while the params hold x_t + e_t. Not part of state_dict: it only lives
        # between perturb_weights() and the end of the step.
        self._backups: Dict[int, Tensor] = {}  # keyed by id(param)
        self._perturbed: List[Tensor] = []
        self._pending_hvps: Optional[Dict[Tensor, List[Optional[Tensor]]]] = None
        self._pending_graph = True
        self._restore_pending = False

    @property
    def is_perturbed(self) -> bool:
        """True between ``perturb_weights()`` and ``unperturb()`` / the end of the step."""
        return bool(self._perturbed)

    def _backup(self, p: Tensor) -> Tensor:
        buf = self._backups.get(id(p))
        # (a param's storage may have been replaced since: p.data = ... with another shape)
        if buf is None or buf.shape != p.shape or buf.dtype is not p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backups[id(p)] = buf
        return buf

    @torch.no_grad()
    def perturb_weights(self, zero_grad: bool = True) -> None:
        """Climb to ``x + rho * g / ||g||`` along the current gradients.

        ``||g||`` is one norm over all params of all groups, computed on the device.
        The unperturbed point is kept (not recomputed), so ``unperturb()`` restores
        every parameter bit for bit.
        """
        self._materialize_restore()
        if self._perturbed:
            raise RuntimeError("perturb_weights() called twice without unperturb() or step() in between")
        # A step that never reached step() (GradScaler skips it on inf/NaN) leaves
        # nothing behind: this is a new step, with new Hessian-vector products.
        self._pending_hvps = None
        self._pending_graph = True
        self._begin_step()
        self._check_grads(self._all_params())
        per_device = self._group_tensors(
            lambda g: [p for p in g["params"] if p.grad is not None],
            self._backup, with_state=False,
        )
        jobs = self._backend_groups(per_device)
        if jobs:
            grads = [p.grad for groups in per_device.values() for g in groups for p in g.params]
            inv = self._inv_scale(grads[0].device)
            if inv is not None:  # the perturbation follows the unscaled gradient
                torch._foreach_mul_(grads, inv.to(grads[0].dtype))
            sq_norm = self._global_sq_norm(jobs, "grads", self.adaptive)
            for backend, groups in jobs:
                backend.perturb(groups, sq_norm, "grads", 1.0, self.adaptive)
            self._perturbed = [p for groups in per_device.values() for g in groups for p in g.params]
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return every parameter to the unperturbed point, bit for bit.

        On a Hessian-refresh step the Hessian-vector products are taken first, at
        the perturbed point, while the graph of the second backward pass still
        describes it; ``step()`` then uses them.
        """
        if not self._perturbed or self._restore_pending:
            return
        if self.hessian_due and self._pending_hvps is None:
            refresh = True
            per_device = self._group_tensors(
                lambda g: self._update_params(g, refresh), lambda p: p, with_state=False,
            )
            try:
                self._pending_hvps, self._pending_graph = self._hessian_vector_products(per_device)
            except BaseException:
                self._abort_step()
                raise
        if self.defer_unperturb:
            self._restore_pending = True  # step() restores inside the fused update
            return
        self._restore(self._perturbed)
        self._perturbed = []

    @torch.no_grad()
    def _restore(self, params: Sequence[Tensor]) -> None:
        if params:
            torch._foreach_copy_(list(params), [self._backups[id(p)] for p in params])

    def _materialize_restore(self) -> None:
        """Carry out a restore that ``defer_unperturb`` left for ``step()``."""
        if self._restore_pending:
            self._restore(self._perturbed)
            self._perturbed = []
            self._restore_pending = False

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Parameters at the unperturbed point inside the block.

        Between SASSHA steps they are there anyway; a deferred restore is carried
        out; mid-step (between ``perturb_weights()`` and ``unperturb()``) the
        perturbed values are kept aside and put back after the block.
        """
        self._materialize_restore()
        if not self._perturbed:
            yield
            return
        with torch.no_grad():
            aside = [p.detach().clone() for p in self._perturbed]
            self._restore(self._perturbed)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(self._perturbed), aside)

    def state_dict(self) -> Dict[str, Any]:
        self._materialize_restore()
        return super().state_dict()

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One SASSHA step.

        With a ``closure`` (returns the loss, does not call backward) the optimizer
        runs both passes itself and returns the first loss. Without one, it finishes
        the official protocol after ``perturb_weights``/``backward``/``unperturb``.
        """
        if closure is None:
            with torch.no_grad():
                self._finish_step()
            return None
        self._check_closure_allowed()
        for p in self._all_params():
            p.grad = None
        params = [p for p in self._all_params() if p.requires_grad]
        with torch.enable_grad():
            loss = closure()
            self._set_grads(loss, params)
        try:
            self.perturb_weights(zero_grad=True)
            refresh = self.hessian_due
            with torch.enable_grad():
                self._set_grads(closure(), params, create_graph=refresh)
            with torch.no_grad():
                self._finish_step()
        except BaseException:
            # Whatever failed (the closure, an out-of-memory error, a backend), the
            # parameters go back to x_t and the optimizer can take the step again.
            self._abort_step()
            raise
        return loss.detach()

    def _finish_step(self) -> None:
        self._begin_step()
        self._sync_participation()
        refresh = self.hessian_due
        perturbed = {id(p) for p in self._perturbed}
        try:
            update = {id(g): self._update_params(g, refresh) for g in self.param_groups}
        except Exception:
            self._abort_step()
            raise
        hvps_by_param: Optional[Dict[Tensor, List[Optional[Tensor]]]] = None
        if refresh:
            if self._pending_hvps is not None:
                hvps_by_param, has_graph = self._pending_hvps, self._pending_graph
            else:
                per_device = self._group_tensors(lambda g: update[id(g)], lambda p: p, with_state=False)
                try:
                    hvps_by_param, has_graph = self._hessian_vector_products(per_device)
                except BaseException:
                    self._abort_step()
                    raise
            if not has_graph and any(update.values()):
                self._abort_step()
                raise self._missing_graph_error()
        updated_list = [p for ps in update.values() for p in ps]
        per_device = self._group_tensors(
            lambda g: update[id(g)],
            lambda p: self._backups[id(p)] if id(p) in perturbed else p,
            with_state=False,
        )
        if not self._average_and_check(per_device, hvps_by_param):
            self._abort_step()
            self._skip_step()
            return
        if refresh:  # between refreshes, every param taking part has state (_update_params)
            for p in updated_list:
                self._ensure_state(p)
        # Params perturbed but not updated (no state yet) go back to x_t here.
        updated = {id(p) for p in updated_list}
        self._restore([p for p in self._perturbed if id(p) not in updated])
        self._attach_state(per_device, refresh)
        self._run_update(per_device, hvps_by_param)
        self._perturbed = []
        self._restore_pending = False
        self._pending_hvps = None
        self._pending_graph = True
        self._commit_state(per_device, refresh)

    def _abort_step(self) -> None:
        """Leave params and state as they were before the step began."""
        self._restore(self._perturbed)
        self._perturbed = []
        self._restore_pending = False
        self._pending_hvps = None
        self._pending_graph = True
        for p in self._all_params():
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()


class MSASSHA(_SasshaBase):
    r"""M-SASSHA (paper appendix B): SASSHA with one gradient per step.

    The perturbation follows the momentum instead of a fresh gradient:

    .. math::
        \tilde x_t = x_t - \nu_{t-1} m_{t-1}, \qquad
        \nu_{t-1} = \rho / (\lVert m_{t-1} \rVert_2 + 10^{-12}), \quad \nu_0 = 0

    and the only gradient of the step is taken at :math:`\tilde x_t` (with a graph on
    Hessian-refresh steps); the update is SASSHA's, applied to the restored
    :math:`x_t`. The parameters stay perturbed between steps, as in the official
    code: ``unperturb()`` / ``perturb_weights()`` move them, and
    ``with opt.unperturbed():`` does both around an evaluation or a checkpoint.

    Usage::

        loss = opt.step(lambda: loss_fn(model(x), y))         # closure: no backward
        # or
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        opt.step(); opt.zero_grad()
    """ + _SHARED_ARGS_DOC + r"""
        perturb_eps: added to the momentum norm (default 1e-12, as in the paper).

    State per parameter: ``step``, ``exp_avg``, ``exp_hessian_diag``,
    ``bias_correction2`` and ``unperturbed_param`` (the point :math:`x_t` while the
    parameter holds :math:`\tilde x_t`).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: Tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        rho: Union[float, Any] = 0.2,
        lazy_hessian: int = 10,
        n_samples: int = 1,
        eps: float = 1e-4,
        perturb_eps: float = 1e-12,
        hessian_power: Union[float, Any] = 0.5,
        seed: int = 0,
        backend: Union[str, Backend] = "auto",
        nonfinite: str = "skip",
        distributed: bool = True,
        process_group: Optional[Any] = None,
        grad_scaler: Optional[Any] = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, weight_decay=weight_decay, rho=rho,
            lazy_hessian=lazy_hessian, n_samples=n_samples, eps=eps,
            perturb_eps=perturb_eps, hessian_power=hessian_power, seed=seed, backend=backend,
            nonfinite=nonfinite, distributed=distributed, process_group=process_group,
            grad_scaler=grad_scaler,
        )
        self._is_perturbed = False

    @property
    def is_perturbed(self) -> bool:
        """True while the parameters hold the perturbed point :math:`\\tilde x`."""
        return self._is_perturbed

    def _with_state(self, group: Dict[str, Any]) -> List[Tensor]:
        return [p for p in group["params"] if "exp_avg" in self.state.get(p, ())]

    def _backup(self, p: Tensor) -> Tensor:
        state = self.state[p]
        buf = state.get("unperturbed_param")
        if buf is None:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            state["unperturbed_param"] = buf
        return buf

    @torch.no_grad()
    def unperturb(self) -> None:
        """Move the parameters to the unperturbed point :math:`x_t`, bit for bit."""
        if not self._is_perturbed:
            return
        params = [p for g in self.param_groups for p in self._with_state(g)]
        if params:
            torch._foreach_copy_(params, [self.state[p]["unperturbed_param"] for p in params])
        self._is_perturbed = False

    @torch.no_grad()
    def perturb_weights(self, zero_grad: bool = False) -> None:
        """Move the parameters to :math:`x_t - \\nu m` (where ``step()`` leaves them)."""
        if self._is_perturbed:
            return
        per_device = self._group_tensors(self._with_state, self._backup, with_state=True)
        jobs = self._backend_groups(per_device)
        if jobs:
            sq_norm = self._global_sq_norm(jobs, "exp_avgs", False)
            for backend, groups in jobs:
                backend.perturb(groups, sq_norm, "exp_avgs", -1.0, False)
            self._is_perturbed = True
        if zero_grad:
            self.zero_grad()

    # The official class's names for the same two moves.
    move_back_from_momentumAscent = unperturb
    move_up_to_momentumAscent = perturb_weights

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Parameters at :math:`x_t` inside the block (evaluation, checkpoints), perturbed after."""
        was = self._is_perturbed
        self.unperturb()
        self._perturbed_outside = was  # a state_dict taken in here records the outside
        try:
            yield
        finally:
            self._perturbed_outside = False
            if was:
                self.perturb_weights()

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One M-SASSHA step; with a closure (no backward inside) it runs the backward pass."""
        loss = None
        if closure is not None:
            self._check_closure_allowed()
            refresh = self.hessian_due
            for p in self._all_params():
                p.grad = None  # frozen params too: a stale gradient must not update them
            params = [p for p in self._all_params() if p.requires_grad]
            with torch.enable_grad():
                loss = closure()
                self._set_grads(loss, params, create_graph=refresh)
            loss = loss.detach()
        with torch.no_grad():
            self._finish_step()
        return loss

    def _finish_step(self) -> None:
        self._begin_step()
        self._sync_participation()
        refresh = self.hessian_due
        update = {id(g): self._update_params(g, refresh) for g in self.param_groups}
        hvps_by_param = None
        if refresh:
            per_device = self._group_tensors(lambda g: update[id(g)], lambda p: p, with_state=False)
            hvps_by_param, has_graph = self._hessian_vector_products(per_device)
            if not has_graph and any(update.values()):
                raise self._missing_graph_error()
        perturbed = self._is_perturbed
        had_state = {p for g in self.param_groups for p in self._with_state(g)}
        per_device = self._group_tensors(
            lambda g: update[id(g)],
            lambda p: self.state[p]["unperturbed_param"] if perturbed and p in had_state else p,
            with_state=False,
        )
        if not self._average_and_check(per_device, hvps_by_param):
            # The parameters still hold x~_t, where the step found them.
            self._skip_step()
            return
        for ps in update.values():
            for p in ps:
                self._ensure_state(p)
        self._attach_state(per_device, refresh)
        self._run_update(per_device, hvps_by_param)
        # Params with state that did not take part still hold x~_t: bring them back.
        updated = {p for ps in update.values() for p in ps}
        if perturbed:
            idle = [p for p in had_state if p not in updated]
            if idle:
                torch._foreach_copy_(idle, [self.state[p]["unperturbed_param"] for p in idle])
        self._commit_state(per_device, refresh)
        self._is_perturbed = False
        self.perturb_weights()

    def _extra_state(self) -> Dict[str, Any]:
        extra = super()._extra_state()
        extra["is_perturbed"] = self._is_perturbed or getattr(self, "_perturbed_outside", False)
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        """Put the parameters where the saved run had them between steps.

        A checkpoint may be taken with the model at x~ (outside ``unperturbed()``)
        or at x (inside it). Load the model first: if its parameters equal the saved
        unperturbed point, the perturbation is applied again (bit for bit what it
        was, computed from the saved momentum); otherwise they are taken to hold x~.
        """
        self._is_perturbed = False
        if not extra.get("is_perturbed", False):
            return
        params = [p for g in self.param_groups for p in self._with_state(g)]
        at_x = all(torch.equal(p, self.state[p]["unperturbed_param"]) for p in params
                   if "unperturbed_param" in self.state[p])
        if at_x:
            self.perturb_weights()
        else:
            self._is_perturbed = True
