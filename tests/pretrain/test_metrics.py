"""`MetricsLogger`: metrics.jsonl, console lines and a real offline W&B run (no network)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain.config import (
    CausalLMConfig,
    DDPEngineConfig,
    DecoderConfig,
    KilnConfig,
    LoggerConfig,
    SlurmClusterConfig,
)
from pretrain.metrics import (
    REDACTED,
    RUN_ID_FILE,
    MetricsLogger,
    api_key_configured,
    is_secret_key,
    read_records,
    resolve_mode,
    scrub_secrets,
)

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits, like a real key
FAKE_HF_TOKEN = "hf_fAkEtOkEnFoRtEsTs"


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, no user files: offline, silent, a fake key, HOME and W&B dirs in tmp."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))


def make_config(**logger: Any) -> KilnConfig:
    # The Slurm setup lines and the W&B key are the kind of thing that must not reach W&B.
    cluster = SlurmClusterConfig(
        setup=[f"export WANDB_API_KEY={FAKE_KEY}", f"export HF_TOKEN={FAKE_HF_TOKEN}", "ml cuda"]
    )
    return KilnConfig(
        model=DecoderConfig(n_layers=2, d_model=64),
        objective=CausalLMConfig(),
        engine=DDPEngineConfig(),
        cluster=cluster,
        logger=LoggerConfig(**({"mode": "offline"} | logger)),
        run_name="tiny-run",
        experiment_name="exp",
    )


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a `.wandb` file: a LevelDB-style log (a 7-byte file header,
    then 32 KiB blocks of chunks, each with a crc32, length and FULL/FIRST/MIDDLE/LAST type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    block, header, pos, pending = 32768, 7, 7, b""
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # a block's tail too short for a chunk header is zero padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if pos + header + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending = (b"" if kind == 2 else pending) + chunk
            continue
        assert kind in (1, 4), kind  # FULL, LAST
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        pending = b""
        yield record


def complete_records(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a `.wandb` file once W&B's service has written the last one (`exit`):
    `run.finish()` can return before the service has flushed the file (seen under load)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path)) if path.stat().st_size >= 7 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def read_offline_run(
    directory: Path,
) -> tuple[Any, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(the run record, its config, history rows by step, summary) of an offline run
    directory."""
    [path] = directory.glob("run-*.wandb")
    run, history, summary = None, [], {}
    for record in complete_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            # A key with "/" is stored as its parts in nested_key.
            items = record.history.item
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in items
                }
            )
    assert run is not None
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return run, config, history, summary


