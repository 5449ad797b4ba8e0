"""Typed configuration schemas: the single source of truth for every `kiln` subcommand.

Each dataclass here is registered in Hydra's ConfigStore by `register_configs()`. The YAML
files under `hydra_conf/` only set values; a key that is not declared here, or a value of the
wrong type, fails at composition time with a message that names the key. The entry point turns
the composed `DictConfig` into these dataclasses once (`OmegaConf.to_object`); code below it
never sees a `DictConfig`.

Families and kinds are expressed as subclasses (a `DecoderConfig` *is a* `ModelConfig`), so a
preset YAML picks its schema in its defaults list (`- /schema/model/decoder@_here_`) and the
composed object has the right type for dispatch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

# omegaconf.MISSING, the value OmegaConf reads as "required": spelt here so that the ranks,
# which unpickle these dataclasses and never compose, do not import Hydra and OmegaConf
# (about 0.25 s per process)
MISSING: Any = "???"

# --------------------------------------------------------------------------------------------
# model/


@dataclass
class RopeScalingConfig:
    """How rotary position embeddings are stretched beyond the trained context.

    The formulas are transformers' (`modeling_rope_utils`): "linear" divides every frequency by
    `factor` (position interpolation); "ntk" raises the base to
    `rope_theta * factor ** (D / (D - 2))` (static NTK-aware scaling); "yarn" interpolates the
    low frequencies, keeps the high ones (a ramp between `beta_slow` and `beta_fast` rotations
    over `original_max_seq_len`) and scales cos/sin by `attention_factor`.
    """

    kind: str = "none"  # none | linear | ntk | yarn
    factor: float = 1.0  # target context / original context (>= 1)
    # context the model was trained at (YaRN's ramp); None = model.max_seq_len / factor
    original_max_seq_len: int | None = None
    beta_fast: float = 32.0  # YaRN: dims turning more than this often in the context keep RoPE
    beta_slow: float = 1.0  # YaRN: dims turning less often than this are fully interpolated
    attention_factor: float | None = None  # YaRN cos/sin scale; None = 0.1 * ln(factor) + 1
    truncate: bool = True  # YaRN: round the ramp's ends to whole dims (transformers' default)


@dataclass
class MoEConfig:
    """Sparse mixture-of-experts feed-forward. `n_experts=0` means a dense model."""

    n_experts: int = 0
    top_k: int = 2  # experts each token is routed to
    every_k_layers: int = 1  # MoE feed-forward on every k-th block, dense elsewhere
    d_expert: int | None = None  # hidden size of one expert; None = model.d_ff
    n_shared_experts: int = 0  # always-on experts added to the routed output
    router: str = "softmax"  # softmax | sigmoid
    # renormalise the top-k weights to sum to 1 (Mixtral); sigmoid routers always do
    normalize_top_k: bool = True
    capacity_factor: float | None = None  # None = dropless; else tokens above capacity drop
    # dropless experts without biases as one grouped GEMM per weight (torch._grouped_mm: bf16
    # on Hopper GPUs, the CPU outside torch.compile; d_model and the experts' hidden size
    # multiples of 16 bytes), no host sync; else a loop over experts
    grouped_gemm: bool = True
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    # split each layer's experts over the data-parallel ranks (tokens exchanged by all-to-all);
    # engine=ddp only, and the ranks must divide n_experts
    expert_parallel: bool = False


@dataclass
class ModelConfig:
    """Fields shared by the three architecture families.

    A concrete preset is one of `DecoderConfig`, `EncoderConfig`, `EncoderDecoderConfig`.
    """

    family: ClassVar[str] = "abstract"

    name: str = "unnamed"  # preset name, shown in plans and W&B
    vocab_size: int = 32000  # must match the tokenizer (checked by the loader)
    d_model: int = 768  # residual stream width
    n_heads: int = 12  # attention (query) heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 3072  # feed-forward hidden size (per branch for gated activations)
    activation: str = "swiglu"  # swiglu | geglu | gelu | relu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    bias: bool = False  # biases in linear layers and LayerNorms
    position: str = "rope"  # rope | learned | alibi | relative (T5 bucketed bias)
    max_seq_len: int = 2048  # longest data.seq_len: learned table size; RoPE's declared context
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    tie_embeddings: bool = True  # output projection shares the token embedding
    dropout: float = 0.0
    init_std: float = 0.02  # std of the normal init; residual projections are scaled down
    attention_window: int | None = None  # sliding-window size; None = full attention
    # with attention_window: every global_every-th block (the last of each group) attends to
    # the whole sequence, the others to the window (Gemma's local:global layers); 0 = none
    global_every: int = 0
    # with attention_window: the first global_tokens tokens of every document stay visible to
    # every query (attention sinks; in encoders they also see the whole row, as Longformer's)
    global_tokens: int = 0
    # RMSNorm (LayerNorm under norm=layernorm) over each head's queries and keys, before RoPE
    # (Qwen3, Gemma 3, OLMo 2's QK-norm): keeps attention logits from growing without bound
    qk_norm: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


@dataclass
class DecoderConfig(ModelConfig):
    """GPT/LLaMA-style causal decoder (`model.family == "decoder"`)."""

    family: ClassVar[str] = "decoder"

    n_layers: int = 12


@dataclass
class EncoderConfig(ModelConfig):
    """BERT-style bidirectional encoder with a masked-LM head."""

    family: ClassVar[str] = "encoder"

    n_layers: int = 12
    type_vocab_size: int = 0  # segment (token type) embeddings; BERT uses 2
    embedding_norm: bool = True  # LayerNorm after the embedding sum (BERT)
    norm_position: str = "post"  # post (BERT) | pre
    pooler: bool = False  # [CLS] pooler (dense + tanh); unused by MLM pretraining
    mlm_head_transform: bool = True  # dense + activation + norm before the vocabulary projection


@dataclass
class EncoderDecoderConfig(ModelConfig):
    """T5-style encoder-decoder with cross-attention and shared embeddings."""

    family: ClassVar[str] = "encoder_decoder"

    n_encoder_layers: int = 12
    n_decoder_layers: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_logits_when_tied: bool = True  # T5 rescales d_model**-0.5 before a tied output head


# --------------------------------------------------------------------------------------------
# objective/


@dataclass
class ObjectiveConfig:
    """Which training objective turns shard tokens into model inputs and targets."""

    kind: ClassVar[str] = "abstract"
    families: ClassVar[tuple[str, ...]] = ()

    # weight of the output z-loss, mean(logsumexp(logits)**2) over the labelled positions,
    # added to the training loss (logged apart as z_loss); PaLM's 1e-4; 0 = off
    z_loss: float = 0.0


@dataclass
class CausalLMConfig(ObjectiveConfig):
    """Next-token prediction on packed sequences (decoders)."""

    kind: ClassVar[str] = "clm"
    families: ClassVar[tuple[str, ...]] = ("decoder",)


@dataclass
class MaskedLMConfig(ObjectiveConfig):
    """BERT masked LM: select `mask_prob` of tokens, replace 80/10/10 mask/random/keep."""

    kind: ClassVar[str] = "mlm"
    families: ClassVar[tuple[str, ...]] = ("encoder",)

    mask_prob: float = 0.15
    replace_with_mask: float = 0.8
    replace_with_random: float = 0.1  # the rest (0.1) keeps the original token
    whole_word: bool = False  # mask all pieces of a word together (SentencePiece "▁" starts)


@dataclass
class SpanCorruptionConfig(ObjectiveConfig):
    """T5 span corruption: noise spans are replaced by sentinels in the input, restored in
    the target. Input and target lengths are computed so packed examples fill `data.seq_len`."""

    kind: ClassVar[str] = "span"
    families: ClassVar[tuple[str, ...]] = ("encoder_decoder",)

    noise_density: float = 0.15
    mean_span_length: float = 3.0


@dataclass
class UL2Config(ObjectiveConfig):
    """UL2 mixture of denoisers: R (regular spans), S (prefix LM), X (extreme spans)."""

    kind: ClassVar[str] = "ul2"
    families: ClassVar[tuple[str, ...]] = ("encoder_decoder",)

    r_weight: float = 0.5
    s_weight: float = 0.25
    x_weight: float = 0.25
    r_noise_density: float = 0.15
    r_mean_span_length: float = 3.0
    x_noise_density: float = 0.5
    x_mean_span_length: float = 32.0


# --------------------------------------------------------------------------------------------
# engine/


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# scaled_dot_product_attention's kernels, as engine.attention_backends names them
ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")
# torchao's float8 training recipes, as engine.float8_recipe names them
FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@dataclass
class EngineConfig:
    """How the model is distributed across ranks. Applied to a finished model in a fixed
    order: FP8 conversion (float8), activation checkpointing, then compile, then sharding."""

    kind: ClassVar[str] = "abstract"

    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    # with activation_checkpointing: recompute every k-th block only (blocks 0, k, 2k, ...),
    # the others keep their activations: 1/k of the recompute for part of the memory saving
    activation_checkpointing_every: int = 1
    compile: bool = False  # torch.compile (what: compile_scope)
    # auto | loss (forward + cross-entropy as one compiled function; engine=ddp without context
    # parallelism) | blocks (each transformer block's forward, and the cross-entropy apart;
    # ZeRO-3: the cross-entropy only). auto: loss where allowed, else blocks
    compile_scope: str = "auto"
    # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune |
    # max-autotune-no-cudagraphs (autotuned matmul kernels: longer compiles)
    compile_mode: str = "default"
    # the kernels scaled_dot_product_attention may use, in this order of preference: flash |
    # cudnn | efficient | math ([] = all of them, in torch's order); e.g. [cudnn,flash,math]
    attention_backends: list[str] = field(default_factory=list)
    # the output head and the cross-entropy computed this many tokens at a time, the gradients
    # with them, so the (tokens, vocab) logits are never held whole (a fused linear
    # cross-entropy); 0 = the logits whole. Masked-LM heads also skip the unmasked positions
    loss_chunk_tokens: int = 0
    # the transformer blocks' linear layers as FP8 matmuls (torchao's float8 training; DDP and
    # FSDP2): recipe tensorwise | rowwise | rowwise_with_gw_hp; under FSDP2 with tensorwise,
    # float8_all_gather all-gathers the weights already in FP8
    float8: bool = False
    float8_recipe: str = "tensorwise"
    float8_all_gather: bool = True
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class DDPEngineConfig(EngineConfig):
    """Plain data parallel: every rank holds full weights, gradients and optimizer state."""

    kind: ClassVar[str] = "ddp"

    bucket_cap_mb: int = 25
    # ranks that split each sequence (context parallelism, decoders): the keys and values are
    # all-gathered in every attention layer; data parallelism runs over ranks / this
    context_parallel: int = 1


@dataclass
class DeepSpeedEngineConfig(EngineConfig):
    """DeepSpeed ZeRO. The DeepSpeed JSON is built from this in one place (pretrain/engine)."""

    kind: ClassVar[str] = "deepspeed"

    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer state to CPU memory
    offload_params: bool = False  # parameters to CPU memory (stage 3 only)
    reduce_bucket_size: int = 200_000_000  # elements
    allgather_bucket_size: int = 200_000_000  # elements (stages 1-2)
    overlap_comm: bool = True


@dataclass
class FSDPEngineConfig(EngineConfig):
    """PyTorch FSDP2 (`fully_shard`) over a device mesh; `replicate_degree > 1` is HSDP."""

    kind: ClassVar[str] = "fsdp"

    reshard_after_forward: bool = True
    replicate_degree: int = 1  # >1: shard within groups, replicate across them (HSDP)
    reduce_dtype: str = "fp32"  # gradient reduction dtype under bf16 params


# --------------------------------------------------------------------------------------------
# optim/


@dataclass
class OptimConfig:
    """AdamW with weight-decay groups and a learning-rate schedule."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_biases_embeddings: bool = False  # False: no decay on norms, biases, embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of steps in the final decay
    fused: bool | None = None  # fused AdamW kernel; None = when on CUDA


