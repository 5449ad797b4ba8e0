"""Hugging Face transformers interop: our modules to transformers directories and back.

One module per transformers architecture, each with the same four names:

    HF_CLASS: str                      the transformers class, e.g. "LlamaForCausalLM"
    hf_config(cfg) -> PretrainedConfig the equivalent transformers config; ValueError naming
                                       every `model.*` key that has no equivalent
    to_hf_state_dict(model) -> dict    our weights under transformers' names and layouts (a
                                       tied output head is left out: transformers ties it)
    from_hf(hf_config, state_dict)     -> (ModelConfig, our state dict)

`ARCHITECTURES` maps each transformers class to its module (read from `config.json`'s
`architectures` on import); `hf_module_for(cfg)` picks the module for one of our configs:

    decoder, position=rope      LLaMA  (RMSNorm, RoPE, gated MLP)    -> LlamaForCausalLM
    decoder, rope, qk_norm      Qwen3  (LLaMA with QK-norm, windows) -> Qwen3ForCausalLM
    decoder, rope, window       Qwen2  (LLaMA with sliding windows)  -> Qwen2ForCausalLM
    decoder, rope, MoE          Mixtral (LLaMA with sparse experts)  -> MixtralForCausalLM
    decoder, rope, MoE, qk_norm Qwen3-MoE (Qwen3 with sparse experts)-> Qwen3MoeForCausalLM
    decoder, position=learned   GPT-2  (LayerNorm, learned, GELU)    -> GPT2LMHeadModel
    encoder                     BERT                                 -> BertForMaskedLM
    encoder_decoder             T5                                   -> T5ForConditionalGeneration

`export_model` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` (or
the family's auto class) and `AutoTokenizer.from_pretrained` load; `import_model` reads one
back into our modules. Modules are imported lazily: importing this package does not import
transformers.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, ModelConfig

# transformers imports torchao when it is installed (kiln's float8 option), and torchao's
# enums register with torch's pytree in a way torch now calls deprecated: two warnings on
# every export and import, about code that is neither kiln's nor the user's
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# The fixed special-token ids of every kiln tokenizer (data_pipeline/tokenizer.py), written into
# exported configs so `generate()` and padding use the right tokens.
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "pretrain.models.hf.llama",
    "Qwen3ForCausalLM": "pretrain.models.hf.qwen3",
    "Qwen2ForCausalLM": "pretrain.models.hf.qwen2",
    "MixtralForCausalLM": "pretrain.models.hf.mixtral",
    "Qwen3MoeForCausalLM": "pretrain.models.hf.qwen3_moe",
    "GPT2LMHeadModel": "pretrain.models.hf.gpt2",
    "BertForMaskedLM": "pretrain.models.hf.bert",
    "T5ForConditionalGeneration": "pretrain.models.hf.t5",
}

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class NoEquivalentError(ValueError):
    """Our config has no transformers equivalent; the message names the keys."""


def mismatch_error(hf_class: str, problems: list[str]) -> NoEquivalentError:
    """One error naming every key that keeps a config from mapping onto `hf_class`."""
    return NoEquivalentError(f"{hf_class} cannot represent this model: " + "; ".join(problems))


_WRAPPERS = re.compile(r"^module\.|(?<![^.])(_orig_mod|_checkpoint_wrapped_module)\.")


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` without the name parts DDP (`module.`), `torch.compile`
    (`_orig_mod.`) and activation checkpointing (`_checkpoint_wrapped_module.`) add."""
    return {_WRAPPERS.sub("", name): tensor.detach() for name, tensor in model.state_dict().items()}


def hf_module_for(cfg: ModelConfig) -> ModuleType:
    """The interop module for `cfg`'s family and layout (raises NoEquivalentError)."""
    if isinstance(cfg, DecoderConfig):
        if cfg.position == "rope":
            if cfg.moe.n_experts:
                return _load("Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM")
            if cfg.qk_norm:
                return _load("Qwen3ForCausalLM")
            if cfg.attention_window is not None:
                return _load("Qwen2ForCausalLM")
            return _load("LlamaForCausalLM")
        if cfg.position == "learned":
            return _load("GPT2LMHeadModel")
        raise NoEquivalentError(
            f"model.position={cfg.position!r}: a decoder exports as LLaMA (position=rope) or "
            "GPT-2 (position=learned)"
        )
    if isinstance(cfg, EncoderConfig):
        return _load("BertForMaskedLM")
    if isinstance(cfg, EncoderDecoderConfig):
        return _load("T5ForConditionalGeneration")
    raise NoEquivalentError(f"no transformers export for model family {cfg.family!r}")


