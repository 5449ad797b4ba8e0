"""The output z-loss (`objective.z_loss`, `pretrain.models.loss`): the cross-entropy plus
z * mean(logsumexp(logits)**2) over the labelled positions, whole or in chunks (eager and
compiled), with autograd's gradients of that formula; in every family's training forward,
never in evaluation or per-position losses; and nothing of it with z_loss=0."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from pretrain.config import ConfigError, build_config, register_configs
from pretrain.engine import compute_loss, labelled_loss, lm_loss
from pretrain.models import build_model
from pretrain.models.encoder_decoder import EncoderDecoder
from pretrain.models.loss import (
    _softmax_grad_in_place,
    cross_entropy,
    cross_entropy_terms,
    linear_cross_entropy,
    linear_cross_entropy_terms,
    take_z_loss,
)

Z = 0.05  # large enough that the term is a good part of the loss here: its gradient counts


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def reference(logits: torch.Tensor, labels: torch.Tensor, z: float) -> tuple[torch.Tensor, ...]:
    """(cross-entropy + z-loss, the z-loss term, the cross-entropy) written out plainly in fp32:
    torch.logsumexp squared, averaged over the labelled positions."""
    flat, targets = logits.float().flatten(0, -2), labels.flatten()
    labelled = targets != -100
    term = z * torch.logsumexp(flat, dim=-1)[labelled].square().mean()
    ce = F.cross_entropy(flat, targets)
    return ce + term, term, ce


def inputs(bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(2, 150, 32, requires_grad=True)
    weight = (0.3 * torch.randn(101, 32)).requires_grad_()
    bias_ = torch.randn(101, requires_grad=True) if bias else None
    labels = torch.randint(0, 101, (2, 150))
    labels[:, ::7] = -100
    return hidden, weight, bias_, labels


def gradients(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_adds_the_mean_squared_logsumexp(dtype: torch.dtype) -> None:
    """`cross_entropy(z_loss=z)` (the logits path, `lm_loss`): the cross-entropy, bitwise as
    without the z-loss, plus z * mean(logsumexp**2) over the labelled rows, and autograd's
    gradient of that formula (fp32 logits and bf16 ones, whose loss is computed in fp32)."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 40, 77)).to(dtype).requires_grad_()
    labels = torch.randint(0, 77, (3, 40))
    labels[:, :4] = -100
    total, term = cross_entropy_terms(logits, labels, Z)
    expected, expected_term, ce = reference(logits, labels, Z)
    assert total.dtype == term.dtype == torch.float32 and not term.requires_grad
    assert term.item() == pytest.approx(expected_term.item(), rel=1e-6)
    assert term.item() > 0.2 * total.item()  # a sizeable part: its gradient counts
    assert torch.equal(total, cross_entropy(logits, labels) + term)  # the CE part to the bit
    assert torch.equal(cross_entropy(logits, labels, z_loss=Z), total)
    ours, = gradients(total, logits)  # fmt: skip
    reference_grad, = gradients(expected, logits)  # fmt: skip
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}
    torch.testing.assert_close(ours, reference_grad, **tolerance)
    # each position's loss stays the cross-entropy (evaluation)
    torch.testing.assert_close(
        cross_entropy(logits, labels, reduction="none", z_loss=Z),
        cross_entropy(logits, labels, reduction="none"),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("chunk", "compiled"), [(0, False), (7, False), (64, False), (64, True)])
