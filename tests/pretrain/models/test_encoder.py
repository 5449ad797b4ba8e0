"""The BERT-style encoder: parameter accounting, gradients, masks, FLOPs, and logits equal to
transformers' BertForMaskedLM through the Hugging Face mapping (both directions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import EncoderConfig, build_config, register_configs
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.models.accounting import count_parameters, training_flops
from pretrain.models.encoder import Encoder
from pretrain.models.hf import bert, export_model, import_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str, **changes: object) -> EncoderConfig:
    raw = compose("plan", overrides=[f"model={name}", "objective=mlm", "data.seq_len=128"])
    cfg = build_config(raw).model
    assert isinstance(cfg, EncoderConfig)
    return dataclasses.replace(cfg, **changes)


def batch(seed: int = 0, length: int = 24) -> dict[str, torch.Tensor]:
    """Two rows; the second is right-padded after 15 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4096, (2, length), generator=generator)
    types = torch.randint(0, 2, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, 15:] = False
    return {"input_ids": ids, "token_type_ids": types, "padding_mask": mask}


def load_hf(cfg: EncoderConfig, ours: Encoder) -> torch.nn.Module:
    """BertForMaskedLM from `hf_config`, holding exactly `to_hf_state_dict`: no key unused, and
    nothing missing but the tied output weight, which transformers ties to the embedding."""
    model = transformers.BertForMaskedLM(bert.hf_config(cfg)).eval()
    missing, unexpected = model.load_state_dict(bert.to_hf_state_dict(ours), strict=False)
    assert not unexpected
    assert set(missing) == ({"cls.predictions.decoder.weight"} if cfg.tie_embeddings else set())
    if cfg.tie_embeddings:
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    return model


def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"],
            token_type_ids=inputs["token_type_ids"],
            attention_mask=inputs["padding_mask"].long(),
        ).logits


def our_logits(model: Encoder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            token_type_ids=inputs["token_type_ids"],
            padding_mask=inputs["padding_mask"],
        )


@pytest.mark.parametrize("name", ["tiny_encoder", "bert_base"])
def test_parameter_count_matches_accounting(name: str) -> None:
    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, Encoder)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pooler": True, "type_vocab_size": 0, "tie_embeddings": False},
        {"norm_position": "pre", "position": "rope", "norm": "rmsnorm", "bias": False,
         "activation": "swiglu", "mlm_head_transform": False, "embedding_norm": False},
        {"qk_norm": True},  # LayerNorm with biases over each head's queries and keys
    ],
    ids=["bert", "pooler-untied", "prenorm-rope", "qk-norm"],
)  # fmt: skip
def test_variant_counts_and_finite_gradients(changes: dict[str, object]) -> None:
    cfg = preset("tiny_encoder", **changes)
    torch.manual_seed(0)
    model = Encoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    inputs = batch()
    hidden = model.hidden(
        inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
        padding_mask=inputs["padding_mask"],
    )  # fmt: skip
    loss = model.mlm_logits(hidden).float().logsumexp(-1).mean()
    if cfg.pooler:
        assert model.pool(hidden).shape == (2, cfg.d_model)
        loss = loss + model.pool(hidden).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert len(model.blocks) == cfg.n_layers and model.cfg is cfg


def test_activation_checkpointing_keeps_gradients() -> None:
    cfg = preset("tiny_encoder")
    inputs = batch()
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Encoder(cfg)
        if checkpointed:
            apply_activation_checkpointing(model)
        model(**inputs).float().logsumexp(-1).mean().backward()
        grads.append({name.replace("_checkpoint_wrapped_module.", ""): p.grad
                      for name, p in model.named_parameters()})  # fmt: skip
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_init_follows_bert() -> None:
    model = Encoder(preset("tiny_encoder"))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(64))
    assert not model.head.bias.any() and not model.blocks[0].attn.q.bias.any()


def test_hidden_and_mlm_logits_gather_masked_positions() -> None:
    model = Encoder(preset("tiny_encoder")).eval()
    inputs = batch()
    full = our_logits(model, inputs)
    where = torch.tensor([[0, 3], [1, 7], [0, 20]])
    with torch.no_grad():
        hidden = model.hidden(inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
                              padding_mask=inputs["padding_mask"])  # fmt: skip
        picked = model.mlm_logits(hidden[where[:, 0], where[:, 1]])  # (3, V)
    torch.testing.assert_close(picked, full[where[:, 0], where[:, 1]])


