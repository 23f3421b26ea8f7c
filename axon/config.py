"""Hydra structured configs (the schema of `configs/`) and their one-time conversion into frozen
dataclasses. Only the CLI layer sees a DictConfig; everything below it gets a `RunConfig`.

Each setting is declared once, with its default and comment, on its frozen type: `ModelSpec`,
`Plan`, `Cluster` and `Optim` in perfmodel/specs.py, the rest below. The Hydra schema is generated
from those (`schema_of`), plus the few settings only the CLI reads (`model.name`, `parallel.auto`,
`run.*`, `slurm.*`), declared here. A key the schema does not declare is an error (`ConfigError`).
"""
from __future__ import annotations

import re
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, make_dataclass
from difflib import get_close_matches
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from perfmodel.specs import Cluster, ModelSpec, Offload, Optim, Plan

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A setting the schema does not declare; the message names it and the closest valid one."""


# ---- frozen run configuration (the declaration of every train.*, data.*, ... setting) ----
@dataclass(frozen=True)
class Train:
    steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step
    seq_len: int = 128
    lr: float = 3e-3  # peak learning rate (optim.* shapes the schedule)
    seed: int = 1234
    log_every: int = 1
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    progress: bool = True  # a progress line on rank 0's terminal


@dataclass(frozen=True)
class Data:
    name: str = "corpus"
    path: Optional[str] = None  # a .bin token file; None = the embedded corpus
    dtype: str = "auto"  # uint16 | uint32 | auto (from the .json sidecar)
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    val_fraction: float = 0.01


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1  # >1 with no launcher around: start that many local workers
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 120.0  # a collective waiting longer than this fails the job
    master_port: int = 0  # 0 = pick a free port


@dataclass(frozen=True)
class Checkpointing:
    every: int = 0  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # newest checkpoints kept
    resume: str = "auto"  # auto | never | <path>
    at_end: bool = True


@dataclass(frozen=True)
class Logging:
    """Weights & Biases; set as `logger.wandb.<name without the wandb_ prefix>`."""

    wandb_mode: str = "offline"  # disabled | offline | online (offline: local files under the run dir, no network)
    wandb_project: str = "axon"
    wandb_entity: Optional[str] = None


@dataclass(frozen=True)
class RunConfig:
    """Everything a training job needs, frozen; built once from the Hydra config."""

    model: ModelSpec
    plan: Plan
    auto_plan: bool
    cluster: Cluster
    train: Train
    optim: Optim
    data: Data
    launch: Launch
    checkpoint: Checkpointing
    logging: Logging
    run_name: str
    run_dir: Path
    raw: dict[str, Any] = field(compare=False, hash=False, repr=False)  # resolved config, for config.yaml


# ---- Hydra schema: mutable mirrors generated from the frozen types ----
def schema_of(frozen: type, name: str, extra: tuple[tuple[str, type, Any], ...] = (), strip: str = "") -> type:
    """A mutable dataclass `name` with `frozen`'s fields, types and defaults (Hydra cannot hold a
    frozen dataclass as an editable node). Nested frozen dataclasses become nested schema nodes;
    `extra` (name, type, default) are schema-only settings, placed first; `strip` is removed from
    the front of every field name."""
    hints = get_type_hints(frozen)
    specs: list[tuple[str, Any, Field]] = [(n, t, field(default=d)) for n, t, d in extra]
    for f in fields(frozen):
        typ = hints[f.name]
        make: Callable[[], Any] | None = None if f.default_factory is MISSING else f.default_factory
        if is_dataclass(typ):
            typ = schema_of(typ, f"{typ.__name__}Cfg")
            if make is None and f.default is not MISSING:
                make = partial(lambda d: d, f.default)
            spec = field() if make is None else field(default_factory=partial(_thawed, typ, make))
        elif make is not None:
            spec = field(default_factory=make)
        else:
            spec = field(default=f.default)  # MISSING stays required ("???")
        specs.append((f.name.removeprefix(strip), typ, spec))
    cls = make_dataclass(name, specs)
    cls.__module__ = __name__
    return cls


def _thawed(node: type, make: Callable[[], Any]) -> Any:
    """The schema node `node` holding the values of the frozen instance `make()`."""
    return _thaw(node, make())


def _thaw(node: type, obj: Any) -> Any:
    hints = get_type_hints(node)
    return node(**{f.name: _thaw(hints[f.name], getattr(obj, f.name)) if is_dataclass(hints[f.name])
                   else getattr(obj, f.name) for f in fields(node)})


ModelCfg = schema_of(ModelSpec, "ModelCfg", extra=(("name", str, "tiny"),))  # name: the preset's, for logs
# parallel.auto (configs/parallel/auto.yaml): the performance model picks the layout
ParallelCfg = schema_of(Plan, "ParallelCfg", extra=(("auto", bool, False),))
ClusterCfg = schema_of(Cluster, "ClusterCfg")
OptimCfg = schema_of(Optim, "OptimCfg")
DataCfg = schema_of(Data, "DataCfg")
TrainCfg = schema_of(Train, "TrainCfg")
LaunchCfg = schema_of(Launch, "LaunchCfg")
CheckpointCfg = schema_of(Checkpointing, "CheckpointCfg")
WandbCfg = schema_of(Logging, "WandbCfg", strip="wandb_")


@dataclass
class RunCfg:
    name: str = "default"
    dir: Optional[str] = None  # run directory; None = runs/<name>


@dataclass
class SlurmCfg:
    """`axon submit` settings (templates in slurm/); only the submit command reads these."""

    template: Optional[str] = None  # slurm/<template>.sbatch.j2; None = the cluster's own (or generic)
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # None = the cluster preset's
    tasks_per_node: Optional[int] = None  # None = gpus_per_node (CPU dry runs set it)
    time: str = "00:30:00"
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)  # extra "#SBATCH ..." option lines
    setup: list[str] = field(default_factory=list)  # module loads / environment lines
    signal_s: int = 120  # seconds before the time limit at which Slurm sends USR1
    requeue: bool = True


def _node(name: str, children: dict[str, type]) -> type:
    cls = make_dataclass(name, [(k, v, field(default_factory=v)) for k, v in children.items()])
    cls.__module__ = __name__
    return cls


LoggerCfg = _node("LoggerCfg", {"wandb": WandbCfg})
GROUPS: dict[str, type] = {"model": ModelCfg, "parallel": ParallelCfg, "optim": OptimCfg, "data": DataCfg,
                           "cluster": ClusterCfg}  # config groups: configs/<group>/*.yaml
Config = _node("Config", {**GROUPS, "train": TrainCfg, "launch": LaunchCfg, "run": RunCfg,
                          "checkpoint": CheckpointCfg, "logger": LoggerCfg, "slurm": SlurmCfg})
# schema node -> the frozen type it mirrors (the others are schema-only)
FROZEN: dict[str, type] = {"model": ModelSpec, "parallel": Plan, "parallel.offload": Offload, "cluster": Cluster,
                           "optim": Optim, "data": Data, "train": Train, "launch": Launch,
                           "checkpoint": Checkpointing, "logger.wandb": Logging}


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="axon_schema", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


def load(overrides: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose configs/train.yaml with Hydra overrides (`model=tiny parallel.dp=4 ...`)."""
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name="train", overrides=list(overrides))
    except ConfigCompositionException as e:  # `parallel.bogus=1`: say so in one line, not "use +"
        m = re.match(r"Could not override '([\w.]+)'", str(e))
        if m and not _declared(m.group(1)):
            raise ConfigError(_unknown(m.group(1))) from e
        raise
    finally:
        GlobalHydra.instance().clear()
    check_keys(OmegaConf.to_container(cfg, resolve=False))
    return cfg


