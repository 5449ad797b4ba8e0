"""Our RoPE MoE decoder <-> transformers `MixtralForCausalLM`.

Mixtral is the LLaMA decoder (RMSNorm, RoPE, grouped-query attention, no biases) with a sparse
feed-forward on every block: a bias-free linear router, softmax over all experts in fp32, the
top-k experts' weights renormalised to sum to 1, and gated experts (`act(x W1) * (x W3)`, then
W2). That is our `MoEFeedForward` with `router=softmax`, `normalize_top_k=true`, dropless
dispatch, no shared experts and `every_k_layers=1`; every other setting is refused by name.
`top_k=1` is refused too: Mixtral renormalises a single weight to 1.0, ours keeps the router
probability (Switch's gate). Auxiliary-loss coefficients are training options: the load-balance
one is carried as `router_aux_loss_coef`, the z-loss one is not.

Expert weights. Ours are stacked per layer: `experts.gate` and `experts.up` (n, d_model, d_ff),
`experts.down` (n, d_ff, d_model), applied as `x @ W`. transformers 5 keeps them fused the same
way but transposed for `F.linear`: `mlp.experts.gate_up_proj` (n, 2 d_ff, d_model, gate rows
first) and `mlp.experts.down_proj` (n, d_model, d_ff), router `mlp.gate.weight`; transformers
4 (and the files `save_pretrained` writes in either version, which converts back to the
original Mixtral checkpoint layout) has one module per expert:
`block_sparse_moe.experts.{e}.w1` (gate), `.w3` (up), `.w2` (down), router
`block_sparse_moe.gate.weight`. Export builds the layout of the installed transformers; import
reads both.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig, MoEConfig, RopeScalingConfig
from pretrain.models.hf import BOS_ID, EOS_ID, PAD_ID, mismatch_error, plain_state_dict
from pretrain.models.hf.llama import llama_layout, rope_parameters

if TYPE_CHECKING:
    from transformers import MixtralConfig

HF_CLASS = "MixtralForCausalLM"

ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}

_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
}
_GLOBAL_INVERSE = {theirs: ours for ours, theirs in _GLOBAL.items()}
_BLOCK_INVERSE = {theirs: ours for ours, theirs in _BLOCK.items()}
_OURS_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_THEIRS_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
# transformers' MoE names inside a layer: router, fused experts, per-expert experts
_ROUTER = re.compile(r"(?:mlp|block_sparse_moe)\.gate\.weight")
_FUSED = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3)\.weight")


def fused_layout() -> bool:
    """Whether the installed transformers stores Mixtral experts as fused 3-D tensors (5.x)."""
    from transformers.models.mixtral import modeling_mixtral

    return not hasattr(modeling_mixtral, "MixtralBlockSparseTop2MLP")


def _problems(cfg: ModelConfig) -> list[str]:
    problems = []
    moe = cfg.moe
    if not isinstance(cfg, DecoderConfig):
        problems.append(f"model family {cfg.family!r} (needs a decoder)")
    if cfg.position != "rope":
        problems.append(f"model.position={cfg.position!r} (needs 'rope')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'rmsnorm')")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"model.activation={cfg.activation!r} (needs a gated 'swiglu' or 'geglu')")
    if cfg.bias:
        problems.append("model.bias=true (Mixtral has no biases)")
    if cfg.attention_window is not None:
        problems.append(f"model.attention_window={cfg.attention_window} (no sliding window)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (no QK-norm; Qwen3MoeForCausalLM has it)")
    if cfg.d_model % cfg.n_heads:
        problems.append(
            f"model.d_model={cfg.d_model} is not a multiple of model.n_heads={cfg.n_heads}"
        )
    if cfg.rope_scaling.kind not in ("none", "linear", "ntk"):
        problems.append(
            f"model.rope_scaling.kind={cfg.rope_scaling.kind!r} (needs 'none', 'linear' or 'ntk')"
        )
    if not moe.n_experts:
        problems.append("model.moe.n_experts=0 (a dense decoder exports as LlamaForCausalLM)")
        return problems
    if moe.every_k_layers != 1:
        problems.append(f"model.moe.every_k_layers={moe.every_k_layers} (MoE on every block: 1)")
    if moe.n_shared_experts:
        problems.append(f"model.moe.n_shared_experts={moe.n_shared_experts} (no shared experts)")
    if moe.router != "softmax":
        problems.append(f"model.moe.router={moe.router!r} (needs 'softmax')")
    if moe.capacity_factor is not None:
        problems.append(
            f"model.moe.capacity_factor={moe.capacity_factor} (Mixtral is dropless: null)"
        )
    if not moe.normalize_top_k:
        problems.append("model.moe.normalize_top_k=false (Mixtral renormalises the top-k weights)")
    if moe.top_k == 1:
        problems.append(
            "model.moe.top_k=1 (Mixtral renormalises one weight to 1.0; ours keeps the "
            "router probability)"
        )
    return problems


def hf_config(cfg: ModelConfig) -> MixtralConfig:
    """The `MixtralConfig` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import MixtralConfig

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    head_dim = cfg.resolved_head_dim
    rope = rope_parameters(cfg)  # YaRN refused above
    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.moe.d_expert or cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.resolved_kv_heads,
        head_dim=head_dim,
        hidden_act=ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        sliding_window=None,
        attention_dropout=0.0,
        num_experts_per_tok=cfg.moe.top_k,
        num_local_experts=cfg.moe.n_experts,
        router_aux_loss_coef=cfg.moe.aux_loss_coef,
        router_jitter_noise=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def to_hf_state_dict(model: nn.Module, fused: bool | None = None) -> dict[str, Tensor]:
    """Our MoE decoder's weights under `MixtralForCausalLM` names, in the installed
    transformers' layout (or the one `fused` asks for); no `lm_head` when tied."""
    fused = fused_layout() if fused is None else fused
    ours = plain_state_dict(model)
    state = {}
    for name, tensor in ours.items():
        if name in _GLOBAL:
            state[_GLOBAL[name]] = tensor
            continue
        match = _OURS_BLOCK.fullmatch(name)
        if match is None:
            raise ValueError(f"{HF_CLASS} has no weight for our {name!r}")
        layer, rest = f"model.layers.{match.group(1)}", match.group(2)
        if rest in _BLOCK:
            state[f"{layer}.{_BLOCK[rest]}"] = tensor
        elif rest == "mlp.router.weight":
            state[f"{layer}.{'mlp' if fused else 'block_sparse_moe'}.gate.weight"] = tensor
        elif rest == "mlp.experts.gate":
            up = ours[f"blocks.{match.group(1)}.mlp.experts.up"]
            if fused:  # (n, C, F) x2 -> (n, 2F, C), gate rows first
                gate_up = torch.cat([tensor, up], dim=2).transpose(1, 2).contiguous()
                state[f"{layer}.mlp.experts.gate_up_proj"] = gate_up
            else:
                for e in range(tensor.shape[0]):
                    prefix = f"{layer}.block_sparse_moe.experts.{e}"
                    state[f"{prefix}.w1.weight"] = tensor[e].T.contiguous()
                    state[f"{prefix}.w3.weight"] = up[e].T.contiguous()
        elif rest == "mlp.experts.up":
            continue  # with the gate
        elif rest == "mlp.experts.down":  # (n, F, C)
            if fused:
                state[f"{layer}.mlp.experts.down_proj"] = tensor.transpose(1, 2).contiguous()
            else:
                for e in range(tensor.shape[0]):
                    key = f"{layer}.block_sparse_moe.experts.{e}.w2.weight"
                    state[key] = tensor[e].T.contiguous()
        else:
            raise ValueError(f"{HF_CLASS} has no weight for our {name!r}")
    return state


