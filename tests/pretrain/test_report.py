"""`kiln report`: PNG plots of a run's metrics.jsonl, a data build's summary, and the errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import (
    CausalLMConfig,
    DDPEngineConfig,
    DecoderConfig,
    KilnConfig,
    LocalClusterConfig,
    ReportConfig,
)
from pretrain.report import run

KILN = shutil.which("kiln", path=str(Path(sys.executable).parent)) or "kiln"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def config(**report: str) -> KilnConfig:
    return KilnConfig(
        model=DecoderConfig(),
        objective=CausalLMConfig(),
        engine=DDPEngineConfig(),
        cluster=LocalClusterConfig(),
        report=ReportConfig(**report),
    )


def write_metrics(run_dir: Path, steps: int = 50, fields: tuple[str, ...] | None = None) -> None:
    """A synthetic run: train records every step, eval every 10, an event, a resumed repeat
    of step 20 and a line cut by a crash."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "kind": "train",
            "time": 1.7e9 + step,
            "loss": 8.0 * math.exp(-step / 20) + 2.0,
            "lr": 3e-4 * min(1.0, step / 10),
            "grad_norm": 1.0,
            "tokens_per_s": 50_000.0 + step,
            "tokens_seen": 4096 * step,
            "mfu": 0.35,
            "step_time": 0.08,
        }
        if fields is not None:
            record = {k: v for k, v in record.items() if k in ("step", "kind", "time", *fields)}
        lines.append(json.dumps(record))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "kind": "eval", "eval_loss": 9.0 - step / 10}))
    lines.insert(5, json.dumps({"step": 5, "kind": "event", "message": "resumed"}))
    lines.append(json.dumps({"step": 20, "kind": "eval", "eval_loss": 1.5}))  # a resumed repeat
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 51, "ki\n')


def summary_rows(out: str) -> dict[str, str]:
    """The `  label  value` rows of a printed run summary."""
    rows = [line.strip().split("  ", 1) for line in out.splitlines() if line.startswith("  ")]
    return {label: value.strip() for label, value in rows}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"  # complete file
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def test_run_report_writes_one_png_per_metric_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    assert run(config(run_dir=str(run_dir))) == 0
    out, err = capsys.readouterr()
    # the line cut by a kill is skipped and said
    assert err == f"kiln report: skipped 1 malformed line(s) in {run_dir}/metrics.jsonl\n"
    names = ["loss.png", "lr.png", "tokens_per_s.png", "mfu.png"]
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == sorted(names)
    for name in names:
        assert_png(run_dir / "report" / name)
        assert f"wrote {run_dir / 'report' / name}" in out
    rows = summary_rows(out)
    assert rows["steps"] == "1 .. 50 (records: 50 train, 5 eval)"
    assert rows["best eval loss"] == "1.5000 at step 20 (last 4.0000)"  # the repeat of step 20
    assert rows["MFU (median)"] == "35.0%"
    assert rows["tokens seen"] == "205K (204,800)"
    assert rows["tokens/s (median, all ranks)"] == "50K"
    assert rows["status"] == ("ended after step 50 without an exit record (killed, or it "
                              "crashed); it saved no checkpoint")  # fmt: skip
    # bytes that are not UTF-8 spoil their line only
    with open(run_dir / "metrics.jsonl", "ab") as metrics:
        metrics.write(b'{"step": 52, "kind": "train", \xff\xfe}\n')
    assert run(config(run_dir=str(run_dir))) == 0
    out, err = capsys.readouterr()
    assert "skipped 2 malformed line(s)" in err and "1 .. 50" in out


def test_the_eval_loss_of_each_source_has_a_plot_and_a_summary_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run evaluated on two sources (`eval_loss/SOURCE`): their own plot beside the overall
    eval loss, and each one's last eval loss in the summary."""
    run_dir = tmp_path / "run"
    write_metrics(run_dir, steps=30)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        for step in (10, 20, 30):
            web, code = 6.0 - step / 10, 4.0 - step / 20
            metrics.write(json.dumps({"step": step, "kind": "eval", "eval_loss": (web + code) / 2,
                                      "eval_loss/web": web, "eval_loss/code": code}) + "\n")  # fmt: skip
    assert run(config(run_dir=str(run_dir))) == 0
    out = capsys.readouterr().out
    rows = summary_rows(out)
    assert rows["eval loss (web)"] == "3.0000 at step 30"
    assert rows["eval loss (code)"] == "2.5000 at step 30"
    assert rows["best eval loss"] == "2.7500 at step 30 (last 2.7500)"
    assert_png(run_dir / "report" / "eval_loss_by_source.png")
    assert f"wrote {run_dir / 'report' / 'eval_loss_by_source.png'}" in out


