"""`kiln report`: plots and a summary of a training run, or a summary of a data build.

    kiln report report.run_dir=RUN_DIR [report.output=DIR]
    kiln report report.data_dir=DATA_DIR
    kiln report experiment=NAME [overrides]

With neither report.run_dir nor report.data_dir, the composed config names what to report, as
it does for `kiln train`: its `trainer.run_dir`, or, before that run exists, its `data.path`
(a finished data build).

A run report reads `RUN_DIR/metrics.jsonl` (written by `pretrain.metrics.MetricsLogger`) and
writes one PNG per metric into `report.output` (default `RUN_DIR/report`): loss (train and eval)
against step, learning rate, tokens/s and MFU, and for a run evaluated on more than one source
the eval loss of each (`eval_loss_by_source.png`); a metric the run never logged gets no plot. It
prints a short summary (how the run stands: training now, finished, stopped by a signal,
diverged or ended without a word; its checkpoints; losses, speed) and the paths. A data report prints a table of the sources, tokens and
shards in a `kiln data` output's `report.json`. Both may be asked for at once.

Problems the user can fix (a missing directory, no metrics, an empty file) print one line and
exit 1. Plots use matplotlib's Agg canvas directly (no pyplot, no display).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import KilnConfig
from pretrain.exit_codes import INTERRUPTED_EXIT_CODE, NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE
from pretrain.metrics import METRICS_FILE, read_records
from pretrain.plan import human

ERROR_EXIT_CODE = 1
DATA_REPORT_FILE = "report.json"


@dataclass(frozen=True)
class Series:
    """One line of a plot: `field` of the records of `kind`."""

    kind: str
    field: str
    label: str


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: its file stem, axis label, lines, and a factor applied to the values."""

    name: str
    ylabel: str
    series: tuple[Series, ...]
    scale: float = 1.0


PLOTS = (
    PlotSpec(
        "loss", "loss", (Series("train", "loss", "train"), Series("eval", "eval_loss", "eval"))
    ),
    PlotSpec("lr", "learning rate", (Series("train", "lr", "lr"),)),
    PlotSpec("tokens_per_s", "tokens/s", (Series("train", "tokens_per_s", "tokens/s"),)),
    PlotSpec("mfu", "MFU (%)", (Series("train", "mfu", "MFU"),), scale=100.0),  # logged 0-1
)


SOURCE_LOSS = "eval_loss/"  # the eval loss of one source of the held-out split: + its name