def test_records_go_to_jsonl_console_and_an_offline_wandb_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    cfg = make_config(group="ablation", tags=["tiny", "cpu"])
    logger = MetricsLogger(cfg, run_dir)
    assert logger.mode == "offline" and logger.run_id is not None
    logged = [
        logger.log(
            {"kind": "train", "step": 10, "loss": 4.5, "lr": 3e-4, "tokens_per_s": 12345.6}
            | {"mfu": 0.31, "skipped": False}
        ),
        logger.log({"step": 20, "loss": torch.tensor(4.25), "lr": 6e-4, "tokens_seen": 40960}),
        logger.log(
            {"kind": "eval", "step": 20, "eval_loss": 4.4, "eval_ppl": 81.45}
            | {"eval_loss/web": 4.125, "eval_loss/code": 5.0}
        ),
        logger.event(20, "checkpoint", path="ckpt/step_20", resumed_from=None, seconds=1.5),
        logger.event(20, "eval_done", seconds=0.25),
    ]
    directory = logger.finish()
    assert logger.finish() is None  # a second call is harmless

    # metrics.jsonl holds exactly what was logged, one object per line.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == logged
    assert logged[1]["loss"] == 4.25 and isinstance(logged[1]["loss"], float)
    assert [r["kind"] for r in logged] == ["train", "train", "eval", "event", "event"]
    assert all(r["time"] > 0 for r in logged)

    out = capsys.readouterr().out
    # one notation per field (lr, counts whole); False and None left to metrics.jsonl
    assert "step 10 | train | loss 4.5 | lr 3.000e-04 | tokens_per_s 12,346 | mfu 0.31\n" in out
    # the losses of each source end the eval line together
    assert "step 20 | eval | eval_loss 4.4 | eval_ppl 81.45 | by source: web 4.125, code 5\n" in out
    assert "step 20 | event | event checkpoint | path ckpt/step_20 | seconds 1.5\n" in out
    assert f"wandb sync {directory}" in out

    # The offline run: in RUN_DIR/wandb, named by the persisted id, holding config and metrics.
    assert directory is not None and directory.parent == run_dir / "wandb"
    assert directory.name.startswith("offline-run-") and directory.name.endswith(logger.run_id)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == logger.run_id
    run, config, history, summary = read_offline_run(directory)
    assert run.run_id == logger.run_id and run.display_name == "tiny-run"
    assert (
        run.project == "kiln" and run.run_group == "ablation" and list(run.tags) == ["tiny", "cpu"]
    )
    assert config["model"]["d_model"] == 64 and config["model"]["family"] == "decoder"
    assert config["engine"]["kind"] == "ddp" and config["run_name"] == "tiny-run"
    assert config["cluster"]["setup"] == [
        f"export WANDB_API_KEY={REDACTED}",
        f"export HF_TOKEN={REDACTED}",
        "ml cuda",
    ]
    by_step = {row["_step"]: row for row in history}
    assert by_step[10]["train/loss"] == 4.5 and by_step[10]["train/mfu"] == 0.31
    assert by_step[20]["train/loss"] == 4.25 and by_step[20]["train/tokens_seen"] == 40960
    assert by_step[20]["eval/eval_loss"] == 4.4 and by_step[20]["eval/eval_ppl"] == 81.45
    assert by_step[20]["eval/eval_loss/web"] == 4.125 and by_step[20]["eval/eval_loss/code"] == 5.0
    assert by_step[10]["train/skipped"] is False
    # An event's numbers under its name (a checkpoint's seconds apart from others'), its text
    # in the summary; None stays in metrics.jsonl.
    assert by_step[20]["event/checkpoint/seconds"] == 1.5
    assert by_step[20]["event/eval_done/seconds"] == 0.25
    assert summary["event/checkpoint/path"] == "ckpt/step_20"
    assert not any("resumed_from" in key for row in history for key in row)

    # No secret anywhere under the run directory (logs, config, the .wandb file).
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_KEY.encode() not in data, path
            assert FAKE_HF_TOKEN.encode() not in data, path


def test_a_resumed_run_appends_and_continues_the_same_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = make_config()
    with MetricsLogger(cfg, run_dir, console=False) as first:
        first.log({"step": 1, "loss": 2.0})
        run_id = first.run_id
    with MetricsLogger(cfg, run_dir, console=False) as second:
        assert second.run_id == run_id
        second.log({"step": 2, "loss": 1.5})
    records, bad = read_records(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5)] and bad == 0
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # One directory per start (W&B adds "-1" when two starts share a second).
    assert len(runs) == 2 and all(f"-{run_id}" in d.name for d in runs)
    # the first start's file is complete; under load the second's may still be flushing, and
    # its directory name already carries the id
    assert read_offline_run(runs[0])[0].run_id == run_id
    # A run id carried by a checkpoint wins over the file, and is stored for the next start.
    with MetricsLogger(cfg, run_dir, run_id="ckpt1234", console=False) as third:
        assert third.run_id == "ckpt1234"
    assert (run_dir / RUN_ID_FILE).read_text().strip() == "ckpt1234"


def test_wandb_dir_puts_the_wandb_files_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WANDB_DIR (a local disk, away from a shared run directory) is where W&B writes; the run
    id stays with the run."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "local"))
    run_dir = tmp_path / "run"
    with MetricsLogger(make_config(), run_dir, console=False) as logger:
        logger.log({"step": 1, "loss": 2.0})
        directory = logger.wandb_dir
    assert directory is not None and directory.parent == tmp_path / "local" / "wandb"
    assert not (run_dir / "wandb").exists()
    assert (run_dir / RUN_ID_FILE).read_text().strip() == logger.run_id


