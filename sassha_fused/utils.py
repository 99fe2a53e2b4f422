"""Training helpers that go with SASSHA."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["preserve_bn_stats"]


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