def test_linear_cross_entropy_adds_the_z_loss_whole_and_in_chunks(
    bias: bool, chunk: int, compiled: bool
) -> None:
    """`linear_cross_entropy(z_loss=z)`, the logits whole and in chunks (their gradient written
    in the forward pass: eager in place, or each chunk's step compiled): the loss and its
    z-loss term are the plain formula's, and the gradients of hidden states, weight and bias
    are autograd's of it; without gradients, the same loss."""
    hidden, weight, bias_, labels = inputs(bias)
    expected, expected_term, _ = reference(F.linear(hidden, weight, bias_), labels, Z)
    loss, term = linear_cross_entropy_terms(hidden, weight, bias_, labels, chunk, compiled,
                                            z_loss=Z)  # fmt: skip
    assert loss.dtype == torch.float32 and not term.requires_grad
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert term.item() == pytest.approx(expected_term.item(), rel=1e-6)
    ours = gradients(2 * loss, hidden, weight, bias_)
    for grad, reference_grad in zip(ours, gradients(2 * expected, hidden, weight, bias_),
                                    strict=True):  # fmt: skip
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)
    assert ours[0][:, ::7].abs().max() == 0  # unlabelled rows: no gradient, z-loss included
    with torch.no_grad():
        again, again_term = linear_cross_entropy_terms(hidden, weight, bias_, labels, chunk,
                                                       compiled, z_loss=Z)  # fmt: skip
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)
    assert again_term.item() == pytest.approx(term.item(), rel=1e-6)


def test_in_chunks_the_cross_entropy_part_is_the_plain_one_to_the_bit() -> None:
    """The z-loss leaves the chunked cross-entropy's sums alone: the loss with it is the loss
    without it plus the term, exactly; its gradient under bf16 autocast is as close to
    autograd's as the plain loss's is (bf16 matmuls)."""
    hidden, weight, bias_, labels = inputs(True)
    plain = linear_cross_entropy(hidden, weight, bias_, labels, 64)
    loss, term = linear_cross_entropy_terms(hidden, weight, bias_, labels, 64, z_loss=Z)
    assert torch.equal(loss, plain + term)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = linear_cross_entropy(hidden, weight, bias_, labels, 64, z_loss=Z)
        whole = linear_cross_entropy(hidden, weight, bias_, labels, z_loss=Z)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    for a, b in zip(gradients(chunked, hidden, weight, bias_),
                    gradients(whole, hidden, weight, bias_), strict=True):  # fmt: skip
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_no_z_loss_computes_none_of_it() -> None:
    """z_loss=0: no logsumexp**2 sum in a chunk's step, no term, one output (the loss) from the
    chunked function, as before the z-loss existed; the mean is F.cross_entropy's, bitwise."""
    hidden, weight, bias_, labels = inputs(True)
    logits = F.linear(hidden[0, :64], weight, bias_).detach()
    step = _softmax_grad_in_place(logits.clone(), labels[0, :64], torch.tensor(0.1),
                                  torch.float32, True)  # fmt: skip
    assert step[1] is None and step[2] is not None
    for chunk in (0, 64):
        loss, term = linear_cross_entropy_terms(hidden, weight, bias_, labels, chunk)
        assert term is None and loss.dim() == 0
        assert linear_cross_entropy_terms(hidden, weight, bias_, labels, chunk, z_loss=Z,
                                          reduction="none")[1] is None  # fmt: skip
    flat = F.linear(hidden, weight, bias_)
    assert torch.equal(
        cross_entropy(flat, labels, z_loss=0.0),
        F.cross_entropy(flat.flatten(0, 1), labels.flatten()),
    )


FAMILIES = {"tiny_decoder": "clm", "tiny_gpt2": "clm", "tiny_encoder": "mlm",
            "tiny_encoder_decoder": "span"}  # fmt: skip


