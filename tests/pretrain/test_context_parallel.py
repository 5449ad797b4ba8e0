"""Context parallelism on 2 CPU ranks (gloo): a decoder whose rows are split across the ranks
gives the logits and gradients of the unsplit model."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.config import DecoderConfig
from pretrain.models import build_model

WORLD = 2
CASES = {
    "rope_documents": {},
    "alibi_local_global": {"position": "alibi", "attention_window": 6, "global_every": 2,
                           "global_tokens": 2},
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_process(rank: int, port: int, result: str) -> None:
    from pretrain.engine.context_parallel import apply_context_parallel, shard_sequence

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    errors = {}
    for name, changes in CASES.items():
        cfg = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=64, max_seq_len=64, **changes)  # fmt: skip
        torch.manual_seed(0)
        full = build_model(cfg)
        split = build_model(cfg)
        split.load_state_dict(full.state_dict())
        apply_context_parallel(split)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (2, 33), generator=generator)
        documents = (torch.rand(2, 32, generator=generator) < 0.1).long().cumsum(1)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "document_ids": documents,
                 "position_ids": torch.arange(32).expand(2, 32)}  # fmt: skip
        logits = full(batch["input_ids"], document_ids=documents)
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
        part = shard_sequence(batch, rank, WORLD)
        ours = split(part["input_ids"], document_ids=part["document_ids"],
                     position_ids=part["position_ids"])  # fmt: skip
        # each rank's share of the mean over all tokens; gradients summed over the ranks
        loss = F.cross_entropy(ours.flatten(0, 1), part["labels"].flatten(), reduction="sum")
        (loss / batch["labels"].numel()).backward()
        for param in split.parameters():
            dist.all_reduce(param.grad)
        mine = logits.chunk(WORLD, dim=1)[rank]
        grads = [(a.grad - b.grad).abs().max().item()
                 for a, b in zip(full.parameters(), split.parameters(), strict=True)]  # fmt: skip
        errors[name] = {"logits": (ours - mine).abs().max().item(), "grads": max(grads)}
    Path(f"{result}.{rank}").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_context_parallel_equals_the_unsplit_model(tmp_path: Path) -> None:
    result = str(tmp_path / "errors")
    mp.spawn(rank_process, args=(free_port(), result), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        errors = json.loads(Path(f"{result}.{rank}").read_text())
        for name, error in errors.items():
            assert error["logits"] < 1e-5 and error["grads"] < 1e-6, (rank, name, error)


def test_kiln_train_with_context_parallelism_matches_one_rank(tmp_path: Path) -> None:
    """`engine.context_parallel=2` on 2 ranks: each sample's sequence is split between the
    ranks (one data-parallel group), and the per-step losses equal a 1-rank run of the same
    global batch to float tolerance, as do the eval losses, overall and of each source (each
    rank's part of a row summed over the group)."""
    import subprocess
    import sys

    from test_loader import VOCAB, write_corpus_with_val

    corpus = tmp_path / "shards"
    write_corpus_with_val(corpus, {"web": (5, VOCAB), "code": (5, 40)})
    kiln = Path(sys.executable).parent / "kiln"
    evals: dict[Path, dict[int, dict]] = {}

    def train(run_dir: Path, *extra: str) -> dict[int, float]:
        args = [
            "model=tiny_decoder", "objective=clm", "engine=ddp", "cluster=local_cpu",
            "data=small", f"data.path={corpus}", "data.seq_len=64", "data.global_batch_size=4",
            "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
            "trainer.max_steps=6", "trainer.checkpoint_every=100", "trainer.eval_every=3",
            "trainer.eval_steps=2", "optim.lr=3e-3", "optim.warmup_steps=1", "logger=none",
            "logger.log_every=1", *extra,
        ]  # fmt: skip
        result = subprocess.run([str(kiln), "train", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        start = next(r for r in records if r.get("event") == "start")
        assert start["data_parallel"] == 1  # both ranks of the split run read the same samples
        evals[run_dir] = {r["step"]: r for r in records if r["kind"] == "eval"}
        return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}

    split = train(tmp_path / "cp", "cluster.gpus_per_node=2", "engine.context_parallel=2")
    whole = train(tmp_path / "one", "cluster.gpus_per_node=1")
    assert sorted(split) == sorted(whole) == list(range(1, 7))
    for step, loss in whole.items():
        assert abs(split[step] - loss) <= 1e-4 * abs(loss), (step, split[step], loss)
    assert split[6] < split[1]
    split_evals, whole_evals = evals[tmp_path / "cp"], evals[tmp_path / "one"]
    assert sorted(split_evals) == sorted(whole_evals) == [3, 6]
    for step, record in whole_evals.items():
        keys = ("eval_loss", "eval_loss/web", "eval_loss/code")
        assert record.keys() >= set(keys)
        for key in keys:
            got, expected = split_evals[step][key], record[key]
            assert abs(got - expected) <= 1e-4 * abs(expected), (step, key, got, expected)