def use_fused(cfg: OptimConfig, device_type: str) -> bool:
    """`optim.fused`, with None meaning "on CUDA" (the fused kernel's home ground). Here, not in
    `pretrain.optim`, so `kiln plan` decides it without importing torch."""
    return cfg.fused if cfg.fused is not None else device_type == "cuda"


# --------------------------------------------------------------------------------------------
# data/  (the trainer's loader)


@dataclass
class DataConfig:
    """How the trainer reads shards written by `kiln data`."""

    # directory holding manifest.json (from `kiln data`); or that directory on a server or in a
    # bucket: a URL (https://, gs://, ...) or 'pipe:CMD' with {path} for each file's relative
    # path, fetched once into cache_dir (see pretrain/data/remote.py)
    path: str = "out/data"
    cache_dir: str = ""  # "" = $KILN_CACHE_DIR or ~/.cache/kiln/data
    seq_len: int = 1024  # tokens per training sequence (encoder input length for T5)
    global_batch_size: int = 512  # sequences per optimizer step, across all ranks
    # > 0: the global batch in tokens instead; global_batch_size becomes global_batch_tokens /
    # seq_len (which must divide it) and is what the resolved config records
    global_batch_tokens: int = 0
    # sequences per rank per forward/backward; 0 = the largest divisor of the per-rank batch
    # that `kiln plan` fits in cluster.gpu_memory_gib for this engine (`resolve_micro_batch`)
    micro_batch_size: int = 8
    seed: int = 1234  # shard shuffle and shuffle-buffer seed
    shuffle_buffer: int = 1024  # sequences held for local shuffling
    num_workers: int = 1  # DataLoader workers per rank
    document_masking: bool = True  # no attention across document boundaries in packed rows
    reset_position_ids: bool = True  # positions restart at each document
    seq_len_warmup_steps: int = 0  # >0: grow sequence length linearly over these steps
    seq_len_warmup_start: int = 128
    # none: check shards exist with the manifest's sizes; shard: also their sha256; sample:
    # also (beyond shard's) parse every shard's tar headers and array layout before training
    verify: str = "none"
    on_bad_shard: str = "error"  # error | skip (drop bad shards, counted and logged)
    mixture: dict[str, float] = field(default_factory=dict)  # override per-source weights


# --------------------------------------------------------------------------------------------
# corpus/  (the pipeline's raw inputs)


@dataclass
class SourceConfig:
    """One named input of the data pipeline."""

    name: str = "main"
    paths: list[str] = field(default_factory=list)  # files or globs; "stdlib" = Python stdlib
    format: str = (
        "auto"  # auto (by extension) | jsonl | jsonl.gz | jsonl.zst | parquet | txt | stdlib
    )
    text_field: str = "text"  # field holding the document text (jsonl, parquet)
    weight: float = 1.0  # share of training tokens, relative to other sources


