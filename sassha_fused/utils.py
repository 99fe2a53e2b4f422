"""Training helpers that go with SASSHA."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["preserve_bn_stats", "RandomState"]


class RandomState:
    """The random number generators' state now, to run later passes with the same randomness
    (the same dropout masks): torch's CPU generator, every CUDA device's once CUDA is in
    use, Python's ``random`` and, when numpy is imported, numpy's global generator (some
    models draw masks there, e.g. SpecAugment in HF's speech models).

    A finite-difference Hessian-vector product is a difference of two gradients
    divided by a small step; if the passes draw different dropout masks, the
    difference measures the masks, not the curvature. Capture the state right before
    the pass at the perturbed point and replay it in each of ``hvp_passes()``::

        rng = RandomState.capture()
        loss_fn(model(x), y).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            with rng.replay():
                loss_fn(model(x), y).backward()

    ``replay()`` sets the captured state for the block and puts the state it found
    back afterwards, so the run's random stream is as if the block had not run
    (``step(closure)`` and ``SasshaTrainer`` do this themselves). Not covered: other
    devices' generators (XPU, MPS), generators a model keeps itself (a
    ``torch.Generator`` of its own, cuDNN's RNN dropout state).
    """

    def __init__(self, cpu: Tensor, cuda: Optional[List[Tensor]], python: Any, numpy: Any) -> None:
        self.cpu, self.cuda, self.python, self.numpy = cpu, cuda, python, numpy

    @classmethod
    def capture(cls) -> "RandomState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        np = sys.modules.get("numpy")
        return cls(torch.get_rng_state(), cuda, random.getstate(), np.random.get_state() if np is not None else None)

    def _apply(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """The captured state inside the block; the state found here again after it."""
        found = RandomState.capture()
        self._apply()
        try:
            yield
        finally:
            found._apply()


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged inside the block.

    The perturbed forward pass of SASSHA sees the same batch at a shifted point;
    letting it update ``running_mean``/``running_var`` would count the batch twice
    and mix in statistics of weights that are never kept. Inside the block every
    BatchNorm layer still normalises with the batch statistics (training mode), but
    its running statistics and ``num_batches_tracked`` are left exactly as they were.
    """
    if not enabled:
        yield
        return
    saved: List[Tuple[nn.modules.batchnorm._BatchNorm, float, object]] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, tracked))
            # momentum 0 keeps running = (1 - 0) * running + 0 * batch exactly.
            m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, tracked in saved:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)


_INSIDE = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn_at_caller(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn`` pointing at the first frame outside this package and torch: the user's
    line (``opt.step(...)``), not torch.optim's wrapper or our own internals."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
