"""`kiln plan`: a pre-flight estimate of a run, before any GPU is touched.

For the composed config it reports parameters, training FLOPs per token, Chinchilla-optimal
tokens (and compute-optimal size for a budget), per-GPU memory for DeepSpeed ZeRO 0/1/2/3 and
FSDP2 split into weights, gradients, optimizer state, working buffers and activations (with and
without activation checkpointing), whether each fits, and the wall time at an assumed MFU.

Memory model (bytes per parameter, Psi parameters, N data-parallel ranks), checked against the
live tensor bytes of real runs (bench/memory.py):

* bf16 mixed precision (the GPU default): 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master,
  Adam m and v) = 16, as in the ZeRO paper. ZeRO-1 shards the 12, ZeRO-2 also the grads,
  ZeRO-3 everything. FSDP2 keeps sharded fp32 parameters (4), sharded fp32 gradients (4) and
  Adam m and v (8): also 16 / N. fp32 training (CPU): 4 + 4 + 8, except that DeepSpeed keeps
  its fp32 master partition as a copy even of fp32 weights (optimizer 12 / N). Under HSDP
  (`engine.replicate_degree` R) FSDP2 shards over N / R ranks. The run's own row of a DeepSpeed
  engine that offloads moves the optimizer state and gradient partition (and with
  offload_params the parameter partitions) off the GPU into host memory (`offload_memory`).
* Working buffers, from what the engines allocate (DeepSpeed 0.19.8, torch FSDP2): ZeRO-1/2
  hold one reduce bucket (two with overlap_comm) and, on more than one rank, a flat copy of the
  bucket for the all-reduce; the step then flattens the gradient partition to fp32. ZeRO-3
  holds one reduce bucket for the whole run and, on more than one rank, keeps gathered every
  parameter it will use again within `stage3_max_reuse_distance` (a whole model below 500M
  parameters) plus one prefetch bucket's flat all-gather output. FSDP gathers the largest unit
  in the compute dtype for the running and the prefetched unit, and holds its unsharded
  gradient. A non-fused AdamW (CPU) makes two temporaries of each tensor it steps: DeepSpeed's
  flat partition. DDP in bf16 (autocast over fp32 weights) keeps a bf16 copy of every weight.
* Activations (Korthikanti et al. 2022, re-derived per tensor so GQA, gated MLPs, MoE,
  cross-attention, QK-norm and attention masks are counted; within 3% of the measured blocks
  of every family on the CPU, test_plan.py): SDPA's fused kernels keep no attention-score
  matrix (T5's learned bias takes the math kernel, which does). The peak is the largest moment
  of the backward pass (`backward_peak`): at the loss, or at a block with the blocks before it.
  Activation checkpointing (of every block, or every k-th) keeps a recomputed block's input
  until its backward pass. The loss holds 12 bytes per logit at its peak (fp32 log-probabilities and, in
  the backward pass, two fp32 gradients of the same size). Under context parallelism
  (`engine.context_parallel` C) a rank holds seq_len / C tokens of each row, plus the whole
  row's keys and values, gathered for attention; the batch is split over N / C ranks.
* Start-up: DDP and ZeRO-1/2 ranks build the whole model in fp32 before the engine casts it, so
  4 Psi (plus the engine's first copy of the weights) is a peak of its own; `fits` checks it.
  FSDP2 and ZeRO-3 ranks build an empty model and rank 0 the weights in host memory
  (`host_weights`), which reach each GPU one whole tensor at a time.
* Sizes are printed in GiB (2^30 bytes); JSON carries bytes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pretrain.config import (
    DeepSpeedEngineConfig,
    EncoderDecoderConfig,
    FSDPEngineConfig,
    KilnConfig,
    ModelConfig,
    TrainerConfig,
    plan_strategy,
    use_fused,
)
from pretrain.models import checkpointed_block
from pretrain.models.accounting import (
    ParamCounts,
    count_parameters,
    head_fraction,
    is_moe_block,
    training_flops,
)
from pretrain.objectives import encoder_decoder_lengths

GIB = 2**30
STRATEGIES = ("zero0", "zero1", "zero2", "zero3", "fsdp")
DEEPSPEED = ("zero1", "zero2", "zero3")
# DeepSpeed ZeRO-3 defaults that kiln's DeepSpeed config leaves alone, in elements
# (deepspeed/runtime/zero/config.py: stage3_prefetch_bucket_size, stage3_max_reuse_distance).
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000
DDP_BROADCAST_BUCKET = 250 * 2**20  # bytes, DistributedDataParallel's broadcast_bucket_size
LOSS_BYTES_PER_LOGIT = 12  # fp32 log-probabilities + two fp32 gradients in the loss's backward


@dataclass
class MemoryEstimate:
    """Per-GPU memory of one sharding strategy, in bytes."""

    strategy: str  # the row's key: zero0-3, fsdp (`plan_strategy` names the run's)
    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    activations_checkpointed: int
    startup: int = 0  # while the engine takes the model over (see `startup_memory`)
    host_weights: int = 0  # host memory of the fp32 weights rank 0 builds (FSDP2, ZeRO-3)
    # what the row is as the run configures it: "hsdp (shard 8)", "zero3+offload"
    label: str = ""
    offload: list[str] = field(default_factory=list)  # offloaded: "optimizer", "params"
    host: int = 0  # peak host memory per rank of what DeepSpeed offloads (`offload_memory`)
    host_per_node: int = 0  # `host` times the ranks of a node
    total: int = 0
    total_checkpointed: int = 0
    fits: bool = False  # max(total, startup) within the device's budget
    fits_checkpointed: bool = False

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass
class PrecisionBytes:
    """Bytes per parameter for weights, gradients and optimizer state."""

    name: str
    weights: int
    gradients: int
    optimizer: int
    activation: int  # bytes per stored activation element


def precision_bytes(cfg: KilnConfig) -> PrecisionBytes:
    precision = cfg.engine.precision
    if precision == "auto":
        precision = "bf16" if cfg.cluster.accelerator == "cuda" else "fp32"
    if precision == "bf16":
        return PrecisionBytes("bf16", 2, 2, 12, 2)
    return PrecisionBytes("fp32", 4, 4, 8, 4)


def model_state_memory(
    strategy: str,
    params: int,
    ranks: int,
    precision: PrecisionBytes,
    *,
    zero1_reduces_in_backward: bool = False,
) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per GPU for a strategy.

    Args:
        strategy: one of `STRATEGIES`.
        params: parameters (Psi).
        ranks: ranks the strategy shards over (N): every rank, or an HSDP group's
            (`shard_ranks`).
        precision: bytes per parameter of the run's precision.
        zero1_reduces_in_backward: ZeRO-1 reduces each gradient bucket during the backward pass
            and keeps only its own partition (DeepSpeed does with overlap_comm on the last
            micro-batch of a step, i.e. on every one without gradient accumulation); False:
            full gradients, as the ZeRO paper counts them.
    """
    w, g, o = precision.weights * params, precision.gradients * params, precision.optimizer * params
    if strategy in DEEPSPEED and precision.name == "fp32":
        # DeepSpeed clones an fp32 master partition even from fp32 weights and steps that copy
        # (stage_1_and_2.py `single_partition_of_fp32_groups`, stage3.py `_create_fp32_partitions`)
        o = 12 * params
    if strategy == "zero0":
        return w, g, o
    if strategy == "zero1":
        return w, g // ranks if zero1_reduces_in_backward else g, o // ranks
    if strategy == "zero2":
        return w, g // ranks, o // ranks
    if strategy == "zero3":
        return w // ranks, g // ranks, o // ranks
    if strategy == "fsdp":
        # Sharded fp32 parameters double as the master copy: move 2 bytes of the 12 into weights.
        if precision.name == "bf16":
            return 4 * params // ranks, 4 * params // ranks, 8 * params // ranks
        return w // ranks, g // ranks, o // ranks
    raise ValueError(f"unknown strategy {strategy}")


