"""Central frozen types shared by the planner, launcher, mechanisms and trainer.

`ModelSpec` is the model's shape, `Plan` the parallel layout (validated by `Plan.check`, i.e. the
rules of perfmodel/rules.py, before any process group exists), `Cluster` the hardware.
Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

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
    # Llama 3.1 RoPE frequency scaling (rope_type llama3): none | llama3, with its four settings
    rope_scaling: str = "none"
    rope_factor: float = 8.0  # long wavelengths are divided by this
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192  # original_max_position_embeddings
    init_std: float = 0.02
    kernels: str = "auto"  # auto (Triton on GPUs, PyTorch on CPU) | triton | torch: kernels/__init__.py

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self) -> None:
        """Raise PlanError naming the setting when the model's own shape is invalid
        (the rules live in perfmodel/rules.py)."""
        from perfmodel import rules

        found = rules.model_rules(self)
        if found:
            raise PlanError("; ".join(v.message for v in found))


@dataclass(frozen=True)
class Offload:
    optimizer: bool = False  # fp32 master weights + Adam states in host memory, update on host
    activations: float = 0.0  # fraction of pipeline activations moved to host memory (PipeOffload)


@dataclass(frozen=True)
class Plan:
    """The parallel layout. tp = tp_col * tp_row * tp_depth; Megatron 1D TP is tp_col=tp."""

    dp: int = 1  # data parallel degree
    pp: int = 1  # pipeline stages
    cp: int = 1  # context (sequence) parallel degree
    tp_col: int = 1  # tensor parallel, X axis (Megatron 1D TP is tp_col=t)
    tp_row: int = 1  # tensor parallel, Y axis
    tp_depth: int = 1  # tensor parallel, Z axis (weights sharded, batch split like DP)
    zero: int = 0  # 0 = plain data parallel, 1/2/3 = ZeRO stage
    sequence_parallel: bool = False  # Megatron-SP: activations split along the sequence over tp_col
    cp_mode: str = "ring"  # ring | ulysses
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zbh1 | zbv | vhalf | vmin (none: no pipeline)
    virtual_stages: int = 1  # chunks per rank: interleaved >= 1, V shapes (zbv, vhalf, vmin) 2, others 1
    micro_batch_size: int = 1  # sequences per microbatch per data shard
    recompute: str = "none"  # none | selective | full
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
        """Raise PlanError naming every setting to change (perfmodel/rules.py); never touches
        torch.distributed."""
        from perfmodel import rules

        rules.check(model, self, world, global_batch_size, seq_len)

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


@dataclass(frozen=True)
class Optim:
    """AdamW with warm-up + cosine learning-rate decay (axon/optim.py; ZeRO's flat-shard copy in
    parallel/zero_optim.py). The learning rate itself is `train.lr`."""

    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; norms and biases do not decay
    grad_clip: float = 1.0  # global-norm clipping threshold (0 disables)
    warmup_steps: int = 10  # linear warm-up from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
