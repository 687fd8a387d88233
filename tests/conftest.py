"""Shared pytest setup. Runs before any test module imports the project."""

import os
import sys

# Without a GPU, run Triton kernels in its interpreter. Triton picks interpreter vs compiler when a
# kernel is decorated, so this must happen before anything imports triton (or `kernels`).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # let the tests themselves report the missing dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest tests` from the repo root: make the top-level modules importable.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
