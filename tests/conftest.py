"""Test-session set-up: with no GPU, Triton kernels run under Triton's interpreter (its own
switch, read when Triton is first imported, so it is set before any test module loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