def test_disabled_and_none_write_only_the_jsonl(tmp_path: Path) -> None:
    for name, logger_cfg in {
        "disabled": {"mode": "disabled"},
        "none": {"backend": "none", "mode": "online"},
    }.items():
        run_dir = tmp_path / name
        logger = MetricsLogger(make_config(**logger_cfg), run_dir, console=False)
        assert logger.mode is None and logger.run_id is None
        logger.log({"step": 5, "loss": 1.0})
        assert logger.finish() is None
        assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_mode_is_offline_unless_online_is_asked_for_and_a_key_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online, offline = LoggerConfig(mode="online"), LoggerConfig(mode="offline")
    assert resolve_mode(online) == "online"  # the fake key counts as configured
    assert resolve_mode(offline) == "offline"
    assert resolve_mode(LoggerConfig(mode="disabled")) is None
    assert resolve_mode(LoggerConfig(backend="none")) is None
    monkeypatch.delenv("WANDB_API_KEY")
    assert not api_key_configured() and resolve_mode(online) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert api_key_configured() and resolve_mode(online) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:443")
    assert not api_key_configured()  # the entry is for another host


def test_online_without_a_key_falls_back_to_offline_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WANDB_API_KEY")
    logger = MetricsLogger(make_config(mode="online"), tmp_path / "run", console=False)
    assert logger.mode == "offline"
    logger.finish()
    err = capsys.readouterr().err
    assert "logging offline" in err


def test_scrub_secrets_redacts_secret_keys_assignments_and_known_values() -> None:
    config = {
        "api_key": "k1",
        "wandb": {"API-KEY": "k2", "hf_token": "k3", "db_password": "k4", "client_secret": "k5"},
        "access_key": "k6",
        "max_tokens": 1000,
        "tokenizer": {"path": "tok.model", "vocab_size": 4096},
        "tokens_per_param": 20.0,
        "block_tokens": 65536,
        "token": None,  # nothing to hide
        "setup": ["export GITHUB_TOKEN=ghp_x", "echo hi", f"note {FAKE_KEY} inline"],
    }
    scrubbed = scrub_secrets(config, (FAKE_KEY,))
    assert scrubbed == {
        "api_key": REDACTED,
        "wandb": {"API-KEY": REDACTED, "hf_token": REDACTED, "db_password": REDACTED}
        | {"client_secret": REDACTED},
        "access_key": REDACTED,
        "max_tokens": 1000,
        "tokenizer": {"path": "tok.model", "vocab_size": 4096},
        "tokens_per_param": 20.0,
        "block_tokens": 65536,
        "token": None,
        "setup": [f"export GITHUB_TOKEN={REDACTED}", "echo hi", f"note {REDACTED} inline"],
    }
    assert config["api_key"] == "k1"  # the input is not modified
    assert is_secret_key("WANDB_API_KEY") and not is_secret_key("seq_len_warmup_start")


def test_a_cut_line_stays_apart_and_readers_keep_the_last_record_per_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "kind": "train", "loss": 3.0}\n{"step": 2, "kind": "train", "lo'
    )
    cfg = make_config(backend="none")
    with MetricsLogger(cfg, run_dir, console=False) as logger:
        logger.log({"step": 2, "loss": 2.5})  # the resumed run logs step 2 again
        logger.log({"step": 2, "kind": "eval", "eval_loss": 2.7})
        logger.event(2, "start")
        logger.event(2, "start")
        logger.log({"step": 3, "loss": float("nan")})
        with pytest.raises(ValueError, match="kind='metrics'"):
            logger.log({"step": 4, "kind": "metrics", "loss": 1.0})
        with pytest.raises(ValueError, match="needs an int 'step'"):
            logger.log({"loss": 1.0})
    records, bad = read_records(run_dir / "metrics.jsonl")
    assert bad == 1
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("event", 2),
        ("event", 2),
        ("train", 3),
    ]
    assert records[1]["loss"] == 2.5 and records[-1]["loss"] != records[-1]["loss"]  # NaN
