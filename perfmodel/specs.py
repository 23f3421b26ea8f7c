"""Central frozen types shared by the planner, launcher, mechanisms and trainer.

`ModelSpec` is the model's shape, `Plan` the parallel layout (validated by `Plan.check`, i.e. the
rules of perfmodel/rules.py, before any process group exists), `Cluster` the hardware.
A numeric setting's allowed range is declared once, in its type's `RANGES` table next to the
fields, and checked by one function, `check_ranges` (axon/config.py's types use the same).
Standard library only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Optional

AXES = ("pp", "dp", "cp", "tp_depth", "tp_row", "tp_col")  # outermost first; tp_col innermost
STACKS = ("fused", "compiled", "eager")  # Cluster.stack: the software stacks a compute efficiency is given for


class PlanError(ValueError):
    """An invalid layout or model/plan combination; the message names the setting to change."""


class RangeError(ValueError):
    """A setting outside its declared range (`Range`); the message names it and the allowed values."""


@dataclass(frozen=True)
class Range:
    """The values a setting may take: a finite number within [low, high] (either end open or
    absent), or one of `choices`; `none_ok`: None (unset) is allowed too."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    none_ok: bool = False

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is outside the range (the allowed values), or None."""
        if value is None and self.none_ok:
            return None
        if self.choices:
            return None if value in self.choices else f"is not one of {', '.join(map(str, self.choices))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number {self.describe()}".rstrip()
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}" if below or above else None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"


def at_least(low: float, none_ok: bool = False) -> Range:
    return Range(low=low, none_ok=none_ok)


def above(low: float, none_ok: bool = False) -> Range:
    return Range(low=low, low_open=True, none_ok=none_ok)


def within(low: float, high: float, high_open: bool = False, low_open: bool = False) -> Range:
    return Range(low=low, high=high, low_open=low_open, high_open=high_open)


def one_of(*choices: Any) -> Range:
    return Range(choices=choices)


def range_problems(obj: Any, section: str = "") -> list[tuple[str, str]]:
    """(setting, one-line message) for each field of `obj` outside its type's `RANGES`; `section`
    (default: the type's `SECTION`) prefixes the setting names."""
    section = section or getattr(type(obj), "SECTION", "")
    out = []
    for name, allowed in getattr(type(obj), "RANGES", {}).items():
        value = getattr(obj, name)
        why = allowed.problem(value)
        if why:
            name = name.removeprefix(getattr(type(obj), "STRIP", ""))  # Logging.wandb_mode is logger.wandb.mode
            key = f"{section}.{name}" if section else name
            out.append((key, f"{key}={value!r} {why}"))
    return out


def check_ranges(obj: Any) -> None:
    """Raise RangeError naming every setting of `obj` outside its declared range (one line)."""
    found = range_problems(obj)
    if found:
        raise RangeError("; ".join(message for _, message in found))


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
    # GEMM layout tuning (kernels/gemm_tuning.py): auto (on on GPUs, off on CPU) | on | off; each Linear shape's
    # forward and gradient GEMMs timed in every layout once, decisions in <run dir>/gemm_tuning.json
    gemm_tuning: str = "auto"
    # directory of the per-device GEMM decision caches reused across runs; None = <run dir>/../gemm_cache
    gemm_cache: Optional[str] = None
    # numeric ranges (the names and divisibility rules are perfmodel/rules.py's model_rules)
    SECTION: ClassVar[str] = "model"
    RANGES: ClassVar[dict[str, Range]] = {
        **{n: at_least(1) for n in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size",
                                    "max_seq_len", "rope_original_max_len")},
        **{n: above(0) for n in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                                 "rope_high_freq_factor", "init_std")}}

    def __post_init__(self) -> None:
        check_ranges(self)

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
    # dtype of the data-parallel / ZeRO gradient reductions: fp32 | bf16 (half the bytes moved; the
    # sum over ranks rounded to bf16; gradients still accumulate in fp32): parallel/precision.py
    reduce_dtype: str = "fp32"

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
        """dataclasses.replace without its per-call field introspection (the search calls this
        hundreds of thousands of times); Plan has no __post_init__ to rerun."""
        new = object.__new__(Plan)
        new.__dict__.update(self.__dict__, **changes)
        if len(new.__dict__) != len(self.__dict__):
            raise TypeError(f"Plan has no field(s) {sorted(changes.keys() - self.__dict__.keys())}")
        return new


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
    # the software stack the Blocks run on, which sets the fraction of peak they reach (`efficiency`):
    # fused (fused kernels: Axon's Triton kernels, model.kernels=auto on GPUs; Megatron-LM; Meta's Llama 3
    # stack) | compiled (PyTorch ops under torch.compile: torchtitan with compile) | eager (PyTorch eager
    # ops: model.kernels=torch; torchtitan without torch.compile)
    stack: str = "fused"
    # fraction of peak_flops a whole transformer Block reaches at large sizes on the fused stack (each GPU
    # preset's is fitted on published runs, cited beside it in configs/cluster/*.yaml)
    compute_efficiency: float = 0.6
    # the same on the compiled and the eager stacks; None: compute_efficiency (a preset measured on its own
    # stack: local-cpu)
    compiled_efficiency: Optional[float] = None
    eager_efficiency: Optional[float] = None
    # Two techniques of other stacks, priced so that their published runs can be checked against the model
    # (benchmarks/perfmodel_anchors.py); Axon's trainer runs neither (bf16 Linears; TP collectives
    # overlapped with the weight-gradient GEMM only), so `axon train` refuses them (perfmodel/rules.py).
    # float8_linears: the Blocks' Linears run their three GEMMs in Float8 with dynamic tensorwise scaling
    # (torchao's Float8Linear; the output head stays bf16), float8_speedup x faster than in bf16 on the same
    # stack, the scaling and casts included (fitted per preset on a published bf16 / Float8 pair)
    float8_linears: bool = False
    float8_speedup: float = 1.0
    # async_tp: sequence-parallel TP's all-gathers and reduce-scatters decomposed and overlapped with the
    # GEMMs that consume or produce them, in both passes (torchtitan AsyncTP, Megatron-LM --tp-comm-overlap)
    async_tp: bool = False
    gemm_half_dim: float = 64.0  # a GEMM whose smallest dim is this reaches half that rate
    # the causal attention core's rate over the GEMMs' (flash attention kernels reach a smaller fraction of
    # peak than GEMMs; 1 where the Block's efficiency was measured as a whole: local-cpu)
    attention_efficiency: float = 1.0
    # fixed seconds per Block forward + backward of a microbatch, whatever its size: operator dispatch
    # and kernel launches (calibrated for local-cpu; ~0 on GPUs, whose launches queue ahead)
    block_overhead_s: float = 0.0
    dtype_bytes: int = 2  # bytes per weight/activation element in compute (2 = bf16, 4 = fp32)
    overhead_bytes: float = 2e9  # per device: runtime context, allocator slack, comm buffers
    # processors the node's ranks share; 0 = one per device (GPUs). With more ranks than processors
    # (a CPU run) peak_flops is a rank's rate while all are busy, and a rank idle in the pipeline
    # bubble lends its share to the busy ones
    compute_units: int = 0
    # CPU presets: how many ranks shared the compute_units processors while peak_flops, mem_bw, host_bw,
    # intra_bw, intra_lat and hbm_bytes were measured (axon tune --calibrate); 0 = gpus_per_node. See `sharing`
    measured_ranks: int = 0
    SECTION: ClassVar[str] = "cluster"
    RANGES: ClassVar[dict[str, Range]] = {
        "nodes": at_least(1), "gpus_per_node": at_least(1), "compute_units": at_least(0), "measured_ranks": at_least(0),
        "dtype_bytes": one_of(1, 2, 4, 8), "compute_efficiency": within(0, 1, low_open=True),
        "attention_efficiency": within(0, 1, low_open=True),
        "stack": one_of(*STACKS), "float8_speedup": at_least(1),
        **{n: Range(low=0, high=1, low_open=True, none_ok=True) for n in ("compiled_efficiency", "eager_efficiency")},
        **{n: above(0) for n in ("peak_flops", "hbm_bytes", "host_bytes", "intra_bw", "inter_bw", "host_bw",
                                 "mem_bw")},
        **{n: at_least(0) for n in ("intra_lat", "inter_lat", "gemm_half_dim", "block_overhead_s",
                                    "overhead_bytes")}}

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def efficiency(self) -> float:
        """Fraction of peak_flops a whole Block reaches on this cluster's software stack (`stack`)."""
        own = self.eager_efficiency if self.stack == "eager" else \
            self.compiled_efficiency if self.stack == "compiled" else None
        return self.compute_efficiency if own is None else own

    def sharing(self, ranks: int) -> "Cluster":
        """This cluster run with `ranks` ranks per node. On a CPU preset (compute_units > 0) a rank's
        rates and memory are its share of the machine: measured while measured_ranks ranks shared
        compute_units processors, a rank gets compute_units / max(ranks, compute_units) of them
        (one thread per rank uses at most one), so peak_flops, mem_bw, host_bw and intra_bw scale by
        max(U, measured) / max(U, ranks), the per-Block dispatch time (block_overhead_s, CPU time
        too) and intra_lat by its inverse, and the RAM per rank (hbm_bytes) by measured / ranks.
        The node's link is loopback: its bytes are copied by the ranks' own CPU share, and its
        latency is mostly waiting for peers that are descheduled (axon/calibrate.py), which a
        larger share shortens alike (at 4 ranks on 2 cores a dp=4 gradient sync waits about half
        of what the 8-rank constants give). Device presets are returned unchanged."""
        measured = self.measured_ranks or self.gpus_per_node
        if self.compute_units <= 0 or ranks == measured == self.gpus_per_node:
            return self
        units = self.compute_units
        scale = max(units, measured) / max(units, ranks)
        return replace(self, gpus_per_node=ranks, measured_ranks=ranks, peak_flops=self.peak_flops * scale,
                       mem_bw=self.mem_bw * scale, host_bw=self.host_bw * scale, intra_bw=self.intra_bw * scale,
                       block_overhead_s=self.block_overhead_s / scale, intra_lat=self.intra_lat / scale,
                       hbm_bytes=self.hbm_bytes * measured / ranks)

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
    SECTION: ClassVar[str] = "optim"
    RANGES: ClassVar[dict[str, Range]] = {
        "name": one_of("adamw"), "beta1": within(0, 1, high_open=True), "beta2": within(0, 1, high_open=True),
        "eps": above(0), "weight_decay": at_least(0), "grad_clip": at_least(0), "warmup_steps": at_least(0),
        "min_lr_ratio": within(0, 1)}

    def __post_init__(self) -> None:
        check_ranges(self)
