"""MoE decoders to transformers' MixtralForCausalLM (and, with QK-norm, Qwen3MoeForCausalLM)
and back: logits within 1e-4 (fp32), the same greedy tokens from `generate()`, import of both
expert layouts (fused 5.x tensors and the per-expert files), refusal of the settings each
lacks, and `kiln export`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig

from pretrain.config import (
    DecoderConfig,
    MoEConfig,
    RopeScalingConfig,
    build_config,
    register_configs,
)
from pretrain.models import build_model
from pretrain.models.hf import (
    ARCHITECTURES,
    export_model,
    hf_module_for,
    import_model,
    mixtral,
    qwen3_moe,
)

VOCAB = 640
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str = "tiny_moe", moe: dict | None = None, **changes: object) -> DecoderConfig:
    cfg = build_config(compose("plan", overrides=[f"model={name}", "data=small"])).model
    assert isinstance(cfg, DecoderConfig)
    cfg.vocab_size, cfg.max_seq_len = VOCAB, 64
    for key, value in changes.items():
        setattr(cfg, key, value)
    for key, value in (moe or {}).items():
        setattr(cfg.moe, key, value)
    return cfg


VARIANTS: dict[str, tuple[dict, dict]] = {
    "tiny_moe": ({}, {}),  # 4 experts, top-2, tied, GQA
    # 8 experts top-3 of a separate expert width, untied, GeGLU, head dim, linear rope scaling
    "options": (
        {"n_experts": 8, "top_k": 3, "d_expert": 40},
        {"tie_embeddings": False, "activation": "geglu", "head_dim": 32, "rope_theta": 500.0,
         "rope_scaling": RopeScalingConfig(kind="linear", factor=2.0)},
    ),
    # QK-norm: Qwen3-MoE. A dense block then an MoE one with a top-1 Switch gate (the router
    # probability, not renormalised); then 8 unrenormalised top-3 experts under a window
    "qwen3_moe": ({"every_k_layers": 2, "top_k": 1}, {"qk_norm": True, "n_layers": 4}),
    "qwen3_moe_options": (
        {"n_experts": 8, "top_k": 3, "d_expert": 40, "normalize_top_k": False},
        {"qk_norm": True, "attention_window": 6, "tie_embeddings": False, "head_dim": 32},
    ),
}  # fmt: skip


def hf_class(variant: str) -> str:
    return "Qwen3MoeForCausalLM" if variant.startswith("qwen3") else "MixtralForCausalLM"


def randomized(cfg: DecoderConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("hf_moe")
    result = {}
    for variant, (moe, changes) in VARIANTS.items():
        cfg = preset(moe=moe, **changes)
        model = randomized(cfg)
        result[variant] = (
            cfg,
            model,
            export_model(model, cfg, root / variant, tokenizer_path=None),
        )
    return result


def left_padded_batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 16), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = mask[2, :11] = False
    ids[~mask] = 0
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_logits_match_ours(exported: dict, variant: str) -> None:
    cfg, model, out = exported[variant]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class(variant)
    experts = getattr(hf.config, "num_local_experts", None) or hf.config.num_experts
    assert experts == cfg.moe.n_experts
    assert hf.config.num_experts_per_tok == cfg.moe.top_k
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < TOLERANCE
        ours = model(ids, padding_mask=mask, position_ids=positions)
        theirs = hf(ids, attention_mask=mask.long(), position_ids=positions).logits
    assert (ours - theirs)[mask].abs().max().item() < TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_reproduces_our_greedy_tokens(exported: dict, variant: str) -> None:
    cfg, model, out = exported[variant]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask, _ = left_padded_batch(seed=2)
    steps = 10
    ours, grown = ids, mask
    for _ in range(steps):  # full forwards of our model
        positions = (grown.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ours, padding_mask=grown, position_ids=positions)
        ours = torch.cat([ours, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=1)
    settings = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None,
                                pad_token_id=0)  # fmt: skip
    theirs = hf.generate(ids, attention_mask=mask.long(), generation_config=settings)
    assert theirs[:, 16:].tolist() == ours[:, 16:].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_reproduces_the_model(exported: dict, variant: str) -> None:
    cfg, model, out = exported[variant]
    imported_cfg, imported = import_model(out)
    assert imported_cfg.moe.n_experts == cfg.moe.n_experts
    assert imported_cfg.moe.top_k == cfg.moe.top_k
    assert (imported_cfg.moe.d_expert or imported_cfg.d_ff) == (cfg.moe.d_expert or cfg.d_ff)
    for key in ("d_model", "n_layers", "resolved_kv_heads", "resolved_head_dim", "activation",
                "rope_theta", "rope_scaling", "tie_embeddings", "qk_norm",
                "attention_window"):  # fmt: skip
        assert getattr(imported_cfg, key) == getattr(cfg, key), key
    assert imported_cfg.moe.every_k_layers == cfg.moe.every_k_layers
    if cfg.moe.top_k > 1:
        assert imported_cfg.moe.normalize_top_k == cfg.moe.normalize_top_k
    ids, _, _ = left_padded_batch()
    with torch.no_grad():
        assert torch.allclose(imported(ids), model(ids), atol=1e-6, rtol=0)


def test_both_expert_layouts_round_trip(exported: dict) -> None:
    cfg, model, out = exported["options"]
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    # save_pretrained writes the original Mixtral checkpoint layout (one module per expert)
    # when the installed transformers keeps fused tensors in memory
    per_expert = "model.layers.0.block_sparse_moe.experts.7.w2.weight"
    assert per_expert in names or "model.layers.0.mlp.experts.down_proj" in names
    hf_cfg = mixtral.hf_config(cfg)
    ours = model.state_dict()
    for fused in (True, False):
        state = mixtral.to_hf_state_dict(model, fused=fused)
        assert ("model.layers.1.mlp.experts.gate_up_proj" in state) == fused
        back_cfg, back = mixtral.from_hf(hf_cfg, state)
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours)
    # Qwen3-MoE: the files hold one module per expert (test_import_reproduces_the_model reads
    # them), the installed transformers the fused tensors, read back here
    cfg, model, out = exported["qwen3_moe_options"]
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    state = qwen3_moe.to_hf_state_dict(model)
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 80, cfg.d_model)
    back_cfg, back = qwen3_moe.from_hf(qwen3_moe.hf_config(cfg), state)
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize(
    ("moe", "changes", "keys"),
    [
        ({"capacity_factor": 1.25}, {}, ["model.moe.capacity_factor=1.25"]),
        ({"n_shared_experts": 1, "router": "sigmoid"}, {},
         ["model.moe.n_shared_experts=1", "model.moe.router='sigmoid'"]),
        ({"every_k_layers": 2}, {}, ["model.moe.every_k_layers=2"]),
        ({"top_k": 1}, {}, ["model.moe.top_k=1"]),
        ({"normalize_top_k": False}, {"bias": True}, ["model.moe.normalize_top_k=false",
                                                       "model.bias=true"]),
        ({"capacity_factor": 1.0, "n_shared_experts": 1},
         {"qk_norm": True, "attention_window": 8, "global_every": 2},
         ["model.moe.capacity_factor=1.0", "model.moe.n_shared_experts=1",
          "model.global_every=2"]),
    ],
)  # fmt: skip
def test_settings_mixtral_lacks_are_named(
    moe: dict, changes: dict, keys: list[str], tmp_path: Path
) -> None:
    cfg = preset(moe=moe, **changes)
    expected = "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"
    assert expected == hf_module_for(cfg).HF_CLASS
    with pytest.raises(ValueError) as error:
        export_model(nn.Linear(1, 1), cfg, tmp_path / "out", tokenizer_path=None)
    for key in keys:
        assert key in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_kiln_export_writes_mixtral(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pretrain.checkpoint_io import save_consolidated
    from pretrain.export import run

    cfg = preset()
    model = randomized(cfg, seed=3)
    save_consolidated(model, cfg, tmp_path / "ckpt")
    kiln = build_config(compose("export", overrides=[
        f"export.checkpoint={tmp_path / 'ckpt'}", f"export.output_dir={tmp_path / 'hf'}"]))  # fmt: skip
    assert run(kiln) == 0
    assert "wrote MixtralForCausalLM" in capsys.readouterr().out
    assert ARCHITECTURES["MixtralForCausalLM"] == "pretrain.models.hf.mixtral"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, _, _ = left_padded_batch()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < TOLERANCE
    assert MoEConfig().n_experts == 0  # dense stays the default
