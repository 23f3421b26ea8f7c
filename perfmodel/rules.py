"""Every rule that says whether a (model, plan, world, batch, sequence) can run: the one place
they live (docs/architecture.md, "Where each fact lives"). Standard library only.

    violations(model, plan, world, global_batch_size, seq_len) -> [Violation(knob, message), ...]
    check(model, plan, world, global_batch_size, seq_len)      # raises PlanError listing them all

`Plan.check`, the search's filter (which calls the groups below as it fixes each knob), the
launcher, `axon train|tune|submit` and the runtime all use these; no other module re-states a
rule. The groups, by what they read:
- `model_rules(model)`: the model's own shape;
- `setting_rules(plan)`: ranges and names of single settings;
- `split_rules(model, plan, seq_len)`: the degrees (and sequence parallelism) against the
  model's shape and the sequence: tensor-parallel divisibility (`tensor_rules`), context
  split, tied embeddings;
- `batch_rules(plan, global_batch_size)`: the global batch against the data shards;
- `cp_mode_rules(model, plan)`: the Ulysses head split;
- `chunk_rules(model, plan)`: the layers over the schedule's pipeline chunks;
- `schedule_rules(plan, microbatches)`: the pipeline schedule with the real microbatch count
  (chunks per rank, interleaving groups); the schedule builder checks with it too;
- `packed_rules(model, plan)`: what packed instruction data (several documents per row,
  axon/sft_data.py) cannot combine with; the trainer checks it when data.path is packed;
- `training_cluster_rules(cluster)`: what the performance model prices for other stacks' runs but
  Axon's trainer does not do (preflight refuses it before `axon train` or `axon submit` starts).
"""
from __future__ import annotations

from dataclasses import dataclass

from perfmodel.schedules import SCHEDULES, V_SHAPED, chunks_per_rank
from perfmodel.specs import AXES, Cluster, ModelSpec, Plan, PlanError

ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "selective", "full")  # cheapest first (the search relies on the order)
CP_MODES = ("ring", "ulysses")
REDUCE_DTYPES = ("fp32", "bf16")  # parallel.reduce_dtype: parallel/precision.py
NORMS, POSITIONS, MLPS = ("rmsnorm", "layernorm"), ("rope", "learned"), ("swiglu", "gelu")
KERNELS = ("auto", "triton", "torch")  # model.kernels: kernels/__init__.py
GEMM_TUNING = ("auto", "on", "off")  # model.gemm_tuning: kernels/gemm_tuning.py
ROPE_SCALINGS = ("none", "llama3")


@dataclass(frozen=True)
class Violation:
    knob: str  # the setting to change, e.g. "parallel.tp_col"
    message: str  # one line naming the setting and the fix

    def __str__(self) -> str:
        return self.message


def _v(knob: str, message: str) -> Violation:
    return Violation(knob, message)


