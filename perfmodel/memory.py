"""Per-rank memory: model states (every ZeRO stage, optimizer offload), activations (per
schedule, recomputation, sequence/context parallelism, activation offload), buffers, overhead.

Model states are what the runtime keeps (parallel/precision.py): bytes per parameter w (weights)
+ g (gradients) + K (optimizer). Gradients are accumulated and reduced in fp32 (g = 4) and Adam's
m and v are fp32 (K = 8); in fp32 training w = 4, in mixed precision w = 2 + 4 (the bf16 compute
weights and the fp32 master, which lives with the optimizer and is sharded with it at stages 1-3,
as in Megatron's distributed optimizer). So mixed precision is 18 bytes per parameter at stage 0,
6 + 12/d at stage 1, 2 + 16/d at stage 2, 18/d at stage 3 (the ZeRO paper's 4 + 12/d and 2 + 14/d
keep 16-bit gradients). With the optimizer offloaded the host holds 16 bytes per parameter of the
shard (fp32 master, m, v
and the gradient's landing buffer) and the device keeps w + g. Activations follow Korthikanti
et al. (docs/architecture.md, Formulas), generalised to grouped-query attention, SwiGLU and the
3D tensor split, term by term as the runtime saves them (docs/activation_memory.md). All sizes
are bytes on the most loaded rank.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from perfmodel.comm import tensor_volumes
from perfmodel.flops import layer_params
from perfmodel.pipeline import ScheduleCost, schedule_cost
from perfmodel.specs import Cluster, ModelSpec, Plan
from perfmodel.split import RankLoad, rank_loads, stage_layers


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


GRAD_BYTES = 4  # gradients accumulate in fp32 (parallel/precision.py); reduced in `reduce_bytes`
MASTER_BYTES = 4  # mixed precision: the fp32 master weights beside the compute copy


def reduce_bytes(plan: Plan) -> int:
    """Bytes per gradient element the data-parallel / ZeRO reductions move (`parallel.reduce_dtype`,
    parallel/precision.py): fp32, or a bf16 copy."""
    return 2 if plan.reduce_dtype == "bf16" else GRAD_BYTES


def optimizer_bytes_per_param(dtype_bytes: int) -> int:
    """K: Adam's m and v in fp32 (the fp32 master, in mixed precision, is counted with the weights)."""
    return 8


def master_bytes_per_param(dtype_bytes: int) -> int:
    """The fp32 master beside narrower compute weights (mixed precision); none in fp32."""
    return MASTER_BYTES if dtype_bytes < MASTER_BYTES else 0


def host_optimizer_bytes_per_param() -> int:
    """Optimizer offload (parallel/offload.py): the host keeps the fp32 master, Adam's m and v and
    a landing buffer for the fp32 gradient, whatever the compute dtype."""
    return MASTER_BYTES + 8 + GRAD_BYTES


def rank_params(m: ModelSpec, load: RankLoad) -> int:
    """Parameters of a pipeline rank holding `load` (perfmodel/split.py `rank_loads`): its Blocks,
    the embedding with the first chunk, the head and final norm with the last (a tied head is a
    copy of the embedding, unless both are on one rank)."""
    emb = m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.pos == "learned" else 0)
    head = m.vocab_size * m.d_model + (2 if m.norm == "layernorm" else 1) * m.d_model
    if m.tied_embeddings and load.embedding and load.head:
        head -= m.vocab_size * m.d_model
    return load.layers * layer_params(m) + (emb if load.embedding else 0) + (head if load.head else 0)


@lru_cache(maxsize=4096)
def stage_params(m: ModelSpec, pp: int, seq_len: int, schedule: str = "1f1b", virtual_stages: int = 1) -> int:
    """Parameters of the most loaded pipeline rank, as the runtime places them (perfmodel/split.py
    `rank_loads`: the cost-balanced split of the layers into the schedule's chunks, and each
    rank's chunks by `schedules.placement`: round robin, or V-shaped with the first and the last
    chunk on rank 0)."""
    return max(rank_params(m, load) for load in rank_loads(m, pp, seq_len, schedule, virtual_stages))


