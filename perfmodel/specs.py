"""Central frozen types shared by the planner, launcher, mechanisms and trainer.

`ModelSpec` is the model's shape, `Plan` the parallel layout (validated by `Plan.check` before
any process group exists), `Cluster` the hardware. Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zbh1", "zbv", "vhalf", "vmin")
RECOMPUTE = ("none", "selective", "full")
CP_MODES = ("ring", "ulysses")
AXES = ("pp", "dp", "cp", "tp_depth", "tp_row", "tp_col")  # outermost first; tp_col innermost


class PlanError(ValueError):
    """An invalid layout or model/plan combination; the message names the setting to change."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a GPT/Llama-family decoder."""

    n_layers: int = 8
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention; == n_heads is plain multi-head attention
    d_ff: int = 344
    vocab_size: int = 256
    max_seq_len: int = 1024  # positions the model supports (learned positions table size)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    pos: str = "rope"  # rope | learned
    mlp: str = "swiglu"  # swiglu | gelu
    tied_embeddings: bool = False
    bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise PlanError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise PlanError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise PlanError(f"RoPE needs an even head dim; change model.d_model or model.n_heads (head_dim={self.head_dim})")
        for name, value, allowed in (("norm", self.norm, ("rmsnorm", "layernorm")),
                                     ("pos", self.pos, ("rope", "learned")),
                                     ("mlp", self.mlp, ("swiglu", "gelu"))):
            if value not in allowed:
                raise PlanError(f"model.{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Offload:
    optimizer: bool = False  # fp32 master weights + Adam states in host memory, update on host
    activations: float = 0.0  # fraction of pipeline activations moved to host memory (PipeOffload)


@dataclass(frozen=True)
class Plan:
    """The parallel layout. tp = tp_col * tp_row * tp_depth; Megatron 1D TP is tp_col=tp."""

    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp_col: int = 1
    tp_row: int = 1
    tp_depth: int = 1
    zero: int = 0  # 0 = plain data parallel, 1/2/3 = ZeRO stage
    sequence_parallel: bool = False
    cp_mode: str = "ring"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    recompute_layers: int = -1  # how many layers per stage recompute; -1 = all
    offload: Offload = field(default_factory=Offload)
    # overlap switches
    overlap_grad_reduce: bool = True  # data parallel: bucketed async all-reduce during backward
    bucket_mb: float = 4.0  # data-parallel gradient bucket size (MiB)
    overlap_tp_input_grad: bool = True  # TP: async dX all-reduce overlapped with the dW GEMM
    overlap_tp_depth_reduce: bool = True  # TP: async dW reduce-scatter over tp_depth
    prefetch_tp_weights: bool = True  # TP: all-gather weights over depth one layer ahead
    cache_tp_weights: bool = False  # TP: keep gathered weights across microbatches of a step

    @property
    def tp(self) -> int:
        return self.tp_col * self.tp_row * self.tp_depth

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    @property
    def data_shards(self) -> int:
        """Ranks that see different samples: dp x tp_depth (depth acts as sharded data parallelism)."""
        return self.dp * self.tp_depth

    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.data_shards * self.micro_batch_size)

    def check(self, model: ModelSpec, world: int, global_batch_size: int, seq_len: int) -> None:
        """Raise PlanError naming the setting to change; never touches torch.distributed."""
        model.check()
        for axis in AXES + ("virtual_stages", "micro_batch_size"):
            if getattr(self, axis) < 1:
                raise PlanError(f"parallel.{axis}={getattr(self, axis)} must be >= 1")
        if self.world_size != world:
            shown = " x ".join(f"{a}={getattr(self, a)}" for a in AXES)
            raise PlanError(
                f"the layout {shown} covers {self.world_size} ranks but the job has {world}; "
                f"change parallel.dp (or another degree) so their product is {world}, "
                f"or launch.nproc_per_node / the number of tasks")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"parallel.zero={self.zero} must be 0, 1, 2 or 3")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"parallel.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"parallel.recompute={self.recompute!r} is not one of {RECOMPUTE}")
        if self.cp_mode not in CP_MODES:
            raise PlanError(f"parallel.cp_mode={self.cp_mode!r} is not one of {CP_MODES}")
        if not 0.0 <= self.offload.activations <= 1.0:
            raise PlanError(f"parallel.offload.activations={self.offload.activations} must be in [0, 1]")
        if self.bucket_mb <= 0:
            raise PlanError(f"parallel.bucket_mb={self.bucket_mb} must be > 0")
        self._check_model_split(model)
        self._check_batch(global_batch_size, seq_len, model)

    def _check_model_split(self, model: ModelSpec) -> None:
        # 3D tensor parallelism: heads split over tp_col; every weight piece split again over
        # tp_depth in whole rows (so checkpoints reshard as blocks)
        x, y, z = self.tp_col, self.tp_row, self.tp_depth
        for name, value, by, knob in (
                ("model.n_heads", model.n_heads, x, "parallel.tp_col"),
                ("model.n_kv_heads", model.n_kv_heads, x, "parallel.tp_col"),
                ("model.d_ff", model.d_ff, x * z, "parallel.tp_col * parallel.tp_depth"),
                ("model.vocab_size", model.vocab_size, x * z, "parallel.tp_col * parallel.tp_depth"),
                ("model.d_model", model.d_model, y * z, "parallel.tp_row * parallel.tp_depth"),
                ("model.d_model", model.d_model, x * z, "parallel.tp_col * parallel.tp_depth"),
                ("model.n_kv_heads * head_dim", model.n_kv_heads * model.head_dim, x * z,
                 "parallel.tp_col * parallel.tp_depth")):
            if value % by:
                raise PlanError(f"{name}={value} is not divisible by {knob} = {by}; change {name} or {knob}")
        if model.tied_embeddings and self.tp > 1:
            raise PlanError("model.tied_embeddings=true is not supported with tensor parallelism; set "
                            "model.tied_embeddings=false or parallel.tp_col = tp_row = tp_depth = 1")
        chunks = self.pp * self.virtual_stages
        if model.n_layers % chunks:
            raise PlanError(f"model.n_layers={model.n_layers} is not divisible by parallel.pp * "
                            f"parallel.virtual_stages = {chunks}; change parallel.pp or parallel.virtual_stages")
        if self.cp_mode == "ulysses" and self.cp > 1 and model.n_heads % (self.cp * x):
            raise PlanError(f"Ulysses context parallelism needs model.n_heads={model.n_heads} divisible by "
                            f"parallel.cp * parallel.tp_col = {self.cp * x}; change parallel.cp or set "
                            f"parallel.cp_mode=ring")

    def _check_batch(self, global_batch_size: int, seq_len: int, model: ModelSpec) -> None:
        per_step = self.data_shards * self.micro_batch_size
        if global_batch_size < 1 or global_batch_size % per_step:
            raise PlanError(
                f"train.global_batch_size={global_batch_size} is not divisible by parallel.dp * tp_depth * "
                f"parallel.micro_batch_size = {per_step}; change train.global_batch_size or parallel.micro_batch_size")
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise PlanError(f"train.seq_len={seq_len} is not divisible by 2 * parallel.cp = {2 * self.cp} "
                            f"(zig-zag context split); change train.seq_len or parallel.cp")
        if self.sequence_parallel and self.tp_col > 1 and (seq_len // self.cp) % self.tp_col:
            raise PlanError(f"sequence parallelism splits each rank's train.seq_len / parallel.cp = "
                            f"{seq_len // self.cp} tokens over parallel.tp_col={self.tp_col}; change train.seq_len "
                            f"or parallel.tp_col")
        if seq_len > model.max_seq_len:
            raise PlanError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}; "
                            f"raise model.max_seq_len or lower train.seq_len")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["offload"] = {"optimizer": self.offload.optimizer, "activations": self.offload.activations}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        off = d.pop("offload", {}) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown parallel setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(offload=Offload(**off), **d)

    def replace(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


@dataclass(frozen=True)
class Cluster:
    """Hardware a plan runs on; presets in configs/cluster/ (sources cited there)."""

    name: str = "local-cpu"
    nodes: int = 1
    gpus_per_node: int = 8
    peak_flops: float = 1e11  # per device, bf16 (fp32 for CPU)
    hbm_bytes: float = 16e9  # per device
    host_bytes: float = 64e9  # per node, for offload
    intra_bw: float = 1e9  # bytes/s per device, inside a node
    inter_bw: float = 1e9  # bytes/s per device, across nodes
    intra_lat: float = 1e-5  # seconds per message hop
    inter_lat: float = 1e-5
    host_bw: float = 1e10  # device <-> host copy bandwidth (bytes/s)
    mem_bw: float = 1e11  # device memory bandwidth (bytes/s); prices the optimizer step
    compute_efficiency: float = 0.6  # fraction of peak_flops a whole transformer Block reaches at large sizes
    gemm_half_dim: float = 64.0  # a GEMM whose smallest dim is this reaches half that rate
    # fixed seconds per Block forward + backward of a microbatch, whatever its size: operator dispatch
    # and kernel launches (calibrated for local-cpu; ~0 on GPUs, whose launches queue ahead)
    block_overhead_s: float = 0.0
    dtype_bytes: int = 2  # bytes per weight/activation element in compute (2 = bf16, 4 = fp32)
    overhead_bytes: float = 2e9  # per device: runtime context, allocator slack, comm buffers
    # processors the node's ranks share; 0 = one per device (GPUs). With more ranks than processors
    # (a CPU run) peak_flops is a rank's rate while all are busy, and a rank idle in the pipeline
    # bubble lends its share to the busy ones
    compute_units: int = 0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def ranks_per_unit(self) -> float:
        """How many ranks share one processor (1 on GPUs)."""
        return max(1.0, self.gpus_per_node / self.compute_units) if self.compute_units > 0 else 1.0
