"""Per-rank memory: model states (every ZeRO stage, optimizer offload), activations (per
schedule, recomputation, sequence/context parallelism, activation offload), buffers, overhead.

Model states follow the ZeRO paper: bytes per parameter w (weights) + g (gradients) + K
(optimizer), K = 12 for mixed precision (fp32 master + Adam m, v) and 8 for pure fp32 training
(m, v only: the weights are already fp32). Activations follow Korthikanti et al. (docs/architecture.md,
Formulas), generalised to grouped-query attention, SwiGLU and the 3D tensor split. All sizes
are bytes on the most loaded rank.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from perfmodel.comm import tensor_volumes
from perfmodel.flops import layer_params
from perfmodel.specs import Cluster, ModelSpec, Plan
from perfmodel.split import stage_layers


@dataclass(frozen=True)
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # gathered weights (tp_depth, ZeRO-3) and other transient working sets
    overhead: float  # runtime context, allocator slack
    host: float = 0.0  # host bytes per device (offloaded optimizer states and activations)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.overhead

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def optimizer_bytes_per_param(dtype_bytes: int) -> int:
    """K of the ZeRO paper: fp32 master + Adam m, v (12) in mixed precision, m and v (8) in fp32."""
    return 12 if dtype_bytes < 4 else 8


def stage_params(m: ModelSpec, pp: int, seq_len: int) -> int:
    """Parameters of the largest pipeline stage (embedding on the first, head on the last; the
    layers of the most loaded stage of the cost-balanced split, perfmodel/split.py)."""
    emb = m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.pos == "learned" else 0)
    head = m.vocab_size * m.d_model  # a tied head is a copy of the embedding on the last stage
    final_norm = (2 if m.norm == "layernorm" else 1) * m.d_model
    blocks = stage_layers(m, pp, seq_len) * layer_params(m)
    if pp == 1:
        return blocks + emb + (0 if m.tied_embeddings else head) + final_norm
    return blocks + max(emb, head + final_norm)


def model_states(psi: float, shards: int, zero: int, dtype_bytes: int, offload_optimizer: bool = False
                 ) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes for `psi` parameters on a rank, ZeRO over `shards` ranks.
    Stage 0: (w+g+K)psi; 1: (w+g)psi + K psi/d; 2: w psi + (g+K)psi/d; 3: (w+g+K)psi/d."""
    w = g = dtype_bytes
    k = optimizer_bytes_per_param(dtype_bytes)
    d = shards
    params = w * psi / (d if zero >= 3 else 1)
    grads = g * psi / (d if zero >= 2 else 1)
    optimizer = k * psi / (d if zero >= 1 else 1)
    return params, grads, (0.0 if offload_optimizer else optimizer)


def layer_activation_bytes(m: ModelSpec, seq: int, batch: int, *, tp_col: int = 1, tp_row: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", cp: int = 1,
                           flash: bool = True, dropout: bool = False, dtype_bytes: int = 2) -> float:
    """Activation bytes one block keeps for backward, for `batch` sequences of `seq` tokens.

    Korthikanti et al. with s, b, h, a, t: sbh(34 + 5as/h) unsplit; TP t: sbh(10 + 24/t + 5as/(ht));
    selective recompute drops the 5as/h term; full recompute keeps 2sbh (the block input). Those
    numbers assume MHA, a GELU MLP of 4h, dropout and no fused attention (flash=False,
    dropout=True). This runtime (parallel/tensor.py) differs from Megatron in three ways, counted here:
    - 3D TP: the residual region [b, s, h/tp_row] is split over tp_row (and along the sequence over
      tp_col with SP); q, k, v, the attention output and the MLP interior are split over tp_col
      only (heads are computed redundantly over tp_row);
    - SP saves the sequence-gathered inputs of the attention and MLP input projections (the norm
      outputs, 4sbh in bf16), where Megatron-SP re-gathers them in backward: TP+SP is
      sbh(6/t + 4 + 24/t + 5as/(ht)), not (sbh/t)(34 + 5as/h);
    - RMSNorm keeps its normalized input besides its input (one more h per norm), and grouped-query
      k, v are saved at full head count (repeated before the fused attention kernel).
    With cp the local sequence is seq/cp (queries) against seq keys.
    """
    h, e = m.d_model, dtype_bytes
    sb = seq / cp * batch
    region = tp_row * (tp_col if sequence_parallel else 1)  # split of the residual stream
    if recompute == "full":
        return sb * h * e / region  # the block input only
    # k, v as the attention core saves them: grouped-query heads are repeated to all query heads
    # before the fused kernel (axon.model.attention_core), except when selective recomputation
    # re-runs the core (then its kv-sized inputs are what is kept)
    kv = m.n_kv_heads * m.head_dim if recompute == "selective" or not flash else h
    mlp_saved = 4 * m.d_ff if m.mlp == "swiglu" else 2 * m.d_ff  # gate, up, silu, product | pre/post GELU
    norms = 2 * (2 if m.norm == "rmsnorm" else 1) * h  # 2 norm inputs (+ RMSNorm's normalized inputs)
    residual = sb * (norms * e + (2 * h if dropout else 0)) / region  # (+ 2 dropout masks, 1 byte)
    projection_inputs = sb * 2 * h * e / tp_row  # the norm outputs (gathered over the sequence under SP)
    interior = sb * (2 * h + 2 * kv + mlp_saved) * e  # q, k, v, attention output, MLP interior
    scores = 0.0
    if not flash and recompute != "selective":
        per_score = e + (1 + e if dropout else 0)  # softmax output (+ dropout mask and output)
        scores = m.n_heads * seq / cp * seq * batch * per_score
    return residual + projection_inputs + (interior + scores) / tp_col