def model_states(psi: float, shards: int, zero: int, dtype_bytes: int, offload_optimizer: bool = False
                 ) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes for `psi` parameters on a rank, ZeRO over `shards` ranks.
    Stage 0: (w+g+K)psi; 1: (e+g)psi + (m+K)psi/d; 2: e psi + (m+g+K)psi/d; 3: (w+g+K)psi/d, with
    w = e (compute weights) + m (the fp32 master of mixed precision, sharded from stage 1: parallel/zero.py).
    An offloaded optimizer's device keeps its master shard too (the host update writes into it)."""
    e, m, g = dtype_bytes, master_bytes_per_param(dtype_bytes), GRAD_BYTES
    k = optimizer_bytes_per_param(dtype_bytes)
    d = shards
    params = e * psi / (d if zero >= 3 else 1) + m * psi / (d if zero >= 1 else 1)
    grads = g * psi / (d if zero >= 2 else 1)
    optimizer = k * psi / (d if zero >= 1 else 1)
    return params, grads, (0.0 if offload_optimizer else optimizer)


def layer_activation_terms(m: ModelSpec, seq: int, batch: int, *, tp_col: int = 1, tp_row: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", cp: int = 1,
                           ulysses: bool = False, flash: bool = True, dropout: bool = False,
                           dtype_bytes: int = 2, residual_bytes: int | None = None) -> dict[str, float]:
    """Activation bytes one block keeps for backward, for `batch` sequences of `seq` tokens, term by
    term (the table in docs/activation_memory.md, against Korthikanti et al.'s terms).

    `dtype_bytes` is the compute dtype; `residual_bytes` the residual stream's (the norm inputs and
    the block input; default the same: the paper's all-16-bit layer, and the trainer's bf16, whose
    compute weights make the embedding and residual stream bf16 (parallel/precision.py); plain
    autocast over fp32 weights keeps the residual stream fp32: residual_bytes=4). Per token, unsplit, with kv = n_kv_heads * head_dim:
    - norm inputs: the two norms' inputs, 2h (the norms keep no normalized copy);
    - projection inputs: the two norm outputs, 2h, each saved once by the projections reading it;
    - q, k, v: h + 2kv (grouped-query K/V are never saved repeated);
    - attention output: h (the fused core's output is the output projection's saved input);
    - mlp: SwiGLU 3 d_ff (gate, up: the SwiGLU's inputs; their product: the down projection's
      input; silu(gate) is recomputed), GELU 2 d_ff (its input and output);
    - dropout masks (dropout=True): 2h bytes; scores (flash=False, no selective recomputation):
      the softmax output a*s_keys (+ dropout mask and output);
    - statistics: fp32 numbers per token (RMSNorm rstd 1 / LayerNorm mean and rstd 2 per norm,
      the fused core's log-sum-exp a), under 0.3% of the rest for h >= 1024; listed so that a
      measurement can account for every byte, left out of `layer_activation_bytes`.
    Splits: 3D TP (parallel/tensor.py) splits the residual region [b, s, h/tp_row] over tp_row (and
    the sequence over tp_col with SP); q, k, v, the attention output and the MLP interior over
    tp_col only (heads are computed redundantly over tp_row). SP saves the projection inputs'
    sequence shard and re-gathers it in backward, as Megatron-SP. Selective recomputation
    re-runs the core from its saved inputs (no scores, no log-sum-exp); full recomputation keeps
    the block input only. With cp the local sequence is seq/cp (queries) against seq keys; Ulysses
    (`ulysses`, cp > 1) keeps the attention output twice: the core's, head-sharded, and the output
    projection's input after the second all-to-all (parallel/context.py).
    """
    h, e = m.d_model, dtype_bytes
    r = e if residual_bytes is None else residual_bytes
    sb = seq / cp * batch
    region = tp_row * (tp_col if sequence_parallel else 1)  # split of the residual stream
    if recompute == "full":
        return {"block input": sb * h * r / region}
    kv = m.n_kv_heads * m.head_dim
    mlp = (3 if m.mlp == "swiglu" else 2) * m.d_ff
    scores = 0.0
    if not flash and recompute != "selective":
        per_score = e + (1 + e if dropout else 0)  # softmax output (+ dropout mask and output)
        scores = m.n_heads * seq / cp * seq * batch * per_score / tp_col
    norm_stats = 2 * (1 if m.norm == "rmsnorm" else 2) / (tp_col if sequence_parallel else 1)
    lse = m.n_heads / tp_col if flash and recompute == "none" else 0.0
    return {
        "norm inputs": sb * 2 * h * r / region,
        "projection inputs": sb * 2 * h * e / region,  # the sequence shard under SP (re-gathered in backward)
        "q, k, v": sb * (h + 2 * kv) * e / tp_col,
        "attention output": sb * h * e / tp_col * (2 if ulysses and cp > 1 else 1),
        "mlp": sb * mlp * e / tp_col,
        "dropout masks": sb * 2 * h / region if dropout else 0.0,  # 1 byte per element
        "scores": scores,
        "statistics": sb * 4 * (norm_stats + lse),
    }


