"""pretrain/checkpoint.py at one rank: background saves (`trainer.async_checkpoint`) write the
state of their step however it changes afterwards, and a failed one is raised at the next save
with `latest` left on the previous checkpoint. (The 2-rank DDP and FSDP runs are in
test_engines.py, the crash mid-save in test_trainer_faults.py.)"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointManager, host_copy, share_out, write_files
from pretrain.checkpoint_io import CheckpointError


class TensorEngine:
    """The two save methods of an engine, over one tensor (the real engines: test_engines.py).
    `gate` holds the background writer until the test releases it."""

    def __init__(self) -> None:
        self.weight = torch.zeros(4)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def save(self, directory: Path) -> None:
        torch.save({"weight": self.weight}, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        self.weight = torch.load(directory / "engine.pt", weights_only=True)["weight"]

    def save_async(self, directory: Path, group: object):  # noqa: ANN201
        files = host_copy({directory / "engine.pt": {"weight": self.weight}})

        def write() -> None:
            self.gate.wait()
            if self.fail:
                raise OSError(28, "No space left on device")
            write_files(files)

        return write


def saved_weight(path: Path) -> torch.Tensor:
    return torch.load(path / "engine.pt", weights_only=True)["weight"]


def test_host_copy_shares_nothing_and_keeps_the_structure() -> None:
    state = {"model": {"w": torch.ones(3)}, "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}],
             "step": torch.tensor(5), "name": "adamw"}  # fmt: skip
    copied = host_copy(state)
    state["model"]["w"].add_(1)
    state["step"].add_(1)
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copied["model"]["w"], torch.ones(3)) and int(copied["step"]) == 5
    assert copied["groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}]
    assert isinstance(copied["groups"][0]["betas"], tuple) and copied["name"] == "adamw"


def test_a_background_save_holds_the_state_of_its_step(tmp_path: Path) -> None:
    engine = TensorEngine()
    checkpoints = CheckpointManager(tmp_path, keep=2)
    engine.gate.clear()  # the writer waits: the save must not depend on it
    path = checkpoints.save(engine, {"tokens": 10}, step=1, background=True)
    assert path.name == "step_00000001" and not path.exists() and checkpoints.latest() is None
    engine.weight.add_(5)  # training goes on
    assert checkpoints.written() == []  # not on disk yet
    engine.gate.set()
    checkpoints.wait()
    assert checkpoints.latest() == path
    ((written, seconds),) = checkpoints.written()  # said once: the trainer logs it
    assert written == path and seconds > 0 and checkpoints.written() == []
    assert torch.equal(saved_weight(path), torch.zeros(4))
    state = json.loads((path / "trainer.json").read_text())
    assert state.pop("checksums")["files"] == 2  # engine.pt, rng_rank0.pt
    assert state == {"tokens": 10, "step": 1,
                                                               "world_size": 1}  # fmt: skip
    # the next save waits for the one in flight; keep=2 prunes the oldest
    for step in (2, 3):
        engine.weight.add_(1)
        checkpoints.save(engine, {"tokens": 10 * step}, step=step, background=True)
    checkpoints.save(engine, {"tokens": 40}, step=4)  # foreground
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_00000003", "step_00000004"]  # fmt: skip
    assert torch.equal(saved_weight(tmp_path / "checkpoints" / "step_00000003"),
                       torch.full((4,), 7.0))  # fmt: skip


def test_a_failed_background_save_is_raised_and_latest_stays(tmp_path: Path) -> None:
    engine = TensorEngine()
    checkpoints = CheckpointManager(tmp_path, keep=3)
    checkpoints.save(engine, {}, step=1)
    engine.fail = True
    checkpoints.save(engine, {}, step=2, background=True)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_00000002: "
                       r"OSError: .*No space left on device \(the disk is full: .* free "
                       r"in .*; `latest` still names step_00000001"):  # fmt: skip
        checkpoints.save(engine, {}, step=3, background=True)
    assert checkpoints.latest() == tmp_path / "checkpoints" / "step_00000001"
    assert not (tmp_path / "checkpoints" / ".step_00000002.tmp").exists()  # its space freed
    checkpoints.wait()  # raised once: nothing in flight, nothing left to raise
    engine.fail = False
    checkpoints.save(engine, {}, step=3, background=True)
    checkpoints.wait()
    assert checkpoints.latest() == tmp_path / "checkpoints" / "step_00000003"


def test_a_checkpoint_of_another_model_is_refused_before_the_engine_loads(tmp_path: Path) -> None:
    """Every checkpoint records its model's config and parameter shapes; `load` compares them
    with the run's model first and names the parameter and the config keys that differ."""
    from dataclasses import asdict, replace

    from pretrain.checkpoint import ModelRecord
    from pretrain.config import DecoderConfig
    from pretrain.models import build_model

    small = DecoderConfig(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=2)
    record = ModelRecord("decoder", asdict(small), build_model(small))
    engine = TensorEngine()
    engine.load = lambda directory: loaded.append(directory)  # type: ignore[attr-defined]
    loaded: list[Path] = []
    path = CheckpointManager(tmp_path, keep=2, model=record).save(
        engine, {"tokens_seen": 1, "loader": {}}, 1
    )
    saved = json.loads((path / "trainer.json").read_text())
    assert saved["model"]["d_model"] == 16 and saved["tokens_seen"] == 1
    assert saved["parameters"]["embed.weight"] == [64, 16] and len(saved["parameters"]) == 20

    cases = [
        (
            replace(small, d_model=24),
            "embed.weight is [64, 16] there, [64, 24] here (and 19 "
            "more); the model config differs in model.d_model=16 (now 24)",
        ),
        (
            replace(small, n_layers=3),
            "9 parameter(s) only this model has "
            "(blocks.2.attn_norm.weight, ...); the model config differs in model.n_layers=2 (now 3)",
        ),
        (
            replace(small, n_layers=1),
            "9 parameter(s) only the checkpoint has "
            "(blocks.1.attn_norm.weight, ...); the model config differs in model.n_layers=2 (now 1)",
        ),
    ]
    for other, reason in cases:
        other_record = ModelRecord("decoder", asdict(other), build_model(other))
        with pytest.raises(CheckpointError) as error:
            CheckpointManager(tmp_path, keep=2, model=other_record).load(engine, path)
        assert str(error.value) == (
            f"{path} holds another model: {reason}. Resume it with the model it was trained "
            "with, or train this one in a new trainer.run_dir"
        )
    assert loaded == []  # refused before the engine read anything
    # same shapes, other settings (a new RoPE base for context extension): loads
    longer = replace(small, rope_theta=500000.0, max_seq_len=4096)
    CheckpointManager(
        tmp_path, keep=2, model=ModelRecord("decoder", asdict(longer), build_model(longer))
    ).load(engine, path)
    # a checkpoint from before models were recorded: the engine decides
    CheckpointManager(tmp_path, keep=2).save(engine, {"loader": {}}, 2)
    wider = replace(small, d_model=24)
    CheckpointManager(
        tmp_path, keep=2, model=ModelRecord("decoder", asdict(wider), build_model(wider))
    ).load(engine, tmp_path / "checkpoints" / "step_00000002")
    assert len(loaded) == 2