def family(name: str, tied: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A seeded model of the preset and a 2-row batch with unlabelled positions (the
    masked-LM's about 15% labelled; T5's decoder 10 positions long)."""
    overrides = [f"model={name}", f"objective={FAMILIES[name]}", "data=small",
                 f"model.tie_embeddings={str(tied).lower()}"]  # fmt: skip
    cfg = build_config(compose("plan", overrides=overrides)).model
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(5, cfg.vocab_size, (2, 24))
    labels = ids.clone()
    labels[:, :3] = -100
    if name == "tiny_encoder":
        labels[torch.rand(labels.shape) > 0.15] = -100
        labels[0, 5] = ids[0, 5]
    if isinstance(model, EncoderDecoder):
        decoder_ids = torch.randint(5, cfg.vocab_size, (2, 10))
        return model, {"input_ids": ids, "decoder_input_ids": decoder_ids,
                       "labels": labels[:, :10]}  # fmt: skip
    return model, {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_trains_on_the_z_loss(name: str, tied: bool) -> None:
    """With `model.z_loss` set (the engine sets `objective.z_loss`), a training forward's loss,
    the logits whole or in chunks, is the cross-entropy of the model's logits plus the z-loss,
    with that formula's gradient for every parameter; the term is left for the log
    (`last_z_loss`, moved into the step's sum by `compute_loss`). The logits path (`lm_loss`)
    gives the same. In evaluation, and per position, the loss is the cross-entropy alone."""
    model, batch = family(name, tied)
    inputs_ = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    expected, expected_term, ce = reference(model(**inputs_), labels, Z)
    params = list(model.parameters())
    reference_grads = torch.autograd.grad(expected, params, allow_unused=True)
    model.z_loss = Z
    for chunk in (0, 5):
        model.loss_chunk_tokens = chunk
        for lm in (labelled_loss, lm_loss):
            loss = compute_loss(model, batch, lm)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
            assert take_z_loss(model) == pytest.approx(expected_term.item(), rel=1e-5)
            assert take_z_loss(model) == 0.0  # taken: the next step starts from nothing
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (param_name, _), grad, want in zip(model.named_parameters(), grads,
                                                   reference_grads, strict=True):  # fmt: skip
                if want is None:
                    assert grad is None or grad.abs().max() == 0, param_name
                    continue
                torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=param_name)
        with torch.no_grad():
            per_position = model(**inputs_, labels=labels, reduction="none")
        assert model.last_z_loss is None
        labelled = labels != -100
        mean = (per_position.sum() / labelled.sum()).item()
        assert mean == pytest.approx(ce.item(), rel=1e-5)  # no z-loss per position
    model.eval()
    with torch.no_grad():
        assert model(**inputs_, labels=labels).item() == pytest.approx(ce.item(), rel=1e-5)
        assert compute_loss(model, batch).item() == pytest.approx(ce.item(), rel=1e-5)
    assert take_z_loss(model) == 0.0


def test_compiled_forwards_add_the_z_loss_and_leave_its_term() -> None:
    """`compile_scope=loss` compiles the forward with the loss as one function (the chunked
    autograd.Function traced with its two outputs, fullgraph) and `compile_scope=blocks`
    compiles the cross-entropy over the logits: both give eager's loss and term, and the term
    reaches the step's sum through the compiled code's side effect."""
    import functools

    model, batch = family("tiny_decoder", True)
    model.z_loss = Z
    expected, expected_term, _ = reference(model(batch["input_ids"]), batch["labels"], Z)
    for chunk in (0, 16):
        model.loss_chunk_tokens = chunk
        whole = torch.compile(model, fullgraph=True)(batch["input_ids"], labels=batch["labels"])
        assert whole.item() == pytest.approx(expected.item(), rel=1e-5)
        assert model.last_z_loss.item() == pytest.approx(expected_term.item(), rel=1e-5)
        model.last_z_loss = None
    model.loss_chunk_tokens = 0
    apart = functools.partial(lm_loss, loss=torch.compile(cross_entropy),
                              z_terms=torch.compile(cross_entropy_terms))  # fmt: skip
    for lm in (torch.compile(lm_loss), apart):
        assert compute_loss(model, batch, lm).item() == pytest.approx(expected.item(), rel=1e-5)
        assert take_z_loss(model) == pytest.approx(expected_term.item(), rel=1e-5)


@pytest.mark.parametrize("value", ["-0.001", "nan", "inf"])
def test_a_negative_or_non_finite_z_loss_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^objective.z_loss={value} must be a finite weight"):
        build_config(compose("plan", overrides=["model=tiny_decoder", "objective=clm",
                                                "data=small", f"objective.z_loss={value}"]))  # fmt: skip
    for name, objective in FAMILIES.items():  # every objective has it
        cfg = build_config(compose("plan", overrides=[f"model={name}", f"objective={objective}",
                                                      "data=small", "objective.z_loss=1e-4"]))  # fmt: skip
        assert cfg.objective.z_loss == 1e-4