def layer_activation_bytes(m: ModelSpec, seq: int, batch: int, **kw) -> float:
    """Activation bytes one block keeps for backward (`layer_activation_terms`, same keywords),
    without the per-token statistics. Korthikanti et al. (flash=False, dropout=True, MHA, GELU MLP
    of 4h, LayerNorm): sbh(34 + 5as/h) unsplit; TP t: sbh(10 + 24/t + 5as/(ht)); TP+SP in this
    runtime sbh(6/t + 4 + 24/t + 5as/(ht)); selective drops the 5as/h term; full keeps 2sbh."""
    return sum(v for k, v in layer_activation_terms(m, seq, batch, **kw).items() if k != "statistics")


def stage_activation_bytes(m: ModelSpec, plan: Plan, seq: int, dtype_bytes: int, flash: bool = True) -> float:
    """One microbatch's activations of one whole pipeline stage (the unit of pipeline.py)."""
    layers = stage_layers(m, plan.pp, seq)
    k = layers if plan.recompute_layers < 0 else min(plan.recompute_layers, layers)
    common = dict(tp_col=plan.tp_col, tp_row=plan.tp_row, sequence_parallel=plan.sequence_parallel,
                  cp=plan.cp, ulysses=plan.cp_mode == "ulysses", flash=flash, dtype_bytes=dtype_bytes)
    b = plan.micro_batch_size
    if plan.recompute == "none":
        return layers * layer_activation_bytes(m, seq, b, **common)
    recomputed = layer_activation_bytes(m, seq, b, recompute=plan.recompute, **common)
    kept = layer_activation_bytes(m, seq, b, **common)
    return k * recomputed + (layers - k) * kept


def fused_head_loss(m: ModelSpec, plan: Plan, tokens: float) -> bool:
    """Whether the last chunk's head and loss run fused by token chunks (parallel/head_loss.py), for
    a microbatch of `tokens` on this rank (micro_batch_size * seq / cp, the count of its targets).
    Only where it pays: the head's input whole on each rank of its vocabulary split (no tensor
    parallelism, or 1D over tp_col: tp_row = tp_depth = 1; the 3D head keeps its logits) and the
    tokens spanning more than one chunk of `loss_chunk_tokens`. Fusing a single chunk saves only
    the logits kept for backward (the working set is the same chunk) and adds the backward's
    recompute of the head matmul: the tiny CPU model ran 15% fewer tokens/s fused (issue 14)."""
    if plan.tp_row > 1 or plan.tp_depth > 1:
        return False
    return tokens > loss_chunk_tokens(tokens, m.d_model, m.vocab_size // plan.tp_col)


LOSS_MIN_CHUNK = 256  # the fewest tokens per chunk `loss_chunk_tokens` picks


def loss_chunk_tokens(tokens: float, width: int, vocab: int) -> int:
    """Tokens per chunk of the fused head loss (kernels/linear_ce.py): a chunk's logits [C, V] about
    the size of the hidden states [N, h] (Liger-Kernel's rule), a power of two, at least
    LOSS_MIN_CHUNK (narrower matmuls run far below peak: 16-row chunks ran the CPU loss step 4x
    slower than 256-row ones)."""
    c = max(1, math.ceil(tokens / max(1, math.ceil(vocab / width))))
    return max(LOSS_MIN_CHUNK, 1 << (c - 1).bit_length())


def logits_bytes(m: ModelSpec, plan: Plan, seq: int, dtype_bytes: int) -> float:
    """The last stage's final norm and loss for one microbatch (vocab split over tp_col, replicated
    over tp_row like the heads; the norm over tp_row, and its sequence over tp_col under SP), with
    one chunk of logits and its fp32 copy, alive while the loss runs (kernels/linear_ce.py and
    kernels/cross_entropy.py run the same chunks). Fused (`fused_head_loss`): the norm's input, the
    head's input (gathered whole under SP) and the fp32 log-sum-exp per token. Unfused: the norm's
    input and output (under SP the head re-gathers its input), the logits and the log-sum-exp."""
    tokens = plan.micro_batch_size * seq / plan.cp
    region = plan.tp_row * (plan.tp_col if plan.sequence_parallel else 1)  # the residual stream's split
    vocab = m.vocab_size / plan.tp_col
    working = min(tokens, loss_chunk_tokens(tokens, m.d_model, int(vocab))) * vocab * (dtype_bytes + 4)
    if fused_head_loss(m, plan, tokens):
        return tokens * ((m.d_model / region + m.d_model) * dtype_bytes + 4) + working
    norm = 2 * m.d_model / region * dtype_bytes  # input, output
    return tokens * (norm + vocab * dtype_bytes + 4) + working


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
                                         sequence_parallel=plan.sequence_parallel, cp=plan.cp,
                                         ulysses=plan.cp_mode == "ulysses", flash=flash, dtype_bytes=dtype_bytes)
    return ActivationParts(stage_activation_bytes(m, plan, seq, dtype_bytes, flash), working,
                           logits_bytes(m, plan, seq, dtype_bytes))