@dataclass
class CorpusConfig:
    """Named sources, mixed by token weight."""

    name: str = "custom"
    sources: list[SourceConfig] = field(default_factory=list)
    max_doc_bytes: int = 10 << 20  # a larger document is skipped and counted as too_large


@dataclass
class SplitConfig:
    """How documents are split between training and held-out validation shards."""

    val_fraction: float = 0.01  # share of documents (chosen by a hash of their id) held out


# --------------------------------------------------------------------------------------------
# normalize, filters/, dedup  (the pipeline's cleaning stages; see data_pipeline/filters.py
# and data_pipeline/dedup.py for the rules)


@dataclass
class NormalizeConfig:
    """How document text is normalised before filtering and deduplication."""

    nfc: bool = True  # Unicode NFC, so composed and decomposed "é" become the same string
    # \r\n and \r -> \n, no trailing spaces, at most 2 blank lines in a row, no blank lines at
    # either end; indentation is kept (it is syntax in Python)
    whitespace: bool = True
    fix_text: bool = False  # ftfy.fix_text (mojibake, HTML entities); needs `pip install ftfy`


@dataclass
class FilterConfig:
    """Document quality rules. A threshold of None (or a False switch) turns its rule off.

    The reason a document is dropped is the name of the field whose rule dropped it.
    """

    # Length, in whitespace-separated words. Gopher: 50 and 100_000. Code files are short but
    # still worth keeping; very long ones are usually generated data tables.
    min_words: int | None = 20
    max_words: int | None = 200_000
    # Runs of "#", and of "..." or "…", each divided by the word count (the larger of the two).
    # Gopher: 0.1. Every Python comment starts with "#" (stdlib files reach 0.16).
    max_symbol_word_ratio: float | None = 0.5
    # Share of words with no alphabetic character. Gopher: 0.2. Off: code has many operators
    # and numbers (`=`, `+=`, `0`, `):`).
    max_non_alpha_word_fraction: float | None = None
    # Share of non-blank lines that repeat an earlier line. Gopher: 0.3. Code repeats `pass`,
    # `else:`, `return None`, closing brackets and docstring quotes (stdlib: median 0.14).
    max_duplicate_line_fraction: float | None = 0.8
    # Share of line characters in lines that repeat an earlier line. Gopher: 0.2.
    max_duplicate_line_char_fraction: float | None = 0.8
    # Share of word characters covered by the most frequent 2-gram (when it occurs twice or
    # more); the 3- and 4-gram thresholds are 0.02 and 0.04 lower, as in Gopher (0.20, 0.18,
    # 0.16). Code repeats `self.assertEqual(` and the like (stdlib: 99th percentile 0.2).
    max_top_ngram_char_fraction: float | None = 0.6
    # Share of word characters inside 5-grams that occur more than once; the threshold steps
    # down by 0.01 per word up to 10-grams, as in Gopher (0.15, 0.14, ..., 0.10). Code is full
    # of repeated idioms (stdlib: median 0.12, 99th percentile 0.59), so only near-total
    # repetition, such as a block pasted several times, is dropped.
    max_dup_ngram_char_fraction: float | None = 0.9
    # Mean word length in characters. Gopher: 3 and 10. Off: code tokens such as `=` and
    # `os.path.join(path,` sit at both ends.
    min_mean_word_length: float | None = None
    max_mean_word_length: float | None = None
    # Share of non-blank lines starting with a bullet (•, -, * ...). Gopher: 0.9.
    max_bullet_line_fraction: float | None = 0.9
    # Share of non-blank lines ending with "..." or "…". Gopher: 0.3. Typing stubs end many
    # lines with `...`.
    max_ellipsis_line_fraction: float | None = 0.5
    # C4: drop documents containing "lorem ipsum" (any case). Off: harmless in code.
    lorem_ipsum: bool = False
    # C4: drop documents containing "{" (a sign of scraped JavaScript). Off: code has braces.
    curly_bracket: bool = False


@dataclass
class DedupConfig:
    """Which duplicates are removed, and how near duplicates are found."""

    exact: bool = True  # drop documents whose NFC text is identical to an earlier one
    near: bool = True  # drop documents whose MinHash Jaccard estimate reaches `threshold`
    # Words per shingle. Words are whitespace-separated tokens by default (see `shingle_unit`).
    shingle_size: int = 5
    # "whitespace": str.split() tokens, which keep code's punctuation and case, so `x = 1` and
    # `x == 1` differ (the right choice for source code); "word": lowercased runs of letters and
    # digits, which ignore punctuation and case (the usual choice for prose).
    shingle_unit: str = "whitespace"
    num_perm: int = 128  # MinHash permutations: the signature length
    threshold: float = 0.8  # Jaccard similarity at or above which a document is a duplicate
    # Explicit LSH banding (both or neither): `bands` bands of `rows` signature values each,
    # bands * rows <= num_perm, bands >= 2. None: the banding datasketch derives from
    # `threshold` (9 x 13 for 0.8 and 128 permutations). Fewer, longer bands find only closer
    # pairs; more, shorter bands find more pairs at more verification cost.
    bands: int | None = None
    rows: int | None = None
    seed: int = 1  # seed of the MinHash permutations; signatures with other seeds do not compare


@dataclass
class TokenizerConfig:
    """SentencePiece tokenizer trained by the pipeline (or reused with `path`)."""

    path: str | None = None  # an existing .model file; skips training
    model_type: str = "bpe"  # bpe | unigram
    vocab_size: int = 4096
    byte_fallback: bool = True  # unknown characters become byte pieces, never <unk>
    character_coverage: float = 0.9999
    sample_bytes: int = 20_000_000  # training sample size, drawn across sources by weight
    n_sentinels: int = 100  # <extra_id_N> tokens for T5 span corruption
    num_threads: int = 4  # SentencePiece trainer threads: part of the result, so fixed here


@dataclass
class RayConfig:
    """Where Ray work runs."""

    address: str | None = None  # None: start a local Ray for the run; "auto" or host:port joins
    num_cpus: int | None = None  # local Ray only; None = all cores
    # Tasks in flight at once: the number of busy workers. None = the cluster's CPU count.
    # Outputs never depend on it.
    workers: int | None = None


@dataclass
class ShardConfig:
    """Shard sizing for `kiln data`."""

    target_bytes: int = 64 << 20  # tar size to aim for (tens of MB)
    block_tokens: int = 1 << 16  # tokens per sample (block of whole documents) in a tar
    # Largest raw input per work unit. Smaller sources are cut into about `min_units` units of
    # at least `min_unit_bytes` (a unit should be worth far more than a Ray task's overhead),
    # so a small corpus still spreads over the workers. The outputs do not depend on the unit
    # size; resumption does (it is part of the fingerprint).
    unit_bytes: int = 32 << 20
    min_units: int = 64
    min_unit_bytes: int = 1 << 20
    # Documents are shuffled within each stretch of this many shards' worth of a source's
    # documents in global order (a sorted corpus then spreads over the stretch); 0 keeps the
    # global order. `seed` seeds it.
    shuffle_shards: int = 16
    seed: int = 0


# --------------------------------------------------------------------------------------------
# cluster/


