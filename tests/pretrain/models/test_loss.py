"""The loss in chunks (`engine.loss_chunk_tokens`, `pretrain.models.loss`): the same loss and
gradients as the logits held whole, for the function and for every family's head."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module

from pretrain.config import ModelConfig, build_config, register_configs
from pretrain.models import build_model
from pretrain.models.encoder_decoder import EncoderDecoder
from pretrain.models.loss import cross_entropy, linear_cross_entropy


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def gradients(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


def inputs(bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(2, 150, 32, requires_grad=True)
    weight = (0.3 * torch.randn(101, 32)).requires_grad_()
    bias_ = torch.randn(101, requires_grad=True) if bias else None
    labels = torch.randint(0, 101, (2, 150))
    labels[:, ::7] = -100
    return hidden, weight, bias_, labels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunks_give_the_whole_loss_and_gradients_in_fp32(bias: bool, chunk: int) -> None:
    hidden, weight, bias_, labels = inputs(bias)
    whole = linear_cross_entropy(hidden, weight, bias_, labels)
    chunked = linear_cross_entropy(hidden, weight, bias_, labels, chunk)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    ours = gradients(2 * chunked, hidden, weight, bias_)
    for grad, reference in zip(ours, gradients(2 * whole, hidden, weight, bias_), strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)
    # labelled rows only: an unlabelled row's hidden state gets no gradient
    grad_hidden = ours[0]
    assert grad_hidden[:, ::7].abs().max() == 0 and grad_hidden[:, 1::7].abs().min() > 0


def test_chunks_under_bf16_autocast() -> None:
    """Under autocast the head's matmuls run in bf16, the softmax and the sums in fp32: the
    chunked loss is the whole one's, its gradients as close as bf16 rounding allows (the
    weight's gradient is summed over chunks in fp32 instead of in one bf16 matmul)."""
    hidden, weight, bias_, labels = inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = linear_cross_entropy(hidden, weight, bias_, labels)
        chunked = linear_cross_entropy(hidden, weight, bias_, labels, 64)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    ours, reference = gradients(chunked, hidden, weight, bias_), gradients(whole, hidden,
                                                                         weight, bias_)  # fmt: skip
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_chunks_without_gradients_and_without_labels() -> None:
    hidden, weight, bias_, labels = inputs(False)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, None, labels, 16).item() == pytest.approx(
            linear_cross_entropy(hidden, weight, None, labels).item(), rel=1e-6
        )
    labels[:] = -100  # nothing to predict: nan, as F.cross_entropy's mean
    assert linear_cross_entropy(hidden, weight, None, labels, 16).isnan()
    assert linear_cross_entropy(hidden, weight, None, labels).isnan()
    with pytest.raises(ValueError, match="299 labels for 300 hidden states"):
        linear_cross_entropy(hidden, weight, None, labels.flatten()[1:], 16)


FAMILIES = {"tiny_decoder": "clm", "tiny_gpt2": "clm", "tiny_encoder": "mlm",
            "tiny_encoder_decoder": "span"}  # fmt: skip


def preset(name: str, *changes: str) -> ModelConfig:
    overrides = [f"model={name}", f"objective={FAMILIES[name]}", "data=small", *changes]
    return build_config(compose("plan", overrides=overrides)).model


def family_batch(name: str, model: torch.nn.Module, cfg: ModelConfig) -> tuple[tuple, torch.Tensor]:
    """(the model's positional inputs, labels) of a 2-row batch: the first 3 positions
    unlabelled; the masked-LM's about 15% labelled; T5's decoder 10 positions long."""
    ids = torch.randint(5, cfg.vocab_size, (2, 24))
    labels = ids.clone()
    labels[:, :3] = -100
    if name == "tiny_encoder":
        labels[torch.rand(labels.shape) > 0.15] = -100
        labels[0, 5] = ids[0, 5]
    if isinstance(model, EncoderDecoder):
        return (ids, torch.randint(5, cfg.vocab_size, (2, 10))), labels[:, :10]
    return (ids,), labels


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_computes_its_loss_in_chunks(name: str, tied: bool) -> None:
    """`model(..., labels=labels)` with `loss_chunk_tokens` set: the cross-entropy of the
    model's logits and the same gradient for every parameter (tied and untied heads; BERT's
    head with its output bias; T5's tied logits scaled by d_model**-0.5). The masked-LM head
    runs on the masked positions only."""
    cfg = preset(name, f"model.tie_embeddings={str(tied).lower()}")
    torch.manual_seed(0)
    model = build_model(cfg)
    args, labels = family_batch(name, model, cfg)
    whole = cross_entropy(model(*args), labels)
    reference = dict(zip([n for n, _ in model.named_parameters()],
                         torch.autograd.grad(whole, list(model.parameters())), strict=True))  # fmt: skip
    model.loss_chunk_tokens = 5
    chunked = model(*args, labels=labels)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    grads = torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)
    for (param_name, _), grad in zip(model.named_parameters(), grads, strict=True):
        expected = reference[param_name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=param_name)
    model.loss_chunk_tokens = 0  # given labels, the logits whole: the same loss
    assert model(*args, labels=labels).item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_gives_each_positions_loss(name: str, tied: bool, chunk: int) -> None:
    """`reduction="none"` (evaluation, per sample): each position's fp32 cross-entropy of the
    model's logits, 0 where unlabelled (the masked-LM head's masked positions put back in
    place), whole or in chunks; over the labelled positions they average to the mean loss."""
    cfg = preset(name, f"model.tie_embeddings={str(tied).lower()}")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    args, labels = family_batch(name, model, cfg)
    model.loss_chunk_tokens = chunk
    with torch.no_grad():
        logits = model(*args)
        losses = model(*args, labels=labels, reduction="none")
        mean = model(*args, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="none"
    ).view(labels.shape)
    assert losses.shape == labels.shape and losses.dtype == torch.float32
    assert (losses[labels == -100] == 0).all() and (losses[labels != -100] > 0).all()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert (losses.sum() / (labels != -100).sum()).item() == pytest.approx(mean.item(), rel=1e-5)


def test_a_compiled_forward_traces_the_chunks() -> None:
    """`compile_scope=loss` compiles the forward and the chunked loss as one function: the
    autograd.Function is traced (its chunks unrolled), with eager's loss and gradients."""
    torch.manual_seed(0)
    model = build_model(preset("tiny_decoder"))
    model.loss_chunk_tokens = 16
    ids = torch.randint(5, 4096, (2, 24))
    eager = model(ids, labels=ids)
    expected = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)(ids, labels=ids)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for grad, reference in zip(torch.autograd.grad(compiled, list(model.parameters())),
                               expected, strict=True):  # fmt: skip
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_compiled_chunk_step_gives_the_eager_one(autocast: bool) -> None:
    """`compiled=True` (engine.compile outside a forward compiled whole): each chunk's softmax
    and gradient as one compiled function, the last, shorter chunk included, with the eager
    chunks' loss and gradients."""
    hidden, weight, bias_, labels = inputs(True)
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with context:
        eager = linear_cross_entropy(hidden, weight, bias_, labels, 64)
    expected = gradients(eager, hidden, weight, bias_)
    with context:
        compiled = linear_cross_entropy(hidden, weight, bias_, labels, 64, compiled=True)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    tolerance = 1e-2 if autocast else 1e-5
    for grad, reference in zip(gradients(compiled, hidden, weight, bias_), expected, strict=True):
        assert grad.dtype == reference.dtype
        assert (grad - reference).abs().max() <= tolerance * reference.abs().max()
