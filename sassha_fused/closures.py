"""Closures that training frameworks hand to ``step()``: PyTorch Lightning's.

Lightning's automatic optimization calls ``optimizer.step(closure)`` with its closure
(``training_step``, ``zero_grad``, ``backward``), and the optimizer runs it once per
pass of the step (refresh steps take finite-difference HVPs); LR schedulers and
checkpoints work as for any optimizer. But Lightning also runs its
``on_before_optimizer_step`` hooks and gradient clipping after *every* call of that
closure, and with ``accumulate_grad_batches > 1`` it runs the earlier micro-batches
outside the optimizer. Both are wrong for a step that takes several passes, so
``step()`` refuses them through :func:`prepare_closure` (called only when Lightning
is imported): the manual-optimization recipe clips once, between ``unperturb()``
and ``step()``, and accumulates inside every pass.

This is part of the optimizer, not an integration: nothing here imports Lightning
(the closure is recognised from its type and the modules its functions come from),
so the check costs nothing in runs without it. ``sassha_fused.integrations.lightning``
documents the Lightning recipes and re-exports these two functions.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from .utils import warn_at_caller

__all__ = ["check_closure", "prepare_closure"]

_PACKAGES = ("lightning.pytorch.", "pytorch_lightning.")


def _from_lightning(obj: Any) -> bool:
    return str(getattr(obj, "__module__", None) or "").startswith(_PACKAGES)


def _unwrap(closure: Any) -> Optional[tuple]:
    """``(model, inner_closure)`` for Lightning's ``partial(precision._wrap_closure, model, opt, closure)``.

    ``None`` for anything else (never raises).
    """
    try:
        if type(closure) is not functools.partial or closure.keywords:
            return None
        func, args = closure.func, closure.args
        if getattr(func, "__name__", None) != "_wrap_closure" or len(args) != 3:
            return None
        plugin = getattr(func, "__self__", None)
        if plugin is None or not any(_from_lightning(c) for c in type(plugin).__mro__):
            return None  # not a method of one of Lightning's Precision plugins
        return args[0], args[2]
    except Exception:
        return None


def _trainer_of(model: Any) -> Any:
    trainer = getattr(model, "_trainer", None)  # LightningModule.trainer raises when detached
    if trainer is None or not _from_lightning(type(trainer)):
        return None
    return trainer


def _where_to_clip(optimizer: Any) -> str:
    if type(optimizer).__name__.endswith("MSASSHA"):
        return "after the `for _ in opt.hvp_passes()` loop, before opt.step()"
    return "between opt.unperturb() and opt.step()"


def check_closure(optimizer: Any, closure: Callable[[], Any]) -> None:
    """Refuse Lightning settings that a multi-pass ``step(closure)`` would get wrong.

    Recognises the closure Lightning's automatic optimization hands to
    ``optimizer.step`` and raises ``ValueError`` (before any pass ran: parameters and
    optimizer state are unchanged) when its trainer has

    * ``gradient_clip_val > 0``: Lightning clips after every closure call, so the
      finite-difference passes' gradients would be clipped too and the Hessian
      estimate corrupted;
    * ``accumulate_grad_batches > 1``: the earlier micro-batches run outside
      ``step()``, whose passes then all see the last micro-batch only (the
      optimizer clears ``.grad`` before its first pass).

    Anything it does not recognise passes silently.
    """
    found = _unwrap(closure)
    if found is None:
        return
    model, _ = found
    try:
        if not getattr(model, "automatic_optimization", True):
            return  # manual optimization: Lightning neither clips nor accumulates for us
        trainer = _trainer_of(model)
        if trainer is None:
            return
        clip = getattr(trainer, "gradient_clip_val", None)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        hook = getattr(type(model), "configure_gradient_clipping", None)
        clip_overridden = hook is not None and not _from_lightning(hook)
    except Exception:
        return
    name = type(optimizer).__name__
    name = name[len("Lightning"):] if name.startswith("Lightning") else name
    recipe = ("train with manual optimization instead (self.automatic_optimization = False; the recipe is in "
              "the README, section 'PyTorch Lightning')")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0:
        raise ValueError(
            f"{name}: Trainer(gradient_clip_val={clip!r}) clips the gradients after every pass of a step, "
            "and a SASSHA step takes several (a perturbed pass and, on Hessian-refresh steps, "
            "finite-difference passes whose gradients must not be clipped). Remove gradient_clip_val and "
            f"{recipe}, clipping once with self.clip_gradients(opt, gradient_clip_val={clip!r}, "
            f"gradient_clip_algorithm=...) {_where_to_clip(optimizer)}. Parameters and optimizer state "
            "are unchanged.")
    if isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate > 1:
        raise ValueError(
            f"{name}: Trainer(accumulate_grad_batches={accumulate}) runs the first {accumulate - 1} "
            "micro-batch(es) outside the optimizer and calls step(closure) on the last one only; every pass "
            "of a SASSHA step would then see that micro-batch alone and the accumulated gradients would be "
            "dropped. Use accumulate_grad_batches=1 with the whole batch in each training_step, or "
            f"{recipe}, running every pass of the step over all micro-batches. Parameters and optimizer "
            "state are unchanged.")
    if clip_overridden:
        warn_at_caller(
            f"{name}: {type(model).__name__}.configure_gradient_clipping is overridden; Lightning calls it after "
            "every pass of a SASSHA step, the finite-difference Hessian passes included. If it clips, "
            f"use manual optimization and clip once, {_where_to_clip(optimizer)}.")


def _do_nothing(closure: Any) -> bool:
    return getattr(closure, "__name__", None) == "do_nothing_closure" and _from_lightning(closure)


def prepare_closure(optimizer: Any, closure: Callable[[], Any]) -> Optional[Callable[[], Any]]:
    """What ``step(closure)`` should run: :func:`check_closure`, then Lightning's no-op closure.

    In manual optimization ``self.optimizers().step()`` reaches the optimizer as
    ``step(closure)`` with Lightning's ``do_nothing_closure`` inside (the wrapper
    counts ``trainer.global_step`` and runs ``on_before_optimizer_step``). That is
    the official protocol's ``step()``: the closure is run once here, for its hooks,
    and ``None`` is returned, so the step finishes the passes the training step
    already took. Any other closure comes back unchanged.
    """
    check_closure(optimizer, closure)
    found = _unwrap(closure)
    if found is not None and _do_nothing(found[1]):
        closure()  # Lightning's hooks after the (empty) closure; it returns None
        return None
    return closure