@dataclass
class ClusterConfig:
    """Hardware a job runs on. `kiln plan` uses the size and accelerator figures."""

    kind: ClassVar[str] = "abstract"

    nodes: int = 1
    gpus_per_node: int = 8  # ranks per node (CPU processes when accelerator=cpu)
    accelerator: str = "cuda"  # cuda | cpu
    gpu_name: str = "H100-SXM"
    gpu_memory_gib: float = 80.0  # memory per device (per rank)
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s per device, the MFU denominator


@dataclass
class LocalClusterConfig(ClusterConfig):
    """One machine, ranks started by torchrun."""

    kind: ClassVar[str] = "local"

    procs_per_node: int | None = None  # `kiln launch`: processes (ranks); None = gpus_per_node


@dataclass
class SlurmClusterConfig(ClusterConfig):
    """A Slurm cluster; the sbatch script is rendered from `launch/templates/job.sbatch.tmpl`."""

    kind: ClassVar[str] = "slurm"

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = "01:00:00"
    # CPUs per rank (in launch_mode=torchrun, the one task per node gets gpus_per_node times
    # this); a data job's one task gets this many, and its Ray as many (ray.num_cpus)
    cpus_per_task: int = 8
    mem: str | None = None  # e.g. "0" for all memory on the node
    constraint: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)  # extra "#SBATCH" option lines
    setup: list[str] = field(default_factory=list)  # shell lines run before the job
    container_image: str | None = None
    launch_mode: str = "torchrun"  # torchrun (one task per node) | srun (one task per rank)
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    max_requeues: int = 10
    dry_run: bool = False  # write the sbatch script, do not submit
    python: str | None = None  # the interpreter on the nodes; None = the one running kiln launch


@dataclass
class RayClusterConfig(ClusterConfig):
    """A Ray cluster; training workers are placed by Ray Train."""

    kind: ClassVar[str] = "ray"

    address: str = "auto"  # a running cluster: "auto", "host:port" or "ray://host:10001"
    workers: int = 2  # training workers (ranks), each one Ray actor
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0  # 0 on CPU clusters; 1 for one GPU per rank
    max_failures: int = 3  # worker-group restarts (from the last checkpoint) before giving up
    storage_path: str | None = None  # shared path for Ray Train's run state; None = run_dir/ray


# --------------------------------------------------------------------------------------------
# logger/


@dataclass
class LoggerConfig:
    """Metrics sink. `metrics.jsonl` in the run directory is always written."""

    backend: str = "wandb"  # wandb | none
    project: str = "kiln"
    entity: str | None = None
    mode: str = "offline"  # online | offline | disabled (offline unless a key is set)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 10  # steps between metric records


# --------------------------------------------------------------------------------------------
# Subcommand sections (set in the primary configs, not groups)


@dataclass
class ProfileConfig:
    """`trainer.profile`: torch.profiler over a window of steps (pretrain/profiling.py)."""

    start_step: int = 0  # the first step recorded (0 = off); the step before it warms up
    steps: int = 3  # steps recorded
    ranks: list[int] = field(default_factory=lambda: [0])  # ranks that record ([] = every one)
    record_shapes: bool = False  # input shapes of each operator
    profile_memory: bool = False  # tensor allocations and frees
    with_stack: bool = False  # Python stacks (large traces)
    row_limit: int = 30  # rows of the summary table


@dataclass
class TrainerConfig:
    """The training loop."""

    max_steps: int = 1000
    # stop after this many tokens (overrides max_steps); a float, so that 5e9 and 2.5e10
    # are taken as written
    max_tokens: float | None = None
    seed: int = 0
    run_dir: str = "runs/${run_name}"
    eval_every: int = 200
    eval_steps: int = 20
    checkpoint_every: int = 200  # steps between checkpoints (0: only the last step and timed ones)
    # also checkpoint when this many minutes passed since the last one (0 = off); on Slurm,
    # 0 becomes a quarter of the time limit, so a slice always leaves progress behind
    checkpoint_minutes: float = 0.0
    keep_checkpoints: int = 3
    # write checkpoints in the background: the loop stops only to copy the state into host
    # memory, a thread per rank writes it (engine=ddp or fsdp); the last checkpoint of a run
    # and one on a stop signal are written in the foreground
    async_checkpoint: bool = False
    resume: str = "auto"  # auto (latest in run_dir) | none | a checkpoint path
    # check each file of the checkpoint a run resumes from against the sha256 written with it
    # (the ranks share the reading); false reads a checkpoint changed on purpose as it is
    verify_checkpoints: bool = True
    # start a new run from these weights (a consolidated checkpoint, a training checkpoint of
    # any engine, a run directory, or a transformers directory): the optimizer, schedule, step
    # and data start afresh. Only when there is nothing to resume: a requeue resumes its own.
    init_from: str | None = None
    # A step that takes longer than this dumps every thread's stack to stderr (a hang
    # watchdog: a stuck collective, a dead data worker); 0 disables it.
    watchdog_seconds: float = 1800.0
    spike_window: int = 100  # losses kept to spot a spike
    spike_zscore: float = 4.0  # a loss this many standard deviations above the window is logged
    # MFU denominator per device (dense bf16 TFLOP/s); 0 = auto: the known figure for the GPU
    # in use (pretrain/hardware.py), else cluster.peak_tflops
    peak_tflops: float = 0.0
    # Python's garbage collector in the loop: 0 = automatic; N = automatic collection off, the
    # young generations collected every N steps (the same steps on every rank) and everything
    # after each checkpoint and eval. Start-up's objects are frozen either way.
    gc_every: int = 50
    # torch.profiler: a Chrome/Perfetto trace and a summary of a few steps (0 steps: off)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    sample_prompt: str = "def "  # decoders: a sample printed at the end of the run
    sample_tokens: int = 48


@dataclass
class PlanConfig:
    """`kiln plan`: what to estimate and how to print it."""

    format: str = "table"  # table | json
    output: str | None = None  # also write the JSON report here
    mfu: float = 0.4  # model FLOP utilisation assumed for the time estimate
    tokens: float | None = None  # training tokens; None = trainer.max_tokens or Chinchilla
    compute_flops: float | None = None  # a compute budget C: report compute-optimal N and D
    tokens_per_param: float = 20.0  # Chinchilla's ratio
    memory_reserve: float = 0.1  # share of device memory kept free (context, fragmentation)


@dataclass
class ExportConfig:
    """`kiln export`: a checkpoint to a Hugging Face transformers directory."""

    checkpoint: str | None = (
        None  # consolidated, RUN_DIR/checkpoints/step_N or RUN_DIR; None: trainer.run_dir
    )
    output_dir: str = "out/hf"
    dtype: str = "float32"  # float32 | bfloat16 | float16: the exported weights
    tokenizer: str | None = None  # SentencePiece .model to export when the checkpoint has none


@dataclass
class ReportConfig:
    """`kiln report`: summarise a run or a data build."""

    run_dir: str | None = None
    data_dir: str | None = None
    output: str | None = None


@dataclass
class LaunchConfig:
    """`kiln launch` settings common to every cluster kind (the job is the top-level `job`)."""

    # slurm: the c10d rendezvous (torchrun) or process-group master (srun) port on the job's
    # first node; 0: 20000 + SLURM_JOB_ID % 10000, so jobs sharing a node do not collide
    rdzv_port: int = 0
    wait: bool = False  # slurm: block until the job ends and print its final state


