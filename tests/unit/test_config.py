"""The Hydra schema is generated from the frozen types (so the two cannot drift), every preset
composes and freezes, and an undeclared key is an error naming the closest declared one."""
from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import get_type_hints

import pytest
from omegaconf import OmegaConf, open_dict

from axon import config
from axon.config import FROZEN, Config, ConfigError, freeze, load
from perfmodel.specs import ModelSpec, Offload, Plan

SCHEMA_ONLY = {"model": {"name", "init"}, "parallel": {"auto"}}  # settings outside the frozen specs
STRIP = {"logger.wandb": "wandb_"}  # Logging.wandb_mode is logger.wandb.mode


def _node(path: str) -> type:
    node = Config
    for part in path.split("."):
        node = get_type_hints(node)[part]
    return node


def _default(f) -> object:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _plain(value: object) -> object:
    """A (frozen or schema) dataclass instance as a dict, for comparing the two."""
    return {f.name: _plain(getattr(value, f.name)) for f in fields(value)} if is_dataclass(value) else value


@pytest.mark.parametrize("path", sorted(FROZEN))
def test_schema_fields_are_the_frozen_fields(path):
    schema, frozen = _node(path), FROZEN[path]
    names = [f.name.removeprefix(STRIP.get(path, "")) for f in fields(frozen)]
    assert [f.name for f in fields(schema) if f.name not in SCHEMA_ONLY.get(path, set())] == names
    hints, frozen_hints = get_type_hints(schema), get_type_hints(frozen)
    for f, name in zip(fields(frozen), names):
        typ = frozen_hints[f.name]
        if is_dataclass(typ):
            assert hints[name] is _node(f"{path}.{name}")
        else:
            assert hints[name] == typ, f"{path}.{name}"


@pytest.mark.parametrize("path", sorted(FROZEN))
def test_schema_defaults_are_the_frozen_defaults(path):
    schema, frozen = _node(path), FROZEN[path]
    defaults = {f.name: _plain(_default(f)) for f in fields(schema)}
    for f in fields(frozen):
        assert defaults[f.name.removeprefix(STRIP.get(path, ""))] == _plain(_default(f)), f"{path}.{f.name}"


def test_a_nested_frozen_type_is_an_editable_schema_node():
    cfg = load(["parallel.offload.optimizer=true"])
    assert OmegaConf.get_type(cfg.parallel.offload).__name__ == "OffloadCfg"
    cfg.parallel.offload.activations = 0.5  # a frozen dataclass would be a read-only node
    assert freeze(cfg).plan.offload == Offload(optimizer=True, activations=0.5)


@pytest.mark.parametrize("override,suggestion", [
    ("+train.stesp=5", "did you mean train.steps?"),
    ("+model.from_pretrained=x", "model.* settings are"),
    ("+parallel.foo=1", "parallel.* settings are"),
    ("parallel.bogus=1", "parallel.* settings are"),
    ("+parallel.offload.optimzer=true", "did you mean parallel.offload.optimizer?"),
    ("+train.dp=2", "did you mean parallel.dp?"),
    ("+foo=3", "top-level settings are"),
    ("+logger.wandb.projet=x", "did you mean logger.wandb.project?"),
    ("+slurm.acount=x", "did you mean slurm.account?"),
])
def test_an_unknown_key_is_an_error(override, suggestion):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError) as err:
        freeze(load([override]))
    message = str(err.value)
    assert message.startswith(f"unknown setting {key};") and suggestion in message and "\n" not in message


def test_freeze_rejects_an_unknown_key_added_after_load():
    cfg = load([])
    with open_dict(cfg.train):
        cfg.train.stesp = 5
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        freeze(cfg)


def test_a_normal_override_freezes_to_the_expected_specs():
    cfg = freeze(load(["parallel.dp=4", "model=gpt2-124m"]))
    assert cfg.plan == Plan(dp=4)
    assert cfg.model == ModelSpec(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_ff=3072, vocab_size=50304,
                                  max_seq_len=1024, norm="layernorm", pos="learned", mlp="gelu",
                                  tied_embeddings=True, bias=True)
    assert cfg.raw["model"]["name"] == "gpt2-124m" and not cfg.auto_plan
    assert cfg.optim == config.Optim() and cfg.train == config.Train() and cfg.logging == config.Logging()
    assert freeze(load(["parallel=auto", "parallel.offload.optimizer=true"])).plan.offload == Offload(optimizer=True)
    assert freeze(load(["parallel=auto"])).auto_plan


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (config.CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,preset", [(g, p) for g in config.GROUPS for p in _presets(g)])
def test_every_preset_composes_and_freezes(group, preset):
    cfg = freeze(load([f"{group}={preset}"]))
    if group == "model":
        cfg.model.check()
        assert cfg.raw["model"]["name"] == preset
    if group == "cluster":
        assert cfg.cluster.name == preset and cfg.cluster.world_size >= 1


@pytest.mark.parametrize("command", ["train", "tune", "submit"])
def test_the_commands_print_one_line(command, capsys):
    import importlib

    main = importlib.import_module(f"axon.{command}").main
    argv = ["--dry"] if command == "submit" else []
    assert main([*argv, "+train.stesp=5"]) == 2
    err = capsys.readouterr().err
    assert err == f"axon {command}: unknown setting train.stesp; did you mean train.steps?\n"