def from_hf(hf_config: MixtralConfig, state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:
    """Our `DecoderConfig` and state dict for a Mixtral checkpoint, in either expert layout
    (ValueError naming the transformers option we cannot express)."""
    problems = []
    act = {value: key for key, value in ACTIVATIONS.items()}.get(hf_config.hidden_act)
    if act is None:
        problems.append(f"hidden_act={hf_config.hidden_act!r} (needs 'silu' or 'gelu')")
    if getattr(hf_config, "sliding_window", None) is not None:
        problems.append(f"sliding_window={hf_config.sliding_window} (needs null)")
    if hf_config.num_experts_per_tok == 1:
        problems.append("num_experts_per_tok=1 (our top-1 keeps the router probability)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        problems.append(f"rope_parameters.rope_type={rope_type!r} (needs 'default' or 'linear')")
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))
    scaling = RopeScalingConfig()
    if rope_type == "linear":
        scaling = RopeScalingConfig(kind="linear", factor=float(rope["factor"]))
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 1e6))
    n_experts = hf_config.num_local_experts
    cfg = DecoderConfig(
        **llama_layout(hf_config, "mixtral"),
        activation=act or "swiglu",
        bias=False,
        rope_theta=float(theta),
        rope_scaling=scaling,
        moe=MoEConfig(
            n_experts=n_experts,
            top_k=hf_config.num_experts_per_tok,
            aux_loss_coef=float(hf_config.router_aux_loss_coef),
        ),
    )
    state: dict[str, Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if key in _GLOBAL_INVERSE:
            state[_GLOBAL_INVERSE[key]] = tensor
            continue
        match = _THEIRS_BLOCK.fullmatch(key)
        if match is None:
            raise ValueError(f"cannot import {HF_CLASS}: unknown weight {key!r}")
        block, rest = f"blocks.{match.group(1)}", match.group(2)
        if rest in _BLOCK_INVERSE:
            state[f"{block}.{_BLOCK_INVERSE[rest]}"] = tensor
        elif _ROUTER.fullmatch(rest):
            state[f"{block}.mlp.router.weight"] = tensor
        elif fused := _FUSED.fullmatch(rest):
            if fused.group(1) == "gate_up_proj":  # (n, 2F, C)
                gate, up = tensor.chunk(2, dim=1)
                state[f"{block}.mlp.experts.gate"] = gate.transpose(1, 2).contiguous()
                state[f"{block}.mlp.experts.up"] = up.transpose(1, 2).contiguous()
            else:  # (n, C, F)
                state[f"{block}.mlp.experts.down"] = tensor.transpose(1, 2).contiguous()
        elif single := _PER_EXPERT.fullmatch(rest):
            part = {"w1": "gate", "w3": "up", "w2": "down"}[single.group(2)]
            per_expert.setdefault((block, part), {})[int(single.group(1))] = tensor
        else:
            raise ValueError(f"cannot import {HF_CLASS}: unknown weight {key!r}")
    for (block, part), experts in per_expert.items():
        if sorted(experts) != list(range(n_experts)):
            raise ValueError(
                f"cannot import {HF_CLASS}: {block} has {part} weights for experts "
                f"{sorted(experts)}, expected 0..{n_experts - 1}"
            )
        state[f"{block}.mlp.experts.{part}"] = torch.stack(
            [experts[e].T for e in range(n_experts)]
        ).contiguous()
    return cfg, state
