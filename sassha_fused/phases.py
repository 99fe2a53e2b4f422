"""Where a SASSHA or M-SASSHA step stands, and the legal moves between its phases.

A step spans several public calls in the official protocol (``perturb_weights``,
the second backward, ``hvp_passes``, ``unperturb``, ``step``, ``zero_grad``). The
optimizer keeps where it stands in one ``Phase`` value; every public call checks it
and moves it along ``MOVES``, and every failure returns to a phase between steps
with the parameters where the step found them.
"""

from __future__ import annotations

import enum
from typing import Dict, Tuple

__all__ = ["Phase", "MOVES", "BETWEEN_STEPS"]


class Phase(enum.Enum):
    """Where a step stands (``opt.phase``); the legal moves between phases are ``MOVES``."""

    IDLE = "idle"              # between steps: the params hold x_t
    RESTING = "resting"        # M-SASSHA between steps: the params hold x~ = x_t - nu m (x_t in the state)
    PERTURBED = "perturbed"    # SASSHA after perturb_weights(): the params hold x_t + e_t, the backups x_t
    HVP_PASSES = "hvp_passes"  # inside the finite-difference passes: the params hold a difference point
    RESTORED = "restored"      # SASSHA after unperturb(): the params hold x_t; step() finishes the step
    DEFERRED = "deferred"      # SASSHA after unperturb(), defer_unperturb: x_t + e_t until step() restores


#: The legal moves. A step ends in IDLE (SASSHA, or M-SASSHA unperturbed) or RESTING
#: (M-SASSHA), also when any part of it fails: the params then hold where the step found them.
MOVES: Dict[Phase, Tuple[Phase, ...]] = {
    Phase.IDLE: (Phase.PERTURBED, Phase.RESTING, Phase.HVP_PASSES),
    Phase.RESTING: (Phase.IDLE, Phase.HVP_PASSES),
    Phase.PERTURBED: (Phase.HVP_PASSES, Phase.RESTORED, Phase.DEFERRED, Phase.IDLE),
    Phase.HVP_PASSES: (Phase.PERTURBED, Phase.RESTING, Phase.IDLE),
    Phase.RESTORED: (Phase.IDLE,),
    Phase.DEFERRED: (Phase.RESTORED, Phase.IDLE),
}
BETWEEN_STEPS = (Phase.IDLE, Phase.RESTING)
