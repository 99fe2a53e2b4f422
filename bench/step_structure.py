"""What a reader pays to follow one optimizer step: files, hops and state, counted.

Runs one ``opt.step(closure)`` (a Hessian-refresh step, the first) on a small model
under ``sys.setprofile`` and counts, over the package's own Python frames:

* the files the step visits and how often the executing file changes (a call into,
  or a return to, a function of another file);
* the instance attributes of the optimizer after the step, ``len(vars(opt))``;
* the lines of the class layer (``optimizer.py``, ``phases.py``, ``_passes.py``,
  ``_state.py``) and the private hooks the classes override from their base.

    python bench/step_structure.py [--backend eager] [--hvp autograd]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch

import sassha_fused
from sassha_fused import MSASSHA, SASSHA

PKG = os.path.dirname(os.path.abspath(sassha_fused.__file__))
CLASS_LAYER = ("optimizer.py", "phases.py", "_passes.py", "_state.py")


def trace_step(cls, backend: str, hvp: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    opt = cls(model.parameters(), lr=0.05, backend=backend, hvp=hvp)
    files, changes, last = set(), 0, None

    def profile(frame, event, arg):
        nonlocal changes, last
        if event not in ("call", "return"):
            return
        # the file executing after this event: the callee on a call, the caller on a return
        f = frame if event == "call" else frame.f_back
        name = f.f_code.co_filename if f is not None else None
        if not name or not name.startswith(PKG):
            return
        rel = os.path.relpath(name, PKG)
        files.add(rel)
        if last is not None and rel != last:
            changes += 1
        last = rel

    sys.setprofile(profile)
    try:
        opt.step(lambda: ((model(x) - y) ** 2).mean())
    finally:
        sys.setprofile(None)
    return {"files": sorted(files), "n_files": len(files), "file_changes": changes, "attributes": len(vars(opt))}


def class_layer() -> dict:
    lines = {f: sum(1 for _ in open(os.path.join(PKG, f))) for f in CLASS_LAYER if os.path.exists(os.path.join(PKG, f))}
    base = SASSHA.__mro__[1]
    hooks = set()
    for cls in (SASSHA, MSASSHA):
        for name, member in vars(cls).items():
            if name.startswith("_") and not name.startswith("__") and callable(member) and hasattr(base, name):
                hooks.add(name)
    return {"lines": lines, "total_lines": sum(lines.values()), "private_hooks": sorted(hooks),
            "n_private_hooks": len(hooks), "mro": [c.__name__ for c in SASSHA.__mro__]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--hvp", default="autograd")
    args = ap.parse_args(argv)
    out = {"class_layer": class_layer()}
    for cls in (SASSHA, MSASSHA):
        out[cls.__name__] = trace_step(cls, args.backend, args.hvp)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