def ranks_of(cfg: KilnConfig) -> int:
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def context_parallel(cfg: KilnConfig) -> int:
    """Ranks that split each sequence (`engine.context_parallel`, engine=ddp; 1: none)."""
    return max(1, getattr(cfg.engine, "context_parallel", 1))


def data_parallel_ranks(cfg: KilnConfig) -> int:
    """Ranks that take sequences of their own: the trainer's `dp_world` (pretrain/trainer.py),
    over which the global batch is split into micro-batches and accumulation steps."""
    return ranks_of(cfg) // context_parallel(cfg)


def deepspeed_engine(cfg: KilnConfig) -> DeepSpeedEngineConfig:
    """The run's DeepSpeed settings, or DeepSpeed's as kiln configures it by default (the
    ZeRO rows of a plan for another engine)."""
    if isinstance(cfg.engine, DeepSpeedEngineConfig):
        return cfg.engine
    return DeepSpeedEngineConfig()


def fsdp_engine(cfg: KilnConfig) -> FSDPEngineConfig:
    """The run's FSDP2 settings, or the defaults (the fsdp row of a plan for another engine)."""
    if isinstance(cfg.engine, FSDPEngineConfig):
        return cfg.engine
    return FSDPEngineConfig()


def shard_ranks(cfg: KilnConfig, strategy: str) -> int:
    """Ranks a strategy's sharded states are split over: every rank, except under HSDP
    (`engine.replicate_degree` > 1), whose 2-D mesh shards within groups of ranks /
    replicate_degree and replicates across the groups (`pretrain.engine.fsdp.build_mesh`)."""
    if strategy == "fsdp":
        return ranks_of(cfg) // fsdp_engine(cfg).replicate_degree
    return ranks_of(cfg)


def offloaded(cfg: KilnConfig, strategy: str) -> tuple[bool, bool]:
    """(optimizer, parameters): what the run's DeepSpeed engine keeps in host memory
    (`engine.offload_optimizer`, `engine.offload_params`), in its own row only: the other rows
    are the preset engines, which offload nothing."""
    engine = cfg.engine
    if not isinstance(engine, DeepSpeedEngineConfig) or strategy != plan_strategy(engine):
        return False, False
    if strategy not in DEEPSPEED:  # stage 0 offloads nothing (DeepSpeed refuses it)
        return False, False
    return engine.offload_optimizer, engine.offload_params


def row_label(cfg: KilnConfig, strategy: str) -> str:
    """What a memory row is under the run's settings: the strategy ("ddp" for ZeRO stage 0,
    plain data parallel), "hsdp (shard S)" for
    FSDP2 with `engine.replicate_degree` > 1 (S: the ranks that share the states),
    "zeroN+offload"."""
    if strategy == "fsdp" and fsdp_engine(cfg).replicate_degree > 1:
        return f"hsdp (shard {shard_ranks(cfg, strategy)})"
    if any(offloaded(cfg, strategy)):
        return f"{strategy}+offload"
    return "ddp" if strategy == "zero0" else strategy  # what engine= takes


def offload_memory(
    cfg: KilnConfig, strategy: str, params: int, precision: PrecisionBytes,
    states: tuple[int, int, int],
) -> tuple[tuple[int, int, int], int]:  # fmt: skip
    """The (weights, gradients, optimizer) bytes left on each GPU of a row whose engine
    offloads (`offloaded`), and the peak host bytes per rank (DeepSpeed 0.19.8):

    * offload_optimizer: the fp32 master partition and Adam's m and v (the optimizer column)
      live in host memory, with an fp32 gradient partition that each reduced bucket is copied
      into (stage_1_and_2.py `initialize_optimizer_states`, stage3.py
      `fp32_partitioned_groups_flat[i].grad`) and a compute-dtype buffer of the partition
      (ZeRO-1/2's `param_buffer_of_bit16_for_cpu_offload_groups`, ZeRO-3's
      `grad_partitions_flat_buffer`): the GPU keeps no gradient partition. The step runs on the
      host, with torch's AdamW (kiln sets `zero_force_ds_cpu_optimizer=False`), built for CPU
      tensors: not fused unless `optim.fused=true`, so two fp32 temporaries of the partition at
      its peak (`optimizer_step_bytes`).
    * offload_params (ZeRO-3): the compute-dtype parameter partitions too (`offload_param`);
      the GPU gathers parameters as before (buffers).
    """
    weights, gradients, optimizer = states
    offload_optimizer, offload_params = offloaded(cfg, strategy)
    partition = math.ceil(params / ranks_of(cfg))
    host = 0
    if offload_optimizer:
        temporaries = 0 if use_fused(cfg.optim, "cpu") else 8 * partition
        host += optimizer + (4 + precision.weights) * partition + temporaries
        gradients = optimizer = 0
    if offload_params:
        host += weights
        weights = 0
    return (weights, gradients, optimizer), host


def zero1_reduces_in_backward(cfg: KilnConfig) -> bool:
    """Whether ZeRO-1 reduces gradients bucket by bucket during the backward pass and keeps
    only its partition: DeepSpeed does with overlap_comm on a step's last micro-batch
    (`process_gradients`), so on every micro-batch without gradient accumulation; earlier
    micro-batches keep whole gradients."""
    accumulation = cfg.data.global_batch_size // (
        cfg.data.micro_batch_size * data_parallel_ranks(cfg)
    )
    return deepspeed_engine(cfg).overlap_comm and accumulation <= 1


def optimizer_step_bytes(partition: int, fused: bool) -> int:
    """Transient bytes of a DeepSpeed optimizer step over a flat partition of `partition`
    elements: the gradient partition flattened to fp32 (stage_1_and_2.py `step`, stage3.py
    `_prepare_fp32_grad_for_sub_group`), and without the fused kernel AdamW's two temporaries
    of the tensor it steps (`exp_avg_sq.sqrt()` and its division by the bias correction, in
    torch's `_single_tensor_adam`). Per-parameter optimizers (DDP, FSDP) make temporaries of one
    parameter at a time: not counted."""
    return 4 * partition + (0 if fused else 8 * partition)


