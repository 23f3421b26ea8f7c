"""The worker pool itself: results per rank, errors carry the failing rank's traceback."""
import pytest
import torch
import torch.distributed as dist


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return 0


def test_all_reduce_on_every_rank(dist_pools):
    assert dist_pools.run(4, _allreduce_rank) == [6.0] * 4


def test_error_names_rank(dist_pools):
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on purpose"):
        dist_pools.run(2, _fail_on_rank_one)
    assert dist_pools.run(2, _allreduce_rank) == [1.0, 1.0]  # a fresh pool replaced the broken one
