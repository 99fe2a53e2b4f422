"""A griffe extension for mkdocstrings: docstrings and defaults that exist only at run time.

``SASSHA.__doc__`` and ``MSASSHA.__doc__`` are assembled at import from the option
table (``sassha_fused/_defaults.py``: ``__doc__ = "..." + ARGS_DOC + ...``), and their
``__init__`` defaults read ``DEFAULTS[...]``. Static analysis sees neither; this
extension takes the class docstring and the signature's defaults from the imported
classes, so the API reference shows what ``help(SASSHA)`` shows. Everything else is
read statically (importing every module would need every optional framework).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import griffe

# the checkout these docs belong to, ahead of any installed copy (as mkdocs.yml's paths: [.])
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

#: classes whose docstring is assembled at import
RUNTIME_DOCS = ("sassha_fused.optimizer.SASSHA", "sassha_fused.optimizer.MSASSHA")


def _runtime(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class RuntimeDocs(griffe.Extension):
    def on_class_members(self, *, node: Any, cls: griffe.Class, agent: Any, **kwargs: Any) -> None:
        if cls.path not in RUNTIME_DOCS:
            return
        obj = _runtime(cls.path)
        cls.docstring = griffe.Docstring(inspect.cleandoc(obj.__doc__), parent=cls,
                                         lineno=cls.lineno, endlineno=cls.lineno)
        init = cls.members.get("__init__")
        if init is None:
            return
        defaults = {name: p.default for name, p in inspect.signature(obj.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        for param in init.parameters:
            if param.name in defaults:
                param.default = repr(defaults[param.name])
