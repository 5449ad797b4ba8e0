"""Context extension: a run resumed at a longer `data.seq_len` continues each source's stream
where the shorter samples stopped, and `kiln train` continues a checkpoint trained at length T at
2T with RoPE scaling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_loader import CausalWindows, config, write_corpus

from pretrain.data.loader import LoaderState, build_loader

KILN = Path(sys.executable).parent / "kiln"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [40, 9, 23], "code": [17, 30]}, {"web": 0.75, "code": 0.25})
    return out


def read_spans(loader, first: int, last: int) -> dict[int, list[tuple[int, int]]]:  # noqa: ANN001
    """Per source, the [start, end) stream tokens global samples first..last-1 read."""
    order, stride, raw = loader.dataset.order(), loader.dataset.stride, loader.dataset.raw_length
    spans: dict[int, list[tuple[int, int]]] = {}
    for index in range(first, last):
        source, position = order.lookup(index)
        spans.setdefault(source, []).append((position * stride, position * stride + raw))
    return spans


def test_a_longer_seq_len_on_resume_continues_after_the_tokens_read(corpus: Path) -> None:
    short = config(corpus, seq_len=32)
    first = build_loader(short, CausalWindows(), num_steps=10)
    before = read_spans(first, 0, 120)
    state = LoaderState.from_dict(json.loads(json.dumps(first.state_after(10).to_dict())))
    assert state.seq_len == 32
    longer = config(corpus, seq_len=64)
    second = build_loader(longer, CausalWindows(), state=state, num_steps=10)
    assert second.state.seq_len == 64 and len(second.state.segments) == 2
    assert second.state_after(10).seq_len == 64  # the next checkpoint records the new length
    after = read_spans(second, 120, 240)
    for source, spans in after.items():
        read_until = max(end for _, end in before[source]) - 1  # the last target read
        first_start = min(start for start, _ in spans)
        # nothing re-read (the one-token overlap is the usual causal one), under 64 skipped
        assert read_until <= first_start < read_until + 64, (source, read_until, first_start)
        starts = sorted(start for start, _ in spans)
        assert starts == list(range(starts[0], starts[0] + 64 * len(starts), 64))  # contiguous
    batch = next(iter(second.loader))
    assert batch["input_ids"].shape == (2, 64)
    # and going back to the shorter length continues after the longer samples
    third = build_loader(short, CausalWindows(), state=second.state_after(10), num_steps=1)
    again = read_spans(third, 240, 252)
    for source, spans in again.items():
        assert min(s for s, _ in spans) >= max(e for _, e in after[source]) - 1


def kiln_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KILN), "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
def test_kiln_train_continues_at_twice_the_length_with_rope_scaling(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    common = [
        "model=tiny_decoder", "objective=clm", "engine=ddp", "cluster=local_cpu",
        "cluster.gpus_per_node=1", "data=small", f"data.path={corpus}",
        "data.global_batch_size=4", "data.micro_batch_size=2", "data.shuffle_buffer=64",
        f"trainer.run_dir={run_dir}", "trainer.checkpoint_every=4", "trainer.eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none", "logger.log_every=1",
    ]  # fmt: skip
    result = kiln_train([*common, "data.seq_len=32", "trainer.max_steps=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    extend = [
        "data.seq_len=64", "trainer.max_steps=8", "trainer.resume=auto",
        "model.rope_scaling.kind=yarn", "model.rope_scaling.factor=2",
        "model.rope_scaling.original_max_seq_len=32",
    ]  # fmt: skip
    result = kiln_train([*common, *extend], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert [(r["seq_len"], r["checkpoint_seq_len"]) for r in starts] == [(32, None), (64, 32)]
    losses = {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}
    assert sorted(losses) == list(range(1, 9))  # steps 5..8 continue the checkpoint
    assert all(loss < losses[1] for step, loss in losses.items() if step > 4), losses
    trainer = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer.json").read_text())
    loader = trainer["loader"]
    assert loader["seq_len"] == 64 and loader["samples"] == 8 * 4 and loader["steps"] == 8
    assert [segment["start"] for segment in loader["segments"]] == [0, 16]
    final = json.loads((run_dir / "final" / "config.json").read_text())
    assert final["model"]["rope_scaling"]["kind"] == "yarn"
