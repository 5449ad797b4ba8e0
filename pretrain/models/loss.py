"""The language-model loss: the output projection and the cross-entropy, whole or in chunks.

`cross_entropy(logits, labels)` is the mean fp32 cross-entropy every objective trains on
(labels of -100 are ignored). `linear_cross_entropy(hidden, weight, bias, labels, chunk)` is
the same loss of the logits `hidden @ weight.T + bias`; with `chunk > 0` (`engine.
loss_chunk_tokens`) it never holds those (tokens, vocab) logits whole. Both take
`reduction="none"` for each position's loss instead of the mean (evaluation: the loss of each
sample, hence of each data source, from one forward pass). It projects `chunk`
tokens at a time, reduces them to their loss and, in the same pass, to their gradients with
respect to the hidden states, the weight and the bias, and keeps only those. The backward pass
then only scales them. What it keeps is tokens x d_model + vocab x d_model, where the whole
loss keeps 2 to 12 bytes per logit (tokens x vocab): at gpt2_124m's 16 x 1024 tokens and
50,304-word vocabulary, 1.6 to 9.9 GB.

With `z_loss` > 0 (`objective.z_loss`, as in PaLM, OLMo and Chameleon) the mean has
`z_loss` times the mean over the labelled positions of logsumexp(logits)**2 added, which pulls
the softmax's log-normaliser towards 0 (PaLM found it steadies training). The `*_terms`
functions also give that term alone (detached), for the log. Each position's loss
(`reduction="none"`, evaluation) is the cross-entropy alone. In chunks its gradient,
2 * z_loss * logsumexp * softmax per labelled row, joins the cross-entropy's in the same
buffer: the softmax is scaled by 1 + 2 * z_loss * logsumexp before the one-hot is taken off.

Written here because no installed library does it on every device: Liger-Kernel's fused linear
cross-entropy needs Triton on a GPU and torchtune's chunked loss still keeps each chunk's logits
for the backward pass. The FLOPs are those of the plain head (one matmul forward, two for the
gradients); the gradients come out in the forward pass because recomputing the chunk's logits
in the backward pass would cost a third matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean",
                  z_loss: float = 0.0) -> Tensor:  # fmt: skip
    """Mean cross-entropy of (..., V) logits against (...) labels (-100 ignored), in fp32;
    with `reduction="none"`, each position's, shaped like `labels` (0 where ignored). With
    `z_loss` > 0 the mean has the z-loss added (`cross_entropy_terms`); each position's loss
    never has."""
    if z_loss > 0 and reduction == "mean":
        return cross_entropy_terms(logits, labels, z_loss)[0]
    losses = F.cross_entropy(
        logits.float().flatten(0, -2),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return losses if reduction == "mean" else losses.view(labels.shape)


def cross_entropy_terms(logits: Tensor, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor]:
    """(the mean fp32 cross-entropy of (..., V) logits against (...) labels plus `z_loss` times
    the mean over the labelled positions of logsumexp(logits)**2, that z-loss term alone,
    detached). The cross-entropy is `cross_entropy`'s to the bit (F.cross_entropy is this
    log-softmax and NLL). logsumexp(x) = x_j - log_softmax(x)_j at the target j: the z-loss
    reads the log-probabilities the cross-entropy keeps for its backward pass, where
    torch.logsumexp would keep the fp32 logits too (4 more bytes per logit)."""
    flat, targets = logits.float().flatten(0, -2), labels.flatten()
    log_probs = F.log_softmax(flat, dim=-1)
    loss = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX)
    valid = targets != IGNORE_INDEX
    column = torch.where(valid, targets, 0)[:, None]
    logsumexp = (flat.gather(1, column) - log_probs.gather(1, column)).squeeze(1)
    term = z_loss * (logsumexp.square() * valid).sum() / valid.sum()  # CE's denominator
    return loss + term, term.detach()


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _softmax_grad_in_place(logits: Tensor, labels: Tensor, scale: Tensor | None,
                           dtype: torch.dtype | None, bias: bool, z_loss: float = 0.0) -> tuple[
                               Tensor, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Eager: (loss sum of one chunk's (c, V) logits; with `z_loss` the sum of their labelled
    rows' logsumexp**2, else None; and given the compute `dtype` the gradient of
    (loss_sum + z_loss * that sum) * scale with respect to the logits (in `dtype`) and, with
    `bias`, its sum over the rows (fp32)). One fp32 (c, V) buffer: the logits, then in place
    their exponentials, the softmax and the gradient (torch.logsumexp and log_softmax would
    each allocate two more)."""
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)[:, None]
    picked = logits.gather(1, target).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    sums = probs.sum(dim=-1)
    logsumexp = sums.log() + row_max.squeeze(1)
    loss_sum = ((logsumexp - picked) * valid).sum()
    z_sum = (logsumexp.square() * valid).sum() if z_loss else None
    if dtype is None:
        return loss_sum, z_sum, None, None
    # d(loss)/d(logits) = (softmax - one-hot) * scale on the labelled rows, and the z-loss's
    # d(z_loss * logsumexp**2)/d(logits) = 2 * z_loss * logsumexp * softmax: the softmax
    # scaled by 1 + 2 * z_loss * logsumexp, in the same buffer
    if z_loss:
        probs.mul_(((1.0 + (2.0 * z_loss) * logsumexp) / sums)[:, None])
    else:
        probs.div_(sums[:, None])
    probs.scatter_add_(1, target, -valid[:, None].to(probs.dtype))
    probs.mul_((valid * scale)[:, None])
    return loss_sum, z_sum, probs.to(dtype), probs.sum(0) if bias else None


