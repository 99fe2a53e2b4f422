"""Bitwise trajectory comparison between two checkouts, for refactors that must not
change a single bit.

``dump`` runs five steps of every configuration (SASSHA and M-SASSHA; the closure,
official and standard protocols; every available CPU backend, Triton under its
interpreter; float32, float64, bfloat16; autograd and finite-difference HVPs;
defer_unperturb, adaptive, weight decay with two probes) with the package importable
from the current environment, and saves every parameter and state entry. ``compare``
reports the configurations whose tensors are not ``torch.equal``.

    # in a checkout of the old code (its package first on PYTHONPATH), then in this one
    PYTHONPATH=OLD TRITON_INTERPRET=1 python bench/trajectories.py dump OLD old.pt
    TRITON_INTERPRET=1 python bench/trajectories.py dump . new.pt
    python bench/trajectories.py compare old.pt new.pt
"""

from __future__ import annotations

import itertools
import os
import sys

import torch


def dump(checkout: str, out: str) -> None:
    sys.path.insert(0, os.path.join(checkout, "tests"))
    from parity import coupled_loss, make_params, protocol_step

    from sassha_fused import MSASSHA, SASSHA, available_backends

    backends = [b for b in ("eager", "foreach", "cpp", "triton") if available_backends()[b].available]
    extras = ({}, {"defer_unperturb": True}, {"adaptive": True}, {"weight_decay": 0.01, "n_samples": 2})
    runs = {}
    for cls, proto, backend, dtype, hvp, extra in itertools.product(
            (SASSHA, MSASSHA), ("closure", "official", "standard"), backends,
            (torch.float32, torch.float64, torch.bfloat16), ("autograd", "finite_difference"), extras):
        if proto == "standard" and hvp == "autograd":
            continue  # a closure that calls backward() itself takes finite differences
        if cls is MSASSHA and ("defer_unperturb" in extra or "adaptive" in extra):
            continue
        if backend == "triton" and (dtype == torch.float64 or extra):
            continue  # (the interpreter is slow; Triton runs fp32 and bf16)
        sizes = (1, 3, 33, 130) if backend == "triton" else (1, 3, 31, 33, 1025)
        params = make_params(sizes, dtype=dtype, device="cpu")
        opt = cls(params, lr=0.05, lazy_hessian=2, backend=backend, hvp=hvp, **extra)
        for t in range(5):
            protocol_step(opt, lambda: coupled_loss(params, t), proto)
        key = str((cls.__name__, proto, backend, str(dtype), hvp, tuple(sorted(extra))))
        runs[key] = ([p.detach().clone() for p in params],
                     [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params])
    torch.save(runs, out)
    print(f"{len(runs)} trajectories saved to {out}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        print(f"different configurations: {sorted(set(a) ^ set(b))[:10]}")
        return 1
    differ = []
    for key in a:
        (pa, sa), (pb, sb) = a[key], b[key]
        same = all(torch.equal(x, y) for x, y in zip(pa, pb))
        for da, db in zip(sa, sb):
            same &= da.keys() == db.keys() and all(
                torch.equal(torch.as_tensor(da[n]), torch.as_tensor(db[n])) for n in da)
        if not same:
            differ.append(key)
    print(f"{len(a)} trajectories compared, {len(differ)} differ")
    for key in differ[:20]:
        print(" ", key)
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