def test_a_save_clears_what_a_killed_save_or_prune_left(tmp_path: Path) -> None:
    """A process killed in a save leaves its `.step_N.tmp`; one killed while pruning, a
    `step_N` without trainer.json. Neither is ever resumed from; the next save removes both,
    and keeps the complete checkpoints `keep` allows."""
    engine = TensorEngine()
    checkpoints = CheckpointManager(tmp_path, keep=2)
    checkpoints.save(engine, {}, step=1)
    root = tmp_path / "checkpoints"
    (root / ".step_00000002.tmp").mkdir()  # a save killed mid-write (never saved again)
    (root / ".step_00000002.tmp" / "engine.pt").write_bytes(b"partial")
    (root / "step_00000000").mkdir()  # a pruned checkpoint whose removal was cut short
    (root / "step_00000000" / "engine.pt").write_bytes(b"left over")
    checkpoints.save(engine, {}, step=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000003"]


def test_a_checkpoint_records_its_files_and_one_changed_since_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """checksums.json holds each file's size and sha256 (trainer.json aside: a hand edit is
    checked by its own rules); a file changed after the save, or cut short, is refused before
    the engine reads it. Unchecked, a flipped bit in a tensor loads silently as another weight."""
    engine = TensorEngine()
    engine.weight = torch.arange(4.0)
    checkpoints = CheckpointManager(tmp_path, keep=3)
    path = checkpoints.save(engine, {"loader": {}}, step=1)
    record = json.loads((path / "checksums.json").read_text())
    assert record["algorithm"] == "sha256"
    assert sorted(record["files"]) == ["engine.pt", "rng_rank0.pt"]
    for name, entry in record["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    restored = TensorEngine()
    checkpoints.load(restored, path)
    assert torch.equal(restored.weight, torch.arange(4.0))

    original = (path / "engine.pt").read_bytes()
    data = bytearray(original)
    data[original.index(torch.arange(4.0).numpy().tobytes()) + 5] ^= 0x01  # one bit of a weight
    (path / "engine.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as refused:
        checkpoints.load(TensorEngine(), path)
    assert str(refused.value) == (
        f"{path}: engine.pt does not match the checksum written with it: the checkpoint changed "
        "after it was written (a damaged disk or copy); no other checkpoint of this run is kept; "
        "start over in a new trainer.run_dir (or trainer.verify_checkpoints=false to read it as "
        "it is)"
    )
    checkpoints.verify = False  # what the check is for: the engine reads another weight
    checkpoints.load(restored, path)
    assert not torch.equal(restored.weight, torch.arange(4.0))

    checkpoints.verify = True
    checkpoints.save(engine, {"loader": {}}, step=2)  # the one before, named in the refusal
    (path / "engine.pt").write_bytes(original[:100])
    with pytest.raises(CheckpointError, match=rf"engine.pt has 100 bytes, {len(original):,} were "
                       rf"written: .*resume from another with trainer.resume="
                       rf"{tmp_path / 'checkpoints' / 'step_00000002'} "):  # fmt: skip
        checkpoints.load(TensorEngine(), path)
    (path / "engine.pt").write_bytes(original)
    (path / "rng_rank0.pt").unlink()  # said by `load`; the run goes on without it
    checkpoints.load(restored, path)
    assert "rng_rank0.pt is missing: this rank's random generators start afresh" in (
        capsys.readouterr().err
    )
    state = json.loads((path / "trainer.json").read_text())
    assert state["checksums"] == {
        "files": 2, "sha256": hashlib.sha256((path / "checksums.json").read_bytes()).hexdigest()}  # fmt: skip
    written = (path / "checksums.json").read_bytes()
    (path / "checksums.json").write_text('{"algorithm": "sha256", "files": {}}')  # emptied
    with pytest.raises(CheckpointError, match=r"checksums.json: unreadable \(it differs from "
                       r"the one its trainer.json records\): a damaged checkpoint"):  # fmt: skip
        checkpoints.load(TensorEngine(), path)
    (path / "checksums.json").unlink()  # deleted, or left out of a copy: not a pass
    with pytest.raises(CheckpointError, match=r"checksums.json is missing \(its trainer.json "
                       r"records one of 2 files\)"):  # fmt: skip
        checkpoints.load(TensorEngine(), path)
    (path / "checksums.json").write_bytes(written)
    checkpoints.load(restored, path)
    del state["checksums"]  # a checkpoint from before checksums were written
    (path / "trainer.json").write_text(json.dumps(state))
    (path / "checksums.json").unlink()
    checkpoints.load(restored, path)
    assert torch.equal(restored.weight, torch.arange(4.0))


def test_the_ranks_share_out_the_files_by_size() -> None:
    """Largest first to the rank with the fewest bytes: DeepSpeed's model-states file and the
    ranks' optimizer partitions spread over the ranks (every rank-th by name put both big
    ones on rank 0 here)."""
    sizes = {"a_model.pt": 900, "b_optim_0.pt": 500, "c_optim_1.pt": 500, "rng_0.pt": 10,
             "rng_1.pt": 10, "tokenizer.model": 40}  # fmt: skip
    shares = share_out(sizes, 2)
    assert shares == [["a_model.pt", "tokenizer.model", "rng_0.pt", "rng_1.pt"],
                      ["b_optim_0.pt", "c_optim_1.pt"]]  # 960 and 1,000 bytes  # fmt: skip
    assert sorted(sum(shares, [])) == sorted(sizes)  # each file once
    assert share_out(sizes, 1) == [sorted(sizes, key=lambda n: (-sizes[n], n))]
    assert share_out({"x": 1}, 3) == [["x"], [], []]
