"""Starting from Hugging Face Llama weights under every parallel mechanism (model.init=hf:<dir>),
against `transformers` as the oracle: the trainer's first-step loss equals transformers' loss on
the same batch (fp32, rel 1e-5; measured ~1e-7), each rank reads exactly the bytes of its shards,
`axon convert` checkpoints resume at another layout, and a checkpoint written by a sharded layout
exports to a Hugging Face directory whose loss is the trainer's.

The tiny Llama has 5 layers (GQA, Llama 3.1 rope scaling, untied), so pp=2 and interleaved pp=2 x 2
split unevenly."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from axon.convert import axon_to_hf, hf_to_axon
from axon.hf_config import spec_from_dir
from tests.distributed.trainer_driver import make_cfg, train
from tests.hf_fixture import bytes_read, global_batch, hf_loss, make_llama

REL = 1e-5


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("hf") / "llama", n_layers=5)
    cfg = make_cfg(tmp_path_factory.mktemp("ref"), "ref", f"model.init=hf:{path}")
    return path, [hf_loss(path, global_batch(cfg, step)) for step in (0, 1)]


@pytest.mark.parametrize("layout,world", [
    ([], 1),
    (["parallel.dp=2"], 2),
    (["parallel.dp=2", "parallel.zero=1"], 2),
    (["parallel.dp=2", "parallel.zero=3"], 2),
    (["parallel.tp_col=2"], 2),
    (["parallel.tp_col=2", "parallel.sequence_parallel=true"], 2),
    (["parallel.tp_row=2", "parallel.tp_depth=2"], 4),
    (["parallel.tp_col=2", "parallel.tp_depth=2"], 4),
    (["parallel.pp=2"], 2),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"], 2),
    (["parallel.cp=2"], 2),
], ids=lambda v: "-".join(x.split(".")[-1] for x in v) or "single" if isinstance(v, list) else str(v))
def test_first_loss_matches_transformers(hf, layout, world, tmp_path, dist_pools):
    path, want = hf
    cfg = make_cfg(tmp_path, "run", f"model.init=hf:{path}", "train.steps=1", *layout)
    assert dist_pools.run(world, train, cfg)[0][1][0] == pytest.approx(want[0], rel=REL)


@pytest.mark.parametrize("layout,world", [(["parallel.tp_col=2", "parallel.tp_depth=2"], 4),
                                          (["parallel.tp_row=2", "parallel.dp=2"], 4),
                                          (["parallel.pp=2", "parallel.tp_col=2"], 4)])
def test_each_rank_reads_only_its_shards(hf, layout, world, tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "run", f"model.init=hf:{hf[0]}", *layout)
    for read, shard, largest in dist_pools.run(world, bytes_read, cfg):
        assert read == shard  # bytes read from the safetensors files == bytes of this rank's shards
        assert largest <= 64 * 256 * 4  # one slice at a time: at most the largest parameter's shard


def test_fine_tune_continues_from_the_loaded_loss(hf, tmp_path, dist_pools):
    path, want = hf
    losses = dist_pools.run(2, train, make_cfg(tmp_path, "ft", f"model.init=hf:{path}", "train.steps=4",
                                               "parallel.tp_col=2"))[0][1]
    assert losses[0] == pytest.approx(want[0], rel=REL) and losses[-1] < losses[0]


def test_converted_checkpoint_resumes_and_sharded_checkpoint_exports(hf, tmp_path, dist_pools):
    path, want = hf
    model = [f"model.{k}={v}" for k, v in asdict(spec_from_dir(path)).items()]
    ckpt = hf_to_axon(path, tmp_path / "converted")
    # the converted checkpoint resumes under pp2 x tp2 at step 0 with transformers' loss, then saves step 1
    cfg = make_cfg(tmp_path, "pp_tp", *model, f"checkpoint.resume={ckpt}", "train.steps=1", "checkpoint.at_end=true",
                   "parallel.pp=2", "parallel.tp_col=2")
    start, losses = dist_pools.run(4, train, cfg)[0]
    assert start == 0 and losses[0] == pytest.approx(want[0], rel=REL)
    # that pp2 x tp2 checkpoint exported to HF: transformers' loss on step 1's batch is the trainer's
    exported = axon_to_hf(cfg.run_dir / "checkpoints", tmp_path / "exported", max_shard_bytes=50_000)
    resumed = dist_pools.run(1, train, make_cfg(tmp_path, "pp_tp", *model, "train.steps=2"))[0]
    assert resumed[0] == 1
    assert resumed[1][0] == pytest.approx(hf_loss(exported, global_batch(cfg, 1)), rel=REL)
