"""Integrations with training frameworks, each behind its own optional extra.

* ``sassha_fused.integrations.hf``: ``SasshaTrainer``, a ``transformers.Trainer``
  whose every training step is one whole SASSHA step (``pip install "sassha_fused[hf]"``).
* ``sassha_fused.integrations.lightning``: checks and recipes for Lightning
  (``pip install "sassha_fused[lightning]"``).
* ``sassha_fused.integrations.timm``: ``register()`` puts "sassha" and "msassha"
  into timm's optimizer registry (``pip install "sassha_fused[timm]"``).

Install an extra with a constraint that keeps the torch already installed, e.g.
``pip install "sassha_fused[hf]" -c <(echo "torch==$(python -c 'import torch; print(torch.__version__)')")``:
unconstrained, a dependency (timm's torchvision) may replace it with another build.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install (torchvision's "operator ... does not exist")
        raise ImportError(
            f"sassha_fused: {purpose} needs '{module}', which cannot be imported here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}). Install it with the extra: "
            f"pip install \"sassha_fused[{extra}]\" -c <(echo \"torch==<your installed torch version>\") "
            "(the constraint keeps your torch build).") from exc