def _load(hf_class: str) -> ModuleType:
    name = ARCHITECTURES[hf_class]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise NoEquivalentError(f"{hf_class} export is not built yet ({name})") from error


# --------------------------------------------------------------------------------------------
# export


def build_hf_model(
    hf_class: str, hf_config: PreTrainedConfig, state_dict: dict[str, Tensor], dtype: torch.dtype
) -> PreTrainedModel:
    """A transformers model of `hf_class` holding exactly `state_dict`, in `dtype`.

    Built without random initialisation, then loaded strictly: every parameter must come from
    `state_dict` except those tied to one that does (a tied output head), and no key of
    `state_dict` may go unused.
    """
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, hf_class)
    with no_init_weights():
        model = cls._from_config(hf_config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying that init_weights does
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    own = model.state_dict()
    provided = {own[name].data_ptr() for name in state_dict if name in own}
    untied = [name for name in missing if own[name].data_ptr() not in provided]
    if untied or unexpected:
        raise ValueError(
            f"{hf_class} state dict mismatch: missing {sorted(untied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.eval()


def export_model(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: Path,
    *,
    tokenizer_path: Path | None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a transformers directory (config.json, generation_config.json,
    model.safetensors and, with `tokenizer_path`, tokenizer.json, tokenizer_config.json and the
    SentencePiece tokenizer.model).

    The directory is built under a temporary name next to `out_dir` and renamed when complete,
    so `out_dir` is never half written. An existing non-empty `out_dir` is an error unless
    `overwrite` (then it is replaced). Raises NoEquivalentError when the model has no
    transformers equivalent (before anything is written).
    """
    out_dir = Path(out_dir)
    module = hf_module_for(cfg)
    hf_config = module.hf_config(cfg)
    if tokenizer_path is not None:
        from pretrain.models.hf.tokenizer import check_tokenizer

        check_tokenizer(Path(tokenizer_path), cfg.vocab_size)
    from pretrain.atomic_dir import readable_as_umask_allows, say_recovered, staged

    say_recovered(out_dir)  # an export cut short: its previous directory back in place first
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty (overwrite=true replaces it)")
    hf_model = build_hf_model(module.HF_CLASS, hf_config, module.to_hf_state_dict(model), dtype)
    with staged(out_dir) as staging:
        hf_model.save_pretrained(staging)
        for weights in staging.glob("*.safetensors"):  # written 0600 by safetensors
            readable_as_umask_allows(weights)
        if tokenizer_path is not None:
            from pretrain.models.hf.tokenizer import export_tokenizer

            export_tokenizer(
                Path(tokenizer_path),
                staging,
                model_max_length=cfg.max_seq_len,
                # decoders generate after the prompt: pad batches on the left
                padding_side="left" if isinstance(cfg, DecoderConfig) else "right",
                append_eos=cfg.family == "encoder_decoder",  # T5's inputs end with </s>
            )
    return out_dir


# --------------------------------------------------------------------------------------------
# import


def load_hf_state_dict(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of a transformers directory's safetensors weights (single or sharded)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / WEIGHTS_NAME).is_file():
        return load_file(hf_dir / WEIGHTS_NAME)
    index = hf_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(hf_dir / shard))
        return state
    raise FileNotFoundError(f"{hf_dir} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def import_model(hf_dir: Path) -> tuple[ModelConfig, nn.Module]:
    """Read a transformers directory (of a class in `ARCHITECTURES`) into our module, in fp32.

    Raises NoEquivalentError for an architecture we do not map, ValueError for a config whose
    options we cannot express.
    """
    from transformers import AutoConfig

    from pretrain.models import empty_model

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    known = [name for name in architectures if name in ARCHITECTURES]
    if not known:
        raise NoEquivalentError(
            f"{hf_dir}: architectures {architectures} are not among {sorted(ARCHITECTURES)}"
        )
    module = _load(known[0])
    hf_config = AutoConfig.from_pretrained(hf_dir)
    cfg, state = module.from_hf(hf_config, load_hf_state_dict(hf_dir))
    model = empty_model(cfg, "cpu")  # every weight is loaded: nothing to initialise
    state = {name: tensor.to(torch.float32) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()
