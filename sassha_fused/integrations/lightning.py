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

import importlib.util

from ..closures import check_closure, prepare_closure

# Lightning installs as ``lightning`` (or, older, ``pytorch_lightning``). Located, not
# imported: the checks themselves never import it (a run without Lightning pays nothing).
def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a name blocked in sys.modules
        return False


if not (_installed("lightning") or _installed("pytorch_lightning")):
    raise ImportError(
        "sassha_fused: sassha_fused.integrations.lightning is for PyTorch Lightning, which is not installed here. "
        "Install it with the extra: pip install \"sassha_fused[lightning]\" -c <(echo \"torch==<your installed "
        "torch version>\") (the constraint keeps your torch build).")

__all__ = ["check_closure", "prepare_closure"]
