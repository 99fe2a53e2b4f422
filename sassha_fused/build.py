"""Build (or find) the C++/CUDA extension ahead of time: ``python -m sassha_fused.build``.

The first use of the ``cpp`` or ``cuda`` backend otherwise compiles it just in time
(a minute or more, once per source version and torch). This command does that now,
prints where the extension came from and which backends can run, and exits with 1
and the reason (and its fix) when it cannot be built. ``SASSHA_FUSED_BUILD_DIR`` sets
where the build goes.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from . import _build
    from .backends import available_backends

    start = time.perf_counter()
    build = _build.load_extension()
    seconds = time.perf_counter() - start
    if not build.ok:
        print(f"sassha_fused: the C++ extension is not available: {build.error}", file=sys.stderr)
        return 1
    kernels = "CPU and CUDA kernels" if build.with_cuda else "CPU kernels"
    print(f"sassha_fused: C++ extension ready ({build.how}, {kernels}, {seconds:.1f} s): {build.library or 'already loaded'}")
    for note in build.notes:
        print(f"  note: {note}")
    for name, status in available_backends().items():
        print(f"  {name:8s} {'available' if status.available else 'not available'}: {status.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
