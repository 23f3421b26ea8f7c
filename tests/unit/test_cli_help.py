"""`axon <cmd> --help` for every command, the train help generated from the schema (every key with
its type, default and doc), --version, --cfg, and "did you mean" for commands, presets and keys."""
from __future__ import annotations

import importlib
from dataclasses import is_dataclass
from typing import get_type_hints

import pytest

from axon import cli, config
from axon.help import field_comments, presets, schema_keys, train_help
from axon.metrics import Throughput, device_peak_flops
from axon.tune import default_batch
from perfmodel.specs import Cluster


def _schema_paths(node: type = config.Config, prefix: str = "") -> list[str]:
    out = []
    for key, typ in get_type_hints(node).items():
        out += _schema_paths(typ, f"{prefix}{key}.") if is_dataclass(typ) else [f"{prefix}{key}"]
    return out


def test_train_help_lists_every_schema_key_with_type_default_and_doc(capsys):
    assert importlib.import_module("axon.train").main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "." in line.split()[0]}
    assert set(lines) == set(_schema_paths())  # generated from the schema: nothing missing, nothing extra
    assert [k for k, *_ in schema_keys()] == _schema_paths()
    assert lines["parallel.dp"].split()[1:4] == ["int", "1", "data"]  # type, default, doc from Plan's comment
    assert "data parallel degree" in lines["parallel.dp"]
    assert "sequences per optimizer step" in lines["train.global_batch_size"]
    assert lines["data.path"].split()[1:3] == ["str|null", "null"]
    assert "Weights" not in lines["logger.wandb.mode"] and "disabled | offline | online" in lines["logger.wandb.mode"]


def test_every_documented_field_comment_reaches_the_help():
    docs = {key: doc for key, _, _, doc in schema_keys()}
    for path, frozen in config.FROZEN.items():
        strip = "wandb_" if path == "logger.wandb" else ""
        for name, comment in field_comments(frozen).items():
            key = f"{path}.{name.removeprefix(strip)}"
            if key in docs:
                assert docs[key] == comment, key


def test_groups_list_their_presets_but_not_the_internal_schema():
    text = train_help()
    model_line = next(line for line in text.splitlines() if line.strip().startswith("model "))
    assert "llama3.1-70b" in model_line and "model_schema" not in text
    assert "model_schema" not in presets("model") and "local-cpu" in presets("cluster")


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c != "train"])
def test_every_command_has_help(command, capsys):
    try:
        code = cli.main([command, "--help"])
    except SystemExit as done:  # argparse's --help
        code = done.code
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: axon")
    if command in ("tune", "submit", "prepare-data", "checkpoints"):  # axon/errors.py's one error style
        assert "--debug" in out


def test_top_level_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS) and "--version" in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("axon ")


@pytest.mark.parametrize("argv,suggestion", [
    (["trian"], "did you mean axon train?"),
    (["checkpoint", "x"], "did you mean axon checkpoints?"),
    (["train", "model=llama3-70b"], "did you mean model=llama3.1-70b?"),
    (["tune", "cluster=h100"], "did you mean cluster=dgx-h100?"),
    (["train", "train.stesp=5"], "did you mean train.steps?"),
    (["train", "+train.stesp=5"], "did you mean train.steps?"),
    (["tune", "cluster.node=16"], "did you mean cluster.nodes?"),
    (["train", "logger.tensorbaord.enabled=true"], "did you mean logger.tensorboard?"),
])
def test_did_you_mean(argv, suggestion, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert suggestion in err and err.count("\n") == 1 and "model_schema" not in err


def test_plus_unknown_is_rejected(capsys):
    assert cli.main(["train", "+model.from_pretrained=x"]) == 2
    assert "unknown setting model.from_pretrained" in capsys.readouterr().err


def test_cfg_prints_the_resolved_config(capsys):
    assert cli.main(["train", "--cfg", "model=gpt2-124m", "train.steps=7", "profile.steps=[2,3]"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "name: gpt2-124m" in out and "norm: layernorm" in out
    assert "profile:" in out and "tensorboard:" in out


def test_tune_default_batch_follows_the_model():
    tiny = config.freeze(config.load(["model=tiny"])).model
    assert default_batch(tiny, 16, 128)[:2] == (16, 128)  # the CPU model keeps train.*
    big = config.freeze(config.load(["model=llama3.1-70b"])).model
    gbs, seq, why = default_batch(big, 16, 128)
    assert seq == 8192 and gbs * seq == 2**22 and "train.global_batch_size" in why
    gpt2 = config.freeze(config.load(["model=gpt2-124m"])).model
    assert default_batch(gpt2, 16, 128)[:2] == (512, 1024)


def test_tune_says_which_batch_it_picked(capsys):
    from axon.tune import main

    degrees = [f"parallel.{a}={v}" for a, v in (("dp", 8), ("pp", 1), ("cp", 1), ("tp_col", 1), ("tp_row", 1),
                                                 ("tp_depth", 1))]
    assert main(["model=gpt2-124m", "cluster=dgx-h100", *degrees, "parallel.zero=1"]) == 0
    out = capsys.readouterr().out
    assert "global batch 512 x 1024 tokens" in out and "chosen for a 0.1B-parameter model" in out


def test_device_peak_on_cpu_is_the_machine_shared_by_its_ranks():
    cpu = config.freeze(config.load(["cluster=local-cpu"])).cluster
    machine = cpu.peak_flops * cpu.gpus_per_node  # measured: gpus_per_node ranks at peak_flops each
    assert device_peak_flops(cpu, 1) == pytest.approx(machine)
    assert device_peak_flops(cpu, 8) == pytest.approx(machine / 8)
    gpu = Cluster(name="gpu", gpus_per_node=8, peak_flops=1e15, compute_units=0)
    assert device_peak_flops(gpu, 1) == device_peak_flops(gpu, 8) == 1e15


def test_throughput_is_smoothed_over_a_window():
    meter = Throughput(window=2)
    for tokens, seconds in ((100, 10.0), (100, 1.0), (100, 1.0)):
        meter.add(tokens, seconds)
    figures = meter.figures(devices=4)
    assert figures["tokens_per_s_smooth"] == pytest.approx(100.0)  # the slow first step left the window
    assert figures["tokens_per_s_per_device"] == pytest.approx(25.0)


@pytest.mark.parametrize("steps", [[0, 2], [5, 3], [1, 2, 3]])
def test_profile_steps_are_checked(steps):
    with pytest.raises(config.ConfigError, match="profile.steps"):
        config.Profile(steps=steps)


def test_schema_only_settings_have_a_doc_too():
    from dataclasses import fields

    docs = {key: doc for key, _, _, doc in schema_keys()}
    for path, frozen in config.FROZEN.items():
        strip = "wandb_" if path == "logger.wandb" else ""
        declared = {f.name.removeprefix(strip) for f in fields(frozen)}
        for key in [k for k in docs if k.rpartition(".")[0] == path and k.rpartition(".")[2] not in declared]:
            assert docs[key], f"{key} is schema-only: document it in axon/help.py _SCHEMA_ONLY_DOCS"
