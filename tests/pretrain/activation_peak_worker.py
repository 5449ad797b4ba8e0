"""Run by test_plan.py, one process per case (kernels a process ran before change the CPU
allocator's figures): the live tensor bytes of one eager forward and backward of a model of
width 256 at 2 x 512 tokens, with document masks where the family takes them and activation
checkpointing of every EVERY-th block (0: none), against `kiln plan`'s activation estimate.
Prints one JSON object {"peak": bytes, "estimate": bytes}.

    python activation_peak_worker.py EVERY OVERRIDE...
"""

from __future__ import annotations

import json
import sys

import torch
from hydra import compose, initialize_config_module

from pretrain.config import build_config, register_configs
from pretrain.engine import lm_loss
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.objectives import encoder_decoder_lengths
from pretrain.plan import activation_memory
from pretrain.profiling import peak_tensor_bytes

BATCH, LENGTH, VOCAB = 2, 512, 512


def main(every: int, overrides: list[str]) -> None:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        cfg = build_config(compose("plan", overrides=[
            *overrides, "model.d_model=256", "model.d_ff=688", f"model.vocab_size={VOCAB}",
            f"data.seq_len={LENGTH}", f"data.micro_batch_size={BATCH}", "cluster=local_cpu",
            "engine=ddp", f"model.max_seq_len={LENGTH}",
            f"engine.activation_checkpointing={every > 0}",
            f"engine.activation_checkpointing_every={max(every, 1)}"]))  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if every:
        apply_activation_checkpointing(model, every)
    if cfg.model.family == "encoder_decoder":
        encoder, decoder = encoder_decoder_lengths(cfg)
        batch = {"input_ids": torch.randint(5, VOCAB, (BATCH, encoder)),
                 "decoder_input_ids": torch.randint(5, VOCAB, (BATCH, decoder)),
                 "labels": torch.randint(5, VOCAB, (BATCH, decoder))}  # fmt: skip
    else:  # packed rows of documents of 100 tokens, as the loader gives them
        ids = torch.randint(5, VOCAB, (BATCH, LENGTH))
        documents = (torch.arange(LENGTH) // 100).expand(BATCH, LENGTH)
        batch = {"input_ids": ids, "labels": ids, "document_ids": documents}
    lm_loss(model, batch).backward()  # gradients exist, as in every step after the first
    peak = peak_tensor_bytes(lambda: lm_loss(model, batch).backward())
    estimate = activation_memory(cfg, 4)[1 if every else 0]
    print(json.dumps({"peak": peak, "estimate": estimate}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
