"""Hydra structured configs (the schema of `configs/`) and their one-time conversion into frozen
dataclasses. Only the CLI layer sees a DictConfig; everything below it gets a `RunConfig`.

Each frozen type declares its settings' allowed values once, in a `RANGES` table next to its
fields (perfmodel.specs.Range), checked on construction by perfmodel.specs.check_ranges.

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
from typing import Any, Callable, ClassVar, Optional, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from perfmodel.specs import (Cluster, ModelSpec, Offload, Optim, Plan, Range, above, at_least, check_ranges, one_of,
                             within)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A setting the schema does not declare; the message names it and the closest valid one."""


# ---- frozen run configuration (the declaration of every train.*, data.*, ... setting) ----
@dataclass(frozen=True)
class Goldfish:
    """The Goldfish loss (Hans et al. 2024; axon/goldfish.py): about 1/k of the target tokens are
    left out of the loss, chosen by hashing the h tokens before each (the same text always drops
    the same tokens) or, in static mode, every k-th position."""

    k: int = 0  # drop about 1 in k target tokens; 0 = off
    h: int = 13  # hash context width: the tokens before a target that decide whether it is dropped
    mode: str = "hash"  # hash | static (every k-th position of the sequence)


@dataclass(frozen=True)
class Train:
    steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step
    seq_len: int = 128
    lr: float = 3e-3  # peak learning rate (optim.* shapes the schedule)
    seed: int = 1234
    log_every: int = 1
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16: bf16 computes with bf16 weights made once per step
    # from fp32 masters; gradients, their reduction, Adam and the loss stay fp32 (parallel/precision.py)
    dtype: str = "auto"
    progress: bool = True  # a progress line on rank 0's terminal
    goldfish: Goldfish = Goldfish()  # train.goldfish.k=4 turns the Goldfish loss on
    # a step whose loss or gradient norm is NaN/Inf: stop (checkpoint nothing, exit non-zero) or
    # skip its update (the job stops once more than max_skips steps were skipped)
    on_nonfinite: str = "stop"  # stop | skip
    max_skips: int = 10  # with on_nonfinite=skip: skipped steps tolerated in one run
    # the validation loss (metrics.jsonl `val_loss`) on the data's val split every eval_every steps
    # and at the end (0 = off), over eval_batches global batches of it (axon/evaluate.py)
    eval_every: int = 0
    eval_batches: int = 4
    SECTION: ClassVar[str] = "train"
    RANGES: ClassVar[dict[str, Range]] = {
        "steps": at_least(0), "global_batch_size": at_least(1), "seq_len": at_least(1), "lr": at_least(0),
        "seed": at_least(0), "log_every": at_least(1), "dtype": one_of("auto", "fp32", "bf16"),
        "on_nonfinite": one_of("stop", "skip"), "max_skips": at_least(0),
        "eval_every": at_least(0), "eval_batches": at_least(1)}  # goldfish: axon/goldfish.py check

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Data:
    name: str = "corpus"
    path: Optional[str] = None  # a .bin token file; None = the embedded corpus
    dtype: str = "auto"  # uint16 | uint32 | auto (from the .json sidecar)
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    val_fraction: float = 0.01
    SECTION: ClassVar[str] = "data"
    RANGES: ClassVar[dict[str, Range]] = {"dtype": one_of("auto", "uint16", "uint32"),
                                          "val_fraction": within(0, 1, high_open=True)}

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1  # >1 with no launcher around: start that many local workers
    backend: str = "auto"  # auto (nccl if a GPU is usable, else gloo) | gloo | nccl (RCCL on ROCm)
    # seconds any rank may go without progress (a phase of a step, a collective, the rendezvous)
    # before the job fails with a report (launch/watchdog.py); collectives time out 10 s later;
    # None = 120 on CPU (gloo), 600 on GPUs (nccl) (launch/dist.py DEFAULT_TIMEOUT_S)
    timeout_s: Optional[float] = None
    master_port: int = 0  # 0 = pick a free port
    SECTION: ClassVar[str] = "launch"  # backend: launch/dist.py resolve_backend
    RANGES: ClassVar[dict[str, Range]] = {"nproc_per_node": at_least(1), "timeout_s": above(0, none_ok=True),
                                          "master_port": within(0, 65535)}

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Checkpointing:
    every: int = 0  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # newest checkpoints kept (0 = all)
    resume: str = "auto"  # auto | never | <path>
    at_end: bool = True
    SECTION: ClassVar[str] = "checkpoint"
    RANGES: ClassVar[dict[str, Range]] = {"every": at_least(0), "keep": at_least(0)}

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class Logging:
    """Weights & Biases; set as `logger.wandb.<name without the wandb_ prefix>`."""

    wandb_mode: str = "offline"  # disabled | offline | online (offline: local files under the run dir, no network)
    wandb_project: str = "axon"
    wandb_entity: Optional[str] = None
    SECTION: ClassVar[str] = "logger.wandb"
    STRIP: ClassVar[str] = "wandb_"
    RANGES: ClassVar[dict[str, Range]] = {"wandb_mode": one_of("disabled", "offline", "online")}

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class TensorBoard:
    """TensorBoard event files of rank 0's metrics (torch.utils.tensorboard); `logger.tensorboard.*`."""

    enabled: bool = False  # write the metrics as TensorBoard scalars (pip install tensorboard)
    dir: Optional[str] = None  # event file directory; None = <run dir>/tensorboard