VARIANTS = {
    "tiny_encoder": {},
    "no-types-untied-relu": {"type_vocab_size": 0, "tie_embeddings": False, "activation": "relu"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_and_round_trip(variant: str) -> None:
    cfg = preset("tiny_encoder", **VARIANTS[variant])
    torch.manual_seed(0)
    ours = Encoder(cfg).eval()
    with torch.no_grad():  # nonzero output bias and norm affines, so the mapping is exercised
        for name, param in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf = load_hf(cfg, ours)
    inputs = batch()
    if cfg.type_vocab_size == 0:  # one (zero) token type in transformers; ours has none
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    real = inputs["padding_mask"]
    expected = hf_logits(hf, inputs)
    got = our_logits(ours, inputs)
    assert (got - expected)[real].abs().max().item() < 1e-4

    # transformers -> ours: a fresh model loads the state dict and reproduces the logits
    new_cfg, state = bert.from_hf(hf.config, hf.state_dict())
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "activation", "norm_eps",
                "max_seq_len", "type_vocab_size", "tie_embeddings"):  # fmt: skip
        assert getattr(new_cfg, key) == getattr(cfg, key), key
    loaded = Encoder(new_cfg).eval()
    loaded.load_state_dict(state, strict=True)
    assert (our_logits(loaded, inputs) - expected)[real].abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_export_directory_loads_in_transformers_and_imports_back(tmp_path, tied: bool) -> None:
    cfg = preset("tiny_encoder", tie_embeddings=tied)
    torch.manual_seed(1)
    ours = Encoder(cfg).eval()
    out = export_model(ours, cfg, tmp_path / "bert", tokenizer_path=None)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(hf).__name__ == bert.HF_CLASS
    inputs = batch()
    real = inputs["padding_mask"]
    assert (hf_logits(hf, inputs) - our_logits(ours, inputs))[real].abs().max().item() < 1e-4
    new_cfg, loaded = import_model(out)
    assert new_cfg.tie_embeddings == tied
    assert (our_logits(loaded, inputs) - our_logits(ours, inputs))[real].abs().max() < 1e-5


def test_from_hf_ignores_pooler_and_accepts_bare_bert_names() -> None:
    cfg = preset("tiny_encoder")
    hf = transformers.BertForMaskedLM(bert.hf_config(cfg)).eval()
    state = {key.removeprefix("bert."): value for key, value in hf.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    new_cfg, ours = bert.from_hf(hf.config, state)
    assert not new_cfg.pooler
    model = Encoder(new_cfg).eval()
    model.load_state_dict(ours, strict=True)
    inputs = batch()
    real = inputs["padding_mask"]
    assert (our_logits(model, inputs) - hf_logits(hf, inputs))[real].abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("norm_position", {"norm_position": "pre"}),
        ("position", {"position": "rope"}),
        ("activation", {"activation": "swiglu"}),
        ("norm", {"norm": "rmsnorm"}),
        ("bias", {"bias": False}),
        ("pooler", {"pooler": True}),
        ("n_kv_heads", {"n_kv_heads": 2}),
    ],
)
def test_hf_config_refuses_what_bert_cannot_express(key: str, changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"model.{key}"):
        bert.hf_config(preset("tiny_encoder", **changes))


def test_hf_config_declares_exact_gelu_and_one_token_type() -> None:
    config = bert.hf_config(preset("tiny_encoder", type_vocab_size=0))
    assert config.hidden_act == "gelu" and config.type_vocab_size == 1
    state = bert.to_hf_state_dict(Encoder(preset("tiny_encoder", type_vocab_size=0)))
    assert not state["bert.embeddings.token_type_embeddings.weight"].any()


def test_document_masking_isolates_documents() -> None:
    model = Encoder(preset("tiny_encoder")).eval()
    ids = torch.randint(5, 4096, (1, 20))
    documents = torch.tensor([[0] * 8 + [1] * 12])
    positions = torch.cat([torch.arange(8), torch.arange(12)])[None]
    other = ids.clone()
    other[0, 8:] = torch.randint(5, 4096, (12,))
    with torch.no_grad():
        a = model(ids, document_ids=documents, position_ids=positions)
        b = model(other, document_ids=documents, position_ids=positions)
        alone = model(ids[:, :8])  # the first document on its own row
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[:, :8], alone, rtol=0, atol=1e-4)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2


def test_padding_keys_are_ignored() -> None:
    model = Encoder(preset("tiny_encoder")).eval()
    inputs = batch()
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 15:] = 7
    real = inputs["padding_mask"]
    assert torch.equal(our_logits(model, inputs)[real], our_logits(model, changed)[real])


def test_flops_match_flop_counter() -> None:
    """training_flops against FlopCounterMode on our own module, forward + backward. The math
    SDPA backend makes the score matmuls visible to the counter (the fused CPU kernel's are
    not counted)."""
    seq_len, rows = 128, 2
    cfg = preset("tiny_encoder")
    model = Encoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).sum().backward()
    predicted = training_flops(cfg, seq_len).per_sequence * rows
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_masked_lm_flops_count_the_head_at_the_masked_positions() -> None:
    """Training with labels runs the MLM head on the masked positions only: MFU counts the
    head at `objective.mask_prob` of the positions (counted at all, MFU was ~2.9x too high
    for tiny_encoder)."""
    seq_len, rows, share = 128, 2, 0.15
    cfg = preset("tiny_encoder")
    model = Encoder(cfg)
    ids = torch.randint(5, cfg.vocab_size, (rows, seq_len))
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(rows, seq_len, generator=torch.Generator().manual_seed(0)) < share
    labels[chosen] = ids[chosen]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=labels).backward()
    actual = chosen.float().mean().item()
    predicted = training_flops(cfg, seq_len, head_share=actual).per_sequence * rows
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)
    everywhere = training_flops(cfg, seq_len).per_sequence * rows
    assert everywhere > 2 * counter.get_total_flops()
