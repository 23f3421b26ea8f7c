"""Grid coordinates and group membership, without processes (pure functions)."""
import itertools

import pytest

from launch.grid import COMBOS, Grid, all_groups, coords_of, group_ranks, rank_of
from perfmodel.specs import Plan

SHAPES = [Plan(dp=8), Plan(dp=2, tp_col=4), Plan(pp=2, dp=2, tp_col=2), Plan(tp_col=2, tp_row=2, tp_depth=2),
          Plan(pp=2, dp=3, cp=2, tp_col=2), Plan(pp=3, dp=1, cp=2, tp_depth=2, tp_row=2)]


@pytest.mark.parametrize("plan", SHAPES, ids=str)
def test_coords_round_trip_and_innermost_order(plan):
    for r in range(plan.world_size):
        assert rank_of(plan, coords_of(plan, r)) == r
    # tp_col is innermost: neighbouring ranks differ in tp_col first
    if plan.tp_col > 1:
        assert coords_of(plan, 1)["tp_col"] == 1


@pytest.mark.parametrize("plan", SHAPES, ids=str)
def test_groups_partition_the_world(plan):
    for axes in [(a,) for a in ("pp", "dp", "cp", "tp_depth", "tp_row", "tp_col")] + list(COMBOS):
        groups = all_groups(plan, axes)
        flat = sorted(itertools.chain.from_iterable(groups))
        assert flat == list(range(plan.world_size))
        size = 1
        for a in axes:
            size *= getattr(plan, a)
        assert all(len(g) == size for g in groups)
        for g in groups:  # members agree on every other axis
            others = [{k: v for k, v in coords_of(plan, r).items() if k not in axes} for r in g]
            assert all(o == others[0] for o in others)


def test_axis_coordinate_is_position_in_group():
    plan = Plan(pp=2, dp=2, tp_col=2)
    for r in range(plan.world_size):
        grid = Grid.build(plan, r, plan.world_size, create_groups=False)
        for name in ("pp", "dp", "tp_col"):
            ax = grid.axis(name)
            assert ax.ranks[ax.coord] == r
            assert ax.coord == coords_of(plan, r)[name]
    assert group_ranks(plan, 5, ("dp",)) == [5, 7]
    assert Grid.build(plan, 0, 8, create_groups=False).is_first_stage()
    assert Grid.build(plan, 7, 8, create_groups=False).is_last_stage()


@pytest.mark.parametrize("plan", SHAPES, ids=str)
def test_combo_coordinate_is_the_process_group_rank(plan):
    """torch.distributed.new_group sorts its ranks, and all_gather / reduce_scatter place data by
    that group rank: a group's ranks must be ascending so Axis.coord is the group rank."""
    for r in range(plan.world_size):
        grid = Grid.build(plan, r, plan.world_size, create_groups=False)
        for axes in COMBOS:
            ax = grid.group(*axes)
            assert list(ax.ranks) == sorted(ax.ranks) and ax.ranks[ax.coord] == r


def test_unknown_combo_names_the_fix():
    grid = Grid.build(Plan(), 0, 1, create_groups=False)
    with pytest.raises(KeyError, match="COMBOS"):
        grid.group("pp", "tp_col")


@pytest.mark.parametrize("plan", SHAPES, ids=str)
def test_axes_over_the_same_ranks_share_one_group_created_in_the_same_order_everywhere(plan, monkeypatch):
    import torch.distributed as dist

    calls: list[tuple[int, ...]] = []

    def new_group(ranks, timeout=None):
        calls.append(tuple(ranks))
        return ("group", tuple(ranks))

    monkeypatch.setattr(dist, "new_group", new_group)
    sequences = []
    for r in range(plan.world_size):
        calls.clear()
        grid = Grid.build(plan, r, plan.world_size)
        sequences.append(list(calls))
        assert len(calls) == len(set(calls))  # each distinct set of ranks once
        keys = [(a,) for a in ("pp", "dp", "cp", "tp_depth", "tp_row", "tp_col")] + list(COMBOS)
        for key in keys:
            ax = grid.group(*key) if len(key) > 1 else grid.axis(key[0])
            assert ax.group == ("group", ax.ranks)  # the one group of exactly these ranks
    assert all(seq == sequences[0] for seq in sequences)  # torch.distributed: same calls, same order
    every = {tuple(g) for key in [(a,) for a in ("pp", "dp", "cp", "tp_depth", "tp_row", "tp_col")] + list(COMBOS)
             for g in all_groups(plan, key)}
    assert set(sequences[0]) == every


def test_a_group_of_every_rank_is_the_default_group(monkeypatch):
    import torch.distributed as dist

    plan = Plan(dp=4, tp_col=2)
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: plan.world_size)
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None: made.append(tuple(ranks)) or tuple(ranks))
    grid = Grid.build(plan, 3, plan.world_size)
    world = dist.group.WORLD  # None here: no default group was initialized
    assert grid.group("dp", "cp", "tp_depth", "tp_col").group is world
    assert grid.axis("dp").group == (1, 3, 5, 7) and grid.axis("tp_col").group == (2, 3)
    assert tuple(range(plan.world_size)) not in made
    made.clear()  # the pipeline's stages run different code: their group is never the default one
    pipe = Plan(pp=plan.world_size)
    assert Grid.build(pipe, 3, pipe.world_size).axis("pp").group == tuple(range(pipe.world_size))
