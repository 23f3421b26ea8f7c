"""Test-session set-up: with no GPU, Triton kernels run under Triton's interpreter (its own
switch, read when Triton is first imported, so it is set before any test module loads); the
`no_process_group` fixture of the tests that build one rank over torch's fake process group in
the test process itself."""
import os

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_process_group():
    """Skip a test that initializes its own (fake) process group in this process when one is
    already initialized here (the distributed tests run their ranks in worker processes)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
