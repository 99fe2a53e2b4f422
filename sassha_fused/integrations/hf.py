"""Hugging Face ``transformers.Trainer`` with SASSHA: every training step is one whole SASSHA step.

    from sassha_fused import SASSHA
    from sassha_fused.integrations.hf import SasshaTrainer

    opt = SASSHA(model.parameters(), lr=0.15, rho=0.2, weight_decay=1e-4)
    trainer = SasshaTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            optimizers=(opt, None))
    trainer.train()

How a Trainer step maps onto a SASSHA step (``gradient_accumulation_steps = n``):

1. The Trainer's n micro-batches run as usual (forward, backward, gradients summed):
   that is the gradient at :math:`x_t` (for M-SASSHA, at the perturbed point it
   keeps).
2. After the last one, ``SasshaTrainer`` finishes the step's passes over the same n
   micro-batches: SASSHA perturbs and runs them again at :math:`x_t + e_t`; on
   Hessian-refresh steps ``hvp_passes()`` runs them once more per probe (finite
   differences: Trainer's backward builds no double-backward graph, and models in
   their default ``sdpa`` attention could not differentiate twice anyway). SASSHA
   then returns to :math:`x_t`.
3. The Trainer clips (``max_grad_norm``), logs ``grad_norm``, calls
   ``optimizer.step()``, steps the lr scheduler and zeroes the gradients, as for any
   optimizer.

So ``max_grad_norm`` clips the gradient the update uses (SASSHA's perturbed
gradient; M-SASSHA's only one), after the Hessian estimate was taken from the
unclipped gradients: clipping bounds the step, never the curvature estimate (the
perturbation direction is normalised, so clipping the first pass would change
nothing). The logged ``grad_norm`` is that gradient's norm before clipping, and the
logged loss the first pass's, at the point the step starts from. bf16
(``bf16=True``) works as with any optimizer; fp16 loss scaling across SASSHA's passes
is not wired up here (use bf16). M-SASSHA keeps the parameters at its perturbed point
between steps: evaluation, prediction and saving run at the unperturbed point, and
``train()`` returns with the model there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

from . import require

_transformers = require("transformers", "hf", "sassha_fused.integrations.hf")
require("accelerate", "hf", "transformers.TrainingArguments")

import torch  # noqa: E402
from transformers.training_args import ParallelMode  # noqa: E402

from .. import MSASSHA, SASSHA  # noqa: E402
from ..utils import RandomState, preserve_bn_stats  # noqa: E402

__all__ = ["SasshaTrainer"]


def _unwrap(optimizer: Any) -> Any:
    """The optimizer under accelerate's (or any) ``.optimizer`` wrappers."""
    seen = 0
    while not isinstance(optimizer, (SASSHA, MSASSHA)) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


class SasshaTrainer(_transformers.Trainer):
    """A ``transformers.Trainer`` whose every training step is one whole SASSHA (or M-SASSHA) step.

    Pass the optimizer as ``optimizers=(SASSHA(model.parameters(), ...), scheduler or None)``;
    with ``None`` the Trainer builds its scheduler from ``TrainingArguments`` as usual.
    Gradient accumulation, bf16, the lr scheduler, logging and checkpoint save/resume
    (the optimizer's state dict carries its step, Hessian-refresh phase and probe
    counter) work as for any optimizer. See the module docstring for what each step
    runs and what ``max_grad_norm`` clips.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = _unwrap(self.optimizer)
        if not isinstance(opt, (SASSHA, MSASSHA)):
            raise ValueError(
                "SasshaTrainer: pass the optimizer, e.g. optimizers=(SASSHA(model.parameters(), lr=0.15), None); "
                f"got {type(self.optimizer).__name__ if self.optimizer is not None else 'no optimizer'}. "
                "(With any other optimizer use transformers.Trainer.)")
        if self.args.fp16:
            raise ValueError(
                "SasshaTrainer: fp16=True needs loss scaling across SASSHA's passes, which this trainer does not "
                "wire up; use bf16=True (no loss scaling) or float32.")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "SasshaTrainer: DeepSpeed and the Trainer's FSDP wrap the model after the optimizer was built "
                "on its parameters; they are not supported. For sharded training build the model with "
                "torch.distributed.fsdp.fully_shard first and drive SASSHA as in the README's FSDP2 section.")
        opt.require_finite_differences("SasshaTrainer")
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            opt.distributed = False  # DDP averages every pass; the optimizer must not average again
        self._sassha = opt
        # the accumulation window: each micro-batch's inputs, num_items_in_batch, and the random
        # state its pass at the Hessian point started from (finite-difference passes replay it)
        self._window: List[List[Any]] = []

    # ------------------------------------------------------------- the step
    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        """The Trainer's pass over one micro-batch; after the window's last, the step's other passes."""
        self._window.append([inputs, num_items_in_batch, RandomState.capture()])
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:  # e.g. auto_find_batch_size retries the loop without going through train()
            self._window = []
            raise
        if self.accelerator.sync_gradients:  # the last micro-batch before optimizer.step()
            window, self._window = self._window, []
            try:
                self._finish_passes(model, window)
            except BaseException:
                self._sassha._abort_step()  # params back at x_t (or M-SASSHA's x~), nothing of the step kept
                model.zero_grad(set_to_none=True)
                raise
        return loss

    def _finish_passes(self, model: torch.nn.Module, window: List[List[Any]]) -> None:
        opt = self._sassha
        with preserve_bn_stats(model):  # the same batches again: keep them out of BN statistics
            if isinstance(opt, SASSHA):
                opt.perturb_weights(zero_grad=True)
                self._replay(model, window, capture=True)  # the pass at the perturbed point
            for _ in opt.hvp_passes():
                self._replay(model, window, capture=False)
        if isinstance(opt, SASSHA):
            opt.unperturb()

    def _replay(self, model: torch.nn.Module, window: List[List[Any]], capture: bool) -> None:
        """One more forward/backward over the window's micro-batches, gradients summed as the first time.

        ``capture``: record the random state each micro-batch starts from (the pass at the
        Hessian point); otherwise replay it, so that dropout draws the same masks in the
        finite-difference passes as in the pass they differ from. Under DDP only the last
        backward synchronises, as in the Trainer's own loop.
        """
        for i, entry in enumerate(window):
            inputs, num_items_in_batch, rng = entry
            sync = contextlib.nullcontext() if i == len(window) - 1 else self.accelerator.no_sync(model)
            if capture:
                entry[2] = RandomState.capture()
            with sync, (contextlib.nullcontext() if capture else rng.replay()):
                super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------- M-SASSHA: x_t outside steps
    def _at_x_t(self):
        return self._sassha.unperturbed() if isinstance(self._sassha, MSASSHA) else contextlib.nullcontext()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._window = []
        if isinstance(self._sassha, MSASSHA):
            self._sassha.perturb_weights()  # back to where a run before this call left off (no-op when fresh)
        try:
            return super().train(*args, **kwargs)
        finally:
            if isinstance(self._sassha, MSASSHA):
                self._sassha.unperturb()  # the trained model is x_t; the next step perturbs again

    def _load_best_model(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(self._sassha, MSASSHA):
            self._sassha.unperturb()  # the best weights replace x_t, not x~ (train() ends at x_t)
        super()._load_best_model(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Dict[str, float]:
        with self._at_x_t():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._at_x_t():
            return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        with self._at_x_t():
            super().save_model(*args, **kwargs)

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        # the model and the optimizer state of a checkpoint, both at x_t (see MSASSHA.unperturbed)
        with self._at_x_t():
            super()._save_checkpoint(*args, **kwargs)
