"""Bytes per parameter that the optimizer holds: between steps and at the peak inside a step.

Counted: the parameters plus every tensor the optimizer reaches (its state, master
corrections, x_t backups, the step plans' tables, the buffers of the Hessian-vector
products), each storage once; the gradients (``p.grad``, the framework's) are left
out. "Between steps" walks the optimizer after a step; "peak" walks it, and the
tensors a backend phase is handed, at every backend call of a refresh step and keeps
the largest total. On a GPU (``--device cuda``) the table adds
``torch.cuda.max_memory_allocated`` over the step, less the model's activations
and gradients measured with an optimizer that holds nothing (plain SGD).

    python bench/memory.py                      # the table (CPU, about a minute)
    python bench/memory.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info  # noqa: E402
from sassha_fused import MSASSHA, SASSHA  # noqa: E402
from sassha_fused.backends import Backend  # noqa: E402

#: (label, optimizer class or "adamw", param dtype, options)
CONFIGS = [
    ("fused AdamW, fp32 params (anchor)", "adamw", torch.float32, {}),
    ("SASSHA, fp32 params, state_bits=32", SASSHA, torch.float32, {}),
    ("SASSHA, fp32 params, state_bits=16", SASSHA, torch.float32, {"state_bits": 16}),
    ("SASSHA, fp32 params, state_bits=8", SASSHA, torch.float32, {"state_bits": 8}),
    ("SASSHA, bf16 params, state_bits=32", SASSHA, torch.bfloat16, {}),
    ("SASSHA, bf16 params, master 24, state_bits=8", SASSHA, torch.bfloat16,
     {"state_bits": 8, "master_weight_bits": 24}),
    ("SASSHA, bf16 params, master 32, state_bits=8", SASSHA, torch.bfloat16,
     {"state_bits": 8, "master_weight_bits": 32}),
    ("M-SASSHA, fp32 params, state_bits=8", MSASSHA, torch.float32, {"state_bits": 8}),
    ("M-SASSHA, bf16 params, master 24, state_bits=8", MSASSHA, torch.bfloat16,
     {"state_bits": 8, "master_weight_bits": 24}),
]


def tensors_in(obj: Any, seen: Set[int], depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(k, seen, depth + 1)
            yield from tensors_in(v, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        for v in obj:
            yield from tensors_in(v, seen, depth + 1)
        return
    module = type(obj).__module__ or ""
    if not (module.startswith("sassha_fused") or module.startswith("torch.optim")):
        return  # the optimizer's own objects only (not modules, process groups, functions)
    for name in getattr(obj, "__dict__", {}):
        yield from tensors_in(getattr(obj, name), seen, depth + 1)
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                yield from tensors_in(getattr(obj, name), seen, depth + 1)


def held_bytes(roots: List[Any], params: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages reachable from ``roots``, gradients excluded."""
    grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    storages: Dict[int, int] = {}
    seen: Set[int] = set()
    for root in roots:
        for t in tensors_in(root, seen):
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in grads:
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return sum(storages.values())


def model_of(dtype: torch.dtype, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                               torch.nn.GELU(), torch.nn.Linear(width, 10)).to(dtype)


def measure(cls: Any, dtype: torch.dtype, options: Dict, hvp: str, width: int) -> Dict[str, float]:
    model = model_of(dtype, width)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    x, y = torch.randn(32, 64, dtype=dtype), torch.randint(0, 10, (32,))
    loss = lambda: F.cross_entropy(model(x).float(), y)  # noqa: E731
    if cls == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        loss().backward()
        opt.step()
        between = held_bytes([opt, params], params)
        return {"between": between / n, "peak": between / n, "params": n}
    opt = cls(params, lr=0.01, lazy_hessian=2, hvp=hvp, backend="foreach", **options)
    opt.step(loss)  # a refresh step creates the state
    opt.step(loss)
    opt.zero_grad()
    between = held_bytes([opt, params], params)
    peak = [0]
    backend = type(opt._backend_for(params[0].device, dtype))
    originals = {name: getattr(backend, name) for name in ("sq_norm", "perturb", "fd_move", "fd_fold", "update")}

    def spy(name: str) -> Callable:
        def call(self: Backend, *args: Any, **kwargs: Any) -> Any:
            peak[0] = max(peak[0], held_bytes([opt, params, args, kwargs], params))
            return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(backend, name, spy(name))
    try:
        opt.step(loss)  # step 3: a refresh step (lazy_hessian=2)
    finally:
        for name, fn in originals.items():
            setattr(backend, name, fn)
    return {"between": between / n, "peak": peak[0] / n, "params": n}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1024, help="hidden width of the MLP (1024: 1.1M params)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    print("| configuration | between steps | refresh-step peak, autograd HVP | refresh-step peak, finite differences |")
    print("|---|---|---|---|")
    for label, cls, dtype, options in CONFIGS:
        auto = measure(cls, dtype, options, "autograd", args.width)
        fd = measure(cls, dtype, options, "finite_difference", args.width)
        rows.append({"configuration": label, "between": auto["between"], "peak_autograd": auto["peak"],
                     "peak_fd": fd["peak"], "params": auto["params"]})
        print(f"| {label} | {auto['between']:.2f} | {auto['peak']:.2f} | {fd['peak']:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env_info(torch.device("cpu")), "unit": "bytes per parameter", "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
