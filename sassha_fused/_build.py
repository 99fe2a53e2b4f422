"""Finding, building and loading the C++/CUDA extension (``csrc/``).

Order of attempts, first success wins:

1. the extension ``setup.py`` built at install time (``sassha_fused._C``), when it
   was built from the same sources (a hash of ``csrc/`` is embedded in the library
   and compared here, without loading it, so a stale build is never loaded);
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja), cached in
   torch's extensions directory (``TORCH_EXTENSIONS_DIR``) under a name that
   carries the sources' hash. It needs ninja (an install requirement: the pip
   wheel's binary, found in this environment's scripts directory even when that is
   not on ``PATH``) and a C++ compiler (``$CXX``, default ``c++``); a missing one is
   reported as such, with the fix, before anything is compiled.

Nothing here raises: ``load_extension`` returns an ``ExtensionBuild`` that records
either the loaded library or the reason it is missing (the compiler's message for a
failed build) and its ``cause``, which ``backends/cpp_backend.py`` turns into ``BackendUnavailable``.

This module is also imported by ``setup.py`` by file path (before the package is
installed), so it imports nothing from ``sassha_fused`` and torch only lazily.

Environment variables (read only by the default, argument-less call):

* ``SASSHA_FUSED_CSRC``: a directory of sources to build instead of the packaged ones;
* ``SASSHA_FUSED_BUILD_DIR``: where the just-in-time build goes;
* ``SASSHA_FUSED_NO_PREBUILT=1``: skip the install-time build, always build just in time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["ExtensionBuild", "csrc_dir", "sources_hash", "extension_sources", "load_extension", "ninja_dir",
           "cxx_compiler", "CXX_FLAGS"]

#: Flags for the C++ translation unit. No -march=native: the library may be built
#: on one machine and run on another; -fopenmp because at::parallel_for is inlined
#: into this library and compiles to OpenMP pragmas (torch's libgomp runs them).
#: -fno-math-errno lets the compiler vectorise loops that call sqrt (otherwise
#: each sqrt keeps a scalar errno check and the update loop stays scalar: 3x slower).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]

_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
_PREBUILT_MODULE = "sassha_fused._C"
_MARKER = re.compile(rb"SASSHA_FUSED_SOURCES_HASH=([0-9a-zA-Z]+);")
_MAX_MESSAGE = 6000

#: How to get the extension without a just-in-time build, for the messages below.
INSTALL_TIME_HINT = "or build it at install time: pip install --no-build-isolation . (in a source checkout)"


@dataclass
class ExtensionBuild:
    """The outcome of finding or building the extension."""

    ok: bool
    how: str = ""  # "prebuilt" or "jit" when ok
    library: Optional[str] = None  # path of the loaded shared library
    with_cuda: bool = False  # CUDA kernels are registered
    error: Optional[str] = None  # why not, with the compiler's message
    notes: List[str] = field(default_factory=list)
    #: when not ok, what went wrong: "no-ninja", "no-compiler", "build" (the
    #: compiler or linker failed), "sources" (csrc/ missing) or "conflict" (another
    #: build of the operators is already loaded)
    cause: Optional[str] = None


def csrc_dir() -> Optional[str]:
    """The extension sources: packaged (``sassha_fused/csrc``) or the checkout's ``csrc/``."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(cand, "sassha_ops.cpp")):
            return cand
    return None


def extension_sources(directory: str, with_cuda: bool) -> List[str]:
    """The translation units to compile: the CPU one, plus the CUDA ones if asked."""
    names = sorted(os.listdir(directory))
    cpp = [n for n in names if n.endswith(".cpp") and not n.startswith("sassha_cuda")]
    cuda = [n for n in names if n.startswith("sassha_cuda") and n.endswith((".cpp", ".cu"))]
    return [os.path.join(directory, n) for n in cpp + (cuda if with_cuda else [])]


