"""Triton where it is installed (GPU installs and the test environment), nothing where not: the
kernel modules define their Triton kernels only when `triton` is not None, and the registry
(kernels/__init__.py) uses them only when asked to. On CPU, tests run the kernels under
Triton's interpreter (`TRITON_INTERPRET=1`, set by tests/conftest.py before Triton loads).
"""
from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: the PyTorch references only
    triton, tl = None, None


def available() -> bool:
    return triton is not None


def block_for(n: int) -> int:
    """The power-of-two block that holds a row of `n` elements."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def launch_rows(kernel: Any, programs: int, *args: Any, **meta: Any) -> None:
    """Launch `kernel` on a 1-D grid of `programs` programs."""
    if programs > 0:
        kernel[(programs,)](*args, **meta)