def model_rules(m: ModelSpec) -> list[Violation]:
    out = []
    if m.n_heads < 1 or m.n_kv_heads < 1 or m.d_model % m.n_heads:
        out.append(_v("model.d_model", f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"))
    elif m.n_heads % m.n_kv_heads:
        out.append(_v("model.n_kv_heads",
                      f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}"))
    elif m.pos == "rope" and m.head_dim % 2:
        out.append(_v("model.d_model", f"RoPE needs an even head dim; change model.d_model or model.n_heads "
                                       f"(head_dim={m.head_dim})"))
    for name, value, allowed in (("norm", m.norm, NORMS), ("pos", m.pos, POSITIONS), ("mlp", m.mlp, MLPS),
                                 ("rope_scaling", m.rope_scaling, ROPE_SCALINGS), ("kernels", m.kernels, KERNELS),
                                 ("gemm_tuning", m.gemm_tuning, GEMM_TUNING)):
        if value not in allowed:
            out.append(_v(f"model.{name}", f"model.{name}={value!r} is not one of {allowed}"))
    if m.gemm_cache is not None and not m.gemm_cache.strip():
        out.append(_v("model.gemm_cache", "model.gemm_cache is empty; give a directory, or null for "
                                          "<run dir>/../gemm_cache"))
    return out


def setting_rules(p: Plan) -> list[Violation]:
    out = [_v(f"parallel.{a}", f"parallel.{a}={getattr(p, a)} must be >= 1")
           for a in AXES + ("virtual_stages", "micro_batch_size") if getattr(p, a) < 1]
    if p.zero not in ZERO_STAGES:
        out.append(_v("parallel.zero", f"parallel.zero={p.zero} must be 0, 1, 2 or 3"))
    for name, value, allowed in (("schedule", p.schedule, SCHEDULES),
                                 ("recompute", p.recompute, RECOMPUTE), ("cp_mode", p.cp_mode, CP_MODES),
                                 ("reduce_dtype", p.reduce_dtype, REDUCE_DTYPES)):
        if value not in allowed:
            out.append(_v(f"parallel.{name}", f"parallel.{name}={value!r} is not one of {allowed}"))
    if not 0.0 <= p.offload.activations <= 1.0:
        out.append(_v("parallel.offload.activations",
                      f"parallel.offload.activations={p.offload.activations} must be in [0, 1]"))
    if p.bucket_mb <= 0:
        out.append(_v("parallel.bucket_mb", f"parallel.bucket_mb={p.bucket_mb} must be > 0"))
    if p.recompute_layers < -1:
        out.append(_v("parallel.recompute_layers",
                      f"parallel.recompute_layers={p.recompute_layers} must be -1 (all) or >= 0"))
    return out


def world_rules(p: Plan, world: int) -> list[Violation]:
    if p.world_size == world:
        return []
    shown = " x ".join(f"{a}={getattr(p, a)}" for a in AXES)
    return [_v("parallel.dp", f"the layout {shown} covers {p.world_size} ranks but the job has {world}; change "
                              f"parallel.dp (or another degree) so their product is {world}, or "
                              f"launch.nproc_per_node / the number of tasks")]


def tensor_rules(m: ModelSpec, p: Plan) -> list[Violation]:
    """3D tensor parallelism: heads over tp_col; every weight piece split again over tp_depth in
    whole rows (so a depth slice is a row block and checkpoints reshard as blocks)."""
    x, y, z = p.tp_col, p.tp_row, p.tp_depth
    out = []
    for name, value, by, knob in (
            ("model.n_heads", m.n_heads, x, "parallel.tp_col"),
            ("model.n_kv_heads", m.n_kv_heads, x, "parallel.tp_col"),
            ("model.d_ff", m.d_ff, x * z, "parallel.tp_col * parallel.tp_depth"),
            ("model.vocab_size", m.vocab_size, x * z, "parallel.tp_col * parallel.tp_depth"),
            ("model.d_model", m.d_model, y * z, "parallel.tp_row * parallel.tp_depth"),
            ("model.d_model", m.d_model, x * z, "parallel.tp_col * parallel.tp_depth"),
            ("model.n_kv_heads * head_dim", m.n_kv_heads * m.head_dim, x * z, "parallel.tp_col * parallel.tp_depth")):
        if value % by:
            out.append(_v(knob.split(" ")[0], f"{name}={value} is not divisible by {knob} = {by}; "
                                              f"change {name} or {knob}"))
            break  # one tensor-split message: the first failing split names the knob
    if m.tied_embeddings and p.tp > 1:
        out.append(_v("model.tied_embeddings",
                      "model.tied_embeddings=true is not supported with tensor parallelism; set "
                      "model.tied_embeddings=false or parallel.tp_col = tp_row = tp_depth = 1"))
    return out


def split_rules(m: ModelSpec, p: Plan, seq_len: int) -> list[Violation]:
    if seq_len < 1:
        return [_v("train.seq_len", f"train.seq_len={seq_len} must be >= 1")]
    if m.n_heads < 1 or m.n_kv_heads < 1 or m.d_model % m.n_heads or min(p.degrees().values()) < 1:
        return []  # model_rules / setting_rules report it
    out = tensor_rules(m, p)
    if m.n_layers < p.pp:  # uneven splits are fine (perfmodel/split.py); every stage needs a layer
        out.append(_v("parallel.pp", f"model.n_layers={m.n_layers} is fewer than parallel.pp={p.pp} stages (each "
                                     f"needs a layer); lower parallel.pp"))
    if m.tied_embeddings and p.pp > 1:
        out.append(_v("model.tied_embeddings", "model.tied_embeddings=true with several pipeline chunks is not "
                                               "supported yet; set model.tied_embeddings=false or parallel.pp=1"))
    if p.cp > 1 and seq_len % (2 * p.cp):
        out.append(_v("parallel.cp", f"train.seq_len={seq_len} is not divisible by 2 * parallel.cp = {2 * p.cp} "
                                     f"(zig-zag context split); change train.seq_len or parallel.cp"))
    elif p.sequence_parallel and p.tp_col > 1 and (seq_len // p.cp) % p.tp_col:
        out.append(_v("parallel.tp_col", f"sequence parallelism splits each rank's train.seq_len / parallel.cp = "
                                         f"{seq_len // p.cp} tokens over parallel.tp_col={p.tp_col}; change "
                                         f"train.seq_len or parallel.tp_col"))
    if seq_len > m.max_seq_len:
        out.append(_v("train.seq_len", f"train.seq_len={seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                                       f"raise model.max_seq_len or lower train.seq_len"))
    return out


def batch_rules(p: Plan, global_batch_size: int) -> list[Violation]:
    per_step = p.data_shards * p.micro_batch_size
    if per_step >= 1 and global_batch_size >= 1 and global_batch_size % per_step == 0:
        return []
    return [_v("train.global_batch_size",
               f"train.global_batch_size={global_batch_size} is not divisible by parallel.dp * tp_depth * "
               f"parallel.micro_batch_size = {per_step}; change train.global_batch_size or "
               f"parallel.micro_batch_size")]


def cp_mode_rules(m: ModelSpec, p: Plan) -> list[Violation]:
    """Ulysses all-to-all splits each rank's query heads (n_heads / tp_col) over cp."""
    if p.cp_mode == "ulysses" and p.cp > 1 and m.n_heads % (p.cp * p.tp_col):
        return [_v("parallel.cp_mode", f"Ulysses context parallelism needs model.n_heads={m.n_heads} divisible by "
                                       f"parallel.cp * parallel.tp_col = {p.cp * p.tp_col}; change parallel.cp "
                                       f"or set parallel.cp_mode=ring")]
    return []


def schedule_rules(p: Plan, microbatches: int | None) -> list[Violation]:
    """The pipeline schedule with the real number of microbatches per step (what the schedule
    builder of perfmodel/schedules.py needs); None leaves out the rules that need the count."""
    if p.schedule not in SCHEDULES or p.pp < 1 or p.virtual_stages < 1:
        return []  # setting_rules reports it
    out = []
    want = 2 if p.schedule in V_SHAPED else 1
    if p.schedule != "interleaved" and p.virtual_stages != want:  # interleaved with 1 chunk is 1F1B
        out.append(_v("parallel.virtual_stages", f"parallel.schedule={p.schedule} places {want} chunk(s) per rank; "
                                                 f"set parallel.virtual_stages={want}"))
    if p.schedule == "none" and p.pp != 1:
        out.append(_v("parallel.schedule", f"parallel.schedule=none runs without a pipeline but parallel.pp={p.pp}; "
                                           f"pick a pipeline schedule or set parallel.pp=1"))
    if microbatches is None:
        return out
    if microbatches < 1:
        out.append(_v("train.global_batch_size", f"{microbatches} microbatches per step; raise "
                                                 f"train.global_batch_size or lower parallel.micro_batch_size"))
    elif p.schedule == "interleaved" and p.virtual_stages > 1 and microbatches % p.pp:
        out.append(_v("train.global_batch_size",
                      f"parallel.schedule=interleaved needs the microbatches per step ({microbatches}) to be a "
                      f"multiple of parallel.pp={p.pp}; change train.global_batch_size or parallel.micro_batch_size "
                      f"(microbatches = global_batch_size / (dp * tp_depth * micro_batch_size))"))
    return out


def chunk_rules(m: ModelSpec, p: Plan) -> list[Violation]:
    """The model's layers over the schedule's pipeline chunks (pp x chunks per rank)."""
    if p.schedule not in SCHEDULES or p.pp < 1 or p.virtual_stages < 1 or m.n_layers < p.pp:
        return []  # setting_rules / split_rules report it
    chunks = p.pp * chunks_per_rank(p.schedule, p.virtual_stages)
    out = []
    if m.n_layers < chunks:  # uneven splits are balanced by cost (perfmodel/split.py); a chunk needs a layer
        out.append(_v("parallel.virtual_stages", f"model.n_layers={m.n_layers} is fewer than the parallel.pp * "
                                                 f"chunks per rank = {chunks} pipeline chunks (each needs a layer); "
                                                 f"lower parallel.pp or parallel.virtual_stages"))
    if m.tied_embeddings and chunks > 1 and p.pp == 1:
        out.append(_v("model.tied_embeddings", "model.tied_embeddings=true with several pipeline chunks is not "
                                               "supported yet; set model.tied_embeddings=false or a one-chunk "
                                               "schedule (parallel.schedule=1f1b)"))
    return out


def packed_rules(m: ModelSpec, p: Plan) -> list[Violation]:
    """Packed rows (per-sample positions, attention kept within each document) need the positions
    where they are used: sequence-parallel learned positions do not split them by row yet."""
    out = []
    if m.pos == "learned" and p.sequence_parallel:
        out.append(_v("parallel.sequence_parallel", "packed instruction data with model.pos=learned does not support "
                                                    "parallel.sequence_parallel=true; set it to false or use "
                                                    "model.pos=rope"))
    return out


def training_cluster_rules(c: Cluster) -> list[Violation]:
    """Cluster settings that price another stack's published run (benchmarks/perfmodel_anchors.py):
    a run of Axon's trainer priced with them would be predicted for work it does not do."""
    out = []
    if c.float8_linears:
        out.append(_v("cluster.float8_linears", "cluster.float8_linears=true prices Float8 Linears, which Axon's "
                                                "trainer does not run (its Linears are bf16); set it to false"))
    if c.async_tp:
        out.append(_v("cluster.async_tp", "cluster.async_tp=true prices tensor-parallel collectives overlapped with "
                                          "every GEMM, which Axon's trainer does not do; set it to false"))
    return out


def violations(m: ModelSpec, p: Plan, world: int, global_batch_size: int, seq_len: int) -> list[Violation]:
    """Every reason (model, plan) cannot run `world` ranks at this batch and sequence; [] = valid."""
    out = model_rules(m) + setting_rules(p) + world_rules(p, world)
    out += split_rules(m, p, seq_len) + batch_rules(p, global_batch_size) + cp_mode_rules(m, p)
    out += chunk_rules(m, p)
    if p.data_shards >= 1 and p.micro_batch_size >= 1:
        out += schedule_rules(p, p.microbatches(global_batch_size))
    return out


def check(m: ModelSpec, p: Plan, world: int, global_batch_size: int, seq_len: int) -> None:
    """Raise PlanError naming every setting to change (one line); never touches torch."""
    raise_if(violations(m, p, world, global_batch_size, seq_len))


def raise_if(found: list[Violation]) -> None:
    """Raise PlanError with every violation in one line (the mechanisms re-check the groups
    they rely on with this when they are built)."""
    if found:
        raise PlanError("; ".join(v.message for v in found))
