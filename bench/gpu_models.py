"""GPU check of the model zoo (one CUDA device, a few minutes): correctness, then a first speed.

1. Each tiny family (LLaMA, GPT-2, BERT, T5) gives the same fp32 logits on CUDA as on the CPU
   (TF32 off), with padding and document masks, and bf16 autocast gives finite gradients.
2. KV-cached and uncached greedy generation give the same tokens on CUDA.
3. The decoder at gpt2_124m shape (vocab 50304, batch 16 x 1024, bf16 autocast, fused AdamW)
   runs training steps eagerly and under `torch.compile`: tokens/s, MFU against 989 TFLOP/s
   (the FLOP convention of `kiln plan`) and peak memory. The trainer's full-stack comparison
   with a plain loop is issue #9's `bench/gpu.py`; this is the model alone.

    python bench/gpu_models.py [--out results.json] [--steps 10] [--no-compile]

Runs on CPU too (`--smoke`: tiny shapes, no timing), so it cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if not p.endswith("/bench")]  # `bench/` must not shadow packages
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.config import (  # noqa: E402
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    ModelConfig,
)
from pretrain.models import build_model  # noqa: E402
from pretrain.models.accounting import training_flops  # noqa: E402
from pretrain.models.generation import SamplingConfig, generate, generate_seq2seq  # noqa: E402

PEAK_TFLOPS = 989.0
TINY: dict[str, ModelConfig] = {
    "llama": DecoderConfig(name="tiny_llama", vocab_size=4096, d_model=64, n_layers=2,
                           n_heads=4, n_kv_heads=2, d_ff=176, max_seq_len=256),
    "gpt2": DecoderConfig(name="tiny_gpt2", vocab_size=4096, d_model=64, n_layers=2, n_heads=4,
                          d_ff=256, activation="gelu", norm="layernorm", bias=True,
                          position="learned", max_seq_len=256),
    "bert": EncoderConfig(name="tiny_bert", vocab_size=4096, d_model=64, n_layers=2, n_heads=4,
                          d_ff=256, activation="gelu", norm="layernorm", norm_eps=1e-12,
                          bias=True, position="learned", max_seq_len=256, type_vocab_size=2),
    "t5": EncoderDecoderConfig(name="tiny_t5", vocab_size=4096, d_model=64, n_encoder_layers=2,
                               n_decoder_layers=2, n_heads=4, head_dim=16, d_ff=256,
                               activation="relu", norm="rmsnorm", norm_eps=1e-6,
                               position="relative", max_seq_len=256),
}  # fmt: skip
GPT2_124M = DecoderConfig(name="gpt2_124m", vocab_size=50304, d_model=768, n_layers=12,
                          n_heads=12, d_ff=3072, activation="gelu", norm="layernorm", bias=True,
                          position="learned", max_seq_len=1024)  # fmt: skip


def run_family(name: str, model: torch.nn.Module, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 4096, (2, 48), generator=generator).to(device)
    padding = torch.ones(2, 48, dtype=torch.bool, device=device)
    padding[1, 40:] = False
    if name == "t5":
        targets = torch.randint(5, 4096, (2, 16), generator=generator).to(device)
        return model(ids, targets, padding_mask=padding)
    documents = torch.tensor([[0] * 20 + [1] * 28] * 2, device=device)
    return model(ids, padding_mask=padding, document_ids=documents)


def check_families(device: str) -> dict[str, object]:
    results: dict[str, object] = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, cfg in TINY.items():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            cpu = run_family(name, model, "cpu")
            gpu = run_family(name, model.to(device), device).cpu()
        model.train()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = run_family(name, model, device).float().logsumexp(-1).mean()
        loss.backward()
        finite = all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()
        )
        results[name] = {
            "max_abs_diff_fp32": float((cpu - gpu).abs().max()),
            "bf16_grads_finite": finite,
        }
        model.eval()
        if name in ("llama", "gpt2"):
            prompts = [[5, 9, 13, 200, 7], [11, 3]]
            sampling = SamplingConfig(max_new_tokens=16)
            same = generate(model, prompts, sampling) == generate(
                model, prompts, sampling, use_cache=False
            )
            results[name]["cached_generation_equal"] = same  # type: ignore[index]
        elif name == "t5":
            inputs = [[7, 300, 41, 9], [18, 2000]]
            sampling = SamplingConfig(max_new_tokens=16)
            same = generate_seq2seq(model, inputs, sampling) == generate_seq2seq(
                model, inputs, sampling, use_cache=False
            )
            results[name]["cached_generation_equal"] = same  # type: ignore[index]
    return results


def time_training(cfg: DecoderConfig, batch: int, seq: int, steps: int, compile_model: bool,
                  device: str) -> dict[str, float]:  # fmt: skip
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.startswith("cuda"))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def forward_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # compiled with the loss, so the logits' cast and the cross-entropy fuse
    loss_fn = torch.compile(forward_loss) if compile_model else forward_loss

    def step() -> float:
        loss = loss_fn(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / seconds
    flops = training_flops(cfg, seq).per_token * tokens_per_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {
        "step_seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu_989": flops / (PEAK_TFLOPS * 1e12),
        "peak_memory_gib": peak,
        "warmup_seconds": warmup,
        "final_loss": loss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no timing")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 "torch": torch.__version__}  # fmt: skip
    report["families"] = check_families(device)
    print(json.dumps(report["families"], indent=1), flush=True)
    if args.smoke:
        shape = dataclasses.replace(GPT2_124M, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                                    vocab_size=512, max_seq_len=64)  # fmt: skip
        report["train_eager"] = time_training(shape, 2, 64, 2, False, device)
    else:
        report["train_eager"] = time_training(GPT2_124M, 16, 1024, args.steps, False, device)
        print("eager", report["train_eager"], flush=True)
        if not args.no_compile:
            report["train_compiled"] = time_training(GPT2_124M, 16, 1024, args.steps, True, device)
            print("compiled", report["train_compiled"], flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