def sources_hash(directory: str) -> str:
    """16 hex digits identifying the compiler flags and every source file in ``directory``."""
    h = hashlib.sha256(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    for name in sorted(os.listdir(directory)):
        if name.endswith(_SOURCE_SUFFIXES):
            h.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def cuda_build_possible() -> Tuple[bool, str]:
    """Whether CUDA kernels can be compiled: torch built with CUDA and nvcc found."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, ""


def ninja_dir() -> Optional[str]:
    """The directory holding a ``ninja`` executable, or None.

    ``PATH`` first; then where the ``ninja`` pip wheel puts its binary (this
    environment's scripts directory, next to ``sys.executable``), which is not on
    ``PATH`` when the environment's python is run without activating it.
    """
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    candidates = []
    try:
        import ninja  # the pip wheel

        candidates.append(getattr(ninja, "BIN_DIR", ""))
    except Exception:
        pass
    candidates += [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    exe = "ninja" + (sysconfig.get_config_var("EXE") or "")
    for d in candidates:
        if d and os.access(os.path.join(d, exe), os.X_OK):
            return d
    return None


def cxx_compiler() -> Tuple[str, Optional[str]]:
    """The C++ compiler torch's build uses (``$CXX``, default ``c++``) and its path, or None."""
    name = os.environ.get("CXX") or ("cl" if os.name == "nt" else "c++")
    return name, shutil.which(name.split()[0]) if name.strip() else None


def _missing_tool() -> Optional[ExtensionBuild]:
    """A failed ExtensionBuild naming the missing build tool and the fix, or None."""
    if ninja_dir() is None:
        return ExtensionBuild(False, cause="no-ninja", error=(
            "ninja not found: the C++ extension is built just in time on first use, and that needs "
            "the ninja build tool. Fix: pip install ninja (a dependency of sassha_fused, so reinstalling "
            f"sassha_fused brings it too), then restart Python; {INSTALL_TIME_HINT}"))
    name, path = cxx_compiler()
    if path is None:
        return ExtensionBuild(False, cause="no-compiler", error=(
            f"no C++ compiler found ({name!r} is not on PATH; set CXX to use another): the C++ "
            "extension is compiled on first use. Fix: install one (e.g. apt-get install g++), then "
            "restart Python (a build at install time, pip install --no-build-isolation ., needs one too)"))
    return None


def _shorten(message: str) -> str:
    """The compiler's message, its error lines first, within a readable length."""
    message = message.strip()
    errors = [ln for ln in message.splitlines() if "error" in ln.lower()]
    head = "\n".join(errors[:20])
    if len(message) > _MAX_MESSAGE:
        message = "...\n" + message[-_MAX_MESSAGE:]
    return (head + "\n--- full output (tail) ---\n" + message) if head else message


def _registered(with_cuda: bool) -> bool:
    import torch

    if not torch._C._dispatch_has_kernel_for_dispatch_key("sassha_fused::update", "CPU"):
        return False
    return not with_cuda or torch._C._dispatch_has_kernel_for_dispatch_key("sassha_fused::update", "CUDA")


def _ops_loaded() -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("sassha_fused::update", "CPU")
    except RuntimeError:
        return False


def _try_prebuilt(expected_hash: str) -> Tuple[Optional[ExtensionBuild], str]:
    spec = importlib.util.find_spec(_PREBUILT_MODULE)
    if spec is None or not spec.origin:
        return None, "no install-time build"
    with open(spec.origin, "rb") as f:
        found = _MARKER.search(f.read())
    if found is None or found.group(1).decode() != expected_hash:
        return None, f"install-time build {spec.origin} is from other sources; rebuilding"
    import torch

    torch.ops.load_library(spec.origin)
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sassha_fused::update", "CUDA")
    return ExtensionBuild(True, "prebuilt", spec.origin, cuda), ""


def _jit(directory: str, digest: str, build_dir: Optional[str], verbose: bool) -> ExtensionBuild:
    from torch.utils import cpp_extension

    with_cuda, why_not = cuda_build_possible()
    notes = [] if with_cuda else [f"CPU kernels only: {why_not}"]
    name = f"sassha_fused_ext_{digest}"
    if build_dir is not None:
        build_dir = os.path.join(build_dir, name)
        os.makedirs(build_dir, exist_ok=True)
    define = f"-DSASSHA_FUSED_SOURCES_HASH={digest}"
    missing = _missing_tool()
    if missing is not None:
        missing.notes = notes
        return missing
    # torch runs "ninja" from PATH; the pip wheel's binary may not be on it.
    path = os.environ.get("PATH")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join(p for p in (ninja_dir(), path) if p)
    _announce(name, directory, build_dir, with_cuda)
    try:
        cpp_extension.load(
            name=name,
            sources=extension_sources(directory, with_cuda),
            extra_cflags=CXX_FLAGS + [define],
            extra_cuda_cflags=NVCC_FLAGS + [define],
            extra_include_paths=[directory],
            build_directory=build_dir,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # a compiler or linker error
        return ExtensionBuild(False, cause="build", notes=notes, error=(
            f"building the C++ extension from {directory} failed (the compiler's message follows). Fix: "
            "a C++17 compiler that can build against this torch (CXX selects it), then restart Python; "
            f"{INSTALL_TIME_HINT}, with pip -v for the full log:\n{_shorten(str(exc))}"))
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    if not _registered(with_cuda):
        return ExtensionBuild(False, cause="build", notes=notes,
                              error="the extension was built but registered no sassha_fused operators")
    return ExtensionBuild(True, "jit", build_dir or name, with_cuda, notes=notes)


#: How to build ahead of time, for the line a just-in-time build prints.
AHEAD_OF_TIME = "python -m sassha_fused.build"


def _announce(name: str, directory: str, build_dir: Optional[str], with_cuda: bool) -> None:
    """One line on stderr before a just-in-time build compiles (not when its result is cached)."""
    from torch.utils import cpp_extension

    where = build_dir or cpp_extension._get_build_directory(name, False)
    if os.path.exists(os.path.join(where, f"{name}.so")):
        return  # built before: loading takes a moment
    what = "CPU and CUDA kernels" if with_cuda else "CPU kernels"
    print(f"sassha_fused: compiling the C++ extension ({what}) from {directory} for this torch, once; "
          f"it takes about {'3-6' if with_cuda else '1-2'} minutes and is cached in {where}. To build ahead "
          f"of time: {AHEAD_OF_TIME}", file=sys.stderr, flush=True)


_lock = threading.Lock()
_memo: Dict[Tuple, ExtensionBuild] = {}


def load_extension(
    sources: Optional[str] = None,
    build_dir: Optional[str] = None,
    prebuilt: Optional[bool] = None,
    verbose: bool = False,
) -> ExtensionBuild:
    """Find or build the extension and load it into this process; never raises.

    ``sources``: directory of the C++/CUDA sources (default: ``SASSHA_FUSED_CSRC`` or
    the packaged ones); ``build_dir``: where a just-in-time build goes (default:
    ``SASSHA_FUSED_BUILD_DIR`` or torch's extensions directory); ``prebuilt``: try the
    install-time build first (default: unless ``SASSHA_FUSED_NO_PREBUILT=1`` or
    ``sources`` was given). Results are memoised per arguments.
    """
    if sources is None:
        sources = os.environ.get("SASSHA_FUSED_CSRC") or csrc_dir()
        if prebuilt is None and os.environ.get("SASSHA_FUSED_CSRC"):
            prebuilt = False
    elif prebuilt is None:
        prebuilt = False
    if build_dir is None:
        build_dir = os.environ.get("SASSHA_FUSED_BUILD_DIR") or None
    if prebuilt is None:
        prebuilt = os.environ.get("SASSHA_FUSED_NO_PREBUILT", "") not in ("1", "true", "yes")
    key = (sources, build_dir, prebuilt)
    with _lock:
        if key in _memo:
            return _memo[key]
        _memo[key] = result = _load(sources, build_dir, prebuilt, verbose)
        return result


def _load(sources: Optional[str], build_dir: Optional[str], prebuilt: bool, verbose: bool) -> ExtensionBuild:
    if sources is None or not os.path.isdir(sources):
        return ExtensionBuild(False, cause="sources", error=(
            "the C++ extension sources (csrc/) were not found next to the package; "
            "reinstall sassha_fused from a source checkout"))
    try:
        digest = sources_hash(sources)
    except OSError as exc:
        return ExtensionBuild(False, cause="sources", error=f"cannot read the extension sources in {sources}: {exc}")
    notes = []
    try:
        if _ops_loaded():
            # Another build of these ops is already in the process (one namespace
            # can be registered once); use it only if it is from the same sources.
            import torch

            info = torch.ops.sassha_fused.build_info()
            if f"sources={digest}" in info:
                return ExtensionBuild(True, "loaded", None, _registered(True))
            return ExtensionBuild(False, cause="conflict", error=(
                f"another build of the sassha_fused operators ({info}) is already loaded in this "
                f"process; restart Python to load the one from {sources}"))
        if prebuilt:
            found, note = _try_prebuilt(digest)
            if found is not None:
                return found
            notes.append(note)
    except Exception as exc:  # a broken install-time build: fall back to building
        notes.append(f"install-time build unusable: {exc}")
    result = _jit(sources, digest, build_dir, verbose)
    result.notes = notes + result.notes
    return result
