"""Sources of the C++/CUDA extension, shipped as package data (``sassha_fused.csrc``).

Nothing here is Python: ``setup.py`` compiles these files at install time when torch
is importable, and ``sassha_fused/_build.py`` compiles them just in time otherwise.
"""