def test_only_logged_metrics_are_plotted_and_output_is_honoured(tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "plots" / "here"
    write_metrics(run_dir, steps=3, fields=("loss", "lr"))
    assert run(config(run_dir=str(run_dir), output=str(out_dir))) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["loss.png", "lr.png"]
    assert not (run_dir / "report").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", "report.run_dir={run_dir} is not a directory"),
        ("no_metrics", "no metrics.jsonl in {run_dir}"),
        ("empty", "{run_dir}/metrics.jsonl has no train or eval records"),
        ("events_only", "{run_dir}/metrics.jsonl has no train or eval records"),
    ],
)
def test_run_errors_are_one_line_and_exit_1(
    setup: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    if setup != "missing_dir":
        run_dir.mkdir()
    if setup == "empty":
        (run_dir / "metrics.jsonl").write_text("")
    if setup == "events_only":
        (run_dir / "metrics.jsonl").write_text('{"step": 0, "kind": "event", "message": "x"}\n')
    assert run(config(run_dir=str(run_dir))) == 1
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith("kiln report: " + message.format(run_dir=run_dir))
    assert captured.out == ""


def test_nothing_to_report_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config()
    cfg.trainer.run_dir, cfg.data.path = str(tmp_path / "run"), str(tmp_path / "data")
    assert run(cfg) == 1
    assert capsys.readouterr().err == (
        f"kiln report: nothing to report: no run at trainer.run_dir={tmp_path}/run and no data "
        f"build at data.path={tmp_path}/data; pass report.run_dir=RUN_DIR (a training run) or "
        "report.data_dir=DIR (a `kiln data` output)\n"
    )


def data_report() -> dict:
    def source(weight: float, docs: int, train: int, val: int, shards: int, share: float) -> dict:
        return {
            "weight": weight,
            "natural_share": share,
            "documents_out": {"train": docs - 1, "val": 1},
            "tokens_out": {"train": train, "val": val},
            "shards": {"train": shards - 1, "val": 1},
        }

    return {
        "status": "ok",
        "output_dir": "out/data",
        "sources": {
            "code": source(2.0, 120, 1_500_000, 15_000, 3, 0.75),
            "prose": source(1.0, 80, 500_000, 5_000, 2, 0.25),
        },
        "stages": {},
        "tokenizer": {"vocab_size": 4096, "model_type": "bpe"},
    }


def test_data_report_prints_sources_tokens_and_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "report.json").write_text(json.dumps(data_report()))
    assert run(config(data_dir=str(data_dir))) == 0
    out = capsys.readouterr().out
    assert "kiln data: out/data (status ok)" in out
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("│") and (cells := [c.strip() for c in line.strip("│").split("│")])
    }
    assert rows == {
        "code": ["2", "120", "1,500,000", "15,000", "3", "75.0%"],
        "prose": ["1", "80", "500,000", "5,000", "2", "25.0%"],
        "total": ["", "200", "2,000,000", "20,000", "5", ""],
    }
    assert "tokenizer: vocab 4,096" in out
    failed = data_report() | {"status": "failed", "message": "12 of 40 documents are bad [x]"}
    (data_dir / "report.json").write_text(json.dumps(failed))
    assert run(config(data_dir=str(data_dir))) == 0
    assert "failed: 12 of 40 documents are bad [x]" in capsys.readouterr().out  # why it stopped


