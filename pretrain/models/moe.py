"""Sparse mixture-of-experts feed-forward (Switch / GShard / Mixtral style) for every family.

A router scores each token against `n_experts` experts (softmax or sigmoid), each token goes
to its `top_k` best, and the experts' outputs are summed with the routing weights. Dispatch
sorts the (token, choice) assignments by expert, so every expert runs one matmul over its
tokens: with a capacity factor on a padded (experts, capacity, width) buffer through batched
matmuls; dropless, over the sorted tokens split by expert.

Capacity: each expert takes at most ceil(capacity_factor * tokens * top_k / n_experts)
assignments; first choices of all tokens come before second choices (GShard's priority), then
token order. Dropped assignments contribute nothing (the residual carries the token on).

Padding: given a `padding_mask` (the families pass theirs down), only the real tokens are
routed. Padding positions get a zero output, take no capacity (`tokens` above counts real
tokens) and stay out of the losses and statistics, so a batch's real tokens route as they
would without the pads. (A padded encoder-decoder batch can be half padding, whose states are
alike: routed, they would pile onto one or two experts and fill them.)

Losses (training only), added to the model's loss by `pretrain.engine.compute_loss`:
- load balance (Switch Transformer): n_experts * sum_e f_e * P_e, f_e the fraction of
  assignments routed to e, P_e the mean routing probability of e; 1.0 when perfectly balanced;
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.

Statistics for the trainer's metrics accumulate per layer (`MoEStats`): assignments per expert,
dropped assignments, routing entropy, and the two losses; `moe_metrics` reduces them across
ranks and resets them.

Expert parallelism (`model.moe.expert_parallel`, `enable_expert_parallel`): the data-parallel
ranks split each layer's experts (rank r keeps experts [r E/W, (r+1) E/W)). Every rank routes
its own real tokens as before (capacity counted on them, so dropping is what plain data
parallelism drops), sends each kept assignment to the rank that owns its expert with one
all-to-all, runs its local experts over what it received, and returns the outputs with a
second all-to-all (`AllToAll`, differentiable: its backward is the reverse exchange). The
result equals the replicated model's. Expert gradients are the owner's alone (not all-reduced);
a gradient hook divides them by W so they equal the data-parallel mean the other parameters
get from DDP's all-reduce.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import ACTIVATIONS, FeedForward


class Experts(nn.Module):
    """`n` feed-forwards of hidden size `d_ff` with stacked weights: (n, in, out) each."""

    def __init__(self, cfg: ModelConfig, n: int, d_ff: int) -> None:
        super().__init__()
        self.first = 0  # global id of the first expert held here (expert parallelism)
        self.d_ff = d_ff  # kept: ZeRO-3 empties the parameters' shapes between gathers
        c = cfg.d_model
        self.act = ACTIVATIONS[cfg.activation]
        self.gate = nn.Parameter(torch.empty(n, c, d_ff)) if cfg.gated else None
        self.up = nn.Parameter(torch.empty(n, c, d_ff))
        self.down = nn.Parameter(torch.empty(n, d_ff, c))
        bias = cfg.bias
        self.gate_bias = nn.Parameter(torch.zeros(n, d_ff)) if bias and cfg.gated else None
        self.up_bias = nn.Parameter(torch.zeros(n, d_ff)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(n, c)) if bias else None

    def reset_parameters(self, std: float, down_std: float, gate_std: float | None = None) -> None:
        for weight in (self.gate, self.up):
            if weight is not None:
                nn.init.normal_(weight, std=gate_std or std)
        nn.init.normal_(self.down, std=down_std)
        for bias in (self.gate_bias, self.up_bias, self.down_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def _hidden(self, x: Tensor, gate: Tensor | None, up: Tensor, gate_b: Tensor | None,
                up_b: Tensor | None, matmul) -> Tensor:  # fmt: skip  # noqa: ANN001
        h = matmul(x, up) + (up_b.unsqueeze(-2) if up_b is not None else 0)
        if gate is None:
            return self.act(h)
        g = matmul(x, gate) + (gate_b.unsqueeze(-2) if gate_b is not None else 0)
        return self.act(g) * h

    def forward(self, x: Tensor, counts: list[int] | Tensor | None = None) -> Tensor:
        """`padded(x)` without counts, `grouped(x, counts)` with counts in a list,
        `grouped_gemm(x, counts)` with counts in a tensor. Called as a module (not the methods
        directly) so that engines' hooks (ZeRO-3 gathers parameters in a forward pre-hook) see
        the experts run."""
        if counts is None:
            return self.padded(x)
        if isinstance(counts, Tensor):
            return self.grouped_gemm(x, counts)
        return self.grouped(x, counts)

    @property
    def has_bias(self) -> bool:
        return self.up_bias is not None

    def padded(self, x: Tensor) -> Tensor:
        """(n, capacity, C) -> (n, capacity, C): every expert on its slice, batched."""
        h = self._hidden(x, self.gate, self.up, self.gate_bias, self.up_bias, torch.bmm)
        out = torch.bmm(h, self.down)
        return out + self.down_bias.unsqueeze(-2) if self.down_bias is not None else out

    def grouped(self, x: Tensor, counts: list[int]) -> Tensor:
        """(M, C) tokens sorted by expert, `counts[e]` of them for expert e -> (M, C)."""
        outputs = []
        for e, part in enumerate(torch.split(x, counts)):
            if part.shape[0] == 0:
                continue

            def pick(t: Tensor | None, e: int = e) -> Tensor | None:
                return t[e] if t is not None else None

            h = self._hidden(part, pick(self.gate), self.up[e], pick(self.gate_bias),
                             pick(self.up_bias), torch.matmul)  # fmt: skip
            out = h @ self.down[e]
            outputs.append(out + self.down_bias[e] if self.down_bias is not None else out)
        # x * 0 keeps an empty result in the autograd graph (expert parallelism: every rank
        # must run the backward of the exchange that follows, received tokens or not)
        return torch.cat(outputs) if outputs else x * 0

    def grouped_gemm(self, x: Tensor, counts: Tensor) -> Tensor:
        """(M, C) tokens sorted by expert and `counts` (E,) on the device -> (M, C), through
        one grouped GEMM per weight (`torch._grouped_mm`): no host sync and no shape that
        depends on the routing, so a compiled forward stays one graph (the loop of `grouped`
        reads the counts on the host and is traced again for every new split). Experts
        without biases only (a per-row bias's gradient would be a scatter-add, rounded at
        every step in bf16). Under autocast the operands are cast to its dtype, as it would
        cast a matmul's."""
        dtype = compute_dtype(x)
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def mm(a: Tensor, w: Tensor) -> Tensor:
            return torch._grouped_mm(a.to(dtype), w.to(dtype), offs=offs)

        h = mm(x, self.up)
        h = self.act(mm(x, self.gate)) * h if self.gate is not None else self.act(h)
        return mm(h, self.down)

    def shard(self, rank: int, world: int) -> None:
        """Keep only experts [rank n / world, (rank + 1) n / world) (expert parallelism)."""
        n = self.up.shape[0]
        local = n // world
        self.first = rank * local
        for name, param in list(self.named_parameters(recurse=False)):
            piece = param.detach()[self.first : self.first + local].clone()
            setattr(self, name, nn.Parameter(piece, requires_grad=param.requires_grad))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in: autocast's when it is on, else `x`'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_gemm_supported(x: Tensor, widths: tuple[int, ...] = ()) -> bool:
    """Whether `torch._grouped_mm` runs for `x` here: in bf16 on a Hopper (or newer) GPU; on
    the CPU in bf16, or in any dtype outside torch.compile (whose CPU form wants bf16). Every
    operand's rows must also start 16 bytes apart: `x`'s width and each of `widths` (the
    experts' hidden size) a multiple of 16 bytes in the compute dtype (8 in bf16), else
    `_grouped_mm` raises "strides should be multiple of 16 bytes" and the loop runs instead."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtype = compute_dtype(x)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(w * itemsize % 16 for w in (x.shape[-1], *widths)):
        return False
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    if x.device.type == "cpu":
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return False


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None,
                      **kwargs: Any) -> int:  # fmt: skip
    """FLOPs of `torch._grouped_mm` for `FlopCounterMode` (torch counts none): two per
    multiply-add. Two 2-D operands contract over the jagged rows (the weights' gradient);
    otherwise the output's elements times the contracted width."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


if hasattr(torch.ops.aten, "_grouped_mm"):
    from torch.utils.flop_counter import register_flop_formula

    with contextlib.suppress(RuntimeError):  # already registered (a torch that counts it)
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


class AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` of the rows of a (M, C) tensor with autograd: `send[j]` rows go
    to rank j, `recv[j]` rows arrive from rank j; the backward sends gradients back the same
    way reversed."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: object) -> Tensor:  # noqa: ANN001
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


@dataclass
class RoutingStep:
    """What one training forward of one MoE layer leaves for `collect_moe_losses`."""

    loss: Tensor  # aux_coef * balance + z_coef * z, with gradient
    counts: Tensor  # (E,) assignments per expert, before dropping
    dropped: Tensor  # () dropped assignments
    entropy: Tensor  # () summed routing entropy over tokens
    tokens: int
    balance: Tensor  # () load-balancing loss (unweighted)
    z: Tensor  # () router z-loss (unweighted)


class MoEStats:
    """Per-layer sums since the last `moe_metrics` on this rank, kept on the layer's device
    (adding never waits for the accelerator): [assignments per expert (E), dropped, entropy,
    tokens, balance loss, z-loss, forwards]; and the weighted auxiliary loss of the current
    optimizer step (`take_step_loss`)."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts
        self.values: Tensor | None = None
        self.step_loss: Tensor | None = None

    def reset(self) -> None:
        self.values = None

    def add(self, step: RoutingStep) -> None:
        device = step.counts.device
        # a forward without real tokens (all padding) does not count toward the loss means
        tokens = torch.tensor([float(step.tokens), float(step.tokens > 0)], dtype=torch.float64,
                              device=device)  # fmt: skip
        extra = torch.stack([step.dropped.double(), step.entropy.double(), tokens[0],
                             step.balance.double(), step.z.double(), tokens[1]])  # fmt: skip
        row = torch.cat([step.counts.double(), extra])
        self.values = row if self.values is None else self.values + row
        loss = step.loss.detach()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss

    def empty(self, device: torch.device) -> Tensor:
        return torch.zeros(self.n_experts + 6, dtype=torch.float64, device=device)


class MoEFeedForward(nn.Module):
    """Router + routed experts (+ shared experts): (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.sigmoid = moe.router == "sigmoid"
        self.normalize = moe.normalize_top_k
        self.capacity_factor = moe.capacity_factor
        self.grouped_gemm = moe.grouped_gemm
        self.aux_coef, self.z_coef = moe.aux_loss_coef, moe.z_loss_coef
        d_expert = moe.d_expert or cfg.d_ff
        self.router = nn.Linear(cfg.d_model, moe.n_experts, bias=False)
        self.experts = Experts(cfg, moe.n_experts, d_expert)
        self.shared = nn.ModuleList(FeedForward(cfg, d_expert) for _ in range(moe.n_shared_experts))
        self.last: RoutingStep | None = None  # set by a training forward
        self.stats = MoEStats(moe.n_experts)
        self.ep_group: object | None = None  # set by enable_expert_parallel
        self.ep_world = 1

    def capacity(self, tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C) -> router logits (N, E) fp32, weights (N, k) and expert ids (N, k)."""
        logits = self.router(x).float()
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.sigmoid or (self.normalize and self.top_k > 1):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C).

        Args:
            x: (B, T, C) token states.
            padding_mask: (B, T) True for real tokens. Only those are routed (in their
                order, so their result is that of the batch without the pads); padding
                positions get 0. None: every token is real.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        if padding_mask is None:
            return self._forward_tokens(flat).view(shape)
        real = padding_mask.reshape(-1).nonzero().squeeze(-1)  # (N_real,)
        out = self._forward_tokens(flat[real])  # (N_real, C)
        return torch.zeros_like(flat).index_copy(0, real, out).view(shape)

    def _forward_tokens(self, flat: Tensor) -> Tensor:
        """(N, C) tokens, all real -> (N, C): route, dispatch, combine (+ shared experts)."""
        n, k, e = flat.shape[0], self.top_k, self.n_experts
        logits, weights, experts = self.route(flat)
        # assignments in priority order: all first choices, then all second choices, ...
        expert_of = experts.T.reshape(-1)  # (k N,)
        token_of = torch.arange(n, device=flat.device).repeat(k)
        weight_of = weights.T.reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        sorted_experts, sorted_tokens = expert_of[order], token_of[order]
        sorted_weights = weight_of[order].unsqueeze(-1)
        counts = torch.bincount(expert_of, minlength=e)  # (E,)
        capacity = self.capacity(n)
        if capacity is None:
            keep_tokens = sorted_tokens
            kept = counts
            dropped = torch.zeros((), device=flat.device)
        else:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(k * n, device=flat.device) - starts[sorted_experts]
            keep = rank < capacity
            keep_tokens = sorted_tokens[keep]
            sorted_weights = sorted_weights[keep]
            kept = counts.clamp(max=capacity)
            dropped = (~keep).sum()
        if self.ep_group is not None:
            out = self._exchange(flat[keep_tokens], kept)
        elif (
            capacity is None
            and self.grouped_gemm
            and not self.experts.has_bias
            and grouped_gemm_supported(flat, (self.experts.d_ff,))
        ):
            out = self.experts(flat[sorted_tokens], counts)
        elif capacity is None:
            out = self.experts(flat[sorted_tokens], counts.tolist())
        else:
            slots = (sorted_experts * capacity + rank)[keep]
            buffer = flat.new_zeros(e * capacity, flat.shape[-1])
            buffer[slots] = flat[keep_tokens]
            out = self.experts(buffer.view(e, capacity, -1)).view(e * capacity, -1)[slots]
        weighted = (out * sorted_weights.to(out.dtype)).to(flat.dtype)
        combined = torch.zeros_like(flat).index_add_(0, keep_tokens, weighted)
        for shared in self.shared:
            combined = combined + shared(flat)
        if self.training and torch.is_grad_enabled():
            self.last = self._routing_step(logits, counts, dropped, n)
        return combined

    def _exchange(self, tokens: Tensor, counts: Tensor) -> Tensor:
        """Expert parallelism: (M, C) assignments sorted by global expert, `counts[e]` for
        expert e -> the experts' outputs, in the same order. Two all-to-alls (tokens out,
        outputs back) plus one of the counts."""
        world, local = self.ep_world, self.n_experts // self.ep_world
        send_counts = counts.view(world, local)  # to rank j, for its local experts
        recv_counts = torch.empty_like(send_counts)  # from rank j, for my local experts
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.ep_group)
        send = send_counts.sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        received = AllToAll.apply(tokens, send, recv, self.ep_group)  # by source, then expert
        expert_of = torch.arange(local, device=tokens.device).repeat(world)
        expert_of = expert_of.repeat_interleave(recv_counts.flatten())
        order = torch.argsort(expert_of, stable=True)  # by local expert, then source
        out = self.experts(received[order], recv_counts.sum(0).tolist())
        out = out[torch.argsort(order)]  # back to source order
        return AllToAll.apply(out, recv, send, self.ep_group)

    def _routing_step(self, logits: Tensor, counts: Tensor, dropped: Tensor, n: int) -> RoutingStep:
        if n == 0:  # all padding: nothing to balance; a zero loss still in the graph
            zero = logits.sum()
            return RoutingStep(loss=zero, counts=counts.detach(), dropped=dropped.detach(),
                               entropy=zero.detach(), tokens=0, balance=zero.detach(),
                               z=zero.detach())  # fmt: skip
        if self.sigmoid:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        fraction = counts.float() / (n * self.top_k)
        balance = self.n_experts * (fraction * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum().detach()
        return RoutingStep(
            loss=self.aux_coef * balance + self.z_coef * z,
            counts=counts.detach(), dropped=dropped.detach(), entropy=entropy, tokens=n,
            balance=balance.detach(), z=z.detach(),
        )  # fmt: skip


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def collect_moe_losses(model: nn.Module) -> Tensor | None:
    """After a training forward: the sum of every MoE layer's weighted auxiliary losses (None
    for a dense model), with the layers' statistics moved into their accumulators. Reading
    `last` once here, before backward, keeps a recomputation under activation checkpointing
    (which runs the forward again) from being counted twice."""
    total = None
    for layer in moe_layers(model):
        step, layer.last = layer.last, None
        if step is None:
            continue
        layer.stats.add(step)
        total = step.loss if total is None else total + step.loss
    return total


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer since the last call, summed over ranks (collective when distributed):
    `moe/L{i}/load_max` and `load_min` (busiest and idlest expert's share of assignments
    over the mean, 1.0 = balanced), `moe/L{i}/dropped` (fraction of assignments over capacity),
    `moe/L{i}/entropy` (mean routing entropy, nats); and overall `moe_balance_loss`,
    `moe_z_loss` (means over layers and forwards), `moe_load_max` (the worst layer's) and
    `moe_dropped` (mean over layers). Resets the accumulators."""
    layers = moe_layers(model)
    if not layers:
        return {}
    device = layers[0].router.weight.device
    values = torch.stack(
        [
            layer.stats.values if layer.stats.values is not None else layer.stats.empty(device)
            for layer in layers
        ]
    )  # (L, E + 6)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    values = values.cpu()
    for layer in layers:
        layer.stats.reset()
    out: dict[str, float] = {}
    balance = z = forwards = 0.0
    for index, (layer, row) in enumerate(zip(layers, values, strict=True)):
        e = layer.n_experts
        counts, (dropped, entropy, tokens, bal, zl, calls) = row[:e], row[e:].tolist()
        assigned = float(counts.sum())
        if assigned == 0:
            continue
        share = counts / (assigned / e)
        out[f"moe/L{index}/load_max"] = float(share.max())
        out[f"moe/L{index}/load_min"] = float(share.min())
        out[f"moe/L{index}/dropped"] = dropped / assigned
        out[f"moe/L{index}/entropy"] = entropy / tokens
        balance, z, forwards = balance + bal, z + zl, forwards + calls
    if forwards:
        out["moe_balance_loss"] = balance / forwards
        out["moe_z_loss"] = z / forwards
        load = [v for k, v in out.items() if k.endswith("/load_max")]
        drops = [v for k, v in out.items() if k.endswith("/dropped")]
        out["moe_load_max"] = max(load)  # the worst layer
        out["moe_dropped"] = sum(drops) / len(drops)  # mean over layers
    return out


def take_step_loss(model: nn.Module) -> float:
    """The weighted auxiliary losses this rank added since the last call, summed over layers
    and micro-batches (0.0 for a dense model); the trainer subtracts their mean from the loss
    it logs, so `loss` stays the language-model loss."""
    losses = []
    for layer in moe_layers(model):
        if layer.stats.step_loss is not None:
            losses.append(layer.stats.step_loss.double())
            layer.stats.step_loss = None
    # summed on the device: one host transfer per step, not one per layer
    return float(torch.stack(losses).sum()) if losses else 0.0


def enable_expert_parallel(model: nn.Module, group: object | None = None) -> list[str]:
    """Shard every MoE layer's experts over the ranks of `group` (default: all ranks), rank r
    keeping the r-th contiguous W-th; returns the names of the now rank-local parameters
    (for DDP to leave out of its all-reduce). Call on identical replicas (same seed), before
    the optimizer is built. Each expert gradient is divided by W as it arrives, matching the
    mean DDP takes over the ranks for the replicated parameters."""
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, MoEFeedForward):
            continue
        if module.n_experts % world:
            raise ValueError(
                f"model.moe.expert_parallel: model.moe.n_experts={module.n_experts} is not a "
                f"multiple of the {world} expert-parallel ranks"
            )
        module.ep_group, module.ep_world = group, world
        module.experts.shard(rank, world)
        for pname, param in module.experts.named_parameters():
            param.register_hook(lambda grad, w=world: grad / w)
            names.append(f"{name}.experts.{pname}" if name else f"experts.{pname}")
    return names


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """(state-dict prefix, layer) of every expert-parallel layer. The prefix leaves out the
    activation-checkpointing wrapper's name part, which its state dict leaves out too."""
    return [(name.replace("_checkpoint_wrapped_module.", ""), m)
            for name, m in model.named_modules()
            if isinstance(m, MoEFeedForward) and m.ep_group is not None]  # fmt: skip


def gather_experts(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (the model's own state dict) with every rank-local expert tensor replaced by
    the whole layer's, gathered from the expert-parallel ranks (collective)."""
    state = dict(state)
    for name, layer in expert_parallel_layers(model):
        for pname, param in layer.experts.named_parameters():
            pieces = [torch.empty_like(param) for _ in range(layer.ep_world)]
            dist.all_gather(pieces, param.detach().contiguous(), group=layer.ep_group)
            state[f"{name}.experts.{pname}"] = torch.cat(pieces)
    return state


def local_experts(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole-model `state` cut down to this rank's experts (the inverse of `gather_experts`)."""
    state = dict(state)
    for name, layer in expert_parallel_layers(model):
        local = layer.n_experts // layer.ep_world
        for pname, _ in layer.experts.named_parameters():
            key = f"{name}.experts.{pname}"
            full = state[key]
            if full.shape[0] != layer.n_experts:
                raise ValueError(
                    f"{key}: {full.shape[0]} experts saved, {layer.n_experts} expected"
                )
            state[key] = full[layer.experts.first : layer.experts.first + local]
    return state


def build_feed_forward(cfg: ModelConfig, index: int) -> nn.Module:
    """Block `index`'s feed-forward: MoE on every `moe.every_k_layers`-th block, else dense."""
    from pretrain.models.accounting import is_moe_block

    return MoEFeedForward(cfg) if is_moe_block(cfg, index) else FeedForward(cfg)


def init_feed_forward(mlp: nn.Module, in_std: float, down_std: float | None,
                      router_std: float | None = None) -> None:  # fmt: skip
    """A block's feed-forward, dense or MoE: in-projections N(0, in_std), the router
    N(0, router_std) (None: in_std), out projections N(0, down_std) (None: hidden size ** -0.5,
    T5's rule), biases 0."""

    def dense(ff: FeedForward) -> None:
        for linear in (ff.gate, ff.up):
            if linear is not None:
                nn.init.normal_(linear.weight, std=in_std)
        nn.init.normal_(ff.down.weight, std=down_std or ff.down.in_features**-0.5)
        for linear in (ff.gate, ff.up, ff.down):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)

    if isinstance(mlp, FeedForward):
        dense(mlp)
        return
    assert isinstance(mlp, MoEFeedForward)
    nn.init.normal_(mlp.router.weight, std=router_std or in_std)
    hidden = mlp.experts.d_ff  # (not the shape: zero.Init partitions it as it is made)
    mlp.experts.reset_parameters(in_std, down_std or hidden**-0.5)
    for shared in mlp.shared:
        dense(shared)
