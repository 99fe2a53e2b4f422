"""Every ```python block of README.md and docs/*.md runs as written, and the docs build strictly.

How the blocks run: the blocks of one page run in order, in one namespace of their
own, in a temporary working directory, as a reader pasting them into one Python
session would run them. So a page's first block (its visible setup: "The examples on
this page share this setup") defines what the later blocks use, and nothing is
hidden from the reader. Each block is one test (``README.md:123``: the page and the
line of its opening fence), so a failure names the block.

Markers: an HTML comment on the line(s) just before a block's fence (invisible on
GitHub and on the site; say it in the text as well):

* ``<!-- gpu -->``: needs a CUDA device. Skipped without one, with that reason; with
  one (the GPU check: ``pytest tests/test_docs.py``) it runs in place. ``gpu_blocks()``
  lists them. Later blocks of the page must not depend on a gpu block.
* ``<!-- needs: timm -->``: needs the named modules (comma-separated); skipped with
  the reason when one of them does not import (timm needs a working torchvision,
  which CPU machines of this project's CI lack; see run.sh).

``bash`` and other blocks are not run (the README's two commands are what CI runs;
``tests/test_examples.py`` runs the FSDP2 example under torchrun).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str            # path relative to the repository root
    line: int            # 1-based line of the opening fence
    code: str
    gpu: bool = False
    needs: Tuple[str, ...] = ()
    markers: List[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> List[str]:
    """README.md and every page under docs/, relative to the repository root."""
    out = ["README.md"]
    for base, _, files in sorted(os.walk(DOCS)):
        out += sorted(os.path.relpath(os.path.join(base, f), ROOT) for f in files if f.endswith(".md"))
    return out


def blocks(page: str) -> List[Block]:
    """The ```python blocks of one page, with the markers just above each."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    out: List[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group("indent"), m.group("fence"), m.group("lang")
        start = i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if lang != "python":
            continue
        markers: List[str] = []
        j = start - 1
        while j >= 0 and (lines[j].strip() == "" or _MARKER.match(lines[j])):
            mm = _MARKER.match(lines[j])
            if mm:
                markers.append(mm.group("body"))
            j -= 1
        block = Block(page, start + 1, "\n".join(body) + "\n", markers=markers)
        for marker in markers:
            if marker == "gpu":
                block.gpu = True
            elif marker.startswith("needs:"):
                block.needs += tuple(n.strip() for n in marker[len("needs:"):].split(",") if n.strip())
            else:
                raise ValueError(f"{block.id}: unknown marker <!-- {marker} -->")
        out.append(block)
    return out


def all_blocks() -> Iterator[Block]:
    for page in pages():
        yield from blocks(page)


def gpu_blocks() -> Iterator[Block]:
    """The blocks marked ``<!-- gpu -->``: what a GPU check must run (``pytest tests/test_docs.py``
    on a machine with CUDA runs every block of their pages in order, these included)."""
    return (b for b in all_blocks() if b.gpu)


def _missing(modules: Tuple[str, ...]) -> Optional[str]:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # timm without a working torchvision raises RuntimeError, not ImportError
            return f"needs {name}, which does not import here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def skip_reason(block: Block) -> Optional[str]:
    if block.gpu and not torch.cuda.is_available():
        return "needs a CUDA device (marked <!-- gpu -->; runs in the GPU check)"
    if block.needs:
        return _missing(block.needs)
    return None


class _Page:
    """A page's namespace and working directory, with the index of the next block to run."""

    def __init__(self, page: str) -> None:
        self.blocks = blocks(page)
        self.ns: Dict[str, object] = {"__name__": "__docs__"}
        self.cwd = tempfile.mkdtemp(prefix="sassha-docs-")
        self.next = 0
        self.failed: Optional[str] = None


_PAGES: Dict[str, _Page] = {}


def _run(block: Block, state: _Page) -> None:
    code = compile(block.code, block.id, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # the blocks' own warnings (the switch to finite differences) are expected
        exec(code, state.ns)


def _advance_to(page: str, index: int, monkeypatch) -> _Page:
    """The page's state with blocks 0..index-1 run (a fresh start when tests were deselected)."""
    state = _PAGES.get(page)
    if state is None or state.next > index:
        state = _PAGES[page] = _Page(page)
    monkeypatch.chdir(state.cwd)
    while state.next < index:
        earlier = state.blocks[state.next]
        state.next += 1
        if skip_reason(earlier) is None and state.failed is None:
            try:
                _run(earlier, state)
            except BaseException as exc:  # noqa: BLE001 - reported by the later blocks
                state.failed = f"{earlier.id} failed: {type(exc).__name__}: {exc}"
    return state


@pytest.fixture(autouse=True, scope="module")
def _close_pages_at_the_end():
    """Pages left open (a block deselected or failed before the page's last): their
    directories go, and a process group a page opened is destroyed."""
    yield
    for page in list(_PAGES):
        _close(page)


_PARAMS = [pytest.param(b.page, i, id=b.id) for page in pages() for i, b in enumerate(blocks(page))]


@pytest.mark.parametrize("page,index", _PARAMS)
def test_block_runs(page: str, index: int, monkeypatch) -> None:
    state = _advance_to(page, index, monkeypatch)
    block = state.blocks[index]
    state.next = index + 1
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    if state.failed:
        pytest.fail(f"an earlier block of {page} did not run, so this one cannot: {state.failed}")
    try:
        _run(block, state)
    except BaseException as exc:
        state.failed = f"{block.id} failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        if index == len(state.blocks) - 1:
            _close(page)


def _close(page: str) -> None:
    state = _PAGES.pop(page, None)
    if state is not None:
        shutil.rmtree(state.cwd, ignore_errors=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a page that failed before its own teardown


def test_every_page_has_runnable_blocks_and_known_markers() -> None:
    found = {page: blocks(page) for page in pages()}  # raises on an unknown marker
    assert found["README.md"], "README.md has no python block"
    listed = {b.id for b in gpu_blocks()}
    assert listed == {b.id for bs in found.values() for b in bs if b.gpu}


def test_docs_build_strictly(tmp_path) -> None:
    """``mkdocs build --strict`` (mkdocs.yml at the root; warnings fail the build)."""
    try:
        import mkdocs  # noqa: F401
        import material  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        if os.environ.get("SASSHA_DOCS_REQUIRED") == "1":  # run.sh test: setup installed them
            raise
        pytest.skip(f"the docs packages are not installed ({exc}); pip install -r requirements-dev.txt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "optimizers" / "index.html").exists()


if __name__ == "__main__":
    # python tests/test_docs.py: the blocks a GPU check must run (then: pytest tests/test_docs.py on the GPU)
    for b in gpu_blocks():
        print(b.id)
