"""PyTorch Lightning: what works as it is, and the two settings a SASSHA step cannot take.

Automatic optimization needs nothing from here: ``configure_optimizers`` returns a
``SASSHA`` (or ``MSASSHA``) and ``step(closure)`` recognises Lightning's closure
(:mod:`sassha_fused.closures`). ``Trainer(gradient_clip_val=...)`` and
``accumulate_grad_batches > 1`` are refused at the first step with a ``ValueError``
that points to manual optimization, whose recipe (in the README) clips once between
``unperturb()`` and ``step()`` and accumulates inside every pass.

The checks are re-exported here for code that calls them directly.
"""

from __future__ import annotations

from ..closures import check_closure, prepare_closure

__all__ = ["check_closure", "prepare_closure"]
