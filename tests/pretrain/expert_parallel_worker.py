"""Run under torchrun (2 CPU ranks, gloo) by test_expert_parallel.py: an MoE decoder trained by
the DDP engine with `model.moe.expert_parallel` against the same model replicated, on the same
global batch. Writes the largest differences it measured to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 expert_parallel_worker.py OUT
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from pretrain.config import DecoderConfig, MoEConfig, OptimConfig
from pretrain.engine import compute_loss
from pretrain.engine.ddp import DDPEngine
from pretrain.models import build_model
from pretrain.models.moe import gather_experts, moe_layers, moe_metrics
from pretrain.optim import build_optimizer

CASES = {
    "dropless_top2": {"top_k": 2},
    "capacity_shared_bias": {"top_k": 2, "capacity_factor": 1.0, "n_shared_experts": 1},
    "top1_sigmoid": {"top_k": 1, "router": "sigmoid", "capacity_factor": 1.5},
    "padded_capacity": {"top_k": 2, "capacity_factor": 1.0},  # right-padded rows
}
ACCUMULATION = 2
ROWS = 2  # per micro-batch and rank


def config(settings: dict) -> DecoderConfig:
    bias = "n_shared_experts" in settings
    return DecoderConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                         max_seq_len=64, bias=bias, activation="gelu" if bias else "swiglu",
                         moe=MoEConfig(n_experts=4, expert_parallel=True, **settings))  # fmt: skip


def engine_for(cfg: DecoderConfig, seed: int) -> tuple[DDPEngine, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # off the init, so every weight matters; uneven routing
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    reference = copy.deepcopy(model)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.05)
    settings = SimpleNamespace(model=cfg, engine=SimpleNamespace(bucket_cap_mb=25), optim=optim)
    engine = DDPEngine(settings, model, accumulation=ACCUMULATION, max_steps=10,
                       device=torch.device("cpu"))  # fmt: skip
    return engine, reference.train()


def batches(world: int, step: int, padded: bool = False) -> list[list[dict]]:
    """[rank][micro] batches of one global batch (the same on every rank). `padded`: rows of
    4 to 16 real tokens, right-padded (a padding mask; pad id 0, label -100), so the ranks
    route different numbers of tokens."""
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(5, 97, (world, ACCUMULATION, ROWS, 16), generator=generator)
    if not padded:
        return [[{"input_ids": ids[r, m], "labels": ids[r, m]} for m in range(ACCUMULATION)]
                for r in range(world)]  # fmt: skip
    lengths = torch.randint(4, 17, (world, ACCUMULATION, ROWS, 1), generator=generator)
    mask = torch.arange(16) < lengths
    ids = ids.masked_fill(~mask, 0)
    labels = ids.masked_fill(~mask, -100)
    return [[{"input_ids": ids[r, m], "padding_mask": mask[r, m], "labels": labels[r, m]}
             for m in range(ACCUMULATION)] for r in range(world)]  # fmt: skip


def full_state(engine: DDPEngine) -> dict[str, torch.Tensor]:
    return gather_experts(engine.module, engine.module.state_dict())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        if a[k].shape != b[k].shape:
            raise AssertionError(f"{k}: {a[k].shape} vs {b[k].shape}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def full_grads(engine: DDPEngine) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in engine.module.named_parameters()
             if p.grad is not None}  # fmt: skip
    for name in engine.expert_names:  # the same order on every rank
        pieces = [torch.empty_like(grads[name]) for _ in range(engine.world)]
        dist.all_gather(pieces, grads[name].contiguous())
        grads[name] = torch.cat(pieces)
    return grads


def run_case(name: str, settings: dict, out: Path, rank: int, world: int) -> dict:
    cfg = config(settings)
    engine, reference = engine_for(cfg, seed=0)
    result: dict = {
        "local_experts": [int(m.experts.up.shape[0]) for m in moe_layers(engine.module)]
    }
    result["state_at_start"] = max_diff(full_state(engine), reference.state_dict())
    ref_optimizer = build_optimizer(reference, engine_cfg_optim(), device_type="cpu")
    loss_diffs, logit_diffs, grad_diffs, norm_diffs, weight_diffs = [], [], [], [], []
    norms = []
    padded = name.startswith("padded")
    for step in range(3):
        data = batches(world, step, padded)
        with torch.no_grad():  # outputs, on this rank's rows (the exchange still runs)
            inputs = {k: v for k, v in data[rank][0].items() if k != "labels"}
            ours, theirs = engine.module(**inputs), reference(**inputs)
            real = inputs.get("padding_mask", torch.ones(ours.shape[:2], dtype=torch.bool))
            logit_diffs.append(float((ours - theirs)[real].abs().max()))
        losses = [engine.forward_backward(b, last=m == ACCUMULATION - 1)
                  for m, b in enumerate(data[rank])]  # fmt: skip
        ref_losses = []
        for r in range(world):  # the data-parallel mean, computed on one process
            for b in data[r]:
                loss = compute_loss(reference, b)
                (loss / (ACCUMULATION * world)).backward()
                ref_losses.append(loss.detach())
        loss_diffs.append(max(float((a - b).abs()) for a, b in
                              zip(losses, ref_losses[rank * ACCUMULATION:], strict=False)))  # fmt: skip
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        grad_diffs.append(max_diff(full_grads(engine), ref_grads))
        norm, skipped = engine.optimizer_step()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05))
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)
        norm_diffs.append(abs(norm - ref_norm) / ref_norm)
        norms.append(norm)
        weight_diffs.append(max_diff(full_state(engine), reference.state_dict()))
        assert not skipped
    result |= {"loss": max(loss_diffs), "logits": max(logit_diffs), "grads": max(grad_diffs),
               "norm_rel": max(norm_diffs), "weights_after_steps": max(weight_diffs), "norms": norms,
               "dropped": moe_metrics(engine.module)["moe_dropped"]}  # fmt: skip
    # checkpoint: save, load into a differently initialised engine, then both take a step
    directory = out / f"ckpt_{name}"
    if rank == 0:
        directory.mkdir(parents=True)
    dist.barrier()
    engine.save(directory)
    dist.barrier()
    restored, _ = engine_for(cfg, seed=1)
    result["state_before_load"] = max_diff(full_state(restored), full_state(engine))
    restored.load(directory)
    result["state_after_load"] = max_diff(full_state(restored), full_state(engine))
    data = batches(world, 7, padded)
    for e in (engine, restored):
        for m, b in enumerate(data[rank]):
            e.forward_backward(b, last=m == ACCUMULATION - 1)
        e.optimizer_step()
    result["state_after_resumed_step"] = max_diff(full_state(restored), full_state(engine))
    result["files"] = sorted(p.name for p in directory.iterdir())
    return result


def engine_cfg_optim() -> OptimConfig:
    return OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.05)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {name: run_case(name, settings, out, rank, world) for name, settings in CASES.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    # No collective in flight at exit: gloo's worker thread frees the last all_gather's work
    # (its Python-owned output tensors) after `wait()` returns, and needs the GIL to do it. If
    # the interpreter is already finalizing then, that thread aborts the process ("terminate
    # called without an active exception"; 3 in 85 runs at idle, 0 in 90 with the barrier).
    # `destroy_process_group` does not join those threads once a DDP model has lived (torch
    # 2.13 keeps the group alive), but the barrier releases the GIL until both ranks reach it.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
