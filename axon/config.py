"""Hydra structured configs (the schema of `configs/`) and their one-time conversion into frozen
dataclasses. Only the CLI layer sees a DictConfig; everything below it gets a `RunConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from perfmodel.specs import Cluster, ModelSpec, Offload, Plan

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ---- Hydra schema (mutable mirrors of the frozen specs; documented where declared) ----
@dataclass
class ModelCfg:
    name: str = "tiny"  # preset name, for logs
    n_layers: int = 8
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 344
    vocab_size: int = 256
    max_seq_len: int = 1024
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    pos: str = "rope"  # rope | learned
    mlp: str = "swiglu"  # swiglu | gelu
    tied_embeddings: bool = False
    bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02


@dataclass
class OffloadCfg:
    optimizer: bool = False  # Adam states + fp32 master on the host
    activations: float = 0.0  # fraction of pipeline activations offloaded (PipeOffload)


@dataclass
class ParallelCfg:
    auto: bool = False  # parallel=auto: the performance model picks the layout
    dp: int = 1  # data parallel degree
    pp: int = 1  # pipeline stages
    cp: int = 1  # context (sequence) parallel degree
    tp_col: int = 1  # tensor parallel, X axis (Megatron 1D TP is tp_col=t)
    tp_row: int = 1  # tensor parallel, Y axis
    tp_depth: int = 1  # tensor parallel, Z axis (weights sharded, batch split like DP)
    zero: int = 0  # ZeRO stage 0-3
    sequence_parallel: bool = False
    cp_mode: str = "ring"  # ring | ulysses
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zbh1 | zbv | vhalf | vmin
    virtual_stages: int = 1
    micro_batch_size: int = 1  # sequences per microbatch per data shard
    recompute: str = "none"  # none | selective | full
    recompute_layers: int = -1  # layers per stage that recompute (-1 = all)
    offload: OffloadCfg = field(default_factory=OffloadCfg)
    overlap_grad_reduce: bool = True
    bucket_mb: float = 4.0
    overlap_tp_input_grad: bool = True
    overlap_tp_depth_reduce: bool = True
    prefetch_tp_weights: bool = True
    cache_tp_weights: bool = False


@dataclass
class OptimCfg:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping threshold (0 disables)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclass
class DataCfg:
    name: str = "corpus"
    path: Optional[str] = None  # a .bin token file; None = the embedded corpus
    dtype: str = "auto"  # uint16 | uint32 | auto (from the .json sidecar)
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    val_fraction: float = 0.01


@dataclass
class TrainCfg:
    steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 1234
    log_every: int = 1
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    progress: bool = True


@dataclass
class LaunchCfg:
    nproc_per_node: int = 1  # >1 with no launcher around: start that many local workers
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 120.0  # a collective waiting longer than this fails the job
    master_port: int = 0  # 0 = pick a free port


@dataclass
class RunCfg:
    name: str = "default"
    dir: Optional[str] = None  # run directory; None = runs/<name>


@dataclass
class CheckpointCfg:
    every: int = 0  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # newest checkpoints kept
    resume: str = "auto"  # auto | never | <path>
    at_end: bool = True


@dataclass
class WandbCfg:
    mode: str = "offline"  # disabled | offline | online (offline: local files under the run dir, no network)
    project: str = "axon"
    entity: Optional[str] = None


@dataclass
class LoggerCfg:
    wandb: WandbCfg = field(default_factory=WandbCfg)


@dataclass
class ClusterCfg:
    name: str = "local-cpu"
    nodes: int = 1
    gpus_per_node: int = 8
    peak_flops: float = 1e11
    hbm_bytes: float = 16e9
    host_bytes: float = 64e9
    intra_bw: float = 1e9
    inter_bw: float = 1e9
    intra_lat: float = 1e-5
    inter_lat: float = 1e-5
    host_bw: float = 1e10
    mem_bw: float = 1e11  # device memory bandwidth (bytes/s)
    compute_efficiency: float = 0.6  # fraction of peak_flops a whole Block reaches at large sizes
    gemm_half_dim: float = 64.0  # smallest GEMM dim at which half that rate is reached
    block_overhead_s: float = 0.0  # fixed seconds per Block forward + backward of a microbatch
    dtype_bytes: int = 2  # 2 = bf16 compute, 4 = fp32 (CPU)
    overhead_bytes: float = 2e9  # per device: context, allocator slack, buffers
    compute_units: int = 0  # processors the node's ranks share; 0 = one per device (GPUs)


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


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    launch: LaunchCfg = field(default_factory=LaunchCfg)
    run: RunCfg = field(default_factory=RunCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    slurm: SlurmCfg = field(default_factory=SlurmCfg)


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="axon_schema", node=Config)
    for group, node in (("model", ModelCfg), ("parallel", ParallelCfg), ("optim", OptimCfg),
                        ("data", DataCfg), ("cluster", ClusterCfg)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def load(overrides: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose configs/train.yaml with Hydra overrides (`model=tiny parallel.dp=4 ...`)."""
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# ---- frozen run configuration ----
@dataclass(frozen=True)
class Train:
    steps: int
    global_batch_size: int
    seq_len: int
    lr: float
    seed: int
    log_every: int
    dtype: str
    progress: bool


@dataclass(frozen=True)
class Optim:
    name: str
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip: float
    warmup_steps: int
    min_lr_ratio: float


@dataclass(frozen=True)
class Data:
    name: str
    path: Optional[str]
    dtype: str
    tokenizer: str
    val_fraction: float


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int
    backend: str
    timeout_s: float
    master_port: int


@dataclass(frozen=True)
class Checkpointing:
    every: int
    keep: int
    resume: str
    at_end: bool


@dataclass(frozen=True)
class Logging:
    wandb_mode: str
    wandb_project: str
    wandb_entity: Optional[str]


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


def _pick(cls: type, d: dict[str, Any], **extra: Any) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names}, **extra)


def freeze(cfg: DictConfig) -> RunConfig:
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    p = dict(raw["parallel"])
    auto = bool(p.pop("auto"))
    off = p.pop("offload")
    plan = Plan(offload=Offload(**off), **p)
    run_dir = Path(raw["run"]["dir"] or Path("runs") / raw["run"]["name"]).resolve()
    log = raw["logger"]["wandb"]
    return RunConfig(
        model=_pick(ModelSpec, raw["model"]),
        plan=plan,
        auto_plan=auto,
        cluster=_pick(Cluster, raw["cluster"]),
        train=_pick(Train, raw["train"]),
        optim=_pick(Optim, raw["optim"]),
        data=_pick(Data, raw["data"]),
        launch=_pick(Launch, raw["launch"]),
        checkpoint=_pick(Checkpointing, raw["checkpoint"]),
        logging=Logging(wandb_mode=log["mode"], wandb_project=log["project"], wandb_entity=log["entity"]),
        run_name=raw["run"]["name"],
        run_dir=run_dir,
        raw=raw,
    )
