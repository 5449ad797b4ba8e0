"""Our sliding-window RoPE decoder <-> transformers `Qwen2ForCausalLM`.

LLaMA has no sliding window; Qwen2 is LLaMA's layout with per-layer windows (`layer_types`,
see `pretrain.models.hf.qwen3`, which does the work) and always-present q/k/v biases, which a
bias-free model of ours exports as zeros and imports only when they are zero. Used for decoders
with `model.attention_window` and without QK-norm (with QK-norm: Qwen3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig
from pretrain.models.hf import mismatch_error
from pretrain.models.hf.qwen3 import config_kwargs, decoder_from_hf, hf_state_dict, problems

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

HF_CLASS = "Qwen2ForCausalLM"


def hf_config(cfg: ModelConfig) -> PreTrainedConfig:
    """The `Qwen2Config` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import Qwen2Config

    found = problems(cfg, qk_norm=False)
    if found:
        raise mismatch_error(HF_CLASS, found)
    return Qwen2Config(**config_kwargs(cfg))


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our decoder's weights under `Qwen2ForCausalLM` names, with zero q/k/v biases."""
    return hf_state_dict(model, HF_CLASS, qk_norm=False)


def from_hf(hf_config: PreTrainedConfig,
            state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:  # fmt: skip
    """Our `DecoderConfig` and state dict for a Qwen2 checkpoint whose q/k/v biases are zero."""
    return decoder_from_hf(hf_config, state_dict, HF_CLASS, qk_norm=False)
