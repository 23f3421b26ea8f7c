"""Worker pools (one per world size, tests/distributed/harness.py) shared by the distributed tests of this
package."""
import pytest

from tests.distributed.harness import package_pools


@pytest.fixture(scope="package")
def dist_pools():
    yield from package_pools()
