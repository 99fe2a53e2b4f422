"""Schedules for ``hessian_power`` and ``rho``.

A schedule is any object with ``step() -> float``; the optimizer calls it once per
optimizer step and uses the value for that step. The ones here also have
``state_dict()`` / ``load_state_dict()`` so a resumed run continues the schedule
exactly (the optimizer saves them with its own state).

The official code offers the same four families (constant, proportional to the
learning rate, linear, cosine); these are written from their definitions below.
"""

from __future__ import annotations

import math
from typing import Any, Dict

__all__ = [
    "Schedule",
    "ConstantSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "ProportionalToLR",
    "is_schedule",
]


def is_schedule(value: Any) -> bool:
    """True for an object with a callable ``step`` (a schedule), False for a number."""
    return callable(getattr(value, "step", None))


class Schedule:
    """Base class: counts calls; ``value(t)`` is the value of the ``t``-th call (0-based)."""

    def __init__(self) -> None:
        self.t = 0

    def value(self, t: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        v = self.value(self.t)
        self.t += 1
        return float(v)

    def state_dict(self) -> Dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.t = int(state["t"])


class ConstantSchedule(Schedule):
    """Always ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.constant = float(value)

    def value(self, t: int) -> float:
        return self.constant


def _fraction(t: int, total_steps: int) -> float:
    # 0 at the first call, 1 at call total_steps - 1 and after.
    return min(t / max(total_steps - 1, 1), 1.0)


class LinearSchedule(Schedule):
    """From ``start`` (first step) to ``end`` (step ``total_steps`` and after), linearly."""

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.start, self.end, self.total_steps = float(start), float(end), int(total_steps)

    def value(self, t: int) -> float:
        return self.start + (self.end - self.start) * _fraction(t, self.total_steps)


class CosineSchedule(LinearSchedule):
    """From ``start`` to ``end`` along half a cosine over ``total_steps`` steps."""

    def value(self, t: int) -> float:
        c = 0.5 * (1.0 + math.cos(math.pi * _fraction(t, self.total_steps)))
        return self.end + (self.start - self.end) * c


class ProportionalToLR(Schedule):
    """A value that moves with the learning rate of ``optimizer.param_groups[0]``.

    ``(value - min_value) / (max_value - min_value) = (lr - min_lr) / (max_lr - min_lr)``.
    With ``inverse=True`` the value moves against the learning rate instead, as the
    official code's ``ProportionScheduler`` computes it (despite its docstring).
    """

    def __init__(
        self,
        optimizer: Any,
        max_lr: float,
        min_lr: float,
        max_value: float,
        min_value: float,
        inverse: bool = False,
    ) -> None:
        super().__init__()
        if max_lr < min_lr or max_value < min_value:
            raise ValueError("ProportionalToLR needs max_lr >= min_lr and max_value >= min_value")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.max_value, self.min_value = float(max_value), float(min_value)
        self.inverse = inverse

    def value(self, t: int) -> float:
        if self.max_lr == self.min_lr:
            return self.max_value
        lr = self.optimizer.param_groups[0]["lr"]
        frac = (lr - self.min_lr) / (self.max_lr - self.min_lr)
        if self.inverse:
            frac = 1.0 - frac
        return self.min_value + (self.max_value - self.min_value) * frac
