"""Triton kernel sources (STYLE.md §3). Installed as ``gnr_fast.kernels``: in a checkout
``gnr_fast/kernels`` is a symlink to this directory, and wheels carry a copy. Modules here are
imported lazily by their wrappers in ``gnr_fast/ops/`` (``@triton.jit`` binds the interpreter
setting at import)."""
