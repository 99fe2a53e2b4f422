"""``state_dict`` / ``load_state_dict`` of the optimizer classes.

torch's state dict plus what makes a resumed run continue exactly: the global step
and refresh counters (the probes' counter), the seed, skipped steps, the HVP
method in use and the schedules' positions, under the ``"sassha_fused"`` key.
State tensors are copied on load and cast to the dtypes this package keeps them in
(``step`` float32, ``bias_correction2`` float64, ``exp_avg``/``exp_hessian_diag``
in the param's math dtype); checkpoints with integer or float counters load too.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .backends import math_dtype
from .schedules import is_schedule

__all__ = ["StateDictMixin", "EXTRA_KEY"]

EXTRA_KEY = "sassha_fused"
_STATE_DTYPES = {"step": torch.float32, "bias_correction2": torch.float64}


class StateDictMixin:
    """State dict methods of the optimizer classes (a mixin of ``_SasshaBase``)."""

    def _extra_state(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {
            "global_step": self._global_step,
            "refreshes": self._refreshes,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "hvp_method": self._hvp_method,
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
        """
        sd = super().state_dict()
        sd[EXTRA_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume exactly: steps, refresh phase, probe counter, schedules and HVP method."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(EXTRA_KEY, None)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype (16-bit params keep fp32
        # state here) and may alias the given tensors: every tensor is copied, so
        # loading a live optimizer's state_dict shares no buffer with it.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(self._all_params(), ids):
            saved = saved_state.get(i, {})
            if not saved:
                continue
            state = self.state[p]
            # the counters live in the optimizer's banks; the state holds views of them
            step, c2 = self._counter_views(p)
            state["step"], state["bias_correction2"] = step, c2
            for key, value in saved.items():
                if key in _STATE_DTYPES:
                    state[key].copy_(torch.as_tensor(value, dtype=_STATE_DTYPES[key]))
                    continue
                dtype = math_dtype(p.dtype) if key in ("exp_avg", "exp_hessian_diag") else p.dtype
                state[key] = torch.as_tensor(value).to(device=p.device, dtype=dtype, copy=True)
        if extra is not None:
            self._global_step = int(extra["global_step"])
            self._refreshes = int(extra["refreshes"])
            self.seed = int(extra.get("seed", self.seed))
            self._skips.skipped = int(extra.get("skipped_steps", 0))
            if self.hvp == "auto" and extra.get("hvp_method") in ("autograd", "finite_difference"):
                self._hvp_method = extra["hvp_method"]
            if "hessian_power_schedule" in extra and hasattr(self.hessian_power, "load_state_dict"):
                self.hessian_power.load_state_dict(extra["hessian_power_schedule"])
            if "rho_schedule" in extra and hasattr(self.rho_schedule, "load_state_dict"):
                self.rho_schedule.load_state_dict(extra["rho_schedule"])
        self._plans.clear()
        self._step_begun = False
        self._load_extra_state(extra or {})

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass
