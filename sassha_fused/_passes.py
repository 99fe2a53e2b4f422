"""How a step's forward/backward passes run, and where its Hessian-vector products come from.

``PassDriver`` is the part of the optimizer classes that deals with autograd:

* the closure: ours (returns the loss; the optimizer runs ``autograd.grad``) or
  torch.optim's standard one (clears the grads, calls ``backward()``, returns the
  loss), and reentrant activation checkpointing, which only plain ``backward()``
  can run;
* the pass at the HVP point and, on refresh steps, the products themselves: a
  double backward (``hvp.autograd_refresh``) or the finite-difference passes
  (``hvp.FiniteDifferences``), in the closure or in the official protocol's
  ``hvp_passes()``;
* ``hvp="auto"``: autograd while the model allows it, finite differences for good
  once it does not (one warning), with nothing lost at the switch.

It relies on the optimizer's plans, state and abort (``optimizer._SasshaBase``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import Tensor

from .backends import RefreshInput
from .hvp import (
    FiniteDifferences,
    autograd_refresh,
    REENTRANT_CHECKPOINT,
    cannot_differentiate_twice,
    has_reentrant_checkpoint,
    is_reentrant_checkpoint_error,
    remap_refresh,
)
from .distributed import is_distributed
from .plans import StepPlan, count_present
from .utils import RandomState, warn_at_caller
from .phases import Phase

__all__ = ["PassDriver"]


class _UseFiniteDifferences(Exception):
    """This step cannot take an autograd HVP; the message says why."""


_GRAPH_WALK_LIMIT = 5000  # autograd nodes; Python walks of far deeper chains crashed PyTorch 2.13 at free


class _ClosureCallsBackward(_UseFiniteDifferences):
    """A torch.optim-style closure: no double-backward graph can be built through it."""

    def __init__(self) -> None:
        super().__init__("the closure calls backward() itself")


class NothingToStep(Exception):
    """The step's first closure pass returned None and left no gradient: the batch is skipped
    (Lightning's ``training_step`` returning None); ``step()`` then changes nothing."""


class PassDriver:
    """Closure passes and Hessian-vector products of a step (a mixin of the optimizer classes)."""

    # ------------------------------------------------------------ the closure
    def _check_closure_allowed(self) -> None:
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            raise ValueError(
                "grad_scaler: with a GradScaler, drive the step with the official protocol "
                "(scaler.scale(loss).backward(), perturb_weights, ..., scaler.step(opt)); "
                "a closure's loss is never scaled, so step(closure) cannot use it")

    def _closure_pass(self, closure: Callable[[], Any], create_graph: bool = False,
                      rng: Optional[RandomState] = None) -> Any:
        """One forward/backward through the closure; the gradients land in ``.grad``.

        A closure that returns the loss gets its backward from here (autograd.grad:
        no parameter/gradient reference cycle); one that calls ``backward()``
        itself, as torch.optim's closures do, is taken as it is, and then no
        double-backward graph can be built.
        """
        for g in self.param_groups:  # frozen params too: a stale gradient must not update them
            for p in g["params"]:
                p.grad = None
        params = self._trainable_now()
        # a step run inside one autocast region: its cached low-precision weights would
        # hide the moves (perturbation, difference points) from this pass's forward
        torch.clear_autocast_cache()
        first = self._this_step.closure_calls == 0
        self._this_step.closure_calls += 1
        with torch.enable_grad():
            loss = closure()
        if loss is None and first and self._this_step.may_skip and not count_present([p.grad for p in params]):
            raise NothingToStep()
        if count_present([p.grad for p in params]):
            self._this_step.standard_closure = True
            if create_graph:
                raise _ClosureCallsBackward()
            return loss.detach() if isinstance(loss, Tensor) else loss
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__} (a closure "
                            "that returns None on a step's first pass, with no gradient, skips the step, except "
                            "in data-parallel runs, where every rank must take every step, and mid-step)")
        if not loss.requires_grad:
            if any(p.numel() > 0 for p in params):
                raise ValueError(
                    "the closure's loss does not depend on any parameter: return the loss without calling "
                    "backward() on it (the optimizer runs the backward passes), or call loss.backward() "
                    "inside the closure as torch.optim's closures do")
            return loss.detach()
        if self._run.plain_backward and create_graph:  # (hvp='autograd' refused this model before)
            raise RuntimeError(REENTRANT_CHECKPOINT)
        if (self._run.plain_backward or self._backward_reduces()) and not create_graph:
            loss.backward()
            return loss.detach()
        check = not self._run.graph_checked  # the run's first pass: see _pruned_by_reentrant_checkpoint
        try:
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True,
                                        retain_graph=True if check else None)
        except RuntimeError as exc:
            if is_reentrant_checkpoint_error(exc) and not create_graph:
                # autograd.grad cannot run reentrant checkpoints; plain backward() can
                self._run.plain_backward = True
                if self.hvp != "finite_difference":
                    self._use_finite_differences(exc)  # their double backward would miss the checkpointed part
                if rng is not None:  # the retry draws what the failed attempt drew (the replays' masks)
                    rng._apply()
                return self._closure_pass(closure, rng=rng)
            if "second time" in str(exc):  # (PyTorch's own text would only confuse: not chained)
                raise RuntimeError(
                    f"{type(self).__name__}.step(closure): the graph of the loss the closure returned was already "
                    "used by a backward pass (the closure calls backward() on it and then clears the gradients, "
                    "or returns a loss computed outside it). Either return the loss without calling backward() "
                    "(the optimizer runs the backward passes), or call loss.backward() inside the closure and "
                    "leave the gradients in place, as torch.optim's closures do. Parameters and optimizer state "
                    "are unchanged.") from None
            raise
        if check:
            self._run.graph_checked = True
            if self._pruned_by_reentrant_checkpoint(loss, grads):
                self._run.plain_backward = True
                if create_graph:  # _pass_and_refresh switches to finite differences and takes the pass again
                    raise RuntimeError(REENTRANT_CHECKPOINT)
                if self.hvp != "finite_difference":
                    self._use_finite_differences(RuntimeError(REENTRANT_CHECKPOINT))
                loss.backward()  # the graph was kept for this
                return loss.detach()
        for p, g in zip(params, grads):
            p.grad = g
        return loss.detach()

    def _pruned_by_reentrant_checkpoint(self, loss: Tensor, grads: List[Optional[Tensor]]) -> bool:
        """Whether parameters without a gradient sit inside a reentrant activation checkpoint.

        ``torch.autograd.grad`` raises when it has to run such a checkpoint, but prunes
        one with no parameter upstream (around the first layer) without an error: the
        parameters inside get no gradient, which only a plain ``backward()`` gives.
        Asked once per run, and only when some parameter got no gradient; the graph walk
        stops after ``_GRAPH_WALK_LIMIT`` nodes (walking very deep graphs from Python is
        unsafe), and then a warning says what could not be checked.
        """
        if all(g is not None for g in grads):
            return False
        found = has_reentrant_checkpoint(loss, _GRAPH_WALK_LIMIT)
        if found is None:
            warn_at_caller(
                f"{type(self).__name__}: some parameters got no gradient in the first pass, and the autograd graph "
                f"is too large (over {_GRAPH_WALK_LIMIT} nodes) to look for reentrant activation checkpoints, "
                "whose parameters torch.autograd.grad can miss. If the model checkpoints with use_reentrant=True, "
                "use use_reentrant=False, or a closure that calls loss.backward() itself.")
        return bool(found)

    def _use_finite_differences(self, cause: BaseException) -> None:
        """Switch the run to finite differences, or raise if autograd was asked for."""
        if self.hvp == "autograd":
            if isinstance(cause, _ClosureCallsBackward):
                raise RuntimeError(
                    f"{type(self).__name__}(hvp='autograd'): the closure calls backward() itself, so the optimizer "
                    "cannot build the double-backward graph the Hessian-vector products need. Return the loss "
                    "from the closure without calling backward() (the optimizer runs the passes), or use "
                    "hvp='finite_difference' (or 'auto'), which takes them from ordinary backward passes. "
                    "Parameters and optimizer state are unchanged.") from None
            raise RuntimeError(
                f"{type(self).__name__}(hvp='autograd'): this model cannot be differentiated twice "
                f"({cause}). Use hvp='finite_difference' (or 'auto'), which needs no double backward.") from cause
        if self._run.hvp_method != "finite_difference":
            self._run.hvp_method = "finite_difference"
            if not isinstance(cause, _UseFiniteDifferences):
                warn_at_caller(
                    f"{type(self).__name__}: switching to finite-difference Hessian-vector products for the rest "
                    f"of the run: the model cannot be differentiated twice ({str(cause).splitlines()[0]}).")

    def require_finite_differences(self, who: str) -> None:
        """Say that this run's refresh steps take finite differences: for drivers whose
        backward passes build no double-backward graph (a framework's trainer). ``who``
        names the driver in the ``ValueError`` raised when ``hvp="autograd"`` was asked for."""
        if self.hvp == "autograd":
            raise ValueError(
                f"{who} takes the Hessian-vector products by finite differences (its backward passes build no "
                f"double-backward graph): construct {type(self).__name__} with hvp='finite_difference' or 'auto'")
        self._run.hvp_method = "finite_difference"

    def _pass_and_refresh(self, closure: Callable[[], Any]) -> Any:
        """The pass at the HVP point, and on refresh steps the Hessian-vector products.

        Returns the pass's loss; leaves the update's refresh input in ``self._this_step.pending``.
        """
        if self.hessian_due:
            try:
                loss = self._closure_pass(closure, create_graph=True)
                self._take_autograd_refresh(_UseFiniteDifferences("no gradient carries a second-order graph"))
                return loss
            except Exception as exc:
                if not (isinstance(exc, _UseFiniteDifferences) or cannot_differentiate_twice(exc)):
                    raise
                if self.hvp == "autograd" and str(exc).startswith("no gradient"):
                    raise self._missing_graph_error() from None
                self._use_finite_differences(exc)
                self._this_step.pending = None
                self._detach_grads()  # the pass's graph, if it got that far
        rng = RandomState.capture() if self.refresh_due else None
        loss = self._closure_pass(closure, rng=rng)
        if rng is not None:  # the difference passes draw the same dropout masks as the pass they differ from
            for _ in self._fd_passes(direct=True):
                with rng.replay():
                    self._closure_pass(closure)
        return loss

    def _fd_passes(self, direct: bool) -> Iterator[int]:
        """The finite-difference passes of this refresh: yields once per pass, with the
        params at that pass's point; the caller runs one forward and backward. Leaves
        the update's refresh input in ``self._this_step.pending``; on any failure the params and
        gradients are back where the passes found them."""
        fd = self._finite_differences(direct)
        back = self._phase
        try:
            self._this_step.fd_displaced = True  # (begin() moves the params)
            self._move(Phase.HVP_PASSES)  # a zero_grad() between the passes clears .grad only
            fd.begin()
            self.last_fd_step = fd.step_size
            for i in range(fd.n_passes):
                torch.clear_autocast_cache()  # the params moved (see _closure_pass)
                yield i
                fd.after_pass(i)
        except BaseException:
            fd.abort()
            raise
        finally:
            self._move(back)
        self._this_step.pending = (fd.plan, fd.finish())
        self._report_overflow(*self._this_step.pending)

    def hvp_passes(self) -> Iterator[int]:
        """The extra passes of a finite-difference Hessian refresh, in the official protocol.

        Yields once per pass (``n_samples``, or twice that for ``fd_scheme="central"``)
        with the parameters moved to where that pass's gradient is needed; run one
        forward and backward per iteration. Yields nothing on steps that do not
        refresh, or that take autograd HVPs (those are taken here, at the HVP point;
        an ``hvp="auto"`` run whose model cannot differentiate twice switches to
        finite differences right here)::

            loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
            for _ in opt.hvp_passes():
                loss_fn(model(x), y).backward()
        """
        if self._phase is Phase.HVP_PASSES:
            self._refuse_in_passes("hvp_passes()")
        if not self.refresh_due or self._this_step.pending is not None:
            return
        if self._run.hvp_method == "autograd":
            try:
                with torch.no_grad():
                    self._take_autograd_refresh()
                return
            except Exception as exc:
                if not cannot_differentiate_twice(exc) or self.hvp == "autograd":
                    self._abort_step()
                    if cannot_differentiate_twice(exc):
                        self._use_finite_differences(exc)
                    raise
                self._use_finite_differences(exc)
                self._detach_grads()
        try:  # the user may change .grad before step() (clipping): the quotient is finished here
            yield from self._fd_passes(direct=False)
        except BaseException:
            self._abort_step()
            raise

    def _reduce_max(self, whoever_averages: bool = False) -> Optional[Callable[[Tensor], None]]:
        """Data-parallel: an in-place MAX over the group, else None. For decisions every rank must
        share: the FD precision (where the optimizer averages), the scaler's overflow (``whoever_averages``)."""
        if self._run.shards is not None:  # FSDP2: every rank decides over its shards, then the mesh agrees
            return self._run.shards.max_
        if not (self._data_parallel() or (whoever_averages and is_distributed(self.process_group))):
            return None
        import torch.distributed as dist

        return lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)

    # ----------------------------------------------------------- refresh inputs
    def _finite_differences(self, direct: bool) -> FiniteDifferences:
        """The finite-difference passes of this refresh (``begin()`` moves the params to the first point)."""
        self._presence()  # data-parallel: no param without a gradient from here on
        plan = self._plan(self._participants(), self._backup)
        device = plan.participants[0].device if plan.participants else torch.device("cpu")
        return FiniteDifferences(plan, self._probe_keys(), self.fd_scheme, self.fd_eps, self._fd_x_t(plan),
                                 self._inv_scale(device), direct=direct, reduce_max=self._reduce_max(),
                                 averaged_later=self._data_parallel(), copy_gradients=self._gradients_reused())

    def _gradients_reused(self) -> bool:
        """Whether the next backward may write into the tensors now in ``.grad``: DDP with
        ``gradient_as_bucket_view=True`` (or a wrapper we cannot inspect), not FSDP2."""
        if self._run.shards is not None or not self._backward_reduces():
            return False
        ddp = getattr(self.no_sync, "__self__", None)
        return bool(getattr(ddp, "gradient_as_bucket_view", True))

    def _take_autograd_refresh(self, no_graph: Optional[BaseException] = None, report: bool = True) -> None:
        """Autograd HVPs at the params' current point, kept for the step's update."""
        plan = self._plan(self._participants(), self._backup)
        inputs, has_graph = autograd_refresh(plan, self._probe_keys())
        if not has_graph and plan.participants:
            raise no_graph if no_graph is not None else self._missing_graph_error()
        self._this_step.pending = (plan, inputs)
        if report:
            self._report_overflow(plan, inputs)

    @torch.no_grad()
    def _report_overflow(self, plan: StepPlan, inputs: List[RefreshInput]) -> None:
        """Under a GradScaler, a non-finite Hessian estimate is reported like an inf gradient.

        The scaled products overflow before the gradients do (fp16 autocast): the
        first gradient's first element is multiplied by inf when any product is not
        finite (on the device, no host sync), so ``scaler.step()`` skips the step and
        ``scaler.update()`` lowers the scale; the refresh is taken again next step.
        """
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return
        ys = [y for r in inputs for sample in r.ys for y in sample if y is not None and y.numel()]
        grad = next((g for b in plan.buckets for g in plan.grads(b) if g is not None and g.numel()), None)
        if not ys or grad is None:
            return
        total = torch.stack([n.to(grad.device, torch.float32) for n in torch._foreach_norm(ys)]).sum()
        bad = (~torch.isfinite(total)).to(torch.float32)
        reduce_max = self._reduce_max(whoever_averages=True)
        if reduce_max is not None:  # every rank's scaler must make the same decision (collectives follow)
            reduce_max(bad)
        grad[(0,) * grad.dim()].mul_(torch.where(bad > 0, float("inf"), 1.0).to(grad.dtype))

    def _refresh_input(self, plan: StepPlan) -> Optional[List[RefreshInput]]:
        """The update's refresh input for ``plan``: taken earlier, or now by autograd."""
        if not self.refresh_due:
            return None
        if self._this_step.pending is None:
            if self._run.hvp_method == "finite_difference":
                raise self._missing_fd_error()
            self._take_autograd_refresh(report=False)  # (after a scaler's check: step() counts a skip)
        src, inputs = self._this_step.pending
        return inputs if src is plan else remap_refresh(inputs, src, plan)

    def _missing_graph_error(self) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}: step {self._run.global_step + 1} refreshes the Hessian "
            "estimate, but the gradients carry no autograd graph. Run that backward "
            "pass as loss.backward(create_graph=opt.hessian_due). (If the loss has no "
            "curvature in any parameter, the Hessian is zero and this step cannot "
            "estimate it; hvp='finite_difference' needs no graph.)")

    def _missing_fd_error(self) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}: step {self._run.global_step + 1} refreshes the Hessian estimate with "
            "finite differences, but its extra pass did not run. After the last backward of the step, "
            "add:  for _ in opt.hvp_passes(): loss_fn(model(x), y).backward()  (the loop runs only on "
            "refresh steps). Parameters and optimizer state are unchanged.")