@dataclass
class KilnConfig:
    """Every subcommand composes this one schema, so one experiment file and one set of
    overrides serve `kiln data`, `kiln train`, `kiln plan` and `kiln launch` alike."""

    # Polymorphic groups: the chosen preset's schema (a subclass) fills these in.
    model: ModelConfig = MISSING
    objective: ObjectiveConfig = MISSING
    engine: EngineConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cluster: ClusterConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    output_dir: str = "out/data"  # where `kiln data` writes; `data.path` reads it by default
    # `kiln data`: rebuild an output_dir made with another config; `kiln export`: replace a
    # non-empty export.output_dir
    overwrite: bool = False
    max_error_fraction: float = 0.01  # `kiln data`: fail if more input than this is bad
    run_name: str = "default"  # names the run directory and the W&B run
    job: str = "train"  # `kiln launch`: train | data
    experiment_name: str | None = None  # set by experiment/ overlays


# Schemas for group options: a preset YAML names one in its defaults list, e.g.
# `- /schema/model/decoder@_here_`. Kept in `schema/` so they are not offered as presets.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "decoder": DecoderConfig,
        "encoder": EncoderConfig,
        "encoder_decoder": EncoderDecoderConfig,
    },
    "objective": {
        "clm": CausalLMConfig,
        "mlm": MaskedLMConfig,
        "span": SpanCorruptionConfig,
        "ul2": UL2Config,
    },
    "engine": {
        "ddp": DDPEngineConfig,
        "deepspeed": DeepSpeedEngineConfig,
        "fsdp": FSDPEngineConfig,
    },
    "optim": {"adamw": OptimConfig},
    "data": {"shards": DataConfig},
    "corpus": {"corpus": CorpusConfig},
    "filters": {"filters": FilterConfig},
    "cluster": {
        "local": LocalClusterConfig,
        "slurm": SlurmClusterConfig,
        "ray": RayClusterConfig,
    },
    "logger": {"logger": LoggerConfig},
}


def register_configs() -> None:
    """Register the primary schema and the per-group schemas in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="kiln_schema", node=KilnConfig)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


def to_dict(obj: Any) -> Any:
    """A JSON-ready view of a config dataclass (for run directories and W&B)."""
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


# --------------------------------------------------------------------------------------------
# Building and validating


class ConfigError(ValueError):
    """A composed config that type-checks but cannot work; the message names the key."""


def build_config(raw: Any) -> KilnConfig:
    """Turn a composed `DictConfig` into a validated `KilnConfig` (call once, at the entry)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    unknown = unknown_keys(raw)
    if unknown:
        raise ConfigError("; ".join(unknown))
    try:
        cfg = OmegaConf.to_object(raw)
    except MissingMandatoryValue as error:
        raise ConfigError(f"missing value for '{error.full_key}'") from error
    assert isinstance(cfg, KilnConfig)
    resolve_batch_tokens(cfg.data)
    resolve_max_tokens(cfg)
    if isinstance(cfg.cluster, LocalClusterConfig) and cfg.cluster.procs_per_node:
        cfg.cluster.gpus_per_node = cfg.cluster.procs_per_node  # the ranks every check counts
    if cfg.data.micro_batch_size == 0:
        resolve_micro_batch(cfg)
    validate_config(cfg)
    return cfg


def config_groups() -> dict[str, list[str]]:
    """The config groups of `hydra_conf/` and their options (the presets `group=option` picks),
    read from the package's directories: what `kiln <subcommand> --help` lists."""
    from importlib.resources import files

    groups = {}
    for folder in (f for f in files("hydra_conf").iterdir() if f.is_dir()):
        options = [
            f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")
        ]
        if options:
            groups[folder.name] = sorted(options)
    return dict(sorted(groups.items()))


def closest_settings(key: str, schema: type, path: str = "", value: Any = None) -> str:
    """The " (did you mean ...?)" for `path + key`, a key `schema` lacks: its closest fields and,
    at the top level, config groups (`experiement=demo` means experiment, one of whose options
    is demo, rather than experiment_name); empty when none is close."""
    import difflib

    names = [f.name for f in dataclasses.fields(schema)]
    groups = config_groups() if path == "" else {}
    close = difflib.get_close_matches(key, list(dict.fromkeys([*names, *groups])), n=2)
    close = [name for name in close if value in groups.get(name, ())] or close
    return f" (did you mean {' or '.join(path + name for name in close)}?)" if close else ""