def test_the_summary_says_how_the_run_stands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """exit.json (written by rank 0 as a run ends) tells finished, stopped by a signal and
    diverged apart; none, or one older than the last record, is a run that ended without a
    word; a held lock is a run training now. The newest checkpoints are named."""
    from pretrain.run_lock import hold

    run_dir = tmp_path / "run"
    write_metrics(run_dir, steps=20)

    def status(exit_record: dict | None = None) -> dict[str, str]:
        exit_file = run_dir / "exit.json"
        exit_file.unlink(missing_ok=True)
        if exit_record is not None:
            exit_file.write_text(json.dumps(exit_record))
        assert run(config(run_dir=str(run_dir))) == 0
        return summary_rows(capsys.readouterr().out)

    assert "latest checkpoint" not in status() and "final" not in status()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_00000020\n")
    assert status()["status"] == ("ended after step 20 without an exit record (killed, or it "
                                  "crashed); trainer.resume=auto continues from its latest "
                                  "checkpoint")  # fmt: skip
    (run_dir / "final").mkdir()
    (run_dir / "final" / "config.json").write_text('{"format": "kiln-consolidated", "step": 20}')
    rows = status({"exit_code": 0, "step": 20, "nonfinite_steps": 0})
    assert rows["status"] == "finished at step 20"
    assert rows["latest checkpoint"] == f"{run_dir}/checkpoints/step_00000020"
    assert rows["final"] == f"{run_dir}/final (step 20)"
    assert "non-finite steps" not in rows
    rows = status({"exit_code": 42, "step": 20, "nonfinite_steps": 0})
    assert rows["status"] == ("stopped by a signal at step 20, saved (exit 42); "
                              "trainer.resume=auto continues")  # fmt: skip
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"step": 20, "kind": "event", "event": "stopped",
                                  "reason": "5 non-finite steps in a row"}) + "\n")  # fmt: skip
    rows = status({"exit_code": 3, "step": 20, "nonfinite_steps": 7})
    assert rows["status"] == "diverged at step 20: 5 non-finite steps in a row (exit 3)"
    assert rows["non-finite steps"] == "7 skipped"
    rows = status({"exit_code": 0, "step": 8})  # an earlier slice's: this one left none
    assert rows["status"].startswith("ended after step 20 without an exit record")
    with hold(run_dir):
        rows = status({"exit_code": 42, "step": 20})
    assert rows["status"].startswith("training now (pid ")


