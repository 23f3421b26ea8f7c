"""`axon tune`'s explanations (axon/tune_explain.py): the memory fit against HBM, the pinned-layout
overflow error, divisibility vs memory as the reason nothing fits, the tie-break line, what limits
the pick, --why-not and the two-panel plot. In process, on small models."""
import dataclasses
import json

import pytest

from axon import tune_explain as explain
from axon.config import freeze, load
from axon.tune import main, plot, plot_figure, report
from perfmodel.estimate import estimate
from perfmodel.specs import Plan

PINNED = ["parallel.pp=1", "parallel.cp=1", "parallel.tp_col=1", "parallel.tp_row=1", "parallel.tp_depth=1"]
SMALL_HBM = ["cluster.overhead_bytes=0", "cluster.hbm_bytes=2.0e7"]  # tiny's unsharded states do not fit


def _tiny(*plans: Plan, overrides: tuple[str, ...] = ()):
    cfg = freeze(load(["model=tiny", *overrides]))
    return cfg, [estimate(cfg.model, p, cfg.cluster, 16, 128) for p in plans]


def test_table_shows_memory_against_hbm_and_what_limits_the_pick(capsys):
    assert main(["model=tiny", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "mem/HBM GiB" in out and "/2.9 " in out  # local-cpu's HBM beside each plan's memory
    limit = next(line for line in out.splitlines() if line.startswith("limited by: "))
    assert "of the step" in limit and "memory headroom" in limit and "HBM" in limit


def test_limits_names_the_largest_component_and_headroom():
    cfg, (e,) = _tiny(Plan(dp=8))
    part, secs = max(e.breakdown.items(), key=lambda kv: kv[1])
    text = explain.limits(e, cfg.cluster)
    assert text.startswith(f"limited by: {explain.STEP_PARTS[part]} {secs:.3f}s")
    assert f"({(cfg.cluster.hbm_bytes - e.memory.total) / cfg.cluster.hbm_bytes:.0%} of" in text


def test_pinned_layout_that_does_not_fit_is_an_error_naming_the_overflow(capsys):
    assert main(["model=tiny", *SMALL_HBM, "parallel.dp=8", *PINNED]) == 2
    err = capsys.readouterr().err
    assert "the pinned layout dp=8,pp=1" in err and "over the 19.1 MiB of cluster=local-cpu" in err
    assert "params" in err and "optimizer" in err  # the overflowing components, with sizes
    assert "parallel.zero=3" in err and "fastest plan that fits sets" in err


def test_divisibility_is_named_as_the_reason_not_memory(capsys):
    assert main(["model=tiny", "model.tied_embeddings=true", "cluster.gpus_per_node=3"]) == 2
    err = capsys.readouterr().err
    assert "passes the rules (divisibility, not memory)" in err and "fits" not in err
    assert "6 of 6 layouts rejected: [3 layouts] model.tied_embeddings=true" in err


def test_memory_is_named_as_the_reason_with_the_smallest_memory_found(capsys):
    assert main(["model=tiny", "cluster.hbm_bytes=2.0e8"]) == 2
    err = capsys.readouterr().err
    assert "fits memory:" in err and "pass the rules but the leanest" in err
    assert "over the 190.7 MiB of cluster=local-cpu" in err


def test_tie_line_states_the_rule_that_picked():
    cfg, (simple, complex_) = _tiny(Plan(dp=8), Plan(dp=4, pp=2))
    same = dataclasses.replace(complex_, step_time_s=simple.step_time_s)
    assert "by fewer mechanisms (none vs pp" in explain.tie(simple, same)
    slower = dataclasses.replace(same, step_time_s=simple.step_time_s * 1.001)
    assert "by step time (0.10% faster), and it has fewer mechanisms" in explain.tie(simple, slower)
    assert explain.tie(simple, dataclasses.replace(same, step_time_s=simple.step_time_s * 1.01)) is None
    twin = dataclasses.replace(simple, plan=Plan(dp=8, micro_batch_size=2))
    assert "by the degree order" in explain.tie(simple, twin)
    header = {"model": "tiny", "world": 8, "cluster": "local-cpu", "global_batch_size": 16, "seq_len": 128}
    assert "\ntie: #1 and #2 within 0.5%; picked by fewer mechanisms" in report(header, [simple, same], cfg.cluster)


def test_why_not_a_rejected_layout(capsys):
    assert main(["model=tiny", "--top", "1", "--why-not", "dp=2,tp_col=4"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("why not dp=2,tp_col=4: rejected by the rules") and "model.n_kv_heads=2" in line


def test_why_not_a_layout_that_does_not_fit(capsys):
    assert main(["model=tiny", *SMALL_HBM, "--top", "1", "--why-not", "dp=8,zero=0,offload.optimizer=false"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "does not fit even at its leanest" in line and "over the 19.1 MiB" in line and "params" in line


def test_why_not_a_slower_layout_and_the_pick(capsys):
    assert main(["model=tiny", "--top", "1", "--json", "--why-not", "dp=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "slower than the pick; differs most in" in out["why_not"]
    pick = ",".join(f"{a}={out['candidates'][0]['plan'][a]}" for a in explain.DEGREES)
    assert main(["model=tiny", "--top", "1", "--json", "--why-not", pick]) == 0
    assert json.loads(capsys.readouterr().out)["why_not"] == f"why not {pick}: it is the pick"


def test_why_not_needs_key_value_items(capsys):
    assert main(["model=tiny", "--top", "1", "--why-not", "dp=8,tp"]) == 2
    assert "--why-not" in capsys.readouterr().err


def test_plot_has_time_and_memory_panels_with_legends_outside(tmp_path):
    pytest.importorskip("matplotlib")
    cfg, estimates = _tiny(Plan(dp=8), Plan(dp=4, pp=2))
    fig = plot_figure(estimates, "tiny", cfg.cluster.hbm_bytes)
    time_ax, mem_ax = fig.axes
    assert time_ax.get_ylabel() == "seconds per step" and mem_ax.get_ylabel() == "GiB per rank"
    labels = [t.get_text() for t in mem_ax.get_legend().get_texts()]
    assert "HBM" in labels and "params" in labels
    for ax in (time_ax, mem_ax):  # anchored right of the axes, so no bar is covered
        assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    path = tmp_path / "tune.png"
    plot(estimates, path, "tiny", cfg.cluster.hbm_bytes)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_stack_is_named_only_where_the_preset_prices_two():
    """A GPU preset has a fused, a compiled and an eager efficiency (cluster.stack picks one); local-cpu has one
    rate, measured on this machine, so the header does not claim a stack for it."""
    header = {"model": "tiny", "world": 8, "cluster": "local-cpu", "global_batch_size": 16, "seq_len": 128}
    cfg, ests = _tiny(Plan(dp=8))
    assert "stack," not in report(header, ests, cfg.cluster).splitlines()[0]
    assert "measured on this machine's stack" in report(header, ests, cfg.cluster).splitlines()[0]
    gpu = freeze(load(["model=tiny", "cluster=dgx-h100", "cluster.stack=eager"])).cluster
    assert "eager stack, a Block at 39% of peak" in report(header, ests, gpu).splitlines()[0]
    f8 = dataclasses.replace(gpu, stack="compiled", float8_linears=True)
    assert report(header, ests, f8).splitlines()[0].endswith(
        "compiled stack, a Block at 46% of peak (cluster.stack), Float8 Linears priced (cluster.float8_linears; "
        "axon train refuses it)")