def unknown_keys(node: Any, path: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have, each said with the closest
    names it has. Hydra refuses a misspelled `key=value`, but suggests `+key=value`, which adds
    the key and which `OmegaConf.to_object` then drops without a word."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode

    problems: list[str] = []
    if isinstance(node, ListConfig):
        for index in range(len(node)):
            problems += unknown_keys(node._get_node(index), f"{path}{index}.")
        return problems
    if not isinstance(node, DictConfig):
        return problems
    schema = OmegaConf.get_type(node)
    names = (
        [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        child = node._get_node(key)
        if names is not None and key not in names:
            value = child._value() if isinstance(child, ValueNode) else None
            hint = closest_settings(str(key), schema, path, value)
            problems.append(f"{path}{key} is not a setting of kiln{hint}")
        else:
            problems += unknown_keys(child, f"{path}{key}.")
    return problems


def plan_strategy(engine: EngineConfig) -> str:
    """The row of `kiln plan`'s memory table that an engine is: zero0 (DDP), zero1-3, fsdp."""
    if isinstance(engine, DeepSpeedEngineConfig):
        return f"zero{engine.zero_stage}"
    return "fsdp" if isinstance(engine, FSDPEngineConfig) else "zero0"


def resolve_micro_batch(cfg: KilnConfig) -> None:
    """`data.micro_batch_size=0`: the largest micro-batch whose `kiln plan` estimate for this
    engine (with or without activation checkpointing, as configured) fits in
    `cluster.gpu_memory_gib` less `plan.memory_reserve`, among the divisors of the per-rank
    batch (so the global batch, and the training, are unchanged; only the accumulation
    differs); 1 when none fits (`kiln plan` then shows by how much)."""
    from pretrain.models.accounting import count_parameters
    from pretrain.plan import largest_micro_batches

    ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    ranks //= max(1, getattr(cfg.engine, "context_parallel", 1))
    if ranks < 1 or cfg.data.global_batch_size % ranks:
        raise ConfigError(
            f"data.micro_batch_size=0 (the largest that fits) needs data.global_batch_size="
            f"{cfg.data.global_batch_size} to be a multiple of the {ranks} data-parallel ranks"
        )
    cfg.data.micro_batch_size = 1
    validate_config(cfg)  # everything else, before planning with it
    largest = largest_micro_batches(cfg, count_parameters(cfg.model))["largest"]
    kind = "checkpointed" if cfg.engine.activation_checkpointing else "plain"
    cfg.data.micro_batch_size = max(1, largest[plan_strategy(cfg.engine)][kind])


def resolve_max_tokens(cfg: KilnConfig) -> None:
    """`trainer.max_tokens` sets `trainer.max_steps` to the steps that reach it (rounded up)."""
    tokens = cfg.trainer.max_tokens
    if tokens is None:
        return
    _check_positive("trainer.max_tokens", tokens)
    per_step = cfg.data.global_batch_size * cfg.data.seq_len
    if per_step > 0:
        cfg.trainer.max_steps = -(-math.ceil(tokens) // per_step)


def resolve_batch_tokens(data: DataConfig) -> None:
    """`data.global_batch_tokens` (> 0) sets `data.global_batch_size` to that many tokens of
    `data.seq_len`-token sequences (as OLMo and Megatron users state batch sizes)."""
    tokens = data.global_batch_tokens
    if not tokens:
        return
    _check_positive("data.global_batch_tokens", tokens)
    _check_positive("data.seq_len", data.seq_len)
    if tokens % data.seq_len:
        below = tokens // data.seq_len * data.seq_len
        raise ConfigError(
            f"data.global_batch_tokens={tokens} is not a multiple of data.seq_len={data.seq_len}; "
            f"use {below or data.seq_len} or {below + data.seq_len}"
        )
    data.global_batch_size = tokens // data.seq_len


def _check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")


def _validate_float8(engine: EngineConfig) -> None:
    _check_choice("engine.float8_recipe", engine.float8_recipe, FLOAT8_RECIPES)
    if isinstance(engine, DeepSpeedEngineConfig):
        raise ConfigError(
            f"engine.float8=true converts layers with torchao's float8 training, which runs under "
            f"engine=ddp or engine=fsdp (torchao does not support DeepSpeed ZeRO); this run has "
            f"engine.kind={engine.kind!r}"
        )
    # found, not imported: torchao imports torch (seconds), which neither `kiln plan` nor the
    # launching `kiln train` process does; the ranks import it (pretrain.engine.float8)
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("engine.float8=true needs torchao (pip install torchao)")


def _check_positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _validate_profile(trainer: TrainerConfig, ranks: int) -> None:
    profile = trainer.profile
    _check_positive("trainer.profile.start_step", profile.start_step, allow_zero=True)
    _check_positive("trainer.profile.steps", profile.steps)
    _check_positive("trainer.profile.row_limit", profile.row_limit)
    last = profile.start_step + profile.steps - 1
    if profile.start_step and last > trainer.max_steps:
        raise ConfigError(
            f"trainer.profile.start_step={profile.start_step} with trainer.profile.steps="
            f"{profile.steps} ends at step {last}, after trainer.max_steps={trainer.max_steps}"
        )
    if outside := [rank for rank in profile.ranks if not 0 <= rank < ranks]:
        raise ConfigError(
            f"trainer.profile.ranks={list(profile.ranks)}: rank(s) {outside} not among the "
            f"{ranks} ranks of the cluster (0..{ranks - 1}; [] = every rank)"
        )


def validate_pipeline(cfg: KilnConfig) -> None:
    """The cleaning, tokenizer, shard and Ray settings of `kiln data`."""
    dedup = cfg.dedup
    _check_choice("dedup.shingle_unit", dedup.shingle_unit, ("whitespace", "word"))
    _check_positive("dedup.shingle_size", dedup.shingle_size)
    if dedup.num_perm < 2:
        raise ConfigError(f"dedup.num_perm={dedup.num_perm} must be >= 2")
    if not 0.0 < dedup.threshold <= 1.0:
        raise ConfigError(f"dedup.threshold={dedup.threshold} must be in (0, 1]")
    if (dedup.bands is None) != (dedup.rows is None):
        raise ConfigError("dedup.bands and dedup.rows must be set together (or both null)")
    bands, rows = dedup.bands, dedup.rows
    if (
        bands is not None
        and rows is not None
        and (bands < 2 or rows < 1 or bands * rows > dedup.num_perm)
    ):
        raise ConfigError(
            f"dedup.bands={bands} x dedup.rows={rows} needs bands >= 2, "
            f"rows >= 1 and bands * rows <= dedup.num_perm={dedup.num_perm}"
        )
    tokenizer = cfg.tokenizer
    n_special = 5 + tokenizer.n_sentinels
    if tokenizer.path is None and tokenizer.vocab_size <= n_special + 256 * tokenizer.byte_fallback:
        raise ConfigError(
            f"tokenizer.vocab_size={tokenizer.vocab_size} leaves no room for learned pieces "
            f"after {n_special} special tokens"
            + (" and 256 byte-fallback pieces" if tokenizer.byte_fallback else "")
        )
    _check_positive("tokenizer.sample_bytes", tokenizer.sample_bytes)
    _check_positive("tokenizer.num_threads", tokenizer.num_threads)
    _check_positive("tokenizer.n_sentinels", tokenizer.n_sentinels, allow_zero=True)
    for key in ("target_bytes", "block_tokens", "unit_bytes", "min_units", "min_unit_bytes"):
        _check_positive(f"shards.{key}", getattr(cfg.shards, key))
    _check_positive("shards.shuffle_shards", cfg.shards.shuffle_shards, allow_zero=True)
    _check_positive("ray.num_cpus", cfg.ray.num_cpus)
    _check_positive("ray.workers", cfg.ray.workers)


def validate_rope_scaling(model: ModelConfig) -> None:
    """`model.rope_scaling`: a known kind, a factor >= 1, YaRN's ramp in order."""
    scaling = model.rope_scaling
    _check_choice("model.rope_scaling.kind", scaling.kind, ("none", "linear", "ntk", "yarn"))
    if scaling.kind == "none":
        return
    if model.position != "rope":
        raise ConfigError(
            f"model.rope_scaling.kind={scaling.kind!r} needs model.position='rope' "
            f"(got {model.position!r})"
        )
    if scaling.factor < 1.0:
        raise ConfigError(f"model.rope_scaling.factor={scaling.factor} must be >= 1")
    _check_positive("model.rope_scaling.original_max_seq_len", scaling.original_max_seq_len)
    _check_positive("model.rope_scaling.attention_factor", scaling.attention_factor)
    if not 0.0 < scaling.beta_slow < scaling.beta_fast:
        raise ConfigError(
            f"model.rope_scaling.beta_slow={scaling.beta_slow} must be > 0 and below "
            f"model.rope_scaling.beta_fast={scaling.beta_fast}"
        )


def validate_model(model: ModelConfig) -> None:
    for key in ("vocab_size", "d_model", "n_heads", "d_ff", "max_seq_len"):
        _check_positive(f"model.{key}", getattr(model, key))
    _check_choice("model.activation", model.activation, ("swiglu", "geglu", "gelu", "relu"))
    _check_choice("model.norm", model.norm, ("rmsnorm", "layernorm"))
    positions = {
        "decoder": ("rope", "learned", "alibi", "none"),
        "encoder": ("learned", "rope", "alibi"),
        "encoder_decoder": ("relative", "rope"),
    }[model.family]
    _check_choice("model.position", model.position, positions)
    if model.head_dim is None and model.d_model % model.n_heads:
        raise ConfigError(
            f"model.n_heads={model.n_heads} does not divide model.d_model={model.d_model}; "
            "set model.head_dim or change one of them"
        )
    if model.n_heads % model.resolved_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={model.n_kv_heads} must divide model.n_heads={model.n_heads}"
        )
    if model.position == "rope" and model.resolved_head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dim, got {model.resolved_head_dim}")
    validate_rope_scaling(model)
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} must be in [0, 1)")
    _check_positive("model.attention_window", model.attention_window)
    _check_positive("model.global_every", model.global_every, allow_zero=True)
    _check_positive("model.global_tokens", model.global_tokens, allow_zero=True)
    for key in ("global_every", "global_tokens"):
        if getattr(model, key) and model.attention_window is None:
            raise ConfigError(
                f"model.{key}={getattr(model, key)} needs model.attention_window (the local "
                "layers' window); without one every layer is already global"
            )
    if model.family == "encoder_decoder" and model.attention_window is not None:
        raise ConfigError(
            f"model.attention_window={model.attention_window}: encoder-decoders attend to the "
            "whole sequence (set it to null)"
        )
    moe = model.moe
    if moe.n_experts:
        if not 1 <= moe.top_k <= moe.n_experts:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.n_experts={moe.n_experts}"
            )
        _check_choice("model.moe.router", moe.router, ("softmax", "sigmoid"))
        _check_positive("model.moe.every_k_layers", moe.every_k_layers)
        _check_positive("model.moe.capacity_factor", moe.capacity_factor)
    layer_keys = (
        ("n_encoder_layers", "n_decoder_layers")
        if isinstance(model, EncoderDecoderConfig)
        else ("n_layers",)
    )
    for key in layer_keys:
        _check_positive(f"model.{key}", getattr(model, key))


def _validate_expert_parallel(cfg: KilnConfig) -> None:
    moe, engine, cluster = cfg.model.moe, cfg.engine, cfg.cluster
    if not moe.n_experts:
        raise ConfigError("model.moe.expert_parallel=true needs model.moe.n_experts > 0")
    if not isinstance(engine, DDPEngineConfig):
        raise ConfigError(
            f"model.moe.expert_parallel=true works with engine=ddp only, not engine.kind="
            f"{engine.kind!r} (DeepSpeed ZeRO and FSDP would shard or all-reduce the rank-local "
            "experts as replicated weights); use engine=ddp or model.moe.expert_parallel=false"
        )
    if engine.compile:
        raise ConfigError("model.moe.expert_parallel=true does not support engine.compile=true")
    ranks = cluster.nodes * cluster.gpus_per_node
    if moe.n_experts % ranks:
        raise ConfigError(
            f"model.moe.expert_parallel=true: model.moe.n_experts={moe.n_experts} must be a "
            f"multiple of the {ranks} data-parallel ranks (cluster.nodes={cluster.nodes} x "
            f"cluster.gpus_per_node={cluster.gpus_per_node})"
        )


def _validate_context_parallel(cfg: KilnConfig, cp: int, ranks: int) -> None:
    _check_positive("engine.context_parallel", cp)
    if ranks % cp:
        raise ConfigError(
            f"engine.context_parallel={cp} must divide the {ranks} ranks of the cluster"
        )
    if cfg.model.family != "decoder":
        raise ConfigError(
            f"engine.context_parallel={cp}: context parallelism splits decoder sequences; "
            f"model={cfg.model.name} is {cfg.model.family}"
        )
    if cfg.data.seq_len % cp:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not a multiple of engine.context_parallel={cp}"
        )
    if cfg.model.moe.n_experts and cfg.model.moe.expert_parallel:
        raise ConfigError(
            f"engine.context_parallel={cp} and model.moe.expert_parallel=true do not combine "
            "(both split the ranks of a step); set one of them off"
        )
    if cfg.data.seq_len_warmup_steps:
        raise ConfigError(
            f"engine.context_parallel={cp} slices rows of data.seq_len={cfg.data.seq_len}, "
            f"which data.seq_len_warmup_steps={cfg.data.seq_len_warmup_steps} would shorten; "
            "set data.seq_len_warmup_steps=0 (or engine.context_parallel=1)"
        )