def combine_activations(parts: ActivationParts, pp: int, cost: ScheduleCost) -> tuple[float, float]:
    """(device, host) activation bytes on the most loaded rank.

    `cost` (perfmodel/pipeline.py `schedule_cost`, with the plan's activation offload) gives the
    microbatch-stage units on the device on the busiest rank and on the rank holding the head
    (pipeline.py), and those in host memory. The head's rank also holds the running microbatch's
    final norm and logits (with pp = 1 one rank holds everything). The logits are freed once the
    loss's backward has passed the head, before full recomputation rematerializes a block
    (`working`), so the two never coexist; with GPipe (every forward before any backward,
    `head_logits` > 1) the head's rank keeps every in-flight microbatch's logits."""
    held, host = cost.peak_activations * parts.unit, cost.offloaded * parts.unit
    if pp == 1:
        return held + max(parts.working, parts.logits), host
    if cost.head_logits > 1:
        head = cost.head_activations * parts.unit + cost.head_logits * parts.logits
    else:
        head = cost.head_activations * parts.unit + max(parts.working, parts.logits)
    return max(held + parts.working, head), host


def state_bytes(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> tuple[float, float, float, float, float]:
    """(params, grads, optimizer, buffers, host) bytes: model states on the largest stage, sharded
    over the tensor group and, by ZeRO, over dp x cp; gathered-weight buffers; offloaded states."""
    e = c.dtype_bytes
    psi = stage_params(m, plan.pp, seq, plan.schedule, plan.virtual_stages) / plan.tp
    shards = plan.dp * plan.cp
    params, grads, optimizer = model_states(psi, shards, plan.zero, e, plan.offload.optimizer)
    buffers = 0.0
    if plan.tp_depth > 1:  # gathered block weights: current + prefetched, or every block of the rank when cached
        blocks = 2
        if plan.cache_tp_weights:
            blocks = max(r.layers for r in rank_loads(m, plan.pp, seq, plan.schedule, plan.virtual_stages))
        buffers += tensor_volumes(m, plan, 0, e).weights * blocks
    if plan.zero >= 3:  # ZeRO-3 gathers a block's parameters (current + prefetched)
        buffers += 2 * layer_params(m) / plan.tp * e
    host = 0.0
    if plan.offload.optimizer:
        host = host_optimizer_bytes_per_param() * psi / (shards if plan.zero >= 1 else 1)
    return params, grads, optimizer, buffers, host


def memory(m: ModelSpec, plan: Plan, c: Cluster, seq: int, microbatches: int) -> Memory:
    """Everything a rank holds at its peak, running `microbatches` per step under the plan's schedule."""
    params, grads, optimizer, buffers, host = state_bytes(m, plan, c, seq)
    parts = activation_parts(m, plan, seq, c.dtype_bytes)
    cost = schedule_cost(plan.schedule, plan.pp, microbatches, plan.virtual_stages, plan.offload.activations)
    acts, host_acts = combine_activations(parts, plan.pp, cost)
    return Memory(params, grads, optimizer, acts, buffers, c.overhead_bytes, host + host_acts)