def buffer_memory(
    strategy: str, counts: ParamCounts, cfg: KilnConfig, precision: PrecisionBytes
) -> int:
    """Working buffers the strategy allocates on top of the model states (the largest of what
    it holds in the backward pass and in the optimizer step)."""
    half = precision.weights  # bytes of the compute dtype: gathered weights, buckets
    psi, ranks = counts.total, ranks_of(cfg)
    partition = math.ceil(psi / ranks)
    engine = deepspeed_engine(cfg)
    device = "cuda" if cfg.cluster.accelerator == "cuda" else "cpu"
    step = optimizer_step_bytes(partition, use_fused(cfg.optim, device))
    offload_optimizer = offloaded(cfg, strategy)[0]
    if offload_optimizer:
        step = 0  # the step runs in host memory (`offload_memory`)
    # kiln caps DeepSpeed's buckets at the model's size (engine/deepspeed_engine.py)
    bucket = min(engine.reduce_bucket_size, psi)
    if strategy in ("zero1", "zero2"):
        # Gradients are copied into a contiguous reduce bucket (`setup_buckets`: a second one
        # with overlap_comm, so one fills while the other is reduced); on several ranks the
        # bucket is all-reduced through a flat copy (`allreduce_bucket`). The all-gather after
        # the step writes into the flat weights in place: no allgather bucket is allocated.
        copy = bucket * half if ranks > 1 else 0
        partitioned = strategy == "zero2" or zero1_reduces_in_backward(cfg)
        if offload_optimizer:
            # No gradient partition on the GPU: each parameter's reduced gradient goes to the
            # host through a buffer of the largest parameter (`temp_grad_buffer_for_gpu_offload`)
            copy += half * largest_tensor(cfg.model)
        elif partitioned and bucket >= psi:
            # One bucket holds every gradient: the rank's partition of them (counted with the
            # model states) is copied out of it (`copy_grads_in_partition`) only after the
            # all-reduce's flat copy is freed, so the two are not held at once.
            copy = max(0, copy - half * partition)
        backward = (2 if engine.overlap_comm else 1) * bucket * half + copy
        return max(backward, step)
    if strategy == "zero3":
        # One reduce bucket for the whole run (`_setup_for_real_optimizer`). A parameter is
        # released after its module only if its next use lies beyond stage3_max_reuse_distance
        # elements of the trace; its next use is in the backward pass, twice the rest of the
        # forward away, so the last max_reuse_distance / 2 elements stay gathered, plus the
        # flat all-gather output of one prefetch bucket (each parameter's tensor is a copy cut
        # from it: `AllGatherCoalescedHandle.wait`). A single rank gathers nothing.
        gathered = 0
        if ranks > 1:
            gathered = half * (
                min(psi, ZERO3_MAX_REUSE_DISTANCE // 2) + min(psi, ZERO3_PREFETCH_BUCKET)
            )
        return bucket * half + max(gathered, step)
    if strategy == "fsdp":
        return 2 * half * counts.largest_unit + 4 * counts.largest_unit
    if precision.name == "bf16":
        # DDP trains fp32 weights under autocast, which makes a bf16 copy of every weight for
        # its matmuls and keeps it for the backward pass (measured under CPU autocast, eager
        # and compiled: test_plan.py). Gradients are views of DDP's buckets: no second copy.
        return 2 * psi
    return 0


def startup_memory(
    strategy: str, counts: ParamCounts, cfg: KilnConfig, precision: PrecisionBytes
) -> int:
    """Peak bytes per GPU while the engine takes the model over.

    * DDP (zero0) and ZeRO-1/2 ranks build the whole model in fp32 (`build_model`, then
      `.to(device)`: 4 Psi). DDP keeps it as it is; on several ranks it first broadcasts rank
      0's weights through flat copies of up to 250 MiB (`_sync_module_states`,
      `broadcast_bucket_size`). ZeRO-1/2 casts it to the compute dtype and copies it into one
      flat buffer (`flatten_dense_tensors_aligned`), then clones the fp32 master partition
      and, to set up the optimizer, a zero-filled fp32 gradient of the same size
      (`initialize_optimizer_states`).
    * FSDP2 ranks build an empty model on the meta device; `fully_shard` allocates the fp32
      shards, and rank 0's weights (in host memory: `host_weights`) arrive one whole tensor at
      a time, each rank keeping its shard (`set_model_state_dict(broadcast_from_rank0)`):
      the shards plus the largest tensor.
    * ZeRO-3 ranks build under `deepspeed.zero.Init`, each parameter made whole in fp32 and
      partitioned at once, then gathered whole in turn for rank 0's values; then DeepSpeed
      holds the partitions, the fp32 master partition, the flat gradient partition and the
      reduce bucket (`_setup_for_real_optimizer`); Adam's moments come with the first step.

    The figure matters when it exceeds the running total: a replicated model's fp32 build can
    be larger than a rank's share of everything else.
    """
    psi, ranks = counts.total, ranks_of(cfg)
    partition = math.ceil(psi / shard_ranks(cfg, strategy))
    half = precision.weights
    built = 4 * psi
    tensor = 4 * largest_tensor(cfg.model)
    # offloaded, the fp32 master and gradient partitions (and ZeRO-3's parameter partitions)
    # are made in host memory (`offload_memory`)
    offload_optimizer, offload_params = offloaded(cfg, strategy)
    if strategy == "fsdp":
        return 4 * partition + tensor
    if strategy in ("zero1", "zero2"):
        master = 0 if offload_optimizer else 8 * partition
        return max(built, 2 * half * psi, half * psi + master)
    if strategy == "zero3":
        bucket = min(deepspeed_engine(cfg).reduce_bucket_size, psi)
        weights = 0 if offload_params else half * partition
        master = 0 if offload_optimizer else (half + 4) * partition
        return max(weights + tensor, weights + master + half * bucket)
    if ranks > 1:
        return built + min(built, DDP_BROADCAST_BUCKET)
    return built


def largest_tensor(model: ModelConfig) -> int:
    """Elements of the model's largest parameter: the token embedding (or an untied output
    projection), a feed-forward matrix, or an MoE layer's stacked expert weights."""
    d = model.d_model
    sizes = [model.vocab_size * d, model.d_ff * d]
    if model.position == "learned":
        sizes.append(model.max_seq_len * d)
    if model.moe.n_experts:
        sizes.append(model.moe.n_experts * d * (model.moe.d_expert or model.d_ff))
    return max(sizes)


def block_activation_bytes(
    model: ModelConfig,
    index: int,
    tokens: int,
    element: int,
    context_tokens: int = 0,
    kv_tokens: int = 0,
    scores: int = 0,
) -> int:
    """Bytes kept for the backward pass by one transformer block over `tokens` tokens.

    Args:
        model: the model config.
        index: block index (decides dense or MoE feed-forward).
        tokens: micro-batch tokens through this block (b * s).
        element: bytes per activation element (2 for bf16, 4 for fp32).
        context_tokens: encoder tokens for a decoder block's cross-attention (0: none).
        kv_tokens: tokens of the self-attention's keys and values when more than `tokens`:
            context parallelism gathers every rank's slice of the row for SDPA, which keeps
            them for its backward pass (0: `tokens`).
        scores: bytes the self-attention keeps beyond q, k, v and its output
            (`attention_extra_bytes`: a mask SDPA converts, or T5's probabilities).
    """
    d, inner = model.d_model, model.n_heads * model.resolved_head_dim
    kv_inner = model.resolved_kv_heads * model.resolved_head_dim
    mask = 1 if model.dropout > 0 else 0  # dropout masks are one byte per element
    # Self-attention: the q/k/v projections' input, q, k, v and the attention output (which
    # the out projection reads as a view), and SDPA's fp32 log-sum-exp per head.
    lse = tokens * model.n_heads * 4
    attention = tokens * (d + 2 * inner + 2 * kv_inner) * element + lse + tokens * d * mask
    attention += scores
    if kv_tokens > tokens:  # the other ranks' keys and values, gathered (context parallelism)
        attention += (kv_tokens - tokens) * 2 * kv_inner * element
    # A norm keeps its input; RMSNorm (composed of elementwise ops) its normalised value too,
    # for its gain's gradient (measured on the CPU: test_plan.py)
    per_norm = 2 if model.norm == "rmsnorm" else 1
    norms = 2 * per_norm * tokens * d * element
    if model.qk_norm:  # QK-norm, likewise over q and k
        norms += per_norm * tokens * (inner + kv_inner) * element
    if context_tokens:
        # Cross-attention: the q projection's input, q, k and v over encoder tokens, output.
        attention += (tokens * (d + 2 * inner) + context_tokens * 2 * kv_inner) * element + lse
        norms += per_norm * tokens * d * element
        if model.qk_norm:
            norms += per_norm * (tokens * inner + context_tokens * kv_inner) * element
    # gate, up, activation and product; or fc1's output and the activation's (ReLU's is its
    # own input's saved copy: the out projection and ReLU's backward share it)
    per_ff = (4 if model.gated else 1 if model.activation == "relu" else 2) * element
    if is_moe_block(model, index):
        moe = model.moe
        d_ff = moe.d_expert or model.d_ff
        routed = moe.top_k * tokens
        # three (routed tokens, d_model) tensors (the permuted inputs, the experts' outputs and
        # their weighted copies, measured on the CPU: test_plan.py) and the experts' hiddens
        mlp = routed * (3 * d * element + per_ff * d_ff)
        mlp += moe.n_shared_experts * tokens * per_ff * d_ff + tokens * moe.n_experts * 4  # router
    else:
        mlp = tokens * per_ff * model.d_ff
    mlp += tokens * d * element + tokens * d * mask  # feed-forward input, dropout mask
    return attention + norms + mlp


def attention_extra_bytes(cfg: KilnConfig, batch: int, queries: int, keys: int,
                          element: int) -> tuple[int, int]:  # fmt: skip
    """(bytes each self-attention layer keeps beyond q, k, v and its output; bytes kept once
    for all of them), for `queries` x `keys` attention over `batch` rows.

    * A boolean mask (document masking, which the loader's rows use by default; a window) is
      turned by SDPA into a (B or 1, 1, T, S) mask in the compute dtype, which each layer keeps
      (measured on the CPU, test_plan.py, and on an H200: 0.375 GiB for gpt2_124m's 12 layers
      at 16 x 1024 with document masks, bench/results/gpu_h200_2026-11-28.json).
    * ALiBi's float (B or 1, H, T, S) bias is built once per forward and shared by the layers.
    * T5's learned relative bias needs its gradient, which only SDPA's math kernel gives: it
      keeps each layer's (B, H, T, S) probabilities.
    """
    model = cfg.model
    rows = batch if cfg.data.document_masking else 1
    if model.position == "relative":
        return batch * model.n_heads * queries * keys * element, 0
    if model.position == "alibi":
        return 0, rows * model.n_heads * queries * keys * element
    if cfg.data.document_masking or model.attention_window is not None:
        return rows * queries * keys * element, 0
    return 0, 0


def compiled_loss(cfg: KilnConfig, strategy: str) -> bool:
    """Whether a run of `strategy` compiles the forward with the cross-entropy: with
    `engine.compile`, DDP (the zero0 row) under compile_scope auto or loss, unless context
    parallelism makes auto pick blocks (`pretrain.engine.compile_scope`)."""
    if strategy != "zero0" or not cfg.engine.compile or cfg.engine.compile_scope == "blocks":
        return False
    return getattr(cfg.engine, "context_parallel", 1) == 1


def loss_compilation(cfg: KilnConfig, strategy: str) -> str:
    """How a run of `strategy` computes its cross-entropy: "chunked", with the output head a
    chunk of tokens at a time (`engine.loss_chunk_tokens`); "eager"; "forward", compiled with
    the forward (`compiled_loss`); or "cross_entropy", compiled on its own over the logits
    (`engine.compile` with compile_scope blocks: FSDP2, DeepSpeed, context parallelism)."""
    if cfg.engine.loss_chunk_tokens > 0:
        return "chunked"
    if not cfg.engine.compile:
        return "eager"
    return "forward" if compiled_loss(cfg, strategy) else "cross_entropy"


def loss_convention(cfg: KilnConfig) -> str:
    """What the activations column assumes of the cross-entropy, row by row."""
    if cfg.engine.loss_chunk_tokens > 0:
        return (f"the head and cross-entropy {cfg.engine.loss_chunk_tokens} tokens at a time "
                "(engine.loss_chunk_tokens): one chunk's logits, 4 bytes each (plus their "
                "compute-dtype copy in bf16), and the head's fp32 weight gradient")  # fmt: skip
    if not cfg.engine.compile:
        return "the cross-entropy eager, 12 bytes per logit (engine.compile=true lowers it)"
    fused = [s for s in STRATEGIES if loss_compilation(cfg, s) == "forward"]
    apart = [s for s in STRATEGIES if loss_compilation(cfg, s) == "cross_entropy"]
    parts = []
    if fused:
        parts.append(f"{', '.join(fused)}: compiled with the forward, 1 element per logit")
    if apart:
        parts.append(f"{', '.join(apart)}: compiled on its own, 2 elements per logit")
    return "the cross-entropy under engine.compile=true: " + "; ".join(parts)


def activation_memory(cfg: KilnConfig, element: int, *, loss: str = "eager") -> tuple[int, int]:
    """(without, with) activation checkpointing (of every block, or of every
    `engine.activation_checkpointing_every`-th): bytes for one micro-batch on one rank (its
    slice of each sequence under context parallelism).
    `loss`: how the cross-entropy is computed (`loss_compilation`)."""
    model, batch = cfg.model, cfg.data.micro_batch_size
    d = model.d_model
    held = 0  # bytes activation checkpointing keeps beyond the blocks' inputs
    if isinstance(model, EncoderDecoderConfig):
        enc_len, dec_len = encoder_decoder_lengths(cfg)
        enc_scores = attention_extra_bytes(cfg, batch, enc_len, enc_len, element)[0]
        dec_scores = attention_extra_bytes(cfg, batch, dec_len, dec_len, element)[0]
        enc = [
            block_activation_bytes(model, i, batch * enc_len, element, scores=enc_scores)
            for i in range(model.n_encoder_layers)
        ]
        dec = [
            block_activation_bytes(
                model,
                i,
                batch * dec_len,
                element,
                context_tokens=batch * enc_len,
                scores=dec_scores,
            )  # fmt: skip
            for i in range(model.n_decoder_layers)
        ]
        # T5's probabilities (`scores`) have a gradient of their size in the backward pass;
        # its bias, built once per stack, is an input activation checkpointing keeps
        enc_backward = backward_bytes(model, batch * enc_len, element) + enc_scores
        dec_backward = backward_bytes(model, batch * dec_len, element) + dec_scores
        stacks = [Stack(enc, batch * enc_len * d * element, enc_backward),
                  Stack(dec, batch * dec_len * d * element, dec_backward)]  # fmt: skip
        if model.position == "relative":
            held = model.n_heads * (enc_len**2 + dec_len**2) * element
        logit_tokens = batch * dec_len
        outside = batch * (enc_len + dec_len) * d * element  # final norms' inputs
    else:
        # under context parallelism a rank holds its slice of each row: activations, the head
        # and the loss over seq_len / context_parallel tokens, keys and values over the row
        cp = context_parallel(cfg)
        seq = cfg.data.seq_len // cp
        scores, shared = attention_extra_bytes(cfg, batch, seq, seq * cp, element)
        blocks = [
            block_activation_bytes(
                model, i, batch * seq, element, kv_tokens=batch * seq * cp, scores=scores
            )  # fmt: skip
            for i in range(model.n_layers)
        ]
        stacks = [Stack(blocks, batch * seq * d * element,
                        backward_bytes(model, batch * seq, element))]  # fmt: skip
        logit_tokens = batch * seq
        outside = batch * seq * d * element + shared
    # The loss's peak, at the start of its backward pass: the fp32 log-probabilities that
    # log_softmax keeps, nll_loss's gradient and log_softmax's input gradient, each B x T x V
    # fp32 (in bf16 the head's bf16 logits are gone by then and their gradient comes later).
    # Compiled with the forward, the cross-entropy keeps only the head's logits in the compute
    # dtype: the cast, log-softmax and its gradient fuse into kernels that write per-row
    # figures, and the logits' gradient replaces them (measured: 4 bytes per logit on the CPU
    # in fp32, test_plan.py; 2 in bf16 on an H200, bench/gpu_models.py, 9.1 GiB under the
    # eager loss at 16 x 1024 x 50304). Compiled on its own, it keeps the logits it was given
    # and writes their gradient: two elements per logit (measured on the CPU: 7.1 bytes in
    # fp32, 4.2 in bf16 under autocast; test_plan.py).
    # In chunks (engine.loss_chunk_tokens), the loss holds one chunk's fp32 logits at a time
    # (turned into their gradient in place; in bf16 also the matmul's bf16 output, then the
    # gradient's bf16 copy), the fp32 gradient of the head's weight and the hidden states'
    # gradient, both computed in the forward pass, and in bf16 the chunk's (V, d) bf16 share
    # of the weight's gradient before it is added (measured on the CPU: test_plan.py).
    if loss == "chunked":
        chunk = min(cfg.engine.loss_chunk_tokens, logit_tokens)
        low = element if element < 4 else 0  # the compute dtype's copies, under bf16
        loss_bytes = (chunk * model.vocab_size * (4 + low) + model.vocab_size * d * (4 + low)
                      + 2 * logit_tokens * d * element)  # fmt: skip
    else:
        per_logit = {"eager": LOSS_BYTES_PER_LOGIT, "forward": element,
                     "cross_entropy": 2 * element}[loss]  # fmt: skip
        loss_bytes = logit_tokens * model.vocab_size * per_logit + logit_tokens * d * element
    full = outside + backward_peak(stacks, None, loss_bytes)
    checkpointed = outside + held + backward_peak(stacks, _checkpoint_every(cfg), loss_bytes)
    return full, checkpointed


def _checkpoint_every(cfg: KilnConfig) -> int:
    return max(1, getattr(cfg.engine, "activation_checkpointing_every", 1))


@dataclass
class Stack:
    """One stack of blocks for `backward_peak`: each block's activations, the bytes of one
    block's input, and the gradients one block's backward pass holds at once."""

    blocks: list[int]
    input_bytes: int
    backward: int


def backward_bytes(model: ModelConfig, tokens: int, element: int) -> int:
    """The gradients a block's backward pass holds at once beyond its saved tensors: two of
    the feed-forward's widest (its hidden width, over the tokens a dense block or MoE routing
    gives it) and two of the residual stream's (measured on the CPU: test_plan.py)."""
    width = model.d_ff
    if model.moe.n_experts:
        width = max(width, model.moe.top_k * (model.moe.d_expert or model.d_ff))
    return tokens * (2 * width + 2 * model.d_model) * element


def backward_peak(stacks: list[Stack], every: int | None, loss_bytes: int) -> int:
    """The blocks' and the loss's peak in the backward pass, with activation checkpointing of
    every `every`-th block of each stack (`pretrain.models.checkpointed_block`; None: none).

    A recomputed block keeps only its input until its backward pass, the others everything.
    The backward pass starts at the loss, with every block's kept bytes live, then runs the
    blocks last to first: at block i the blocks before it still hold theirs, block i holds its
    activations whole (recomputed or kept) and the gradients of its backward pass. The peak is
    the largest of these moments (within 3% of the measured peaks, every family, test_plan.py).
    """
    sequence = [(block, stack.input_bytes, stack.backward) for stack in stacks
                for block in stack.blocks]  # fmt: skip
    flags = [every is not None and checkpointed_block(index, every)
             for stack in stacks for index in range(len(stack.blocks))]  # fmt: skip
    kept = [inputs if recomputed else block
            for (block, inputs, _), recomputed in zip(sequence, flags, strict=True)]  # fmt: skip
    peak, before = sum(kept) + loss_bytes, 0
    for (block, _, backward), own in zip(sequence, kept, strict=True):
        peak = max(peak, before + block + backward)
        before += own
    return peak


def estimate_memory(cfg: KilnConfig, counts: ParamCounts) -> list[MemoryEstimate]:
    precision = precision_bytes(cfg)
    by_loss = {kind: activation_memory(cfg, precision.activation, loss=kind)
               for kind in ("eager", "forward", "cross_entropy", "chunked")}  # fmt: skip
    budget = cfg.cluster.gpu_memory_gib * GIB * (1.0 - cfg.plan.memory_reserve)
    estimates = []
    for strategy in STRATEGIES:
        activations, checkpointed = by_loss[loss_compilation(cfg, strategy)]
        states = model_state_memory(
            strategy,
            counts.total,
            shard_ranks(cfg, strategy),
            precision,
            zero1_reduces_in_backward=zero1_reduces_in_backward(cfg),
        )
        (weights, gradients, optimizer), host = offload_memory(
            cfg, strategy, counts.total, precision, states
        )
        estimate = MemoryEstimate(
            strategy=strategy,
            weights=weights,
            gradients=gradients,
            optimizer=optimizer,
            buffers=buffer_memory(strategy, counts, cfg, precision),
            activations=activations,
            activations_checkpointed=checkpointed,
            startup=startup_memory(strategy, counts, cfg, precision),
            host_weights=4 * counts.total if strategy in ("fsdp", "zero3") else 0,
            label=row_label(cfg, strategy),
            offload=[
                name
                for name, on in zip(("optimizer", "params"), offloaded(cfg, strategy), strict=True)
                if on
            ],
            host=host,
            host_per_node=host * cfg.cluster.gpus_per_node,
        )
        base = estimate.model_states + estimate.buffers
        estimate.total = base + activations
        estimate.total_checkpointed = base + checkpointed
        # on a CPU cluster the "device" is host memory: offloading frees none of it
        resident = host if cfg.cluster.accelerator == "cpu" else 0
        estimate.fits = max(estimate.total + resident, estimate.startup) <= budget
        estimate.fits_checkpointed = (
            max(estimate.total_checkpointed + resident, estimate.startup) <= budget
        )
        estimates.append(estimate)
    return estimates


def largest_micro_batches(cfg: KilnConfig, counts: ParamCounts) -> dict[str, Any]:
    """The largest micro-batch each strategy fits in the device, without and with activation
    checkpointing (0: not even one sequence), among the divisors of the per-rank batch: the
    micro-batches that keep the global batch (`data.micro_batch_size=0` takes its engine's)."""
    per_rank = max(1, cfg.data.global_batch_size // max(1, data_parallel_ranks(cfg)))
    largest = {strategy: {"plain": 0, "checkpointed": 0} for strategy in STRATEGIES}
    for micro in (m for m in range(1, per_rank + 1) if per_rank % m == 0):
        sized = replace(cfg, data=replace(cfg.data, micro_batch_size=micro))
        for estimate in estimate_memory(sized, counts):
            if estimate.fits:  # estimates grow with the micro-batch: the last that fits
                largest[estimate.strategy]["plain"] = micro
            if estimate.fits_checkpointed:
                largest[estimate.strategy]["checkpointed"] = micro
    return {"per_rank": per_rank, "largest": largest}


def lightest_checkpointing(cfg: KilnConfig, counts: ParamCounts) -> dict[str, int] | None:
    """For a config whose engine's row fits only with activation checkpointing: the largest
    `engine.activation_checkpointing_every` (the least recompute) that fits, with its total
    bytes, when it is more than 1; else None."""
    strategy = plan_strategy(cfg.engine)
    mine = {e.strategy: e for e in estimate_memory(cfg, counts)}[strategy]
    layers = max(len(blocks) for blocks in _stack_lengths(cfg.model))
    if mine.fits or layers < 2:
        return None
    for every in range(layers, 1, -1):
        engine = replace(cfg.engine, activation_checkpointing=True,
                         activation_checkpointing_every=every)  # fmt: skip
        row = {e.strategy: e for e in estimate_memory(replace(cfg, engine=engine), counts)}
        if row[strategy].fits_checkpointed:
            return {"every": every, "total": row[strategy].total_checkpointed}
    return None


def _stack_lengths(model: ModelConfig) -> list[range]:
    if isinstance(model, EncoderDecoderConfig):
        return [range(model.n_encoder_layers), range(model.n_decoder_layers)]
    return [range(model.n_layers)]  # type: ignore[attr-defined]


def chinchilla_tokens(params: int, tokens_per_param: float) -> float:
    """Compute-optimal training tokens for a model size (Hoffmann et al. 2022: ~20 per parameter)."""
    return tokens_per_param * params


def compute_optimal(compute_flops: float, tokens_per_param: float) -> tuple[float, float]:
    """(parameters, tokens) that spend `compute_flops` optimally, with C = 6 N D and D = r N."""
    params = math.sqrt(compute_flops / (6.0 * tokens_per_param))
    return params, tokens_per_param * params


def training_tokens(
    cfg: KilnConfig, tokens_per_step: float, chinchilla: float
) -> tuple[float, str]:
    """The tokens the time estimate is for, and their source: `plan.tokens`, else
    `trainer.max_tokens`, else `trainer.max_steps` steps of the global batch when the config
    sets it, else Chinchilla's."""
    if cfg.plan.tokens:
        return float(cfg.plan.tokens), "plan.tokens"
    if cfg.trainer.max_tokens:
        return float(cfg.trainer.max_tokens), "trainer.max_tokens"
    # trainer.max_steps has a working default (a short run), not a "not set" value: one that
    # differs from the schema's is the run's length (e.g. experiment=gpt2_124m's 19073 steps),
    # the default is no length given. A max_steps set to the default itself reads as unset:
    # plan.tokens gives the tokens then.
    if cfg.trainer.max_steps != TrainerConfig.max_steps:
        return float(cfg.trainer.max_steps * tokens_per_step), "trainer.max_steps"
    return chinchilla, "chinchilla"


@dataclass
class Plan:
    """Everything `kiln plan` reports; `to_json()` is the machine-readable form."""

    model: dict[str, Any]
    cluster: dict[str, Any]
    batch: dict[str, Any]
    flops: dict[str, Any]
    scaling: dict[str, Any]
    training: dict[str, Any]
    memory: list[MemoryEstimate] = field(default_factory=list)
    micro_batch: dict[str, Any] = field(default_factory=dict)  # `largest_micro_batches`
    conventions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory"] = {
            m.strategy: asdict(m) | {"model_states": m.model_states} for m in self.memory
        }
        return data


def build_plan(cfg: KilnConfig) -> Plan:
    """Assemble the plan for a validated config."""
    model, cluster, data = cfg.model, cfg.cluster, cfg.data
    counts = count_parameters(model)
    ranks, data_parallel = ranks_of(cfg), data_parallel_ranks(cfg)
    if isinstance(model, EncoderDecoderConfig):
        enc_len, dec_len = encoder_decoder_lengths(cfg)
        flops = training_flops(model, enc_len, dec_len)
        seq = {"encoder_seq_len": enc_len, "decoder_seq_len": dec_len}
    else:
        flops = training_flops(model, data.seq_len, head_share=head_fraction(cfg.objective))
        seq = {"seq_len": data.seq_len}
    tokens_per_step = data.global_batch_size * flops.tokens_per_sequence
    scaling_params = counts.active
    optimal_tokens = chinchilla_tokens(scaling_params, cfg.plan.tokens_per_param)
    scaling: dict[str, Any] = {
        "params_for_scaling": scaling_params,
        "tokens_per_param": cfg.plan.tokens_per_param,
        "chinchilla_tokens": optimal_tokens,
        "chinchilla_flops": flops.per_token * optimal_tokens,
    }
    if cfg.plan.compute_flops:
        optimal_params, tokens = compute_optimal(cfg.plan.compute_flops, cfg.plan.tokens_per_param)
        scaling |= {
            "compute_flops": cfg.plan.compute_flops,
            "compute_optimal_params": optimal_params,
            "compute_optimal_tokens": tokens,
        }
    tokens, source = training_tokens(cfg, tokens_per_step, optimal_tokens)
    total_flops = flops.per_token * tokens
    cluster_flops = ranks * cluster.peak_tflops * 1e12 * cfg.plan.mfu
    seconds = total_flops / cluster_flops
    scaling |= {
        "chinchilla_steps": math.ceil(optimal_tokens / tokens_per_step),
        "chinchilla_seconds": scaling["chinchilla_flops"] / cluster_flops,
    }
    return Plan(
        model={
            "name": model.name,
            "family": model.family,
            "params_total": counts.total,
            "params_active": counts.active,
            "params_lookup": counts.lookup,
            "moe": bool(model.moe.n_experts),
        },
        cluster={
            "nodes": cluster.nodes,
            "gpus_per_node": cluster.gpus_per_node,
            "ranks": ranks,
            "gpu_name": cluster.gpu_name,
            "gpu_memory_gib": cluster.gpu_memory_gib,
            "peak_tflops": cluster.peak_tflops,
            "precision": precision_bytes(cfg).name,
            "strategy": plan_strategy(cfg.engine),  # the memory row of this config's engine
            "strategy_label": row_label(cfg, plan_strategy(cfg.engine)),  # as the row prints it
        },
        batch=seq
        | {
            "global_batch_size": data.global_batch_size,
            "micro_batch_size": data.micro_batch_size,
            "data_parallel_ranks": data_parallel,
            "context_parallel": context_parallel(cfg),
            "grad_accumulation": data.global_batch_size // (data.micro_batch_size * data_parallel),
            "activation_checkpointing": bool(cfg.engine.activation_checkpointing),
            "activation_checkpointing_every": _checkpoint_every(cfg),
            "lightest_checkpointing": lightest_checkpointing(cfg, counts),
            "tokens_per_step": tokens_per_step,
        },
        flops={
            "per_token": flops.per_token,
            "per_sequence": flops.per_sequence,
            "weights_per_sequence": flops.weights,
            "attention_per_sequence": flops.attention,
        },
        scaling=scaling,
        training={
            "tokens": tokens,
            "tokens_source": source,
            "steps": math.ceil(tokens / tokens_per_step),
            "total_flops": total_flops,
            "mfu": cfg.plan.mfu,
            "tokens_per_second": cluster_flops / flops.per_token,
            "tokens_per_second_per_gpu": cluster_flops / flops.per_token / ranks,
            "seconds": seconds,
            "days": seconds / 86400,
            "gpu_hours": seconds * ranks / 3600,
        },
        memory=estimate_memory(cfg, counts),
        micro_batch=largest_micro_batches(cfg, counts),
        conventions=plan_conventions(cfg),
    )


def plan_conventions(cfg: KilnConfig) -> dict[str, str]:
    """What the figures assume, a line each (printed under the tables)."""
    conventions = {
        "flops": "training = 3 x forward; 6*N_active_matmul + 12*L*H*Q*T per token, no causal "
        "halving (PaLM/nanoGPT); encoder-decoder per input token",
        "memory": "bytes; bf16 mixed Adam = 16 bytes/param (ZeRO paper); GiB in the table",
        "chinchilla": f"{cfg.plan.tokens_per_param:g} tokens per (active) parameter",
        "loss": loss_convention(cfg),
    }
    if cfg.engine.float8:
        conventions["float8"] = (
            "engine.float8: the blocks' linear layers run as FP8 matmuls (up to twice the bf16 "
            "peak on Hopper); MFU and time here count every FLOP against cluster.peak_tflops, "
            "the bf16 peak; memory is counted as bf16"
        )
    return conventions


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def format_duration(seconds: float) -> str:
    """In the largest unit that the duration reaches: 45 s -> '45 seconds'."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.3g} seconds"


def micro_batches(largest: dict[str, int]) -> str:
    """One strategy's largest micro-batches, plain / checkpointed: "8 / 16", "none / 4", or
    "none fits" when not one sequence fits either way."""
    if not largest["plain"] and not largest["checkpointed"]:
        return "none fits"
    return " / ".join(str(largest[kind] or "none") for kind in ("plain", "checkpointed"))


def render_table(plan: Plan) -> str:
    """A readable report (rich tables, rendered to text)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=124, file=open("/dev/null", "w"))  # noqa: SIM115
    m, c, b, f, s, t = plan.model, plan.cluster, plan.batch, plan.flops, plan.scaling, plan.training
    summary = Table(
        title=f"kiln plan: {m['name']} ({m['family']})", show_header=False, title_justify="left"
    )
    summary.add_column(style="bold")
    summary.add_column()
    params = human(m["params_total"])
    if m["moe"]:
        params += f" total, {human(m['params_active'])} active per token"
    summary.add_row("parameters", f"{params} ({m['params_total']:,})")
    summary.add_row(
        "cluster",
        f"{c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu_name']} = {c['ranks']} ranks, "
        f"{c['gpu_memory_gib']:g} GiB, {c['peak_tflops']:g} TFLOP/s peak, {c['precision']}",
    )
    lengths = ", ".join(f"{k}={v}" for k, v in b.items() if k.endswith("seq_len"))
    split = ""
    if b["context_parallel"] > 1:
        split = (f" on {b['data_parallel_ranks']} data-parallel ranks (context_parallel="
                 f"{b['context_parallel']}: {b['seq_len'] // b['context_parallel']} tokens of "
                 "each sequence per rank)")  # fmt: skip
    summary.add_row(
        "batch",
        f"{lengths}; global {b['global_batch_size']} seqs = {human(b['tokens_per_step'])} tokens/step; "
        f"micro {b['micro_batch_size']} x grad-accum {b['grad_accumulation']}{split}",
    )
    summary.add_row(
        "FLOPs/token",
        f"{human(f['per_token'])} (attention {f['attention_per_sequence'] / f['per_sequence']:.1%})",
    )
    summary.add_row(
        "Chinchilla",
        f"{human(s['chinchilla_tokens'])} tokens ({s['tokens_per_param']:g}/param), "
        f"{s['chinchilla_flops']:.3g} FLOPs, {s['chinchilla_steps']:,} steps: "
        f"{format_duration(s['chinchilla_seconds'])}",
    )
    if "compute_optimal_params" in s:
        summary.add_row(
            "compute-optimal",
            f"C={s['compute_flops']:.3g} FLOPs -> {human(s['compute_optimal_params'])} params "
            f"on {human(s['compute_optimal_tokens'])} tokens",
        )
    summary.add_row(
        "time",
        f"{human(t['tokens'])} tokens ({t['tokens_source']}), {t['steps']:,} steps: "
        f"{format_duration(t['seconds'])} ({human(t['gpu_hours'])} GPU-hours) at MFU {t['mfu']:.0%}, "
        f"{human(t['tokens_per_second_per_gpu'])} tokens/s/GPU",
    )
    memory = Table(
        title=f"memory per GPU in GiB (device {c['gpu_memory_gib']:g} GiB; +AC = with activation "
        "checkpointing; start-up = while the engine takes the model over: DDP and ZeRO-1/2 "
        "ranks build it whole in fp32, FSDP2 and ZeRO-3 ranks get rank 0's one tensor at a "
        "time; fits also checks it; * = this config's engine)",
        title_justify="left",
    )
    for column in (
        "strategy",
        "weights",
        "grads",
        "optim",
        "buffers",
        "acts",
        "total",
        "fits",
        "acts+AC",
        "total+AC",
        "fits+AC",
        "start-up",
    ):
        memory.add_column(column, justify="left" if column == "strategy" else "right")
    ours = c.get("strategy")
    for e in plan.memory:
        label = e.label or e.strategy
        memory.add_row(
            f"{label} *" if e.strategy == ours else label,
            *(
                f"{value / GIB:.2f}"
                for value in (
                    e.weights,
                    e.gradients,
                    e.optimizer,
                    e.buffers,
                    e.activations,
                    e.total,
                )
            ),
            "yes" if e.fits else "NO",
            f"{e.activations_checkpointed / GIB:.2f}",
            f"{e.total_checkpointed / GIB:.2f}",
            "yes" if e.fits_checkpointed else "NO",
            f"{e.startup / GIB:.2f}",
        )
    console.print(summary)
    console.print(memory)
    host = max(e.host_weights for e in plan.memory)
    console.print(f"Host memory: under FSDP2 and ZeRO-3, rank 0 builds the whole fp32 model "
                  f"({host / GIB:.2f} GiB) in host memory at start-up; the other ranks build "
                  "none of it.")  # fmt: skip
    for e in plan.memory:
        if e.offload:
            what = {("optimizer",): "optimizer states and gradients", ("params",): "parameters",
                    ("optimizer", "params"): "optimizer states, gradients and parameters",
                    }[tuple(e.offload)]  # fmt: skip
            console.print(
                f"Offload ({e.label}): DeepSpeed keeps the {what} in host memory, out of the "
                f"GPU figures above: {e.host / GIB:.2f} GiB per rank at the optimizer step's "
                f"peak, {e.host_per_node / GIB:.2f} GiB of host memory per node "
                f"({c['gpus_per_node']} ranks).",
                soft_wrap=True,
            )
    verdict = fit_verdict(plan)
    if verdict:
        console.print(verdict, soft_wrap=True)
    largest = plan.micro_batch["largest"]
    labels = {e.strategy: e.label or e.strategy for e in plan.memory}
    console.print(
        f"Largest micro-batch that fits, of the divisors of {plan.micro_batch['per_rank']} "
        "sequences per rank (without / with activation checkpointing; "
        "data.micro_batch_size=0 takes its engine's): "
        + ", ".join(f"{labels[s]} {micro_batches(v)}" for s, v in largest.items())
        + ".",
        soft_wrap=True,
    )
    console.print(f"FLOPs: {plan.conventions['flops']}.", soft_wrap=True)
    console.print(f"Loss: {plan.conventions['loss']}.", soft_wrap=True)
    if "float8" in plan.conventions:
        console.print(f"FP8: {plan.conventions['float8']}.", soft_wrap=True)
    return console.export_text()


