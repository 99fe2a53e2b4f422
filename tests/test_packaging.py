"""Packaging: the sdist is complete, the metadata declares what installs need, the
extension's missing build tools are named (with the fix), and the demo's missing
extra is one clear line.

The sdist is built from a copy of the checkout's files (``git ls-files``) in a
temporary directory, so no build output lands in the repository; without git (a
test run from an unpacked sdist) those tests skip.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest
import torch

from sassha_fused import _build, backends
from sassha_fused.backends import BackendUnavailable, available_backends, cpp_backend, resolve_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "sassha_fused-0.1.0"


def _git_files(*args):
    if shutil.which("git") is None:
        pytest.skip("needs git to list the checkout's files")
    out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", *args], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()})")
    return [p for p in out.stdout.split("\0") if p and os.path.isfile(os.path.join(REPO, p))]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(members relative to the sdist's root, PKG-INFO text, path of the .tar.gz)."""
    tmp = tmp_path_factory.mktemp("sdist")
    copy = tmp / "src"
    # Tracked files plus new ones not yet committed (not the ignored: .venv, builds).
    for rel in _git_files("--cached", "--others", "--exclude-standard"):
        dst = copy / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), dst)
    env = dict(os.environ, SASSHA_FUSED_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    path = tmp / "dist" / f"{NAME}.tar.gz"
    with tarfile.open(path) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
        pkg_info = tar.extractfile(f"{NAME}/PKG-INFO").read().decode()
    return members, pkg_info, path


def test_sdist_holds_every_tracked_file(sdist):
    members, _, _ = sdist
    missing = sorted(set(_git_files()) - members - {".gitignore"})
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing}"
    for rel in ("tests/conftest.py", "tests/parity.py", "run.sh", ".ci/run", "requirements-dev.txt", "LICENSE",
                "README.md", "BENCHMARKS.md", "MANIFEST.in", "setup.py", "sassha_fused/py.typed",
                "sassha_fused/_build.py", "csrc/sassha_ops.cpp", "csrc/sassha_cuda_kernels.cu",
                "triton_kernels/sassha.py"):
        assert rel in members, rel
    assert not [m for m in members if m.endswith((".so", ".pyc"))]


def test_sdist_metadata(sdist):
    _, pkg_info, _ = sdist
    lines = set(pkg_info.splitlines())
    assert "License: MIT" in lines or "License-Expression: MIT" in lines
    assert "License-File: LICENSE" in lines
    assert "Classifier: Programming Language :: Python :: 3" in lines
    assert "Requires-Dist: ninja" in lines  # the just-in-time build of the extension needs it
    for extra in ("hf", "lightning", "timm", "demo", "triton", "dev"):
        assert f"Provides-Extra: {extra}" in lines, extra
    requires = [ln for ln in lines if ln.startswith("Requires-Dist:")]
    for package, extra in (("transformers", "hf"), ("accelerate", "hf"), ("lightning", "lightning"),
                           ("timm", "timm"), ("scikit-learn", "demo")):
        assert any(ln.startswith(f"Requires-Dist: {package}") and f'extra == "{extra}"' in ln for ln in requires), \
            (package, extra)


def test_wheel_from_sdist_ships_sources_and_marker(sdist, tmp_path):
    _, _, path = sdist
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    env = dict(os.environ, SASSHA_FUSED_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "wheel")],
                         cwd=tmp_path / NAME, env=env, capture_output=True, text=True, timeout=120)
    if "invalid command 'bdist_wheel'" in out.stderr:
        pytest.skip("this setuptools has no bdist_wheel (needs setuptools>=70.1 or the wheel package)")
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("sassha_fused/py.typed", "sassha_fused/csrc/sassha_ops.cpp", "sassha_fused/csrc/sassha_math.h",
                "sassha_fused/csrc/sassha_cuda_kernels.cu", "sassha_fused/triton_kernels/sassha.py",
                "sassha_fused/_build.py"):
        assert rel in names, rel
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)


# --- the extension's build tools: named when missing, with the fix ---------------------

def _jit_here(tmp_path):
    d = _build.csrc_dir()
    return _build._jit(d, _build.sources_hash(d), str(tmp_path), False)


def test_missing_ninja_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "ninja_dir", lambda: None)
    result = _jit_here(tmp_path)
    assert not result.ok and result.cause == "no-ninja"
    assert result.error.startswith("ninja not found")
    assert "pip install ninja" in result.error and "pip install --no-build-isolation ." in result.error
    with pytest.raises(BackendUnavailable, match="ninja not found") as info:
        cpp_backend.load("cpp", build=result)
    assert info.value.build_cause == "no-ninja"


def test_missing_compiler_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    result = _jit_here(tmp_path)
    assert not result.ok and result.cause == "no-compiler"
    assert result.error.startswith("no C++ compiler found") and "no-such-c++" in result.error
    assert "install one" in result.error


