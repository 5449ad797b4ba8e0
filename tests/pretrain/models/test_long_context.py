"""Long-context options of the models: RoPE scaling (linear, NTK, YaRN) equals transformers'
formulas and exports with equal logits; ALiBi, sliding windows, local+global layers, global
tokens and document masks equal a naive reference attention; the KV cache agrees with them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import (
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    RopeScalingConfig,
    validate_model,
)
from pretrain.models import build_model
from pretrain.models.decoder import DecoderCache
from pretrain.models.layers import alibi_slopes, rope_frequencies

VOCAB = 64


def decoder_config(**changes: object) -> DecoderConfig:
    cfg = DecoderConfig(name="long", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_ff=64, max_seq_len=64)  # fmt: skip
    for key, value in changes.items():
        setattr(cfg, key, value)
    validate_model(cfg)
    return cfg


def encoder_config(**changes: object) -> EncoderConfig:
    cfg = EncoderConfig(name="long_encoder", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                        d_ff=64, max_seq_len=64, position="learned", norm="layernorm",
                        activation="gelu", bias=True, type_vocab_size=2)  # fmt: skip
    for key, value in changes.items():
        setattr(cfg, key, value)
    validate_model(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# RoPE scaling


def yarn(**changes: object) -> RopeScalingConfig:
    return RopeScalingConfig(kind="yarn", factor=4.0, original_max_seq_len=16, **changes)  # type: ignore[arg-type]


SCALINGS = {
    "linear": RopeScalingConfig(kind="linear", factor=4.0),
    "ntk": RopeScalingConfig(kind="ntk", factor=4.0),
    "yarn": yarn(),
    "yarn_options": yarn(beta_fast=16.0, beta_slow=2.0, attention_factor=1.25, truncate=False),
}


@pytest.mark.parametrize("name", SCALINGS)
def test_rope_frequencies_equal_transformers(name: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from pretrain.models.hf.llama import hf_config

    cfg = decoder_config(head_dim=16, rope_scaling=SCALINGS[name])
    theirs_module = LlamaRotaryEmbedding(hf_config(cfg))  # ntk: plain RoPE with a larger base
    theirs, their_scale = theirs_module.inv_freq, theirs_module.attention_scaling
    ours, our_scale = rope_frequencies(cfg)
    assert torch.equal(ours, theirs) and our_scale == pytest.approx(their_scale, abs=1e-12)


def test_rope_scaling_changes_the_frequencies_as_the_formulas_say() -> None:
    dim, theta, factor = 16, 10000.0, 4.0
    base = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = {name: rope_frequencies(decoder_config(head_dim=dim, rope_scaling=scaling))
             for name, scaling in SCALINGS.items()}  # fmt: skip
    torch.testing.assert_close(freqs["linear"][0], base / factor, rtol=0, atol=0)
    ntk = 1.0 / (theta * factor ** (dim / (dim - 2))) ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(freqs["ntk"][0], ntk)
    assert freqs["ntk"][0][0] == base[0]  # NTK keeps the fastest dim, stretches the slowest
    assert freqs["ntk"][0][-1] == pytest.approx(base[-1].item() / factor)
    inv_freq, scale = freqs["yarn"]
    # YaRN: dims that turn more than beta_fast=32 times in the original 16 tokens keep their
    # frequency, dims turning less than beta_slow=1 time are divided by the factor
    turns = 16 * base / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert torch.equal(inv_freq[fast], base[fast])
    torch.testing.assert_close(inv_freq[slow], base[slow] / factor)
    assert slow.any() and (inv_freq <= base).all() and (inv_freq >= base / factor - 1e-12).all()
    assert scale == pytest.approx(0.1 * math.log(factor) + 1)
    assert freqs["yarn_options"][1] == 1.25


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_rope_exports_to_llama_with_equal_logits(name: str, export_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pretrain.models.hf import export_model, import_model

    cfg = decoder_config(rope_scaling=SCALINGS[name], max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    out = export_model(model, cfg, export_dir / name, tokenizer_path=None)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 64))  # 4x the original 16-token context
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        error = (ours - theirs).abs().max().item()
    assert error < 1e-4, error
    imported_cfg, imported = import_model(out)
    expected = SCALINGS[name] if name != "ntk" else RopeScalingConfig()  # ntk: a larger base
    assert imported_cfg.rope_scaling == expected
    with torch.no_grad():
        assert (imported(ids) - ours).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------
# ALiBi, sliding windows, local+global layers: against a naive reference


def test_alibi_slopes_are_the_papers_and_blooms() -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(6).tolist() == [2.0**-i for i in (2, 4, 6, 8, 1, 3)]
    for heads in (4, 6, 12):
        bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # slope * position
        torch.testing.assert_close(alibi_slopes(heads), bloom.view(heads, 2)[:, 1])


def reference_bias(cfg: ModelConfig, layer: int, *, causal: bool, batch: int, length: int,
                   documents: Tensor | None, padding: Tensor | None) -> Tensor:  # fmt: skip
    """(B, H, T, T) additive bias, element by element from the rules as the README states."""
    heads = cfg.n_heads
    if cfg.position == "alibi":  # the ALiBi paper's slopes for 4 heads: 2^-2, 2^-4, ...
        assert heads == 4
    slopes = [2.0 ** (-2 * (h + 1)) for h in range(heads)]
    is_global = cfg.global_every > 0 and (layer + 1) % cfg.global_every == 0
    window = None if is_global else cfg.attention_window
    bias = torch.zeros(batch, heads, length, length)

    def doc(b: int, t: int) -> int:
        return int(documents[b, t]) if documents is not None else 0

    def real(b: int, t: int) -> bool:
        return padding is None or bool(padding[b, t])

    def index_in_document(b: int, t: int) -> int:  # among the document's real tokens
        return sum(1 for s in range(t) if doc(b, s) == doc(b, t) and real(b, s))

    for b in range(batch):
        for i in range(length):
            for j in range(length):
                visible = doc(b, i) == doc(b, j) and real(b, j) and (j <= i or not causal)
                if window is not None:
                    near = (i - j < window) if causal else abs(i - j) < window
                    sink = index_in_document(b, j) < cfg.global_tokens
                    if not causal:
                        sink = sink or index_in_document(b, i) < cfg.global_tokens
                    visible = visible and (near or sink)
                visible = visible or i == j
                for h in range(heads):
                    alibi = -slopes[h] * abs(i - j) if cfg.position == "alibi" else 0.0
                    bias[b, h, i, j] = alibi if visible else -math.inf
    return bias


class NaiveAttention:
    """Stands in for SDPA: ignores the mask the model built and computes
    softmax(Q K^T * scale + reference bias) V explicitly, layer by layer."""

    def __init__(self, biases: list[Tensor]) -> None:
        self.biases = biases
        self.calls = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                 is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                 enable_gqa: bool = False) -> Tensor:  # fmt: skip
        bias = self.biases[self.calls]
        self.calls += 1
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale + bias  # (B, H, T, S)
        return scores.softmax(dim=-1) @ v


def packed_documents(batch: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=generator) < 0.15
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)  # (B, T) document ids, restarting nowhere


CASES: dict[str, tuple[str, dict, str]] = {
    # name: (family, config changes, inputs: packed documents | left padding | both)
    "decoder_window": ("decoder", {"attention_window": 5}, "documents"),
    "decoder_local_global": (
        "decoder",
        {"attention_window": 5, "global_every": 2, "global_tokens": 2},
        "documents",
    ),
    "decoder_alibi": ("decoder", {"position": "alibi"}, "documents"),
    "decoder_alibi_local_global": (
        "decoder",
        {"position": "alibi", "attention_window": 4, "global_every": 2, "global_tokens": 1},
        "padding",
    ),
    "encoder_alibi": ("encoder", {"position": "alibi"}, "both"),
    "encoder_local_global": (
        "encoder",
        {"attention_window": 4, "global_every": 2, "global_tokens": 2},
        "both",
    ),
    "encoder_rope_window": ("encoder", {"position": "rope", "attention_window": 3}, "documents"),
}


@pytest.mark.parametrize("case", CASES)
def test_masks_equal_the_naive_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    family, changes, inputs = CASES[case]
    causal = family == "decoder"
    cfg = (decoder_config if causal else encoder_config)(**changes)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    batch, length = 2, 24
    ids = torch.randint(5, VOCAB, (batch, length))
    documents = packed_documents(batch, length, 3) if inputs in ("documents", "both") else None
    padding = None
    kwargs: dict[str, Tensor] = {}
    if inputs in ("padding", "both"):
        padding = torch.ones(batch, length, dtype=torch.bool)
        if causal:
            padding[1, :5] = False  # left padding, positions start after it
            kwargs["position_ids"] = (padding.long().cumsum(-1) - 1).clamp(min=0)
        else:
            padding[1, -6:] = False  # right padding
        kwargs["padding_mask"] = padding
    if documents is not None:
        kwargs["document_ids"] = documents
    with torch.no_grad():
        ours = model(ids, **kwargs)
        biases = [reference_bias(cfg, layer, causal=causal, batch=batch, length=length,
                                 documents=documents, padding=padding)
                  for layer in range(cfg.n_layers)]  # fmt: skip
        naive = NaiveAttention(biases)
        monkeypatch.setattr(F, "scaled_dot_product_attention", naive)
        reference = model(ids, **kwargs)
    assert naive.calls == cfg.n_layers
    rows = padding if padding is not None else torch.ones(batch, length, dtype=torch.bool)
    torch.testing.assert_close(ours[rows], reference[rows], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {"position": "alibi"},
        {"attention_window": 4, "global_every": 2, "global_tokens": 2},
        {"position": "alibi", "attention_window": 3, "global_tokens": 1},
    ],
)
def test_kv_cache_agrees_with_the_full_forward(changes: dict) -> None:
    torch.manual_seed(2)
    model = build_model(decoder_config(**changes)).eval()
    ids = torch.randint(5, VOCAB, (2, 20))
    padding = torch.ones(2, 20, dtype=torch.bool)
    padding[0, :3] = False  # a left-padded prompt
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, padding_mask=padding, position_ids=positions)
        cache = DecoderCache(model, 2, 32)
        steps = [model(ids[:, :9], padding_mask=padding[:, :9], position_ids=positions[:, :9],
                       cache=cache)]  # fmt: skip
        for t in range(9, 20):
            steps.append(model(ids[:, t : t + 1], padding_mask=padding[:, t : t + 1],
                               position_ids=positions[:, t : t + 1], cache=cache))  # fmt: skip
    torch.testing.assert_close(torch.cat(steps, dim=1)[padding], full[padding], atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_a_window_hides_what_it_should() -> None:
    """Changing a token outside every window changes no later logit; inside, it does."""
    torch.manual_seed(3)
    model = build_model(decoder_config(attention_window=4, n_layers=1)).eval()
    ids = torch.randint(5, VOCAB, (1, 16))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[0, 6:], after[0, 6:])  # one layer: position 6 cannot see 2
    assert not torch.allclose(before[0, 3:6], after[0, 3:6])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": RopeScalingConfig(kind="yarn", factor=0.5)}, "rope_scaling.factor=0.5"),
        ({"rope_scaling": RopeScalingConfig(kind="linear", factor=2.0), "position": "alibi"},
         "model.rope_scaling.kind='linear' needs model.position='rope'"),
        ({"rope_scaling": RopeScalingConfig(kind="yarn", factor=2.0, beta_fast=1.0)},
         "model.rope_scaling.beta_slow=1.0 must be > 0 and below"),
        ({"rope_scaling": RopeScalingConfig(kind="dynamic")}, "model.rope_scaling.kind='dynamic'"),
        ({"global_every": 2}, "model.global_every=2 needs model.attention_window"),
        ({"global_tokens": 4}, "model.global_tokens=4 needs model.attention_window"),
        ({"attention_window": 8, "global_tokens": -1}, "model.global_tokens=-1 must be >= 0"),
    ],
)  # fmt: skip
def test_bad_long_context_settings_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        decoder_config(**changes)


# --------------------------------------------------------------------------------------------
# a model trained at length T, run at 4T


def markov_rows(table: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """(B, length + 1) tokens where each follows from the two before it (10% noise): a model
    must attend to its last two positions, so broken relative positions show in the loss."""
    vocab = table.shape[0]
    rows = torch.empty(batch, length + 1, dtype=torch.long)
    rows[:, :2] = torch.randint(0, vocab, (batch, 2), generator=generator)
    for t in range(2, length + 1):
        rule = table[rows[:, t - 2], rows[:, t - 1]]
        noise = torch.randint(0, vocab, (batch,), generator=generator)
        rows[:, t] = torch.where(torch.rand(batch, generator=generator) < 0.1, noise, rule)
    return rows


def perplexity(model: torch.nn.Module, rows: Tensor, start: int = 0) -> float:
    with torch.no_grad():
        logits = model(rows[:, :-1])
    assert torch.isfinite(logits).all()
    loss = F.cross_entropy(logits[:, start:].flatten(0, 1), rows[:, start + 1 :].flatten())
    return math.exp(loss.item())


def test_a_model_trained_at_length_t_runs_at_4t_with_each_rope_scaling() -> None:
    """Measured (250 steps at T=32, evaluated at 128): perplexity at T 2.36; at 4T unscaled
    8.5 (13.0 on the positions past T), linear 9.3 (9.7), NTK 7.2 (10.4), YaRN 3.3 (3.5).
    Without fine-tuning only YaRN stays close; linear and NTK still beat extrapolation past T
    (linear interpolation needs the fine-tuning of a context-extension stage)."""
    vocab, length, factor = 32, 32, 4
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(0, vocab, (vocab, vocab), generator=generator)
    cfg = decoder_config(vocab_size=vocab, d_model=64, n_heads=4, n_kv_heads=None, d_ff=128,
                         max_seq_len=factor * length)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        rows = markov_rows(table, 32, length, generator)
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rows = markov_rows(table, 16, factor * length, torch.Generator().manual_seed(1))
    at_t = perplexity(model.eval(), rows[:, : length + 1])
    results = {}
    for kind in ("none", "linear", "ntk", "yarn"):
        scaled = DecoderConfig(**{**vars(cfg), "rope_scaling": RopeScalingConfig(
            kind=kind, factor=factor if kind != "none" else 1.0, original_max_seq_len=length)})  # fmt: skip
        extended = build_model(scaled).eval()
        extended.load_state_dict(model.state_dict())
        results[kind] = (perplexity(extended, rows), perplexity(extended, rows, start=length))
    assert at_t < 3.0  # it learned the rule (uniform guessing is 32)
    for kind in ("linear", "ntk", "yarn"):
        whole, beyond = results[kind]
        assert whole < vocab / 2, (kind, results)  # far from chance at 4T
        assert beyond < 0.9 * results["none"][1], (kind, results)  # better than extrapolating
    assert results["yarn"][0] < 1.6 * at_t, results  # YaRN: close to the trained length


@pytest.fixture(autouse=True)
def few_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the machine is shared
    yield
    torch.set_num_threads(threads)