def _softmax_grad(logits: Tensor, labels: Tensor, scale: Tensor, dtype: torch.dtype,
                  bias: bool, z_loss: float = 0.0) -> tuple[
                      Tensor, Tensor | None, Tensor, Tensor | None]:  # fmt: skip
    """`_softmax_grad_in_place` written as functions of the logits, for torch.compile to fuse
    into a reduction over the compute-dtype logits and one pass that writes their gradient in
    the compute dtype: no fp32 (c, V) buffer at all (`linear_cross_entropy(compiled=True)`)."""
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    logsumexp = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    loss_sum = ((logsumexp - picked) * valid).sum()
    columns = torch.arange(logits.shape[1], device=logits.device)
    probs = torch.exp(logits - logsumexp[:, None])
    z_sum = None
    if z_loss:  # the z-loss's gradient: the softmax scaled by 1 + 2 * z_loss * logsumexp
        z_sum = (logsumexp.square() * valid).sum()
        probs = probs * (1.0 + (2.0 * z_loss) * logsumexp)[:, None]
    grad = torch.where(columns[None, :] == target[:, None], probs - 1.0, probs)
    grad = grad * (valid * scale)[:, None]
    return loss_sum, z_sum, grad.to(dtype), grad.sum(0) if bias else None


_COMPILED_STEP: list = []  # torch.compile(_softmax_grad), made on first use


def _compiled_softmax_grad() -> object:
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(_softmax_grad))
    return _COMPILED_STEP[0]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss of `linear_cross_entropy` with its gradients computed chunk by chunk in the
    forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                chunk: int, dtype: torch.dtype, compiled: bool,
                z_loss: float) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        # the matmuls run under the caller's autocast, if any (its cached copy of the weight);
        # the weight's and the bias's gradients are summed over the chunks in fp32
        step = _compiled_softmax_grad() if compiled else _softmax_grad_in_place
        count = (labels != IGNORE_INDEX).sum()
        scale = 1.0 / count.clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros_like(total) if z_loss else None
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = F.linear(h, weight, bias)
            loss_sum, z_sum, d_logits, d_bias = step(
                logits, labels[start : start + chunk], scale, dtype, bias is not None, z_loss
            )
            del logits
            total += loss_sum
            if z_total is not None:
                z_total += z_sum
            grad_hidden[start : start + chunk] = d_logits @ weight
            if d_logits.dtype == h.dtype == grad_weight.dtype:  # in place: no (V, C) temporary
                grad_weight.addmm_(d_logits.T, h)
            else:  # the chunk's (V, C) product in the compute dtype, summed in fp32
                grad_weight += d_logits.T @ h
            del d_logits  # before the next chunk's logits: one chunk's buffer at a time
            if grad_bias is not None:
                grad_bias += d_bias
        ctx.has_bias = bias is not None
        saved = [grad_hidden, grad_weight.to(weight.dtype)]
        if grad_bias is not None:
            saved.append(grad_bias.to(bias.dtype))
        ctx.save_for_backward(*saved)
        if z_total is None:
            return total / count  # nan when nothing is labelled, as F.cross_entropy
        # (the loss, its z-loss term for the log: no gradient of its own)
        term = z_loss * z_total / count
        ctx.mark_non_differentiable(term)
        return total / count + term, term

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_term: Tensor | None) -> tuple[Tensor | None, ...]:
        # scaled in place, not copied (a second (V, C) weight gradient at the peak); a second
        # backward pass through the same graph (retain_graph) then fails autograd's version check
        grad_hidden, grad_weight, *rest = ctx.saved_tensors
        grad_bias = rest[0].mul_(grad_loss) if ctx.has_bias else None
        grads = grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), grad_bias
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         chunk: int = 0, compiled: bool = False, reduction: str = "mean",
                         z_loss: float = 0.0) -> Tensor:  # fmt: skip
    """Mean fp32 cross-entropy of the logits `hidden @ weight.T + bias` against `labels`.

    Args:
        hidden: (..., C) final hidden states.
        weight: (V, C) output projection (the word embedding when tied).
        bias: (V,) output bias, or None.
        labels: (...) target ids, -100 where nothing is predicted.
        chunk: tokens projected at a time, never holding all the logits (0: all at once).
        compiled: each chunk's softmax and gradient as one torch.compile'd function (under
            `engine.compile`), else eager in place.
        reduction: "mean", or "none" for each position's loss, shaped like `labels` (0 where
            ignored; for evaluation: with gradients, every chunk's logits would be kept).
        z_loss: with "mean", plus `z_loss` times the mean over the labelled positions of
            logsumexp(logits)**2 (0: none, and no work for it); `linear_cross_entropy_terms`
            gives that term apart.
    """
    return linear_cross_entropy_terms(hidden, weight, bias, labels, chunk, compiled, reduction,
                                      z_loss)[0]  # fmt: skip


