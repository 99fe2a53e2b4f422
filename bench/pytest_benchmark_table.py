"""Markdown table of a pytest-benchmark JSON written by ``bench/test_optimizer_step.py``.

    .venv/bin/python bench/pytest_benchmark_table.py bench/results/pytest-benchmark-cpu.json

One row per (params, tensors, step kind), one column per implementation, median ms.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, Tuple

ORDER = ["sassha-cuda", "sassha-triton", "sassha-cpp", "sassha-foreach", "sassha-eager", "official-style",
         "compiled-eager", "adamw-fused", "adamw-foreach"]


def _size(n: int) -> str:
    return f"{n // 10**6}M" if n >= 10**6 and n % 10**6 == 0 else f"{n:,}"


def table(data: dict) -> str:
    cells: Dict[Tuple[int, int, bool], Dict[str, float]] = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        cells.setdefault((e["numel"], e["tensors"], e["refresh"]), {})[e["impl"]] = b["stats"]["median"] * 1e3
    impls = [i for i in ORDER if any(i in row for row in cells.values())]
    impls += sorted({i for row in cells.values() for i in row} - set(impls))
    lines = ["| params | tensors | step | " + " | ".join(impls) + " |",
             "|---:|---:|---|" + "---:|" * len(impls)]
    for (numel, tensors, refresh), row in sorted(cells.items()):
        vals = [f"{row[i]:.2f}" if i in row else "–" for i in impls]
        lines.append(f"| {_size(numel)} | {tensors} | {'refresh' if refresh else 'non-refresh'} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json_path")
    args = ap.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"{data.get('datetime', '?')}, {info.get('cpu', {}).get('brand_raw', '?')}\n")
    print(table(data))


if __name__ == "__main__":
    main()
