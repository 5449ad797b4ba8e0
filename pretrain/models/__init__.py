"""The model zoo: plain PyTorch modules for the three families (no distributed imports).

`build_model(cfg)` returns a `Decoder` (GPT/LLaMA), an `Encoder` (BERT, masked LM) or an
`EncoderDecoder` (T5) for the config's family. Each model keeps its layers in `.blocks` (an
encoder-decoder in `.encoder.blocks` and `.decoder.blocks`), which is what
`apply_activation_checkpointing` and the engines wrap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pretrain.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, ModelConfig

if TYPE_CHECKING:  # torch is imported where a model is built: `kiln plan` counts without it
    from torch import Tensor, nn


def build_model(cfg: ModelConfig) -> nn.Module:
    """The module for `cfg`'s family, initialised with that family's recipe (on the CPU, fp32)."""
    if isinstance(cfg, DecoderConfig):
        from pretrain.models.decoder import Decoder

        return Decoder(cfg)
    if isinstance(cfg, EncoderConfig):
        from pretrain.models.encoder import Encoder

        return Encoder(cfg)
    if isinstance(cfg, EncoderDecoderConfig):
        from pretrain.models.encoder_decoder import EncoderDecoder

        return EncoderDecoder(cfg)
    raise TypeError(f"no model family for {type(cfg).__name__}")


def empty_model(cfg: ModelConfig, device: Any) -> nn.Module:
    """The module for `cfg`, its parameters allocated on `device` but not initialised (they
    hold whatever the memory held) and its buffers computed: for weights that come from
    elsewhere (a checkpoint, `trainer.init_from`, rank 0's). Built on the meta device, so no
    time goes into an initialisation that would be overwritten (minutes at tens of billions
    of parameters)."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    reset_buffers(model)
    return model


def reset_buffers(model: nn.Module) -> None:
    """Compute the buffers no state dict carries (RoPE's frequencies, ALiBi's slopes) of a
    model whose buffers were allocated empty (`to_empty`): every submodule with such buffers
    has a `reset_buffers()`."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()


def parameter_numel(parameter: Tensor) -> int:
    """A parameter's element count, also for one partitioned by DeepSpeed's `zero.Init`
    (whose own `numel()` is 0 outside a gather)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def parameter_shape(parameter: Tensor) -> tuple[int, ...]:
    """A parameter's shape, also for one partitioned by `zero.Init` (`ds_shape`)."""
    return tuple(getattr(parameter, "ds_shape", None) or parameter.shape)


def transformer_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """Every stack of blocks in a model (one for decoders and encoders, two for T5)."""
    from torch import nn

    return [module for name, module in model.named_modules() if name.endswith("blocks")
            and isinstance(module, nn.ModuleList)]  # fmt: skip


def checkpointed_block(index: int, every: int) -> bool:
    """Whether block `index` of a stack recomputes its activations under
    `engine.activation_checkpointing_every=every`: blocks 0, every, 2 * every, ..."""
    return index % every == 0


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Recompute blocks' activations in the backward pass instead of storing them: every
    block, or with `every` > 1 every `every`-th block of each stack (`checkpointed_block`).

    Wraps those blocks in place with PyTorch's non-reentrant `checkpoint_wrapper` (the engines
    call this before compiling and sharding, in that order).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for blocks in transformer_blocks(model):
        for index, block in enumerate(blocks):
            if checkpointed_block(index, every):
                blocks[index] = checkpoint_wrapper(block)
    return model