def linear_cross_entropy_terms(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                               labels: Tensor, chunk: int = 0, compiled: bool = False,
                               reduction: str = "mean",
                               z_loss: float = 0.0) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(`linear_cross_entropy`, its z-loss term alone and detached: None without one, when
    `z_loss` is 0 or `reduction="none"`)."""
    if reduction == "none":
        return _token_cross_entropy(hidden, weight, bias, labels, chunk), None
    if chunk <= 0:
        logits = F.linear(hidden, weight, bias)
        if z_loss > 0:
            return cross_entropy_terms(logits, labels, z_loss)
        return cross_entropy(logits, labels), None
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if labels.numel() != hidden.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {hidden.shape[0]} hidden states")
    z_loss = float(z_loss) if z_loss > 0 else 0.0
    dtype = compute_dtype(hidden)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad:
        out = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, labels, chunk, dtype, compiled, z_loss
        )
        return out if z_loss else (out, None)
    sums = [  # evaluation: the loss alone
        _softmax_grad_in_place(F.linear(hidden[s : s + chunk], weight, bias),
                               labels[s : s + chunk], None, None, False, z_loss)[:2]
        for s in range(0, hidden.shape[0], chunk)
    ]  # fmt: skip
    count = (labels != IGNORE_INDEX).sum()
    loss = sum(loss_sum for loss_sum, _ in sums) / count
    if not z_loss:
        return loss, None
    term = z_loss * sum(z_sum for _, z_sum in sums) / count
    return loss + term, term


def _token_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         chunk: int) -> Tensor:  # fmt: skip
    """Each position's fp32 cross-entropy of `hidden @ weight.T + bias`, shaped like `labels`
    (0 where ignored), from the logits of `chunk` tokens at a time (0: all at once)."""
    if chunk <= 0:
        return cross_entropy(F.linear(hidden, weight, bias), labels, reduction="none")
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if targets.numel() != flat.shape[0]:
        raise ValueError(f"{targets.numel()} labels for {flat.shape[0]} hidden states")
    losses = [
        cross_entropy(F.linear(flat[s : s + chunk], weight, bias), targets[s : s + chunk],
                      reduction="none")
        for s in range(0, flat.shape[0], chunk)
    ]  # fmt: skip
    return torch.cat(losses).view(labels.shape)


class OutputHead(nn.Linear):
    """The vocabulary projection of an untied head: logits, or given labels the loss
    (`linear_cross_entropy`). Called as a module so that engines that gather a module's
    parameters around its forward (ZeRO-3) gather the weight for the loss too; its parameters
    are those of `nn.Linear` (checkpoints and exports see no difference)."""

    def forward(self, x: Tensor, labels: Tensor | None = None, chunk: int = 0,
                bias: Tensor | None = None, compiled: bool = False, reduction: str = "mean",
                z_loss: float = 0.0) -> Tensor | tuple[Tensor, Tensor | None]:  # fmt: skip
        """The logits, or given `labels` `linear_cross_entropy_terms`'s (loss, z-loss term).
        `bias`: an output bias kept elsewhere (BERT's MLM head), used for the loss."""
        if labels is None:
            return super().forward(x)
        bias = self.bias if bias is None else bias
        return linear_cross_entropy_terms(x, self.weight, bias, labels, chunk, compiled,
                                          reduction, z_loss)  # fmt: skip


def collect_z_loss(model: nn.Module) -> None:
    """After a training forward of `model` (a language model, unwrapped): the z-loss term its
    loss added (`last_z_loss`, left there by the forward, or by `pretrain.engine.lm_loss`)
    moved into the step's sum (`take_z_loss`). Read once per forward, outside any compiled
    region, as `pretrain.models.moe.collect_moe_losses` reads the MoE losses."""
    term = getattr(model, "last_z_loss", None)
    if term is None:
        return
    model.last_z_loss = None
    total = getattr(model, "step_z_loss", None)
    model.step_z_loss = term if total is None else total + term


def take_z_loss(model: nn.Module) -> float:
    """The z-loss terms `model`'s training forwards added since the last call, summed over the
    micro-batches (0.0 without any); the trainer subtracts their mean from the loss it logs,
    so `loss` stays the cross-entropy, and logs it as `z_loss`."""
    total, model.step_z_loss = getattr(model, "step_z_loss", None), None
    return 0.0 if total is None else float(total)