def fit_verdict(plan: Plan) -> str | None:
    """One line on whether this config's own engine (the `*` row, with or without activation
    checkpointing as configured) fits, and if not, what does."""
    ours = plan.cluster.get("strategy")
    mine = next((e for e in plan.memory if e.strategy == ours), None)
    if mine is None:
        return None
    checkpointed = plan.batch.get("activation_checkpointing", False)
    total = mine.total_checkpointed if checkpointed else mine.total
    fits = mine.fits_checkpointed if checkpointed else mine.fits
    label = mine.label or mine.strategy
    how = "with" if checkpointed else "without"
    device = plan.cluster["gpu_memory_gib"]
    if fits:
        return (f"This config ({label}, {how} activation checkpointing): {total / GIB:.2f} GiB "
                f"per GPU of {device:g}: fits.")  # fmt: skip
    fixes = []
    lightest = plan.batch.get("lightest_checkpointing")
    if not checkpointed and lightest:
        every = lightest["every"]
        fixes.append(
            f"engine.activation_checkpointing=true engine.activation_checkpointing_every={every} "
            f"({lightest['total'] / GIB:.2f} GiB, recomputing 1 block in {every})"
        )
    if not checkpointed and mine.fits_checkpointed:
        fixes.append(
            f"engine.activation_checkpointing=true ({mine.total_checkpointed / GIB:.2f} GiB)"
        )
    rows = [e.label or e.strategy for e in plan.memory
            if e.strategy != ours and (e.fits_checkpointed if checkpointed else e.fits)]  # fmt: skip
    if rows:
        fixes.append(f"an engine whose row fits ({', '.join(rows)})")
    largest = (
        plan.micro_batch["largest"].get(ours, {}).get("checkpointed" if checkpointed else "plain")
    )
    if largest:
        fixes.append(f"data.micro_batch_size={largest} (the largest that fits; 0 picks it)")
    return (f"This config ({label}, {how} activation checkpointing) needs {total / GIB:.2f} GiB "
            f"per GPU, more than the {device:g} GiB (less plan.memory_reserve): it will not fit. "
            f"Try {'; or '.join(fixes)}.")  # fmt: skip


def run(cfg: KilnConfig) -> int:
    """Entry point of `kiln plan`."""
    plan = build_plan(cfg)
    text = json.dumps(plan.to_json(), indent=2)
    if cfg.plan.output:
        path = Path(cfg.plan.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            tmp.write_text(text + "\n")
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)  # e.g. plan.output names a directory
            raise
    sys.stdout.write((text if cfg.plan.format == "json" else render_table(plan)) + "\n")
    return 0
