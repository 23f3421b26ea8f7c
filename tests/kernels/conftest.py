"""Worker pools (one per world size, tests/distributed/harness.py) shared by the kernel parity
tests of this package (the trainer on gloo ranks)."""
import pytest

from tests.distributed.harness import package_pools


@pytest.fixture(scope="package")
def dist_pools():
    yield from package_pools()
