"""`kiln train` on 2 CPU ranks under faults and for the other families: a crash in the middle
of a checkpoint save leaves `latest` on the previous complete checkpoint and the resumed run
matches an uninterrupted one bitwise; encoders (MLM) and encoder-decoders (span corruption)
train end to end; an offline W&B run records metrics and config and never the API key."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loader import write_corpus

from pretrain.exit_codes import PEER_GONE

KILN = Path(sys.executable).parent / "kiln"
pytestmark = pytest.mark.slow
FAKE_KEY = "fake-key-0123456789abcdef"


def said_by_the_ranks(stderr: str, line: str) -> None:
    """Every rank that refuses the run says `line` (with its rank for {rank}) and nothing else
    of the kind, and at least one does. The first rank to fail ends the run: torchrun stops the
    other, which on a loaded machine may be stopped before it gets as far as its own line."""
    said: dict[int, list[str]] = {}
    for rank, text in re.findall(r"kiln train: rank (\d+): (.*)\n", stderr):
        if text != PEER_GONE:  # a rank whose collective the first one's exit cut short
            said.setdefault(int(rank), []).append(f"kiln train: rank {rank}: {text}\n")
    assert said, stderr[-3000:]
    for rank, lines in said.items():
        assert lines == [line.format(rank=rank)], stderr[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    # sentinel ids in the tokenizer record, for span corruption
    write_corpus(out, {"web": [200, 150, 180]}, {"web": 1.0}, sentinels=100)
    return out


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_decoder", "objective=clm", "engine=ddp", "cluster=local_cpu", "data=small",
        f"data.path={corpus}", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
        "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none", "logger.log_every=1", *extra,
    ]  # fmt: skip


def kiln_train(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KILN_FAULT_")}
    return subprocess.run([str(KILN), "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=environment | env)  # fmt: skip


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Step -> loss; a step logged again after a resume keeps its last record."""
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 12-step run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = kiln_train(train_args(corpus, run_dir), run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_crash_during_save_keeps_the_previous_checkpoint(
    corpus: Path, tmp_path: Path, reference: Path, background: bool
) -> None:
    """A crash after every rank wrote its part of the step-8 checkpoint, before rank 0 moved
    `latest`: in the foreground (the loop stopped) or in the background writer's thread
    (`trainer.async_checkpoint`, the loop gone on meanwhile)."""
    extra = [f"trainer.async_checkpoint={str(background).lower()}"]
    run_dir = tmp_path / "crashed"
    result = kiln_train(train_args(corpus, run_dir, *extra), tmp_path,
                        KILN_FAULT_CRASH_IN_SAVE="8")  # fmt: skip
    assert result.returncode != 0, "the run survived a crash in the middle of a save"
    assert not (run_dir / "exit.json").exists()  # rank 0 died before it could write one
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    previous = checkpoints / "step_00000004"
    assert json.loads((previous / "trainer.json").read_text())["step"] == 4
    assert not (checkpoints / "step_00000008").exists()  # never renamed into place
    half_written = checkpoints / ".step_00000008.tmp"
    if half_written.exists():  # the engine state, but no trainer.json
        assert not (half_written / "trainer.json").exists()
    reached = max(train_losses(records(run_dir)))
    # it got as far as the save at step 8 (in the background, maybe a step or two further)
    assert reached == 8 if not background else 8 <= reached <= 12

    result = kiln_train(train_args(corpus, run_dir, *extra), tmp_path)  # no fault this time
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(run_dir)
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    assert len(starts) == 2
    resumed = rows[starts[-1]]
    assert resumed["step"] == 4 and Path(resumed["resumed_from"]).name == "step_00000004"
    assert sorted(train_losses(rows[starts[-1] :])) == list(range(5, 13))
    assert (checkpoints / "latest").read_text() == "step_00000012"
    assert not half_written.exists()  # the save at step 8 replaced it
    ours, theirs = train_losses(rows), train_losses(records(reference))
    assert sorted(ours) == sorted(theirs) == list(range(1, 13))
    assert ours == theirs  # bitwise: the same floats, step by step


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 7 MiB filesystem (tmpfs): the tiny model's first checkpoint (4.2 MiB) fits, a second
    does not. Mounting needs root (CI and these machines run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(
    corpus: Path, tmp_path: Path, reference: Path, small_disk: Path
) -> None:
    """The step-8 checkpoint fills the disk: the run stops with the cause, the free space and
    where it resumes (torch said "unexpected pos 2169344 vs 2169236" in a traceback per rank);
    the part written is removed; `latest` names step 4. With room made, the run resumes and
    matches the uninterrupted one bitwise."""
    run_dir = small_disk / "run"
    checkpoints = run_dir / "checkpoints"
    result = kiln_train(train_args(corpus, run_dir), tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    said = re.findall(r"kiln train: rank (\d): (.*)\n", result.stderr)
    assert said, result.stderr[-3000:]
    for _, text in said:  # rank 1 may also fail writing its RNG file, or lose rank 0
        assert text == PEER_GONE or re.fullmatch(
            rf"cannot write checkpoint {re.escape(str(checkpoints))}/step_00000008: \w+: .+ "
            r"\(the disk is full: [\d.]+ [KM]iB free in "
            rf"{re.escape(str(checkpoints))}; a save needs room for one checkpoint \(4\.\d MiB "
            r"the last\) beyond the trainer.keep_checkpoints=3 kept, until the oldest is "
            r"pruned\); `latest` still names step_00000004, where trainer.resume=auto continues",
            text,
        ), text
    assert "0" in dict(said)  # rank 0 writes the engine file, the bulk
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000004"]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    ended = json.loads((run_dir / "exit.json").read_text())  # `kiln report` says why it stopped
    assert (ended["exit_code"], ended["step"]) == (1, 8)
    assert ended["error"] == dict(said)["0"]
    report = subprocess.run([str(KILN), "report", f"report.run_dir={run_dir}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "stopped after step 8 (exit 1): cannot write checkpoint" in " ".join(
        report.stdout.split()
    ), report.stdout

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = kiln_train(train_args(corpus, run_dir), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(run_dir)
    resumed = [r for r in rows if r.get("event") == "start"][-1]
    assert resumed["step"] == 4
    ours, theirs = train_losses(rows), train_losses(records(reference))
    assert sorted(ours) == list(range(1, 13))
    assert ours == theirs  # bitwise


@pytest.mark.parametrize(
    ("model", "objective"),
    [("tiny_encoder", "mlm"), ("tiny_encoder_decoder", "span")],
)
def test_each_family_trains_with_its_objective(
    corpus: Path, tmp_path: Path, model: str, objective: str
) -> None:
    run_dir = tmp_path / model
    args = train_args(corpus, run_dir, f"model={model}", f"objective={objective}",
                      "trainer.max_steps=30", "trainer.checkpoint_every=100")  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = train_losses(records(run_dir))
    assert sorted(per_step) == list(range(1, 31))
    last = [per_step[step] for step in range(26, 31)]
    assert sum(last) / len(last) < per_step[1] - 0.4, per_step  # it learns
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000030"
    from pretrain.checkpoint_io import load_consolidated

    model_cfg, weights = load_consolidated(run_dir / "final")
    assert model_cfg.name == model and sum(p.numel() for p in weights.parameters()) > 0


def test_wandb_offline_run_has_metrics_and_config_and_no_key(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "wandb_run"
    args = train_args(corpus, run_dir, "logger=wandb", "logger.mode=offline",
                      "trainer.max_steps=6")  # fmt: skip
    result = kiln_train(args, tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_SILENT="true")
    assert result.returncode == 0, result.stderr[-3000:]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir()
    (log,) = offline[0].glob("run-*.wandb")
    data = log.read_bytes()
    assert data, "the offline W&B log is empty"
    assert b"train/loss" in data  # the metrics...
    assert b"tiny_decoder" in data  # ...and the config
    leaked = [
        str(path.relative_to(run_dir))
        for path in run_dir.rglob("*")
        if path.is_file() and FAKE_KEY.encode() in path.read_bytes()
    ]
    assert not leaked, f"the API key was written to {leaked}"
    assert FAKE_KEY not in result.stdout + result.stderr
    assert sorted(train_losses(records(run_dir))) == list(range(1, 7))


def test_a_rank_says_a_bad_shard_in_one_line(corpus: Path, tmp_path: Path) -> None:
    """A problem only the ranks can find (here a shard whose bytes no longer match the
    manifest, with data.verify=shard) is said in one line by each rank that gets to it, not a traceback."""
    shards = tmp_path / "shards"
    shutil.copytree(corpus, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    bad = shards / manifest["shards"][0]["path"]
    data = bytearray(bad.read_bytes())
    data[-600] ^= 0xFF  # one flipped byte: the tar still reads, the sha256 differs
    bad.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    args = train_args(shards, run_dir, "data.verify=shard")
    result = kiln_train(args, tmp_path)
    assert result.returncode == 1
    said_by_the_ranks(result.stderr, f"kiln train: rank {{rank}}: shard {bad}: sha256 differs "
                      "from the manifest (data.on_bad_shard=skip skips bad shards)\n")  # fmt: skip
    assert "DataError" not in result.stderr  # no rank's traceback

    # damaged in place, its size kept, with the default data.verify=none: the rank that reads
    # it says so, naming the shard and how to find such shards before training
    for record in manifest["shards"]:  # the run reads only the shards it gets to
        shard = shards / record["path"]
        damaged = bytearray(shard.read_bytes())
        damaged[:512] = bytes(b ^ 0xFF for b in damaged[:512])  # the first tar header
        shard.write_bytes(bytes(damaged))
    result = kiln_train(train_args(shards, tmp_path / "run2"), tmp_path)
    assert result.returncode == 1
    said = [line for line in result.stderr.splitlines() if line.startswith("kiln train: rank")]
    assert said, result.stderr[-3000:]
    for line in said:
        assert re.fullmatch(
            rf"kiln train: rank [01]: {re.escape(str(shards))}/\S+\.tar: unreadable or "
            r"truncated shard "
            r"\(.+\) \(data.verify=shard checks every shard before training; "
            r"data.on_bad_shard=skip skips bad shards\)",
            line,
        ), line
    assert "Traceback" not in result.stderr


def test_a_bug_in_one_rank_prints_its_traceback_and_fails_the_run(
    corpus: Path, tmp_path: Path
) -> None:
    """An exception nothing expects, in one rank forked from torchrun's agent: its traceback
    is printed as Python prints an uncaught one (torch's "[rankN]:" before each line, where
    torchrun's wrapper of forked ranks would only hand it to the agent), the run fails with
    status 1, and the agent adds one line and its failure table, not its own stack."""
    result = kiln_train(train_args(corpus, tmp_path / "run"), tmp_path, KILN_FAULT_RAISE_RANK="1")
    assert result.returncode == 1
    assert "[rank1]: RuntimeError: KILN_FAULT_RAISE_RANK: rank 1 fails on purpose\n" in (
        result.stderr
    ), result.stderr[-3000:]
    assert "[rank1]: Traceback (most recent call last):" in result.stderr
    assert "FAILED" in result.stderr and "Root Cause" in result.stderr
    assert "ProcessExitedException" not in result.stderr, result.stderr[-3000:]


def test_resuming_another_models_checkpoint_is_one_line_per_rank(
    corpus: Path, tmp_path: Path, reference: Path
) -> None:
    """The reference run's last checkpoint, resumed by a wider model, or by another engine:
    refused in one line before any rank starts and before the run directory is written (the
    ranks' own check, checkpoint.ModelRecord, is for launches without this preflight)."""
    from pretrain.models.accounting import count_parameters
    from pretrain.preflight import resume_mismatch

    checkpoint = reference / "checkpoints" / "step_00000012"
    run_dir = tmp_path / "wider"
    args = train_args(corpus, run_dir, f"trainer.resume={checkpoint}", "model.d_model=96")
    result = kiln_train(args, tmp_path)
    assert result.returncode == 1
    cfg = pickle.loads((reference / "config.pkl").read_bytes())  # noqa: S301
    before = count_parameters(cfg.model).total
    cfg.model.d_model = 96
    assert result.stderr == (
        f"kiln train: {checkpoint} holds another model: {before:,} parameters (now "
        f"{count_parameters(cfg.model).total:,}); model.d_model=64 (now 96). Resume it with the "
        "model it was trained with, or train this one in a new trainer.run_dir\n"
    )
    assert not run_dir.exists()
    cfg.model.d_model = 64
    assert resume_mismatch(cfg, checkpoint) is None

    args = train_args(corpus, run_dir, f"trainer.resume={checkpoint}")
    result = kiln_train([{"engine=ddp": "engine=fsdp"}.get(a, a) for a in args], tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"kiln train: {checkpoint} was written by engine=ddp, and this run uses engine=fsdp (or "
        "hsdp): resume it with its engine, or start a new run from its weights (trainer.init_from="
        f"{checkpoint} and a new trainer.run_dir)\n"
    )
    assert "size mismatch" not in result.stderr  # the engine never tried


def test_a_damaged_checkpoint_is_named_and_never_silently_replaced(
    corpus: Path, tmp_path: Path, reference: Path
) -> None:
    """`latest` naming a checkpoint without its trainer.json stops `trainer.resume=auto` before
    any rank starts (a new run from step 0 would overwrite the run's good checkpoints); an
    engine file that no longer loads is one line per rank; a missing RNG file is said, and the
    run goes on from the checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_00000012" / "trainer.json").unlink()
    kept = {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints.glob("step_*")}
    result = kiln_train(train_args(corpus, run_dir, "trainer.max_steps=16"), tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"kiln train: {checkpoints / 'latest'} names 'step_00000012', which holds no "
        "trainer.json (damaged or deleted); resume from the newest complete one with "
        f"trainer.resume={checkpoints / 'step_00000008'}, or start over in a new trainer.run_dir"
    )
    assert {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints.glob("step_*")} == kept
    # starting afresh there would prune those checkpoints and overwrite latest and final/
    config = (run_dir / "config.yaml").read_bytes()
    result = kiln_train(train_args(corpus, run_dir, "trainer.resume=none"), tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"kiln train: trainer.resume=none, but {checkpoints} holds 3 checkpoint(s) (up to "
        "step_00000012) that a new run there would prune and overwrite; continue them with "
        "trainer.resume=auto, start over in a new trainer.run_dir, or delete the directory first"
    )
    assert {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints.glob("step_*")} == kept
    assert (run_dir / "config.yaml").read_bytes() == config

    step_8 = checkpoints / "step_00000008"
    engine_file = step_8 / "engine.pt"
    written = engine_file.read_bytes()
    flipped = bytearray(written)
    flipped[len(written) // 2] ^= 0x10  # a bit flipped on the disk, or in a copy
    engine_file.write_bytes(bytes(flipped))
    resume_8 = train_args(corpus, run_dir, f"trainer.resume={step_8}", "trainer.max_steps=10")
    result = kiln_train(resume_8, tmp_path)
    assert result.returncode == 1
    said_by_the_ranks(result.stderr, (
        f"kiln train: rank {{rank}}: {step_8}: engine.pt does not match the checksum written "
        "with it: the checkpoint changed after it was written (a damaged disk or copy); resume "
        f"from another with trainer.resume={checkpoints / 'step_00000004'} (or "
        "trainer.verify_checkpoints=false to read it as it is)\n"))  # fmt: skip
    assert "Traceback" not in result.stderr
    export = subprocess.run(
        [str(KILN), "export", f"export.checkpoint={step_8}", f"export.output_dir={tmp_path / 'x'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert export.returncode == 1
    assert export.stderr.strip() == (
        f"kiln export: export.checkpoint: {step_8}: engine.pt does not match the checksum "
        "written with it: the checkpoint changed after it was written (a damaged disk or copy); "
        "take another checkpoint, or trainer.verify_checkpoints=false to read it as it is"
    )
    assert not (tmp_path / "x").exists()
    # final/ records its weights' sha256 too (safetensors has none); the switch reads it anyway
    weights = run_dir / "final" / "model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-100] ^= 0x10
    weights.write_bytes(bytes(flipped))
    exports = [
        subprocess.run(
            [str(KILN), "export", f"export.checkpoint={run_dir / 'final'}",
             f"export.output_dir={tmp_path / 'y'}", f"trainer.verify_checkpoints={switch}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        for switch in ("true", "false")
    ]  # fmt: skip
    assert exports[0].returncode == 1
    assert exports[0].stderr.strip() == (
        f"kiln export: export.checkpoint: {run_dir / 'final'}: model.safetensors does not match "
        "the checksum written with it: the checkpoint changed after it was written (a damaged "
        "disk or copy); take another checkpoint, or trainer.verify_checkpoints=false to read it "
        "as it is"
    )
    assert exports[1].returncode == 0, exports[1].stderr[-2000:]

    engine_file.write_bytes(written[:4096])  # truncated, and the engine's own load reads it
    resume_8.append("trainer.verify_checkpoints=false")
    result = kiln_train(resume_8, tmp_path)
    assert result.returncode == 1
    refusals = [line for line in result.stderr.splitlines() if "cannot resume" in line]
    assert refusals, result.stderr[-3000:]
    for line in refusals:
        assert re.fullmatch(
            rf"kiln train: rank [01]: {re.escape(str(step_8))}: cannot resume from it: \w+: .+",
            line,
        ), line
    assert "Traceback" not in result.stderr

    # a trainer.json without its step or data position, or with another step, resumed from
    # step 0 on these weights and overwrote the run's checkpoints
    step_4 = checkpoints / "step_00000004"
    saved = (step_4 / "trainer.json").read_text()
    for damage, why in (("{}", "it lacks step, loader"),
                        (json.dumps(json.loads(saved) | {"step": 3}),
                         "it records step 3 in step_00000004")):  # fmt: skip
        (step_4 / "trainer.json").write_text(damage)
        args = train_args(corpus, run_dir, f"trainer.resume={step_4}", "trainer.max_steps=6")
        result = kiln_train(args, tmp_path)
        assert result.returncode == 1, result.stderr[-3000:]
        assert f"{step_4 / 'trainer.json'}: unreadable ({why})" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    (step_4 / "trainer.json").write_text(saved)

    (step_4 / "rng_rank1.pt").unlink()
    args = train_args(corpus, run_dir, f"trainer.resume={step_4}", "trainer.max_steps=6")
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"kiln train: rank 1: {step_4 / 'rng_rank1.pt'} is missing: this rank's random "
        "generators start afresh, so the resumed run is not bitwise the uninterrupted one\n"
    ) in result.stderr
    assert "rank 0: " not in result.stderr
    rows = records(run_dir)
    last_start = max(i for i, r in enumerate(rows) if r.get("event") == "start")
    assert rows[last_start]["step"] == 4
    assert sorted(train_losses(rows[last_start:])) == [5, 6]


def test_init_from_starts_a_new_run_on_another_engine(
    corpus: Path, tmp_path: Path, reference: Path
) -> None:
    """`trainer.init_from` the DDP reference run's step-8 checkpoint, trained with FSDP2: the
    weights arrive exactly (at a learning rate too small to move them, the run's final/ holds
    them bitwise), the step and data start afresh; the run's own checkpoint then wins over
    init_from (a requeue resumes), and another model is refused in one line per rank."""
    from safetensors.torch import load_file

    from pretrain.checkpoint_io import open_checkpoint

    step_8 = reference / "checkpoints" / "step_00000008"
    run_dir = tmp_path / "warm"
    args = train_args(corpus, run_dir, f"trainer.init_from={step_8}", "optim.lr=1e-30")
    args = [{"engine=ddp": "engine=fsdp", "trainer.max_steps=12": "trainer.max_steps=2",
             "trainer.checkpoint_every=4": "trainer.checkpoint_every=2"}.get(a, a) for a in args]  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"kiln train: weights from the ddp checkpoint {step_8} at step 8 (trainer.init_from)"
            in result.stdout)  # fmt: skip
    rows = records(run_dir)
    [start] = [r for r in rows if r.get("event") == "start"]
    assert start["init_from"] == str(step_8) and start["resumed_from"] is None
    assert sorted(train_losses(rows)) == [1, 2]  # step 1 of a new run ...
    # ... on step-8 weights: far below the loss the reference started from on the same batch
    assert train_losses(rows)[1] < train_losses(records(reference))[1] - 0.5
    final = load_file(run_dir / "final" / "model.safetensors")
    expected = open_checkpoint(step_8).load_model().state_dict()
    assert final.keys() <= expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in final)

    # a checkpoint of its own: resumed, init_from not read again
    args = ["trainer.max_steps=3" if a == "trainer.max_steps=2" else a for a in args]
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = [r for r in records(run_dir) if r.get("event") == "start"]
    assert starts[-1]["init_from"] is None
    assert Path(starts[-1]["resumed_from"]).name == "step_00000002"
    report = subprocess.run([str(KILN), "report", f"report.run_dir={run_dir}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert re.search(rf"\n  weights from +{re.escape(str(step_8))} \(trainer.init_from\)\n",
                     report.stdout)  # fmt: skip
    assert re.search(r"\n  resumed +1 time\(s\), at step 2 \(2 ranks\)\n", report.stdout)

    wider = train_args(corpus, tmp_path / "wider", f"trainer.init_from={step_8}",
                       "model.d_model=96")  # fmt: skip
    result = kiln_train(wider, tmp_path)
    assert result.returncode == 1
    said_by_the_ranks(result.stderr, (
        f"kiln train: rank {{rank}}: trainer.init_from={step_8} holds another model: "
        "embed.weight is [4096, 64] there, [4096, 96] here (and 19 more); the model config "
        "differs in model.d_model=64 (now 96). Give the run the checkpoint's model (model=... "
        "and model.* overrides)\n"))  # fmt: skip
    # rank 1, which waited for rank 0's shards, says it too: no gloo traceback, no torchrun
    # failure table
    assert "Traceback" not in result.stderr and "Root Cause" not in result.stderr, result.stderr