def test_data_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config(data_dir=str(tmp_path / "nope"))) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert run(config(data_dir=str(tmp_path))) == 1
    assert f"no report.json in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("{not json")
    assert run(config(data_dir=str(tmp_path))) == 1
    assert "is not JSON" in capsys.readouterr().err
    (tmp_path / "report.json").write_bytes(b'{"sources": "\xff"}')  # not UTF-8
    assert run(config(data_dir=str(tmp_path))) == 1
    assert "is not JSON" in capsys.readouterr().err
    (tmp_path / "report.json").write_text('{"sources": {"a": 5}}')
    assert run(config(data_dir=str(tmp_path))) == 1
    assert "sources ['a'] are not objects" in capsys.readouterr().err
    # the other kind of directory, and a build not finished yet, are named as such
    (tmp_path / "report.json").unlink()
    (tmp_path / ".work").mkdir()
    assert run(config(data_dir=str(tmp_path))) == 1
    assert "a `kiln data` build that has not finished" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert run(config(run_dir=str(tmp_path))) == 1
    assert f"is a `kiln data` output, not a training run: pass report.data_dir={tmp_path}" in (
        capsys.readouterr().err
    )
    run_dir = tmp_path / "run"
    write_metrics(run_dir, steps=2)
    assert run(config(data_dir=str(run_dir))) == 1
    assert f"is a training run, not a `kiln data` output: pass report.run_dir={run_dir}" in (
        capsys.readouterr().err
    )


def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [KILN, "report", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_kiln_report_end_to_end_writes_only_the_plots(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    write_metrics(run_dir)
    result = kiln(f"report.run_dir={run_dir}", f"report.output={out_dir}", cwd=work)
    assert result.returncode == 0, result.stderr
    for name in ("loss", "lr", "tokens_per_s", "mfu"):
        assert f"wrote {out_dir / name}.png" in result.stdout
        assert_png(out_dir / f"{name}.png")
    assert list(work.iterdir()) == []  # no Hydra run directory, no log file
    missing = kiln(f"report.run_dir={tmp_path / 'absent'}", cwd=work)
    assert missing.returncode == 1 and missing.stdout == ""
    assert (
        missing.stderr.strip()
        == f"kiln report: report.run_dir={tmp_path / 'absent'} is not a directory"
    )
    assert list(work.iterdir()) == []


def test_kiln_report_of_an_experiment_reports_its_run_else_its_data(tmp_path: Path) -> None:
    """`kiln report experiment=demo`, as `make demo` runs it: the composed trainer.run_dir;
    before that run exists, the composed data.path's build; neither: both named."""
    result = kiln("experiment=demo", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "kiln report: nothing to report: no run at trainer.run_dir=out/demo/run and no data "
        "build at data.path=out/demo/data; pass report.run_dir=RUN_DIR (a training run) or "
        "report.data_dir=DIR (a `kiln data` output)\n"
    )
    data_dir = tmp_path / "out" / "demo" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "report.json").write_text(json.dumps(data_report()))
    result = kiln("experiment=demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kiln report: no run at trainer.run_dir=out/demo/run yet; "
                                    "the data build at data.path=out/demo/data:\n")  # fmt: skip
    assert "tokenizer: vocab 4,096" in result.stdout
    write_metrics(tmp_path / "out" / "demo" / "run")
    result = kiln("experiment=demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kiln report: out/demo/run\n")
    assert "wrote out/demo/run/report/loss.png" in result.stdout
    assert_png(tmp_path / "out" / "demo" / "run" / "report" / "loss.png")


def test_profiled_steps_stay_out_of_the_medians_and_the_profile_is_summarized() -> None:
    from pretrain.report import summarize_run

    records = [
        {"step": s, "kind": "train", "loss": 3.0, "tokens_per_s": 100.0, "step_time": 0.1}
        for s in range(1, 6)
    ] + [
        {"step": s, "kind": "train", "loss": 3.0, "tokens_per_s": 10.0, "step_time": 1.0,
         "profiled": True}
        for s in range(6, 12)
    ] + [
        {"step": 11, "kind": "event", "event": "profile", "first_step": 6, "device_busy": 0.75,
         "trace": "runs/x/profile/step6-11/rank0.trace.json.gz",
         "profile/top": [{"name": "sm90_gemm", "share": 0.4}, {"name": "triton_red", "share": 0.1}]}
    ]  # fmt: skip
    rows = dict(summarize_run(records))
    assert rows["steps"] == "1 .. 11 (records: 11 train)"
    assert rows["tokens/s (median, all ranks)"] == "100"
    assert rows["step time (median)"] == "0.1 s"
    assert rows["profile, steps 6-11"] == (
        "device busy 75%; top: sm90_gemm 40%, triton_red 10%; "
        "trace runs/x/profile/step6-11/rank0.trace.json.gz"
    )


def test_the_summary_says_where_the_weights_came_from_and_each_resume() -> None:
    from pretrain.report import summarize_run

    start = {"kind": "event", "event": "start", "resumed_from": None, "init_from": None}
    records = [
        start | {"step": 0, "world_size": 2, "init_from": "runs/base/checkpoints/step_00000800"},
        *({"step": s, "kind": "train", "loss": 3.0} for s in range(1, 9)),
        start | {"step": 4, "world_size": 1, "resumed_from": "runs/x/checkpoints/step_00000004"},
        start | {"step": 8, "world_size": 2, "resumed_from": "runs/x/checkpoints/step_00000008"},
    ]
    rows = dict(summarize_run(records))
    assert rows["weights from"] == "runs/base/checkpoints/step_00000800 (trainer.init_from)"
    assert rows["resumed"] == "2 time(s), at step 4 (1 rank), 8 (2 ranks)"
    assert "weights from" not in dict(summarize_run(records[1:9]))
    assert "resumed" not in dict(summarize_run(records[:9]))


def test_the_speed_medians_leave_out_warm_up_and_skipped_steps() -> None:
    """The first step after each start or resume compiles and warms up, and a skipped step
    runs no update: neither is in the tokens/s, MFU and step-time medians (a 3-step resumed
    run's median was its warm-up step's)."""
    from pretrain.report import summarize_run

    def train(step: int, speed: float, **extra: object) -> dict:
        return {"step": step, "kind": "train", "loss": 3.0, "tokens_per_s": speed,
                "step_time": 1.0 / speed, "mfu": speed / 1000, **extra}  # fmt: skip

    start = {"kind": "event", "event": "start"}
    records = [start, train(1, 1.0), train(2, 100.0), train(3, 100.0),
               start | {"step": 3}, train(4, 2.0), train(5, 1.0, skipped=True),
               train(6, 1.0, skipped=True), train(7, 100.0)]  # fmt: skip
    rows = dict(summarize_run(records))
    assert rows["tokens/s (median, all ranks)"] == "100"
    assert rows["step time (median)"] == "0.01 s"
    assert rows["MFU (median)"] == "10.0%"