def _validate_objective(cfg: KilnConfig) -> None:
    """The objective's settings (the z-loss weight, mask rates, noise density, span length,
    UL2's weights) and the sequence length it needs, checked as its transform checks them
    when the data is read, so `kiln plan` and every launcher refuse them at once. The
    tokenizer here has as many sentinels as spans could need: their number is the data's,
    checked when it is read."""
    import numpy as np

    from pretrain.objectives import SpecialIds, build_objective

    objective, seq_len = cfg.objective, cfg.data.seq_len
    if not (math.isfinite(objective.z_loss) and objective.z_loss >= 0):
        raise ConfigError(
            f"objective.z_loss={objective.z_loss} must be a finite weight >= 0 (PaLM's 1e-4; "
            "0 = no z-loss)"
        )
    if seq_len < 1:
        return  # said with the other data settings
    if objective.kind != "clm" and cfg.data.seq_len_warmup_steps > 0:
        raise ConfigError(
            f"data.seq_len_warmup_steps={cfg.data.seq_len_warmup_steps} warms up causal LM "
            f"only (it cuts each sample into shorter rows); objective={objective.kind} trains "
            "at data.seq_len from the start: set data.seq_len_warmup_steps=0"
        )
    vocab = 5 + seq_len + 1
    special = SpecialIds(sentinels=tuple(range(5, vocab - 1)))
    word_start = np.ones(vocab, dtype=bool) if getattr(objective, "whole_word", False) else None
    try:
        build_objective(objective, special, vocab, document_masking=False,
                        reset_position_ids=False, word_start=word_start).check(seq_len)  # fmt: skip
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_config(cfg: KilnConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises `ConfigError`."""
    validate_model(cfg.model)
    if cfg.model.family not in cfg.objective.families:
        suggestion = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}[
            cfg.model.family
        ]
        raise ConfigError(
            f"objective={cfg.objective.kind} trains {' or '.join(cfg.objective.families)} models, "
            f"but model={cfg.model.name} is {cfg.model.family}; use objective={suggestion}"
        )
    _validate_objective(cfg)
    engine = cfg.engine
    _check_choice("engine.precision", engine.precision, ("auto", "bf16", "fp32"))
    _check_choice("engine.backend", engine.backend, ("auto", "nccl", "gloo"))
    if isinstance(engine, DeepSpeedEngineConfig):
        _check_choice("engine.zero_stage", engine.zero_stage, (0, 1, 2, 3))
        if engine.offload_params and engine.zero_stage != 3:
            raise ConfigError("engine.offload_params=true needs engine.zero_stage=3")
    if isinstance(engine, FSDPEngineConfig):
        _check_choice("engine.reduce_dtype", engine.reduce_dtype, ("fp32", "bf16"))
    _check_choice("engine.compile_scope", engine.compile_scope, ("auto", "loss", "blocks"))
    _check_choice("engine.compile_mode", engine.compile_mode, COMPILE_MODES)
    _check_positive("engine.activation_checkpointing_every", engine.activation_checkpointing_every)
    if engine.activation_checkpointing_every > 1 and not engine.activation_checkpointing:
        raise ConfigError(
            f"engine.activation_checkpointing_every={engine.activation_checkpointing_every} "
            "picks the blocks activation checkpointing recomputes: set "
            "engine.activation_checkpointing=true too"
        )
    for backend in engine.attention_backends:
        _check_choice("engine.attention_backends", backend, ATTENTION_BACKENDS)
    if len(set(engine.attention_backends)) != len(engine.attention_backends):
        raise ConfigError(
            f"engine.attention_backends={list(engine.attention_backends)} names a backend twice"
        )
    if engine.float8:
        _validate_float8(engine)
    if engine.loss_chunk_tokens < 0:
        raise ConfigError(
            f"engine.loss_chunk_tokens={engine.loss_chunk_tokens} is negative; use 0 (the "
            "logits whole) or the tokens per chunk (e.g. 4096)"
        )
    if engine.compile_scope == "loss" and (
        not isinstance(engine, DDPEngineConfig) or engine.context_parallel != 1
    ):
        raise ConfigError(
            f"engine.compile_scope=loss compiles the whole forward, which engine.kind="
            f"{engine.kind!r}{' with context parallelism' if engine.kind == 'ddp' else ''} "
            "hooks block by block; use engine.compile_scope=blocks (or auto)"
        )
    if cfg.model.moe.expert_parallel:
        _validate_expert_parallel(cfg)
    if not 0 <= cfg.launch.rdzv_port <= 65535:
        raise ConfigError(
            f"launch.rdzv_port={cfg.launch.rdzv_port} is not a TCP port (1-65535), nor 0 "
            "(a port from the Slurm job id)"
        )
    cluster = cfg.cluster
    _check_positive("cluster.nodes", cluster.nodes)
    _check_positive("cluster.gpus_per_node", cluster.gpus_per_node)
    _check_choice("cluster.accelerator", cluster.accelerator, ("cuda", "cpu"))
    _check_positive("cluster.gpu_memory_gib", cluster.gpu_memory_gib)
    _check_positive("cluster.peak_tflops", cluster.peak_tflops)
    if isinstance(engine, FSDPEngineConfig) and (
        engine.replicate_degree < 1
        or (cluster.nodes * cluster.gpus_per_node) % engine.replicate_degree
    ):
        raise ConfigError(
            f"engine.replicate_degree={engine.replicate_degree} must divide the "
            f"{cluster.nodes * cluster.gpus_per_node} ranks of the cluster"
        )
    data = cfg.data
    for key in ("seq_len", "global_batch_size", "micro_batch_size"):
        _check_positive(f"data.{key}", getattr(data, key))
    _check_choice("data.verify", data.verify, ("none", "shard", "sample"))
    _check_choice("data.on_bad_shard", data.on_bad_shard, ("error", "skip"))
    for source, weight in data.mixture.items():
        if not weight > 0:  # a rank's order of sources needs every named one to be drawn
            raise ConfigError(
                f"data.mixture.{source}={weight} must be > 0 (a source of the build is read "
                "at some weight; to leave one out, build the shards without it)"
            )
    ranks = cluster.nodes * cluster.gpus_per_node
    cp = getattr(engine, "context_parallel", 1)
    if cp != 1:
        _validate_context_parallel(cfg, cp, ranks)
        ranks //= cp  # data-parallel ranks
    if data.global_batch_size % (data.micro_batch_size * ranks):
        given = (
            f"data.global_batch_tokens={data.global_batch_tokens} / data.seq_len={data.seq_len}"
            f" = {data.global_batch_size} sequences"
            if data.global_batch_tokens
            else f"data.global_batch_size={data.global_batch_size}"
        )
        raise ConfigError(
            f"{given} is not a multiple of "
            f"data.micro_batch_size={data.micro_batch_size} x {ranks} data-parallel ranks "
            f"(cluster.nodes={cluster.nodes} x cluster.gpus_per_node={cluster.gpus_per_node})"
        )
    declared = {
        "learned": "the size of its learned position table",
        # RoPE itself has no limit, but an export would declare max_position_embeddings below
        # the trained length, and YaRN's default original length is max_seq_len / factor
        "rope": "the context the model declares: its export's max_position_embeddings",
    }
    if cfg.model.position in declared and data.seq_len > cfg.model.max_seq_len:
        fixes = [f"data.seq_len={cfg.model.max_seq_len}", f"model.max_seq_len={data.seq_len}"]
        if cfg.model.position == "rope":
            fixes.reverse()  # RoPE: declaring more context adds no parameters
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} "
            f"({declared[cfg.model.position]}); set {fixes[0]} (or {fixes[1]})"
        )
    for key in ("eval_every", "checkpoint_every", "checkpoint_minutes", "gc_every"):
        _check_positive(f"trainer.{key}", getattr(cfg.trainer, key), allow_zero=True)
    _check_positive("trainer.max_steps", cfg.trainer.max_steps)
    # eval_every=0 turns evaluation off; eval_steps=0 would log a loss over no batches
    _check_positive("trainer.eval_steps", cfg.trainer.eval_steps)
    if cfg.trainer.keep_checkpoints < 1:
        raise ConfigError(
            f"trainer.keep_checkpoints={cfg.trainer.keep_checkpoints} must be >= 1 (the "
            "checkpoints kept; the newest is the one a run resumes from)"
        )
    _validate_profile(cfg.trainer, cluster.nodes * cluster.gpus_per_node)
    if cfg.trainer.async_checkpoint and isinstance(engine, DeepSpeedEngineConfig):
        raise ConfigError(
            f"trainer.async_checkpoint=true writes checkpoints in the background under "
            f"engine=ddp or engine=fsdp; DeepSpeed (this run: ZeRO stage {engine.zero_stage}) "
            f"writes its own, in the foreground"
        )
    optim = cfg.optim
    _check_positive("optim.lr", optim.lr)
    _check_choice("optim.schedule", optim.schedule, ("cosine", "wsd", "constant"))
    _check_positive("optim.grad_clip", optim.grad_clip, allow_zero=True)
    _check_positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    _check_choice("logger.backend", cfg.logger.backend, ("wandb", "none"))
    _check_choice("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    names = [source.name for source in cfg.corpus.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"corpus.sources has repeated names: {names}")
    for i, source in enumerate(cfg.corpus.sources):
        if not re.fullmatch(r"[A-Za-z0-9_]+", source.name):
            raise ConfigError(
                f"corpus.sources[{i}].name={source.name!r}: use letters, digits and '_' "
                "(the name is part of shard file names and sample keys)"
            )
        _check_positive(f"corpus.sources[{i}].weight", source.weight)
        _check_choice(
            f"corpus.sources[{i}].format",
            source.format,
            ("auto", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "stdlib"),
        )
    _check_positive("corpus.max_doc_bytes", cfg.corpus.max_doc_bytes)
    validate_pipeline(cfg)
    _check_choice("tokenizer.model_type", cfg.tokenizer.model_type, ("bpe", "unigram"))
    if not 0.0 <= cfg.split.val_fraction < 1.0:
        raise ConfigError(f"split.val_fraction={cfg.split.val_fraction} must be in [0, 1)")
    if not 0.0 <= cfg.max_error_fraction <= 1.0:
        raise ConfigError(f"max_error_fraction={cfg.max_error_fraction} must be in [0, 1]")
    _check_choice("plan.format", cfg.plan.format, ("table", "json"))
    if not 0.0 < cfg.plan.mfu <= 1.0:
        raise ConfigError(f"plan.mfu={cfg.plan.mfu} must be in (0, 1]")
    if not 0.0 <= cfg.plan.memory_reserve < 1.0:
        raise ConfigError(f"plan.memory_reserve={cfg.plan.memory_reserve} must be in [0, 1)")
    _check_positive("plan.tokens", cfg.plan.tokens)
    _check_positive("plan.compute_flops", cfg.plan.compute_flops)
    _check_positive("plan.tokens_per_param", cfg.plan.tokens_per_param)
    _check_choice("job", cfg.job, ("train", "data"))
    _check_choice("export.dtype", cfg.export.dtype, ("float32", "bfloat16", "float16"))