@dataclass(frozen=True)
class Profile:
    """A torch.profiler trace (Chrome format: chrome://tracing, Perfetto) of some steps."""

    steps: list[int] = field(default_factory=list)  # [first, last] steps to trace, inclusive, e.g. [3,5]; [] = off
    all_ranks: bool = False  # trace every rank (trace_rank<N>.json), not only rank 0
    dir: Optional[str] = None  # trace directory; None = <run dir>/profile

    def __post_init__(self) -> None:
        s = list(self.steps)
        if s and (len(s) > 2 or s[0] < 1 or s[-1] < s[0]):
            raise ConfigError(f"profile.steps={s} must be [first, last] with 1 <= first <= last (e.g. "
                              f"profile.steps=[3,5]), or [] for no trace")


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
    tensorboard: TensorBoard = field(default_factory=TensorBoard)
    profile: Profile = field(default_factory=Profile)
    model_init: str = "random"  # model.init: random | hf:<dir> (axon/hf_load.py)


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


# name: the preset's, for logs; init: random | hf:<dir> (weights, and the model's shape from its config.json)
ModelCfg = schema_of(ModelSpec, "ModelCfg", extra=(("name", str, "tiny"), ("init", str, "random")))
# parallel.auto (configs/parallel/auto.yaml): the performance model picks the layout
ParallelCfg = schema_of(Plan, "ParallelCfg", extra=(("auto", bool, False),))
ClusterCfg = schema_of(Cluster, "ClusterCfg")
OptimCfg = schema_of(Optim, "OptimCfg")
DataCfg = schema_of(Data, "DataCfg")
TrainCfg = schema_of(Train, "TrainCfg")
LaunchCfg = schema_of(Launch, "LaunchCfg")
CheckpointCfg = schema_of(Checkpointing, "CheckpointCfg")
WandbCfg = schema_of(Logging, "WandbCfg", strip="wandb_")
TensorBoardCfg = schema_of(TensorBoard, "TensorBoardCfg")
ProfileCfg = schema_of(Profile, "ProfileCfg")


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
    # centre-specific (axon/slurm_site.py checks them against the template)
    rocm: Optional[str] = None  # frontier: the rocm module version, same X.Y as torch's ROCm (e.g. 6.2.4)
    net_plugin: Optional[str] = None  # lib dir of aws-ofi-rccl (frontier, >1 node: required) or aws-ofi-nccl
    uenv: Optional[str] = None  # alps: a uenv providing NCCL + aws-ofi-nccl (srun --uenv), e.g. prgenv-gnu/24.11:v1
    uenv_view: str = "default"  # alps: the uenv's view (srun --view)
    container: Optional[str] = None  # alps: a container-engine EDF with the aws_ofi_nccl hook (srun --environment)


def _node(name: str, children: dict[str, type]) -> type:
    cls = make_dataclass(name, [(k, v, field(default_factory=v)) for k, v in children.items()])
    cls.__module__ = __name__
    return cls


LoggerCfg = _node("LoggerCfg", {"wandb": WandbCfg, "tensorboard": TensorBoardCfg})
GROUPS: dict[str, type] = {"model": ModelCfg, "parallel": ParallelCfg, "optim": OptimCfg, "data": DataCfg,
                           "cluster": ClusterCfg}  # config groups: configs/<group>/*.yaml
Config = _node("Config", {**GROUPS, "train": TrainCfg, "launch": LaunchCfg, "run": RunCfg,
                          "checkpoint": CheckpointCfg, "logger": LoggerCfg, "slurm": SlurmCfg,
                          "profile": ProfileCfg})
# schema node -> the frozen type it mirrors (the others are schema-only)
FROZEN: dict[str, type] = {"model": ModelSpec, "parallel": Plan, "parallel.offload": Offload, "cluster": Cluster,
                           "optim": Optim, "data": Data, "train": Train, "train.goldfish": Goldfish, "launch": Launch,
                           "checkpoint": Checkpointing, "logger.wandb": Logging,
                           "logger.tensorboard": TensorBoard, "profile": Profile}


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
def _cluster(raw: dict[str, Any]) -> Cluster:
    """The cluster preset with its per-rank rates for its gpus_per_node ranks per node (a CPU
    preset's were measured with measured_ranks ranks: perfmodel/specs.py `Cluster.sharing`)."""
    cluster = Cluster(**raw)
    return cluster.sharing(cluster.gpus_per_node)


def freeze(cfg: DictConfig) -> RunConfig:
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    check_keys(raw)
    p = dict(raw["parallel"])
    auto = bool(p.pop("auto"))
    plan = Plan(**{**p, "offload": Offload(**p["offload"])})
    model = {k: v for k, v in raw["model"].items() if k not in ("name", "init")}
    spec = ModelSpec(**model)
    if raw["model"]["init"] != "random":  # the shape comes from the Hugging Face config.json
        from axon import hf_config, hf_load

        spec = hf_config.spec_from_dir(hf_load.init_dir(raw["model"]["init"]))
    run_dir = Path(raw["run"]["dir"] or Path("runs") / raw["run"]["name"]).resolve()
    return RunConfig(
        model=spec,
        plan=plan,
        auto_plan=auto,
        cluster=_cluster(raw["cluster"]),
        train=Train(**{**raw["train"], "goldfish": Goldfish(**raw["train"]["goldfish"])}),
        optim=Optim(**raw["optim"]),
        data=Data(**raw["data"]),
        launch=Launch(**raw["launch"]),
        checkpoint=Checkpointing(**raw["checkpoint"]),
        logging=Logging(**{f"wandb_{k}": v for k, v in raw["logger"]["wandb"].items()}),
        run_name=raw["run"]["name"],
        run_dir=run_dir,
        raw=raw,
        model_init=raw["model"]["init"],
        tensorboard=TensorBoard(**raw["logger"]["tensorboard"]),
        profile=Profile(**raw["profile"]),
    )
