"""What every family shares: `build_model` dispatch, `empty_model` (no initialisation, the
buffers computed), blocks that torch.compile traces without a graph break, and, for the
encoder-decoder, transformers' `generate()` reproducing our greedy
tokens on the export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pretrain.config import ModelConfig, build_config, register_configs
from pretrain.models import build_model, empty_model, transformer_blocks
from pretrain.models.decoder import Decoder
from pretrain.models.encoder import Encoder
from pretrain.models.encoder_decoder import EncoderDecoder
from pretrain.models.generation import SamplingConfig, generate_seq2seq
from pretrain.models.hf import export_model

FAMILIES = {
    "tiny_decoder": ("clm", Decoder),
    "tiny_gpt2": ("clm", Decoder),
    "tiny_encoder": ("mlm", Encoder),
    "tiny_encoder_decoder": ("span", EncoderDecoder),
}


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str, *extra: str) -> ModelConfig:
    objective = FAMILIES[name][0]
    overrides = [f"model={name}", f"objective={objective}", "data=small", *extra]
    return build_config(compose("plan", overrides=overrides)).model


@pytest.mark.parametrize("name", FAMILIES)
def test_build_model_dispatches_on_family(name: str) -> None:
    model = build_model(preset(name))
    assert type(model) is FAMILIES[name][1]
    assert len(transformer_blocks(model)) == (2 if name == "tiny_encoder_decoder" else 1)


EMPTY_CASES = [
    *((name,) for name in FAMILIES),
    ("tiny_decoder", "model.position=alibi"),
    ("tiny_encoder", "model.position=alibi"),
    ("tiny_decoder", "model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4.0"),
]


@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda case: "-".join(case))
def test_empty_model_draws_nothing_computes_its_buffers_and_takes_a_state_dict(case) -> None:
    """`empty_model` (for weights a checkpoint or rank 0 gives): the same parameter names and
    shapes as `build_model`, no random draw, every buffer (RoPE's frequencies, YaRN's,
    ALiBi's slopes: in no state dict) equal to a built model's, and once loaded with a built
    model's state dict, the same outputs."""
    cfg = preset(*case)
    torch.manual_seed(0)
    built = build_model(cfg).eval()
    torch.manual_seed(1)
    empty = empty_model(cfg, "cpu").eval()
    after = torch.rand(8)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(8))  # no draw in between
    ours = {name: list(p.shape) for name, p in empty.named_parameters()}
    assert ours == {name: list(p.shape) for name, p in built.named_parameters()}
    buffers = dict(built.named_buffers())
    assert len(buffers) == (1 if cfg.position in ("rope", "alibi") else 0)
    for name, buffer in empty.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    empty.load_state_dict(built.state_dict(), strict=True)
    ids = torch.randint(5, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        if isinstance(built, EncoderDecoder):
            targets = torch.randint(5, cfg.vocab_size, (2, 6))
            assert torch.equal(empty(ids, targets), built(ids, targets))
        else:
            assert torch.equal(empty(ids), built(ids))


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_trace_without_graph_breaks(name: str) -> None:
    """Every block forward of every stack is one graph for torch.compile (dynamo's explain
    traces without compiling, so no C++ toolchain is needed)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    ids = torch.randint(5, 4096, (2, 16))
    padding = torch.ones(2, 16, dtype=torch.bool)
    padding[1, 12:] = False
    torch._dynamo.reset()
    if isinstance(model, EncoderDecoder):
        targets = torch.randint(5, 4096, (2, 8))
        explanation = torch._dynamo.explain(model)(ids, targets, padding_mask=padding)
    else:
        explanation = torch._dynamo.explain(model)(ids, padding_mask=padding)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_transformers_generate_reproduces_seq2seq_greedy(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = preset("tiny_encoder_decoder")
    model = build_model(cfg).eval()
    inputs = [[7, 300, 41, 9, 1200, 55], [18, 2000, 6]]
    ours = generate_seq2seq(model, inputs, SamplingConfig(max_new_tokens=10))
    export_model(model, cfg, tmp_path / "hf", tokenizer_path=None)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for row, sequence in enumerate(inputs):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            decoder_start_token_id=0,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out[:, 1:].tolist() == ours  # transformers returns the start token first
