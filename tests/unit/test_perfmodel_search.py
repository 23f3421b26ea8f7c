"""The autotuner at scale and the `axon tune` command's output."""
import json

import pytest
from omegaconf import OmegaConf

from axon.config import freeze, load
from axon.tune import main
from perfmodel.candidates import parse_constraints
from perfmodel.search import search
from perfmodel.specs import PlanError


@pytest.mark.slow
def test_405b_on_4096_gpus_over_the_full_space():
    cfg = freeze(load(["model=llama3.1-405b", "cluster=dgx-h100", "cluster.nodes=512"]))
    result = search(cfg.model, cfg.cluster, 4096, {}, global_batch_size=2048, seq_len=8192, top=5)
    assert result.layouts > 100 and result.estimates
    times = [e.step_time_s for e in result.estimates]
    assert times == sorted(times)
    for e in result.estimates:
        assert e.fits and e.plan.world_size == 4096
        e.plan.check(cfg.model, 4096, 2048, 8192)


def test_constraints_are_held_and_parsed():
    assert parse_constraints(["model=tiny", "parallel.pp=2", "parallel.offload.optimizer=true",
                              "parallel.recompute=full", "parallel=auto"]) == \
        {"pp": 2, "offload.optimizer": True, "recompute": "full"}
    with pytest.raises(PlanError, match="parallel.bogus"):
        parse_constraints(["parallel.bogus=1"])
    cfg = freeze(load(["model=tiny"]))
    result = search(cfg.model, cfg.cluster, 8, {"pp": 2, "recompute": "full"}, 16, 128)
    assert result.estimates and all(e.plan.pp == 2 and e.plan.recompute == "full" for e in result.estimates)


def test_tune_json(capsys):
    assert main(["model=tiny", "cluster=local-cpu", "train.global_batch_size=16", "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world"] == 8 and 1 <= len(out["candidates"]) <= 3
    for cand in out["candidates"]:
        assert {"plan", "n_params", "step_time_s", "tokens_per_s", "mfu", "memory"} <= set(cand)
        assert {"params", "grads", "optimizer", "activations", "total"} <= set(cand["memory"])
        assert cand["plan"]["dp"] * cand["plan"]["pp"] * cand["plan"]["cp"] * cand["plan"]["tp_col"] * \
            cand["plan"]["tp_row"] * cand["plan"]["tp_depth"] == 8


def test_tune_fixed_plan_table_and_yaml(capsys, tmp_path):
    degrees = [f"parallel.{a}=1" for a in ("pp", "cp", "tp_col", "tp_row", "tp_depth")]
    out_file = tmp_path / "best.yaml"
    assert main(["model=tiny", "parallel.dp=8", *degrees, "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "dp=8 pp=1" in text and "winner, memory per device" in text
    saved = OmegaConf.load(out_file)
    assert saved.dp == 8 and saved.offload.optimizer is False


def test_tune_reports_impossible_plans(capsys):
    assert main(["model=tiny", "parallel.dp=3", "parallel.pp=1", "parallel.cp=1", "parallel.tp_col=1",
                 "parallel.tp_row=1", "parallel.tp_depth=1"]) == 2
    assert "parallel.dp" in capsys.readouterr().err