def steady_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train records a speed median should read: not a profiled step, not a skipped one
    (no update ran), and not the first step after each start or resume (which compiles and
    warms up: the trainer's own ETA leaves it out too)."""
    steady, warming = [], True
    for record in records:
        if record.get("kind") == "event" and record.get("event") == "start":
            warming = True
        elif record.get("kind") == "train":
            if not (warming or record.get("profiled") or record.get("skipped")):
                steady.append(record)
            warming = False
    return steady


def eval_sources(records: Sequence[dict[str, Any]]) -> list[str]:
    """The sources whose eval losses the run logged (`eval_loss/SOURCE`), in logged order."""
    names = {key[len(SOURCE_LOSS) :]: None for r in records if r["kind"] == "eval"
             for key in r if key.startswith(SOURCE_LOSS)}  # fmt: skip
    return list(names)


def source_plot(records: Sequence[dict[str, Any]]) -> PlotSpec | None:
    """The eval loss of each source beside the overall one; None for a run without them."""
    names = eval_sources(records)
    if not names:
        return None
    series = [Series("eval", f"{SOURCE_LOSS}{name}", name) for name in names]
    return PlotSpec("eval_loss_by_source", "eval loss",
                    (Series("eval", "eval_loss", "all sources"), *series))  # fmt: skip


class ReportError(Exception):
    """A problem the user can fix; the message is printed on one line."""


def fail(message: str) -> int:
    print(f"kiln report: {message}", file=sys.stderr)
    return ERROR_EXIT_CODE


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def points(records: Sequence[dict[str, Any]], kind: str, field: str) -> tuple[list, list]:
    """(steps, values) of `field` in the records of `kind`, sorted by step."""
    pairs = sorted(
        (r["step"], r[field]) for r in records if r["kind"] == kind and is_number(r.get(field))
    )
    return [s for s, _ in pairs], [v for _, v in pairs]


# --------------------------------------------------------------------------------------------
# a run


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    """The train and eval records of a run directory, and its start, stop, final and
    `trainer.profile` events; `ReportError` when there are no train or eval records."""
    if not run_dir.is_dir():
        raise ReportError(f"report.run_dir={run_dir} is not a directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        if (run_dir / "manifest.json").is_file() or (run_dir / DATA_REPORT_FILE).is_file():
            raise ReportError(f"{run_dir} is a `kiln data` output, not a training run: pass "
                              f"report.data_dir={run_dir}")  # fmt: skip
        raise ReportError(f"no {METRICS_FILE} in {run_dir} (has the run logged a step yet?)")
    records, bad = read_records(path)
    if bad:  # skipped, and said: e.g. the last line cut by a killed run
        print(f"kiln report: skipped {bad} malformed line(s) in {path}", file=sys.stderr)
    if not any(r["kind"] in ("train", "eval") for r in records):
        raise ReportError(f"{path} has no train or eval records")
    events = ("profile", "start", "stopped", "final", "data")
    return [r for r in records if r["kind"] in ("train", "eval") or r.get("event") in events]


def plot(records: Sequence[dict[str, Any]], spec: PlotSpec, path: Path, title: str = "") -> bool:
    """Write `spec`'s PNG to `path`; False (and no file) when no record has its fields."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = [(s, *points(records, s.kind, s.field)) for s in spec.series]
    lines = [(s, steps, values) for s, steps, values in lines if steps]
    if not lines:
        return False
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for series, steps, values in lines:
        marker = "o" if series.kind == "eval" or len(steps) == 1 else None
        axes.plot(steps, [v * spec.scale for v in values], label=series.label, marker=marker)
    axes.set_xlabel("step")
    axes.set_ylabel(spec.ylabel)
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title)
    if len(lines) > 1:
        axes.legend()
    figure.savefig(path, dpi=100)
    return True


def summarize_run(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows: steps, where the weights came from and the resumes, losses,
    throughput, MFU, tokens, profiles.

    Steps recorded under `trainer.profile` (flagged `profiled`) are slowed by the profiler:
    the speed medians leave them out."""
    rows: list[tuple[str, str]] = []
    train_steps, losses = points(records, "train", "loss")
    logged = [r for r in records if r["kind"] in ("train", "eval")]
    steps = sorted({r["step"] for r in logged})
    counts = {kind: sum(r["kind"] == kind for r in logged) for kind in ("train", "eval")}
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    rows.append(("steps", f"{steps[0]:,} .. {steps[-1]:,} (records: {kinds})"))
    starts = [r for r in records if r.get("kind") == "event" and r.get("event") == "start"]
    init_from = next((r["init_from"] for r in starts if r.get("init_from")), None)
    if init_from:
        rows.append(("weights from", f"{init_from} (trainer.init_from)"))
    resumed = [r for r in starts if r.get("resumed_from")]
    if resumed:

        def ranks(record: dict[str, Any]) -> str:
            world = record.get("world_size")
            return "" if world is None else f" ({world} rank{'s' if world != 1 else ''})"

        at = ", ".join(f"{r['step']:,}{ranks(r)}" for r in resumed)
        rows.append(("resumed", f"{len(resumed)} time(s), at step {at}"))
    if losses:
        rows.append(("train loss", f"{losses[-1]:.4f} at step {train_steps[-1]:,}"))
    z_steps, z_losses = points(records, "train", "z_loss")  # objective.z_loss: added to it
    if z_losses:
        rows.append(("z-loss", f"{z_losses[-1]:.4g} at step {z_steps[-1]:,} (trained on; not "
                               "in the train loss)"))  # fmt: skip
    eval_steps, eval_losses = points(records, "eval", "eval_loss")
    finite = [(v, s) for s, v in zip(eval_steps, eval_losses, strict=True) if math.isfinite(v)]
    if finite:
        best, at = min(finite)
        rows.append(("best eval loss", f"{best:.4f} at step {at:,} (last {eval_losses[-1]:.4f})"))
    for name in eval_sources(records):  # the last eval loss of each source
        at_steps, values = points(records, "eval", f"{SOURCE_LOSS}{name}")
        if values:
            rows.append((f"eval loss ({name})", f"{values[-1]:.4f} at step {at_steps[-1]:,}"))
    unprofiled = steady_steps(records)
    for field, label, fmt in (
        ("tokens_per_s", "tokens/s (median, all ranks)", lambda v: human(v)),
        ("mfu", "MFU (median)", lambda v: f"{v:.1%}"),
        ("step_time", "step time (median)", lambda v: f"{v:.3g} s"),
    ):
        values = [v for v in points(unprofiled, "train", field)[1] if math.isfinite(v)]
        if values:
            rows.append((label, fmt(statistics.median(values))))
    _, tokens = points(records, "train", "tokens_seen")
    if tokens:
        rows.append(("tokens seen", f"{human(tokens[-1])} ({int(tokens[-1]):,})"))
    ledger = [r for r in records if r.get("event") == "data"]
    if ledger:  # the data ledger at the last checkpoint: epochs of each source read
        last = ledger[-1]
        epochs = ", ".join(f"{key.split('/', 1)[1]} {value:.3g}" for key, value in last.items()
                           if key.startswith("epochs/") and is_number(value))  # fmt: skip
        rows.append(("epochs read", f"{epochs} (at step {last['step']:,})"))
    for event in (r for r in records if r.get("kind") == "event" and r.get("event") == "profile"):
        top = event.get("profile/top") or []
        parts = [f"{t['name'][:48]} {t['share']:.0%}" for t in top[:3]]
        busy = event.get("device_busy")
        rows.append((
            f"profile, steps {event.get('first_step')}-{event['step']}",
            (f"device busy {busy:.0%}; " if busy is not None else "")
            + (f"top: {', '.join(parts)}; " if parts else "")
            + f"trace {event.get('trace')}",
        ))  # fmt: skip
    return rows


def run_status(run_dir: Path, records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows on how the run stands: training now (its lock is held), finished,
    stopped by a signal (resumable), diverged, or ended without a word (killed, crashed);
    then its newest checkpoints. `exit.json`, which rank 0 writes as the run ends, tells the
    end apart, unless it is older than the last record (a slice since then left none)."""
    from pretrain.run_lock import holder_of

    rows: list[tuple[str, str]] = []
    last = max((r["step"] for r in records if is_number(r.get("step"))), default=0)
    try:
        ended = json.loads((run_dir / "exit.json").read_text())
    except (OSError, ValueError):
        ended = None
    if not isinstance(ended, dict) or not is_number(ended.get("step")) or ended["step"] < last:
        ended = None
    holder = holder_of(run_dir)
    pointer = run_dir / "checkpoints" / "latest"
    if holder is not None:
        status = f"training now ({holder})"
    elif ended is None:
        then = ("trainer.resume=auto continues from its latest checkpoint" if pointer.is_file()
                else "it saved no checkpoint")  # fmt: skip
        status = f"ended after step {last:,} without an exit record (killed, or it crashed); {then}"
    else:
        code, step = ended.get("exit_code"), ended["step"]
        stops = [r for r in records if r.get("event") == "stopped" and r["step"] == step]
        if code == 0:
            status = f"finished at step {step:,}"
        elif code == REQUEUE_EXIT_CODE:
            status = (f"stopped by a signal at step {step:,}, saved (exit {code}); "
                      "trainer.resume=auto continues")  # fmt: skip
        elif code == INTERRUPTED_EXIT_CODE:
            status = (f"interrupted (Ctrl-C) after step {step:,}; trainer.resume=auto continues "
                      "from its latest checkpoint")  # fmt: skip
        elif code == NONFINITE_EXIT_CODE:
            why = stops[-1].get("reason") if stops else "non-finite losses"
            status = f"diverged at step {step:,}: {why} (exit {code})"
        elif ended.get("error"):
            status = f"stopped after step {step:,} (exit {code}): {ended['error']}"
        else:
            status = f"ended at step {step:,} with exit {code}"
    rows.append(("status", status))
    if ended is not None and ended.get("nonfinite_steps"):
        rows.append(("non-finite steps", f"{ended['nonfinite_steps']:,} skipped"))
    if pointer.is_file():
        rows.append(("latest checkpoint", str(pointer.parent / pointer.read_text().strip())))
    final = run_dir / "final" / "config.json"
    if final.is_file():
        try:
            step = json.loads(final.read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            step = None
        rows.append(("final", f"{final.parent}" + (f" (step {step:,})" if is_number(step) else "")))
    return rows


def report_run(run_dir: Path, output: Path | None) -> list[Path]:
    """Plot a run's metrics and print a summary and the PNG paths; returns the paths."""
    records = load_run(run_dir)
    out = output if output is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_source = source_plot(records)
    for spec in (*PLOTS, *([by_source] if by_source else [])):
        path = out / f"{spec.name}.png"
        if plot(records, spec, path, title=f"{run_dir.resolve().name}: {spec.ylabel}"):
            written.append(path)
    print(f"kiln report: {run_dir}")
    rows = run_status(run_dir, records) + summarize_run(records)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for path in written:
        print(f"wrote {path}")
    return written


# --------------------------------------------------------------------------------------------
# a data build


def load_data_report(data_dir: Path) -> dict[str, Any]:
    if not data_dir.is_dir():
        raise ReportError(f"report.data_dir={data_dir} is not a directory")
    path = data_dir / DATA_REPORT_FILE
    if not path.is_file():
        if (data_dir / ".work").is_dir():  # data_pipeline.pipeline.WORK_DIR
            raise ReportError(
                f"{data_dir} is a `kiln data` build that has not finished (no {DATA_REPORT_FILE}"
                " yet): running now, or stopped; the same `kiln data` command resumes it"
            )
        if (data_dir / METRICS_FILE).is_file():
            raise ReportError(f"{data_dir} is a training run, not a `kiln data` output: pass "
                              f"report.run_dir={data_dir}")  # fmt: skip
        raise ReportError(f"no {DATA_REPORT_FILE} in {data_dir} (is it a `kiln data` output?)")
    try:
        report = json.loads(path.read_text())
    except ValueError as error:  # JSON and UTF-8 errors
        raise ReportError(f"{path} is not JSON: {error}") from error
    if not isinstance(report, dict) or not isinstance(report.get("sources"), dict):
        raise ReportError(f"{path} has no 'sources' (is it a `kiln data` report?)")
    bad = sorted(name for name, source in report["sources"].items() if not isinstance(source, dict))
    if bad:
        raise ReportError(f"{path}: sources {bad} are not objects (is it a `kiln data` report?)")
    return report


def render_data_report(report: dict[str, Any]) -> str:
    """A short table: per source, documents, train and val tokens, shards; then totals."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110, file=open("/dev/null", "w"))  # noqa: SIM115
    table = Table(
        title=f"kiln data: {report.get('output_dir', '?')} (status {report.get('status', '?')})",
        title_justify="left",
    )
    for column in ("source", "weight", "docs out", "train tokens", "val tokens", "shards", "share"):
        table.add_column(column, justify="left" if column == "source" else "right")
    totals = {"docs": 0, "train": 0, "val": 0, "shards": 0}
    for name, source in report["sources"].items():
        docs = sum(source.get("documents_out", {}).values())
        tokens = source.get("tokens_out", {})
        shards = sum(source.get("shards", {}).values())
        totals["docs"] += docs
        totals["train"] += tokens.get("train", 0)
        totals["val"] += tokens.get("val", 0)
        totals["shards"] += shards
        table.add_row(
            name,
            f"{source.get('weight', 0):g}",
            f"{docs:,}",
            f"{tokens.get('train', 0):,}",
            f"{tokens.get('val', 0):,}",
            str(shards),
            f"{source.get('natural_share', 0.0):.1%}",
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        f"{totals['docs']:,}",
        f"{totals['train']:,}",
        f"{totals['val']:,}",
        str(totals["shards"]),
        "",
    )
    console.print(table)
    if report.get("status") != "ok" and report.get("message"):  # why the build stopped
        console.print(f"{report.get('status', '?')}: {report['message']}", markup=False)
    tokenizer = report.get("tokenizer")
    if isinstance(tokenizer, dict) and "vocab_size" in tokenizer:
        console.print(f"tokenizer: vocab {tokenizer['vocab_size']:,}")
    return console.export_text()


# --------------------------------------------------------------------------------------------
# entry point


def composed_target(cfg: KilnConfig) -> tuple[str | None, str | None]:
    """(run_dir, data_dir) to report when neither report.run_dir nor report.data_dir is
    given: the composed run (`trainer.run_dir`) when it exists, else the composed data build
    (a local `data.path`) when it has finished (its report.json), else (None, None)."""
    from pretrain.data import remote

    if Path(cfg.trainer.run_dir).is_dir():
        return cfg.trainer.run_dir, None
    if not remote.is_remote(cfg.data.path):
        data_dir = remote.local_path(cfg.data.path)
        if (data_dir / DATA_REPORT_FILE).is_file():
            return None, str(data_dir)
    return None, None


def run(cfg: KilnConfig) -> int:
    """Entry point of `kiln report`. With neither report.run_dir nor report.data_dir, the
    composed config says what to report: `kiln report experiment=NAME` reports that
    experiment's run (or, before it has one, its data build)."""
    settings = cfg.report
    run_dir, data_dir = settings.run_dir, settings.data_dir
    if run_dir is None and data_dir is None:
        run_dir, data_dir = composed_target(cfg)
        if run_dir is None and data_dir is None:
            return fail(
                f"nothing to report: no run at trainer.run_dir={cfg.trainer.run_dir} and no "
                f"data build at data.path={cfg.data.path}; pass report.run_dir=RUN_DIR (a "
                "training run) or report.data_dir=DIR (a `kiln data` output)"
            )
        if data_dir is not None:
            print(f"kiln report: no run at trainer.run_dir={cfg.trainer.run_dir} yet; the data "
                  f"build at data.path={cfg.data.path}:")  # fmt: skip
    try:
        if data_dir is not None:
            sys.stdout.write(render_data_report(load_data_report(Path(data_dir))))
        if run_dir is not None:
            output = Path(settings.output) if settings.output else None
            report_run(Path(run_dir), output)
    except ReportError as error:
        return fail(str(error))
    return 0