def stage_activation_bytes(m: ModelSpec, plan: Plan, seq: int, dtype_bytes: int, flash: bool = True) -> float:
    """One microbatch's activations of one whole pipeline stage (the unit of pipeline.py)."""
    layers = stage_layers(m, plan.pp, seq)
    k = layers if plan.recompute_layers < 0 else min(plan.recompute_layers, layers)
    common = dict(tp_col=plan.tp_col, tp_row=plan.tp_row, sequence_parallel=plan.sequence_parallel,
                  cp=plan.cp, flash=flash, dtype_bytes=dtype_bytes)
    b = plan.micro_batch_size
    if plan.recompute == "none":
        return layers * layer_activation_bytes(m, seq, b, **common)
    recomputed = layer_activation_bytes(m, seq, b, recompute=plan.recompute, **common)
    kept = layer_activation_bytes(m, seq, b, **common)
    return k * recomputed + (layers - k) * kept


def logits_bytes(m: ModelSpec, plan: Plan, seq: int, dtype_bytes: int) -> float:
    """The last stage's final norm, logits and their fp32 softmax for one microbatch (vocab split
    over tp_col, replicated over tp_row like the heads; the norm over tp_row)."""
    tokens = plan.micro_batch_size * seq / plan.cp
    norm = (3 if m.norm == "rmsnorm" else 2) * m.d_model / plan.tp_row * dtype_bytes  # input (+ normalized), output
    return tokens * (norm + m.vocab_size / plan.tp_col * (dtype_bytes + 4))


@dataclass(frozen=True)
class ActivationParts:
    """The pieces the schedule combines: one microbatch-stage (`unit`), the block rematerialized
    during backward under full recompute (`working`), the last stage's logits."""

    unit: float
    working: float
    logits: float


def activation_parts(m: ModelSpec, plan: Plan, seq: int, dtype_bytes: int, flash: bool = True) -> ActivationParts:
    working = 0.0
    if plan.recompute == "full":
        working = layer_activation_bytes(m, seq, plan.micro_batch_size, tp_col=plan.tp_col, tp_row=plan.tp_row,
                                         sequence_parallel=plan.sequence_parallel, cp=plan.cp, flash=flash,
                                         dtype_bytes=dtype_bytes)
    return ActivationParts(stage_activation_bytes(m, plan, seq, dtype_bytes, flash), working,
                           logits_bytes(m, plan, seq, dtype_bytes))


def combine_activations(parts: ActivationParts, pp: int, peak_units: float, head_units: float, offload: float,
                        last_holds_all: bool = False) -> tuple[float, float]:
    """(device, host) activation bytes on the most loaded rank.

    `peak_units` microbatch-stages are in flight on the busiest rank, `head_units` on the rank
    holding the head (pipeline.py); a fraction `offload` of all but the running one lives on the
    host. The head's rank also holds the running microbatch's final norm and logits (with pp = 1
    one rank holds everything). The logits are freed once the loss's backward has passed the
    head, before full recomputation rematerializes a block (`working`), so the two never coexist.
    `last_holds_all` (GPipe: every forward before any backward): the head's rank keeps every
    in-flight microbatch's logits too."""
    waiting = max(peak_units - 1.0, 0.0) * parts.unit
    held = parts.unit + waiting * (1 - offload)
    if pp == 1:
        return held + max(parts.working, parts.logits), waiting * offload
    if last_holds_all:
        head = head_units * (parts.unit + parts.logits)
    else:
        head = parts.unit + max(head_units - 1.0, 0.0) * parts.unit * (1 - offload) + max(parts.working, parts.logits)
    return max(held + parts.working, head), waiting * offload


def state_bytes(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> tuple[float, float, float, float, float]:
    """(params, grads, optimizer, buffers, host) bytes: model states on the largest stage, sharded
    over the tensor group and, by ZeRO, over dp x cp; gathered-weight buffers; offloaded states."""
    e = c.dtype_bytes
    psi = stage_params(m, plan.pp, seq) / plan.tp
    shards = plan.dp * plan.cp
    params, grads, optimizer = model_states(psi, shards, plan.zero, e, plan.offload.optimizer)
    buffers = 0.0
    if plan.tp_depth > 1:  # gathered block weights: current + prefetched, or every block when cached
        block = tensor_volumes(m, plan, 0, e).weights
        buffers += block * (stage_layers(m, plan.pp, seq) if plan.cache_tp_weights else 2)
    if plan.zero >= 3:  # ZeRO-3 gathers a block's parameters (current + prefetched)
        buffers += 2 * layer_params(m) / plan.tp * e
    host = 0.0
    if plan.offload.optimizer:
        host = optimizer_bytes_per_param(e) * psi / (shards if plan.zero >= 1 else 1)
    return params, grads, optimizer, buffers, host


def memory(m: ModelSpec, plan: Plan, c: Cluster, seq: int, peak_units: float, head_units: float) -> Memory:
    """Everything a rank holds at its peak; `peak_units` / `head_units` from the pipeline schedule."""
    params, grads, optimizer, buffers, host = state_bytes(m, plan, c, seq)
    parts = activation_parts(m, plan, seq, c.dtype_bytes)
    acts, host_acts = combine_activations(parts, plan.pp, peak_units, head_units, plan.offload.activations,
                                          plan.schedule == "gpipe")
    return Memory(params, grads, optimizer, acts, buffers, c.overhead_bytes, host + host_acts)