def test_ninja_of_the_pip_wheel_is_found_off_path(monkeypatch, tmp_path):
    # The ninja wheel's binary sits next to the environment's python, which is not
    # on PATH when that python is run without activating its environment.
    scripts = tmp_path / "bin"
    scripts.mkdir()
    ninja = scripts / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_build.sysconfig, "get_path", lambda name, *a, **k: str(scripts))
    monkeypatch.setitem(sys.modules, "ninja", None)
    assert _build.ninja_dir() == str(scripts)


@pytest.fixture
def no_ninja_registry(monkeypatch):
    """The backend registry as in a process whose extension has no ninja to build with."""
    failed = _build.ExtensionBuild(False, cause="no-ninja", error="ninja not found: (simulated) Fix: pip install ninja")
    monkeypatch.setattr(_build, "load_extension", lambda *a, **k: failed)
    for name in ("cpp", "cuda"):
        if name in backends._cache:
            monkeypatch.delitem(backends._cache, name)
    monkeypatch.setattr(backends, "_auto_fallback_warned", False)


def test_available_backends_says_ninja_is_missing(no_ninja_registry):
    status = available_backends()
    assert not status["cpp"].available and status["cpp"].reason.startswith("ninja not found")
    assert status["foreach"].available


def test_auto_warns_once_when_the_extension_did_not_build(no_ninja_registry):
    with pytest.warns(RuntimeWarning, match=r"instead of 'cpp'.*ninja not found.*available_backends\(\)"):
        chosen = resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert chosen.name == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cpu"), torch.float64).name == "foreach"  # once per process


def test_auto_is_silent_where_a_backend_does_not_apply(monkeypatch):
    # Not built for this machine (no CUDA in torch, triton absent): no warning.
    monkeypatch.setattr(backends, "_auto_fallback_warned", False)
    for name, why in (("cpp", "the extension sources were not packaged"), ("triton", "triton is not installed"),
                      ("cuda", "torch was built without CUDA")):
        monkeypatch.setitem(backends._cache, name, BackendUnavailable(why))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cuda"), torch.float32).name == "foreach"
        assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "foreach"
    assert backends._auto_fallback_warned is False


@pytest.mark.skipif(torch.version.cuda is not None, reason="the CPU-only torch case")
def test_cuda_backend_on_cpu_torch_is_not_a_build_failure():
    with pytest.raises(BackendUnavailable, match="without CUDA") as info:
        cpp_backend.load("cuda")
    assert not getattr(info.value, "build_cause", None)


# --- the demo without its extra -------------------------------------------------------

def test_demo_without_scikit_learn_says_how_to_install_it():
    script = ("import sys, runpy; sys.modules['sklearn'] = None; sys.argv = ['sassha_fused.demo']; "
              "runpy.run_module('sassha_fused.demo', run_name='__main__', alter_sys=True)")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert 'pip install "sassha_fused[demo]"' in lines[0] and "torch==" in lines[0]


def test_integrations_without_their_framework_raise_importerror_naming_the_extra():
    """Each integration module, imported where its framework is missing, says which extra to install."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'timm', 'transformers'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "for module, extra in (('lightning', 'lightning'), ('timm', 'timm'), ('hf', 'hf')):\n"
        "    try:\n"
        "        __import__('sassha_fused.integrations.' + module)\n"
        "    except ImportError as exc:\n"
        "        assert f'sassha_fused[{extra}]' in str(exc), (module, str(exc))\n"
        "    else:\n"
        "        raise AssertionError(module + ' imported without its framework')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_a_just_in_time_build_says_what_it_does_first(tmp_path, monkeypatch, capsys):
    """Before compiling: one line with what, why, how long, and the ahead-of-time command; nothing
    when the build is cached (the compiler is replaced here by a stub that stops at once)."""
    from torch.utils import cpp_extension

    calls = []

    def stop(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("stopped before compiling (test)")

    monkeypatch.setattr(cpp_extension, "load", stop)
    result = _build._jit(_build.csrc_dir(), "0123abcd", str(tmp_path), False)
    assert not result.ok and calls
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sassha_fused: compiling")]
    assert len(lines) == 1 and "python -m sassha_fused.build" in lines[0] and "minutes" in lines[0], err
    name = calls[0]
    open(os.path.join(tmp_path, name, f"{name}.so"), "w").close()  # as a finished build leaves it
    _build._jit(_build.csrc_dir(), "0123abcd", str(tmp_path), False)
    assert "sassha_fused: compiling" not in capsys.readouterr().err


def test_the_ahead_of_time_build_command():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "sassha_fused.build"], capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "C++ extension ready" in done.stdout and "cpp" in done.stdout
