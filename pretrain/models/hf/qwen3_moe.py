"""Our RoPE MoE decoder with QK-norm <-> transformers `Qwen3MoeForCausalLM`.

Qwen3-MoE is Qwen3's attention (per-head q/k RMSNorm before RoPE: `model.qk_norm=true`) with
a sparse feed-forward on every `decoder_sparse_step`-th layer (the last of each group, as our
`moe.every_k_layers`) and a dense gated MLP of `intermediate_size` elsewhere. Its router is ours
with `router=softmax`: a bias-free linear, softmax over all experts in fp32, the top-k weights,
renormalised when `norm_topk_prob` (our `normalize_top_k`; a single expert's weight is never
renormalised by ours, so top-1 exports with `norm_topk_prob=false`, the router probability);
its experts are gated (`act(x W_gate) * (x W_up)`, then W_down) and dropless. Shared experts, a
sigmoid router, capacity dropping and biases have no equivalent and are refused by name. A
sliding window applies to every layer (`global_every` has no equivalent); attention sinks have
none. Auxiliary-loss coefficients are training options: the load-balance one is carried as
`router_aux_loss_coef`.

Expert weights: ours are stacked per layer, `experts.gate` / `experts.up` (n, d_model, d_ff)
and `experts.down` (n, d_ff, d_model), applied as `x @ W`. transformers 5 keeps them fused and
transposed for `F.linear`: `mlp.experts.gate_up_proj` (n, 2 d_ff, d_model, gate rows first) and
`mlp.experts.down_proj` (n, d_model, d_ff), router `mlp.gate.weight`; the files it saves hold
one module per expert, `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`. Import reads both.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig, MoEConfig
from pretrain.models.hf import BOS_ID, EOS_ID, PAD_ID, mismatch_error, plain_state_dict
from pretrain.models.hf.llama import (
    _GLOBAL,
    _GLOBAL_INVERSE,
    ACTIVATIONS,
    llama_layout,
    rope_from_hf,
    rope_parameters,
)

if TYPE_CHECKING:
    from transformers import Qwen3MoeConfig

HF_CLASS = "Qwen3MoeForCausalLM"

# our block names -> theirs, for what every block has (attention, norms)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"attn.{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
}
_DENSE = {f"mlp.{p}.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
_BLOCK_INVERSE = {theirs: ours for ours, theirs in (_BLOCK | _DENSE).items()}
_OURS_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_THEIRS_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FUSED = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _problems(cfg: ModelConfig) -> list[str]:
    problems = []
    if not isinstance(cfg, DecoderConfig):
        problems.append(f"model family {cfg.family!r} (needs a decoder)")
    if cfg.position != "rope":
        problems.append(f"model.position={cfg.position!r} (needs 'rope')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'rmsnorm')")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"model.activation={cfg.activation!r} (needs a gated 'swiglu' or 'geglu')")
    if cfg.bias:
        problems.append("model.bias=true (Qwen3-MoE has no biases)")
    if not cfg.qk_norm:
        problems.append("model.qk_norm=false (Qwen3-MoE normalises queries and keys)")
    if cfg.global_every:
        problems.append(f"model.global_every={cfg.global_every} (one window for every layer)")
    if cfg.global_tokens:
        problems.append(f"model.global_tokens={cfg.global_tokens} (no attention sinks)")
    moe = cfg.moe
    if not moe.n_experts:
        problems.append("model.moe.n_experts=0 (a dense decoder exports as Qwen3ForCausalLM)")
        return problems
    if moe.n_shared_experts:
        problems.append(f"model.moe.n_shared_experts={moe.n_shared_experts} (no shared experts)")
    if moe.router != "softmax":
        problems.append(f"model.moe.router={moe.router!r} (needs 'softmax')")
    if moe.capacity_factor is not None:
        problems.append(
            f"model.moe.capacity_factor={moe.capacity_factor} (Qwen3-MoE is dropless: null)"
        )
    return problems


def hf_config(cfg: ModelConfig) -> Qwen3MoeConfig:
    """The `Qwen3MoeConfig` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import Qwen3MoeConfig

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    moe = cfg.moe
    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        moe_intermediate_size=moe.d_expert or cfg.d_ff,
        num_hidden_layers=cfg.n_layers,  # type: ignore[attr-defined]
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.resolved_kv_heads,
        head_dim=cfg.resolved_head_dim,
        hidden_act=ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        use_sliding_window=cfg.attention_window is not None,
        sliding_window=cfg.attention_window,
        attention_dropout=0.0,
        decoder_sparse_step=moe.every_k_layers,
        mlp_only_layers=[],
        num_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.normalize_top_k and moe.top_k > 1,
        router_aux_loss_coef=moe.aux_loss_coef,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our MoE decoder's weights under `Qwen3MoeForCausalLM` names, experts fused as the
    installed transformers (5.x) keeps them; no `lm_head` when tied."""
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
        elif rest in _DENSE:
            state[f"{layer}.{_DENSE[rest]}"] = tensor
        elif rest == "mlp.router.weight":
            state[f"{layer}.mlp.gate.weight"] = tensor
        elif rest == "mlp.experts.gate":  # (n, C, F) x2 -> (n, 2F, C), gate rows first
            up = ours[f"blocks.{match.group(1)}.mlp.experts.up"]
            gate_up = torch.cat([tensor, up], dim=2).transpose(1, 2).contiguous()
            state[f"{layer}.mlp.experts.gate_up_proj"] = gate_up
        elif rest == "mlp.experts.up":
            continue  # with the gate
        elif rest == "mlp.experts.down":  # (n, F, C) -> (n, C, F)
            state[f"{layer}.mlp.experts.down_proj"] = tensor.transpose(1, 2).contiguous()
        else:
            raise ValueError(f"{HF_CLASS} has no weight for our {name!r}")
    return state


def from_hf(hf_config: Qwen3MoeConfig,
            state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:  # fmt: skip
    """Our `DecoderConfig` and state dict for a Qwen3-MoE checkpoint, experts fused or one
    module each (ValueError naming the transformers option we cannot express)."""
    problems = []
    act = {value: key for key, value in ACTIVATIONS.items()}.get(hf_config.hidden_act)
    if act is None:
        problems.append(f"hidden_act={hf_config.hidden_act!r} (needs 'silu' or 'gelu')")
    if getattr(hf_config, "attention_bias", False):
        problems.append("attention_bias=true (needs false)")
    step = hf_config.decoder_sparse_step
    sparse = [(i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)]
    dense_only = [i for i in (hf_config.mlp_only_layers or []) if sparse[i]]
    if dense_only:
        problems.append(
            f"mlp_only_layers={hf_config.mlp_only_layers} (dense layers go between MoE layers "
            "every model.moe.every_k_layers)"
        )
    top_k = hf_config.num_experts_per_tok
    if top_k == 1 and hf_config.norm_topk_prob:
        problems.append("norm_topk_prob=true with one expert (ours keeps the router probability)")
    scaling, theta = rope_from_hf(hf_config, problems)
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))
    window = hf_config.sliding_window if getattr(hf_config, "use_sliding_window", False) else None
    cfg = DecoderConfig(
        **llama_layout(hf_config, "qwen3_moe"),
        activation=act or "swiglu",
        bias=False,
        rope_theta=theta,
        rope_scaling=scaling,
        attention_window=window,
        qk_norm=True,
        moe=MoEConfig(
            n_experts=hf_config.num_experts,
            top_k=top_k,
            every_k_layers=step,
            d_expert=(
                None
                if hf_config.moe_intermediate_size == hf_config.intermediate_size
                else hf_config.moe_intermediate_size
            ),  # fmt: skip
            normalize_top_k=bool(hf_config.norm_topk_prob) or top_k == 1,
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
        layer, rest = match.group(1), match.group(2)
        prefix = f"blocks.{layer}"
        fused, single = _FUSED.fullmatch(rest), _PER_EXPERT.fullmatch(rest)
        if rest in _BLOCK_INVERSE:
            state[f"{prefix}.{_BLOCK_INVERSE[rest]}"] = tensor
        elif rest == "mlp.gate.weight":
            state[f"{prefix}.mlp.router.weight"] = tensor
        elif fused and fused.group(1) == "gate_up_proj":  # (n, 2F, C)
            gate, up = tensor.chunk(2, dim=1)
            state[f"{prefix}.mlp.experts.gate"] = gate.transpose(1, 2).contiguous()
            state[f"{prefix}.mlp.experts.up"] = up.transpose(1, 2).contiguous()
        elif fused:  # down_proj (n, C, F)
            state[f"{prefix}.mlp.experts.down"] = tensor.transpose(1, 2).contiguous()
        elif single:
            per_expert.setdefault((layer, single.group(2)), {})[int(single.group(1))] = tensor
        else:
            raise ValueError(f"cannot import {HF_CLASS}: unknown weight {key!r}")
    ours = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    for (layer, kind), experts in per_expert.items():
        if sorted(experts) != list(range(cfg.moe.n_experts)):
            raise ValueError(
                f"cannot import {HF_CLASS}: layer {layer} has {kind} weights for experts "
                f"{sorted(experts)}, not 0..{cfg.moe.n_experts - 1}"
            )
        stacked = torch.stack([experts[e].T for e in range(cfg.moe.n_experts)])
        state[f"blocks.{layer}.mlp.experts.{ours[kind]}"] = stacked.contiguous()
    return cfg, state