# ---- unknown keys ----
def check_keys(tree: Any, node: type = Config, prefix: str = "") -> None:
    """Raise ConfigError for a key of `tree` (a config as a dict) that `node` does not declare."""
    if not isinstance(tree, dict):
        return
    hints = get_type_hints(node)
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown(path))
        if is_dataclass(hints[key]):
            check_keys(value, hints[key], f"{path}.")


def _paths(node: type = Config, prefix: str = "") -> list[str]:
    """Every declared setting as a dotted key (`parallel.offload.optimizer`, ...)."""
    out = []
    for key, typ in get_type_hints(node).items():
        out += _paths(typ, f"{prefix}{key}.") if is_dataclass(typ) else [f"{prefix}{key}"]
    return out


def _declared(path: str) -> bool:
    return any(p == path or p.startswith(f"{path}.") for p in _paths())


def _unknown(path: str) -> str:
    """One line naming the first undeclared part of `path` and the closest declared key."""
    node, parent = Config, ""
    for part in path.split("."):
        hints = get_type_hints(node)
        if part not in hints:
            break
        node, parent = hints[part], f"{parent}{part}."
    path, siblings = f"{parent}{part}", sorted(get_type_hints(node))
    close = get_close_matches(part, siblings, n=1)
    if close:
        return f"unknown setting {path}; did you mean {parent}{close[0]}?"
    elsewhere = [p for p in _paths() if p.rpartition(".")[2] == part]  # in another group (`train.dp`)
    if elsewhere:
        return f"unknown setting {path}; did you mean {' or '.join(elsewhere)}?"
    where = f"{parent}*" if parent else "top-level"
    return f"unknown setting {path}; the {where} settings are {', '.join(siblings)}"


# ---- freezing ----
def freeze(cfg: DictConfig) -> RunConfig:
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    check_keys(raw)
    p = dict(raw["parallel"])
    auto = bool(p.pop("auto"))
    plan = Plan(**{**p, "offload": Offload(**p["offload"])})
    model = {k: v for k, v in raw["model"].items() if k != "name"}
    run_dir = Path(raw["run"]["dir"] or Path("runs") / raw["run"]["name"]).resolve()
    return RunConfig(
        model=ModelSpec(**model),
        plan=plan,
        auto_plan=auto,
        cluster=Cluster(**raw["cluster"]),
        train=Train(**raw["train"]),
        optim=Optim(**raw["optim"]),
        data=Data(**raw["data"]),
        launch=Launch(**raw["launch"]),
        checkpoint=Checkpointing(**raw["checkpoint"]),
        logging=Logging(**{f"wandb_{k}": v for k, v in raw["logger"]["wandb"].items()}),
        run_name=raw["run"]["name"],
        run_dir=run_dir,
        raw=raw,
    )
